"""``hypersd-train feedback`` and ``dmd`` data-parallel under ``accelerate launch``: two CPU
processes (gloo), as ``test_training_accelerate`` runs TSCD.

The processes take different prompts (the global batch index ``step x 2 + rank``), yet end with
the same new LoRA (and, for DMD, the same fake-score LoRA and DMD2 GAN heads): their gradients
are averaged. Only the main process logs, checkpoints and exports; a stopped launch resumes from
the main process's checkpoint. Prompts streamed from a webdataset or an encoded folder split the
same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_training_accelerate import launch
from test_training_distill import TARGETS
from test_training_encode import encode_config
from test_training_prompt_sources import source_captions

from training import encode
from training.lora_export import read_lora

ROOT = Path(__file__).resolve().parents[1]

# Runs under the launcher in each process: the CLI, plus each process's trained weights saved
# at the end of training and the captions of every batch it drew.
HARNESS = """
import json
import sys

from accelerate import PartialState
from safetensors.torch import save_file

from training import cli, enhance, enhance_loop
from training.lora_export import lora_state_dict

train, next_batch = enhance.train, enhance_loop.next_batch


def rank():
    # asked only once run() has made its Accelerator (a CPU one)
    return PartialState().process_index


def recording(cfg, method, models, *args):
    finished = train(cfg, method, models, *args)
    prefix = f"{cfg.out_dir}/rank{rank()}"
    save_file(lora_state_dict(models.student), f"{prefix}-student.safetensors")
    if models.fake_score is not None:
        save_file(lora_state_dict(models.fake_score), f"{prefix}-fake.safetensors")
    if models.discriminator is not None:
        heads = models.discriminator.heads.state_dict()
        save_file({k: v.contiguous() for k, v in heads.items()}, f"{prefix}-heads.safetensors")
    return finished


def batches(cfg, step, *args):
    batch = next_batch(cfg, step, *args)
    with open(f"captions-rank{rank()}.jsonl", "a") as file:
        print(json.dumps({"step": step, "captions": batch.captions}), file=file)
    return batch


enhance.train, enhance_loop.next_batch = recording, batches
sys.exit(cli.main(sys.argv[1:]))
"""


def common_args(teacher: Path, out: Path) -> list[str]:
    return [
        f"teacher={teacher}",
        f"out_dir={out}",
        "steps=2",
        "batch_size=2",
        "threads=1",
        "device=cpu",
        "lora_rank=4",
        "lora_alpha=4",
        f"lora_targets=[{','.join(TARGETS)}]",
        "lr=1e-2",
        "warmup_steps=1",
        "fake_rank=4",
        "fake_updates=1",
        "log_every=1",
        "checkpoint_every=1",
        "sample_count=2",
        "aesthetic=none",
        f"alignment_path={ROOT / 'models' / 'shapes-attributes'}",
        f"segmentation_path={ROOT / 'models' / 'shapes-segmentation'}",
    ]


def check_in_step(out: Path, roles: tuple[str, ...]) -> None:
    """Both processes hold the same weights of every role; the export is the main one's."""
    for role in roles:
        main = load_file(out / f"rank0-{role}.safetensors")
        other = load_file(out / f"rank1-{role}.safetensors")
        assert main.keys() == other.keys() and main, role
        assert all(torch.equal(main[key], other[key]) for key in main), role
    exported = read_lora(out / "lora.safetensors")
    main = load_file(out / "rank0-student.safetensors")
    assert all(torch.equal(exported[key], v) for key, v in main.items())


def check_batches(folder: Path, steps: list[int]) -> None:
    """Each process drew its own prompts at every step: the global batch's two shares."""
    drawn = {
        rank: [json.loads(line) for line in (folder / f"captions-rank{rank}.jsonl").open()]
        for rank in (0, 1)
    }
    for rank in (0, 1):
        assert [entry["step"] for entry in drawn[rank]] == steps
    for first, second in zip(drawn[0], drawn[1], strict=True):
        assert first["captions"] != second["captions"]


def test_feedback_two_processes_train_in_step_and_resume(tiny_models: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    args = ["feedback", *common_args(tiny_models.sd15, out)]
    # stopped after the first step, then resumed: the second step runs
    launch(script, [*args, "stop_after=1"])
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1
    assert not (out / "lora.safetensors").exists()
    resumed = launch(script, args)
    assert resumed.stdout.count("feedback: resumed from") == 1  # the main process only
    check_in_step(out, ("student",))
    assert (out / "final.png").exists()
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]  # one line per step, the main process's
    assert all("student/structure" in line for line in lines)
    check_batches(tmp_path, [0, 1])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_dmd2_two_processes_train_in_step(tiny_models: Any, tmp_path: Path, family: str) -> None:
    out = tmp_path / "run"
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    args = [
        "dmd",
        *common_args(getattr(tiny_models, family), out),
        "structure_weight=0",
        "gan_weight=0.01",
        "gan_hidden=8",
    ]
    launch(script, args)
    # the student's LoRA, the fake score's LoRA and the GAN heads: averaged, so equal
    check_in_step(out, ("student", "fake", "heads"))
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]
    assert all("disc/loss" in line and "student/gan" in line for line in lines)
    check_batches(tmp_path, [0, 1])


@pytest.mark.parametrize(
    ("stage", "source", "family"),
    # each stage from each source, each family twice
    [
        ("feedback", "webdataset", "sd15"),
        ("feedback", "encoded", "sdxl"),
        ("dmd", "webdataset", "sdxl"),
        ("dmd", "encoded", "sd15"),
    ],
)
def test_two_processes_stream_prompts_from_a_source(
    tiny_models: Any, tmp_path: Path, stage: str, source: str, family: str
) -> None:
    """Prompts streamed from a webdataset's or an encoded folder's captions: the two processes'
    batches of a step are the global batch's two halves, in the source's order."""
    encoding = encode_config(tiny_models, tmp_path, family)  # writes the webdataset (10 samples)
    prompts = Path(encoding.data_path or "")
    if source == "encoded":
        torch.set_num_threads(1)
        encode.run(encoding)
        prompts = Path(encoding.out_dir)
    captions = source_captions(prompts)
    out = tmp_path / "run"
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    # the Shapes judge reads Shapes captions only (these are numbered): the aesthetic reward
    args = [stage, *common_args(getattr(tiny_models, family), out), f"prompts={prompts}"]
    args += ["alignment=none", "aesthetic=shapes-aesthetic"]
    args += [f"aesthetic_path={ROOT / 'models' / 'shapes-aesthetic'}", "structure_weight=0"]
    launch(script, args)
    check_in_step(out, ("student", "fake") if stage == "dmd" else ("student",))
    check_batches(tmp_path, [0, 1])
    drawn = {
        rank: [json.loads(line)["captions"] for line in (tmp_path / name).open()]
        for rank, name in ((0, "captions-rank0.jsonl"), (1, "captions-rank1.jsonl"))
    }
    # global batches 0..3 of two captions: step 0 ranks 0, 1, then step 1 ranks 0, 1
    assert drawn[0] == [captions[0:2], captions[4:6]]
    assert drawn[1] == [captions[2:4], captions[6:8]]
