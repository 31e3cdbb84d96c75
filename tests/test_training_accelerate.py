"""``hypersd-train tscd`` data-parallel under ``accelerate launch``: two CPU processes (gloo).

The processes draw different batches, yet end every stage with the same LoRA and EMA target
(their gradients are averaged); only the main process logs and writes, once per step; a
stopped launch resumes from the main process's checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from training.distill import DistillConfig
from training.distill_loop import loop_seed
from training.lora_export import read_lora

ROOT = Path(__file__).resolve().parents[1]

# Runs under the launcher in each process: the CLI, plus each process's LoRA and EMA target
# saved after every stage and its own gradients' norm before each average, so that the test
# can compare the processes' weights and batches.
HARNESS = """
import sys

from accelerate import PartialState
from safetensors.torch import save_file

from training import cli, distill, loss_scaling
from training.lora_export import lora_state_dict

train_stage, average_gradients = distill.train_stage, loss_scaling.average_gradients


def rank():
    # asked only once run() has made its Accelerator: a PartialState made first would not be
    # a CPU one, and so not distributed on a machine without GPUs
    return PartialState().process_index


def recording(cfg, method, index, models, *args):
    finished = train_stage(cfg, method, index, models, *args)
    name = f"k{cfg.stages[index]}-rank{rank()}"
    save_file(lora_state_dict(models.student), f"{cfg.out_dir}/{name}-student.safetensors")
    if models.target is not None:  # LCM's online target is the student itself
        save_file(lora_state_dict(models.target), f"{cfg.out_dir}/{name}-target.safetensors")
    return finished


def averaging(accelerator, params):
    # this process's own gradient, before the average: its batch's
    with open(f"grads-rank{rank()}.txt", "a") as file:
        print(repr(sum(float(p.grad.norm()) for p in params if p.grad is not None)), file=file)
    average_gradients(accelerator, params)


# every optimiser step averages its gradients in training.loss_scaling
distill.train_stage, loss_scaling.average_gradients = recording, averaging
sys.exit(cli.main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(script: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Two processes of ``script`` under ``accelerate launch``, in the script's folder."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        # torchrun, one process per "GPU"; device=cpu makes them CPU processes talking over gloo
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
        str(script),
        *args,
    ]
    # one thread per process: the test machines share their cores with other work
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        command,
        cwd=script.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def test_loop_seed_per_process() -> None:
    cfg = DistillConfig(seed=3)
    # rank 0 keeps the single-process seed
    assert loop_seed(cfg, 4, 10, 0) == 3 * 1000 + 17 * 4 + 10
    # every (stage, step, rank) draws its own batches from the CPU generator
    draws = {
        tuple(torch.randint(0, 10**6, (4,), generator=torch.Generator().manual_seed(seed)).tolist())
        for seed in (
            loop_seed(cfg, k, step, r) for k in (1, 8) for step in (0, 5) for r in range(4)
        )
    }
    assert len(draws) == 16


def test_two_processes_train_in_step_and_resume(tiny_models: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    common = [
        "tscd",
        f"teacher={tiny_models.sd15}",
        f"out_dir={out}",
        "train_images=8",
        "batch_size=2",
        "threads=1",
        "device=cpu",
        "lora_rank=4",
        "lora_alpha=4",
        "lr=1e-2",
        "warmup_steps=1",
        "disc_hidden=8",
        "sample_count=2",
        "sample_every=0",
        "log_every=1",
        "checkpoint_every=1",
        "stages=[2,1]",
        "steps_per_stage=2",
    ]
    # stopped after k = 2's first step, then resumed: k = 2 finishes and k = 1 runs
    launch(script, [*common, "stop_after=1"])
    assert json.loads((out / "k2" / "checkpoint" / "state.json").read_text())["step"] == 1
    assert not (out / "k2" / "lora.safetensors").exists()
    resumed = launch(script, common)
    assert resumed.stdout.count("k2: resumed from") == 1  # printed by the main process only

    for k in (2, 1):
        assert (out / f"k{k}" / f"shapes-hyper-{k}step.safetensors").exists()
        assert (out / f"k{k}" / "samples" / "final.png").exists()
        weights = {
            (role, rank): read_lora(out / f"k{k}-rank{rank}-{role}.safetensors")
            for role in ("student", "target")
            for rank in (0, 1)
        }
        for role in ("student", "target"):
            main, other = weights[role, 0], weights[role, 1]
            assert main.keys() == other.keys()
            assert all(torch.equal(main[key], other[key]) for key in main), role
        # the export is the main process's student
        exported = read_lora(out / f"k{k}" / "lora.safetensors")
        assert all(torch.equal(exported[key], v) for key, v in weights["student", 0].items())
    # one log line per step, from the main process (k = 2's step 0 from the stopped launch)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(line["phase"], line["step"]) for line in lines] == [
        ("k2", 0),
        ("k2", 1),
        ("k1", 0),
        ("k1", 1),
    ]
    assert all("disc/loss" in line for line in lines)
    # yet the processes' own gradients differed at every step: they drew different batches
    rank0, rank1 = ((tmp_path / f"grads-rank{r}.txt").read_text().split() for r in (0, 1))
    assert len(rank0) == len(rank1) == 2 * 4  # student and discriminator, 4 steps in all
    assert all(a != b for a, b in zip(rank0, rank1, strict=True))


def test_two_processes_encode_and_train_from_shards(tiny_models: Any, tmp_path: Path) -> None:
    """``hypersd-train encode`` under two processes: each encodes its own half of a webdataset
    into its own shards; TSCD (SDXL) under two processes then reads disjoint halves of the
    shards and still ends with the same weights."""
    from tiny_models import tiny_image_captions, write_webdataset

    folder = write_webdataset(tmp_path / "wds", tiny_image_captions(12), shards=3)
    encoded = tmp_path / "encoded"
    cli_script = tmp_path / "cli.py"
    cli_script.write_text(
        "import sys\nfrom training import cli\nsys.exit(cli.main(sys.argv[1:]))\n"
    )
    common = [f"teacher={tiny_models.sdxl}", "resolution=64", "device=cpu", "threads=1"]
    launch(
        cli_script,
        [
            "encode",
            *common,
            f"out_dir={encoded}",
            "data=webdataset",
            f"data_path={folder}",
            "bucket_step=16",
            "crop=random",
            "shard_size=2",
        ],
    )
    meta = json.loads((encoded / "meta.json").read_text())
    assert meta["complete"] and meta["settings"]["processes"] == 2
    captions: dict[int, set[str]] = {0: set(), 1: set()}
    for sidecar in encoded.glob("p*of2-*.json"):
        rank = int(sidecar.name[1])
        captions[rank] |= set(json.loads(sidecar.read_text())["captions"])
    assert not captions[0] & captions[1] and len(captions[0] | captions[1]) == 12

    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    out = tmp_path / "run"
    launch(
        script,
        [
            "tscd",
            *common,
            f"out_dir={out}",
            "data=encoded",
            f"data_path={encoded}",
            "batch_size=2",
            "lora_rank=4",
            "lora_alpha=4",
            "lr=1e-2",
            "warmup_steps=1",
            "disc_hidden=8",
            "sample_count=2",
            "sample_every=0",
            "log_every=1",
            "stages=[1]",
            "steps_per_stage=2",
        ],
    )
    assert (out / "k1" / "lora.safetensors").exists()
    for role in ("student", "target"):
        main, other = (read_lora(out / f"k1-rank{r}-{role}.safetensors") for r in (0, 1))
        assert all(torch.equal(main[key], other[key]) for key in main), role
    rank0, rank1 = ((tmp_path / f"grads-rank{r}.txt").read_text().split() for r in (0, 1))
    assert len(rank0) == len(rank1) == 2 * 2
    assert all(a != b for a, b in zip(rank0, rank1, strict=True))


def test_two_processes_train_lcm_streaming_a_webdataset(tiny_models: Any, tmp_path: Path) -> None:
    """``hypersd-train lcm`` under two processes, streaming (and VAE-encoding per batch) a
    webdataset's images: each process reads its own shards, both end with the same LoRA."""
    from tiny_models import tiny_image_captions, write_webdataset

    folder = write_webdataset(tmp_path / "wds", tiny_image_captions(8), shards=2)
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    out = tmp_path / "run"
    launch(
        script,
        [
            "lcm",
            f"teacher={tiny_models.sd15}",
            "resolution=64",
            "device=cpu",
            "threads=1",
            f"out_dir={out}",
            "data=webdataset",
            f"data_path={folder}",
            "bucket_step=16",
            "crop=random",
            "target=online",
            "batch_size=2",
            "lora_rank=4",
            "lora_alpha=4",
            "lr=1e-2",
            "warmup_steps=1",
            "sample_count=2",
            "sample_every=0",
            "log_every=1",
            "steps_per_stage=2",
        ],
    )
    assert (out / "lcm" / "lora.safetensors").exists()
    students = [read_lora(path) for path in sorted(out.glob("k*-rank*-student.safetensors"))]
    assert len(students) == 2
    assert all(torch.equal(students[0][key], students[1][key]) for key in students[0])
    exported = read_lora(out / "lcm" / "lora.safetensors")
    assert all(torch.equal(exported[key], v) for key, v in students[0].items())
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]
    # the processes drew different batches: their own gradients differed at every step
    rank0, rank1 = ((tmp_path / f"grads-rank{r}.txt").read_text().split() for r in (0, 1))
    assert len(rank0) == len(rank1) == 2
    assert all(a != b for a, b in zip(rank0, rank1, strict=True))
