"""The distillation commands (``hypersd-train tscd`` / ``lcm``) end to end on tiny models.

Every stage runs 2 optimisation steps on tiny random SD1.5- and SDXL-architecture pipelines and
on the Shapes base model; the LoRAs it exports load in plain diffusers and through
``hypersd.lora``, with every trained layer present; stages chain and killed runs resume; the
folder, webdataset and parquet data sources feed the same loop.
"""

from __future__ import annotations

import copy
import json
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from peft import LoraConfig

from hypersd.lora import detect_format, load_lora
from hypersd.registry import LoraSpec, load_registry
from training import cli
from training.config import load_config
from training.data import ImageSample, stream_samples
from training.distill import DistillConfig, run
from training.distill_loop import initial_lora
from training.lora_export import load_lora_into, read_lora

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "models" / "shapes-base"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


def tiny_config(teacher: Path | str, out: Path, **overrides: Any) -> DistillConfig:
    """Two steps per stage at batch 2 on 8 renders: seconds on a loaded CPU."""
    values: dict[str, Any] = {
        "teacher": str(teacher),
        "out_dir": str(out),
        "train_images": 8,
        "batch_size": 2,
        "steps_per_stage": (2,),
        "threads": 1,
        "device": "cpu",
        "lora_rank": 4,
        "lora_alpha": 4,
        "lora_targets": TARGETS,
        "lr": 1e-2,  # large, so that two steps visibly change the LoRA
        "warmup_steps": 1,
        "disc_hidden": 8,
        "log_every": 1,
        "sample_count": 2,
        "sample_every": 0,
    }
    return DistillConfig(**(values | overrides))


def streamed(cfg: DistillConfig) -> list[ImageSample]:
    """One epoch of the source's samples (one process), bucketed and cropped."""
    samples = list(stream_samples(cfg, rank=0, world=1, seed=0, epochs=1))
    assert all(isinstance(s, ImageSample) for s in samples)
    return samples  # type: ignore[return-value]


def lora_module_count(unet: torch.nn.Module) -> int:
    return sum(1 for name, _ in unet.named_modules() if name.endswith("lora_A"))


def check_exported_lora(
    pipeline_cls: type[StableDiffusionPipeline] | type[StableDiffusionXLPipeline],
    base: Path,
    stage: Path,
    name: str,
    cfg: DistillConfig,
) -> None:
    """The stage's diffusers file loads completely and reproduces the trained student."""
    diffusers_file = stage / f"{name}.safetensors"
    assert detect_format(diffusers_file) == "diffusers"
    assert detect_format(stage / f"{name}-kohya.safetensors") == "kohya"

    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    pipe = pipeline_cls.from_pretrained(base, **kwargs)
    reference = copy.deepcopy(pipe.unet)
    reference.add_adapter(
        LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(TARGETS))
    )
    load_lora_into(reference, read_lora(stage / "lora.safetensors"))

    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    hidden = torch.randn(1, 5, pipe.unet.config["cross_attention_dim"])
    extra: dict[str, Any] = {}
    if pipeline_cls is StableDiffusionXLPipeline:
        pooled = pipe.text_encoder_2.config.projection_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
        }

    def eps(unet: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return unet(sample, t, encoder_hidden_states=hidden, **extra).sample

    base_eps, expected = eps(pipe.unet), eps(reference)
    assert not torch.allclose(base_eps, expected, atol=1e-5), "the LoRA changed nothing"

    # plain diffusers
    pipe.load_lora_weights(str(stage), weight_name=diffusers_file.name, adapter_name="hyper")
    assert lora_module_count(pipe.unet) == lora_module_count(reference)
    torch.testing.assert_close(eps(pipe.unet), expected, atol=1e-5, rtol=1e-4)

    # hypersd.lora, diffusers and kohya files
    for spec in (
        LoraSpec(name="hyper", path=diffusers_file, format="diffusers"),
        LoraSpec(name="hyper", path=stage / f"{name}-kohya.safetensors", format="kohya"),
    ):
        fresh = pipeline_cls.from_pretrained(base, **kwargs)
        load_lora(fresh, spec)
        fresh.set_adapters(["hyper"], adapter_weights=[1.0])
        torch.testing.assert_close(eps(fresh.unet), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tscd_and_lcm_on_tiny_models(tiny_models: Any, tmp_path: Path, family: str) -> None:
    torch.set_num_threads(1)
    base = getattr(tiny_models, family)
    # SDXL's LoRA has alpha != rank: the exported files must keep the scale alpha / r
    cfg = tiny_config(base, tmp_path / "run", lora_alpha=8 if family == "sdxl" else 4)
    done = run(cfg, "tscd")
    assert sorted(done) == [1, 2, 4, 8]
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    for k in (8, 4, 2, 1):
        stage = tmp_path / "run" / f"k{k}"
        assert (stage / "samples" / "final.png").exists()
        state = json.loads((stage / "checkpoint" / "state.json").read_text())
        assert state["step"] == 2 and state["k"] == k
        assert state["config"]["stages"] == [8, 4, 2, 1]
        steps = [line for line in lines if line["phase"] == f"k{k}"]
        assert [line["step"] for line in steps] == [0, 1]
        # the adversarial term and the discriminator's step run at every k
        assert all("disc/loss" in line and line["student/adversarial"] != 0 for line in steps)
    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    check_exported_lora(pipeline_cls, base, tmp_path / "run" / "k1", "shapes-hyper-1step", cfg)

    lcm_cfg = replace(cfg, out_dir=str(tmp_path / "lcm"), target="online", distance="huber")
    assert list(run(lcm_cfg, "lcm")) == [1]
    assert (tmp_path / "lcm" / "lcm" / "samples" / "final.png").exists()
    check_exported_lora(pipeline_cls, base, tmp_path / "lcm" / "lcm", "shapes-hyper-lcm", lcm_cfg)


def test_registry_entries_load(tiny_models: Any, tmp_path: Path) -> None:
    """The exported registry blocks validate over a base entry, LoRA files beside them."""
    torch.set_num_threads(1)
    cfg = tiny_config(
        "sd15-teacher",  # the teacher named by a registry entry
        tmp_path / "run",
        registry=str(tiny_models.registry),
        stages=(2, 1),
        adversarial=False,
        registry_base="sd15-teacher",
        export_name="tiny",
    )
    assert sorted(run(cfg, "tscd")) == [1, 2]
    models = tmp_path / "models"
    shutil.copytree(tiny_models.sd15, models / "sd15")
    for k in (2, 1):
        shutil.copy(tmp_path / "run" / f"k{k}" / f"tiny-{k}step.safetensors", models)
    base_entry = '[models.sd15-teacher]\nfamily = "sd15"\npath = "sd15"\nrecipe = "teacher"\n\n'
    entries = (tmp_path / "run" / "tscd-registry.toml").read_text()
    (models / "registry.toml").write_text('default = "sd15-teacher"\n\n' + base_entry + entries)
    registry = load_registry(models / "registry.toml")
    two, one = registry.get("tiny-2step"), registry.get("tiny-1step")
    assert (two.recipe, two.steps, two.default_steps) == ("nstep-lora", (2,), 2)
    assert (one.recipe, one.default_steps) == ("unified-1step-lora", 1)
    assert one.loras[0].path == models / "tiny-1step.safetensors"


def test_stages_chain_and_killed_runs_resume(
    tiny_models: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "run"
    common = [
        f"teacher={tiny_models.sd15}",
        f"out_dir={out}",
        "train_images=8",
        "batch_size=2",
        "threads=1",
        "device=cpu",
        "lora_rank=4",
        "lora_alpha=4",
        "disc_hidden=8",
        "sample_count=2",
        "checkpoint_every=1",
        "log_every=1",
        "sample_every=1",
    ]
    # k = 8 alone, one stage per call
    assert cli.main(["tscd", *common, "stages=8", "steps_per_stage=2"]) == 0
    k8 = out / "k8" / "lora.safetensors"
    assert k8.exists()
    # k = 4 starts from k = 8's LoRA; this call is "killed" after one of its three steps
    cfg4 = load_config(DistillConfig, None, [*common, "stages=4", "steps_per_stage=3"])
    assert initial_lora(cfg4, "tscd", 0) == k8
    assert cli.main(["tscd", *common, "stages=4", "steps_per_stage=3", "stop_after=1"]) == 0
    assert "LoRA initialised from" in capsys.readouterr().out
    assert not (out / "k4" / "lora.safetensors").exists()
    assert json.loads((out / "k4" / "checkpoint" / "state.json").read_text())["step"] == 1
    # the part-trained stage exports from its checkpoint without finishing
    assert cli.main(["tscd", *common, "stages=4", "--export-checkpoint"]) == 0
    snapshot = out / "k4" / "checkpoint-export"
    assert detect_format(snapshot / "shapes-hyper-4step.safetensors") == "diffusers"
    assert not (out / "k4" / "lora.safetensors").exists()
    # the rerun resumes at step 1 and finishes the stage
    assert cli.main(["tscd", *common, "stages=4", "steps_per_stage=3"]) == 0
    assert "resumed from" in capsys.readouterr().out
    steps = [
        json.loads(line)["step"]
        for line in (out / "log.jsonl").read_text().splitlines()
        if json.loads(line)["phase"] == "k4"
    ]
    assert steps == [0, 1, 2]
    grids = sorted(p.name for p in (out / "k4" / "samples").glob("*.png"))
    assert grids == ["final.png", "step-000001.png", "step-000002.png"]
    trained = read_lora(out / "k4" / "lora.safetensors")
    start = read_lora(k8)
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[key], start[key]) for key in trained)
    # a done stage is skipped
    assert cli.main(["tscd", *common, "stages=4", "steps_per_stage=3"]) == 0
    assert "LoRA initialised" not in capsys.readouterr().out


def test_folder_data(tiny_models: Any, tmp_path: Path) -> None:
    """data=folder and data=webdataset: image + caption pairs, streamed, cropped and resized."""
    from PIL import Image

    from hypersd.shapes import ShapesDataset

    torch.set_num_threads(1)
    data = tmp_path / "data"
    data.mkdir()
    for i, sample in enumerate(ShapesDataset(1, 3)):
        Image.fromarray(sample.rendered.image).resize((96, 80)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(sample.caption)
    (data / "no-caption.png").write_bytes((data / "0.png").read_bytes())
    cfg = tiny_config(
        tiny_models.sd15,
        tmp_path / "run",
        data="folder",
        data_path=str(data),
        stages=(1,),
        adversarial=False,
    )
    assert list(run(cfg, "tscd")) == [1]
    captions = [(data / f"{i}.txt").read_text() for i in range(3)]
    assert sorted(s.caption for s in streamed(cfg)) == sorted(captions)

    # the same pairs as a webdataset shard
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for path in sorted(data.iterdir()):
            tar.add(path, arcname=f"sample{path.name}")
    cfg = replace(cfg, data="webdataset", data_path=str(tmp_path), out_dir=str(tmp_path / "wds"))
    assert list(run(cfg, "tscd")) == [1]
    assert [s.caption for s in streamed(cfg)] == captions  # one shard: its order


def test_parquet_data(tiny_models: Any, tmp_path: Path) -> None:
    """data=parquet: Hugging Face datasets' image structs or plain bytes, read in batches."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from hypersd.shapes import ShapesDataset

    torch.set_num_threads(1)
    pngs, captions = [], []
    for sample in ShapesDataset(1, 3):
        buffer = io.BytesIO()
        Image.fromarray(sample.rendered.image).resize((96, 80)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
        captions.append(sample.caption)
    data = tmp_path / "data"
    data.mkdir()
    # two files of a folder, as datasets writes them: {bytes, path} structs; a row without
    # image bytes is skipped
    structs = [{"bytes": png, "path": f"{i}.png"} for i, png in enumerate(pngs)]
    pq.write_table(pa.table({"image": structs[:2], "text": captions[:2]}), data / "0.parquet")
    missing = {"bytes": None, "path": "gone.png"}
    pq.write_table(
        pa.table({"image": [structs[2], missing], "text": [captions[2], "no image"]}),
        data / "1.parquet",
        row_group_size=1,
    )
    cfg = tiny_config(
        tiny_models.sd15,
        tmp_path / "run",
        data="parquet",
        data_path=str(data),
        stages=(1,),
        adversarial=False,
    )
    assert list(run(cfg, "tscd")) == [1]
    assert sorted(s.caption for s in streamed(cfg)) == sorted(captions)

    # one file of plain bytes under other column names
    single = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"jpg": pngs, "caption": captions, "url": ["u"] * 3}), single)
    named = replace(cfg, data_path=str(single), image_column="jpg", caption_column="caption")
    samples = streamed(named)
    assert [s.caption for s in samples] == captions
    assert all(s.pixels.shape == (64, 64, 3) and s.original_size == (80, 96) for s in samples)
    with pytest.raises(ValueError, match=r"no column 'image' \(image_column\).*jpg, caption, url"):
        streamed(replace(named, image_column="image"))
    with pytest.raises(ValueError, match=r"no column 'text' \(caption_column\)"):
        streamed(replace(named, caption_column="text"))
    with pytest.raises(ValueError, match="image_column 'url' is string"):
        streamed(replace(named, image_column="url"))


@pytest.mark.skipif(not (SHAPES / "model_index.json").exists(), reason="no Shapes base model")
def test_shapes_base_model(tmp_path: Path) -> None:
    """Every stage on the real Shapes model (a copy: a training run may re-export it)."""
    torch.set_num_threads(1)
    teacher = tmp_path / "shapes-base"
    shutil.copytree(SHAPES, teacher)
    cfg = tiny_config(teacher, tmp_path / "run", lora_targets=("to_q", "to_k", "to_v", "to_out.0"))
    assert sorted(run(cfg, "tscd")) == [1, 2, 4, 8]
    assert list(run(replace(cfg, out_dir=str(tmp_path / "lcm")), "lcm")) == [1]
    for stage in (tmp_path / "run" / "k1", tmp_path / "lcm" / "lcm"):
        name = next(p.name for p in stage.glob("*-kohya.safetensors")).replace("-kohya", "")
        pipe = StableDiffusionPipeline.from_pretrained(
            teacher, local_files_only=True, use_safetensors=True, safety_checker=None
        )
        pipe.load_lora_weights(str(stage), weight_name=name)
        assert lora_module_count(pipe.unet) > 0


def test_configs_load() -> None:
    folder = ROOT / "training" / "configs"
    # the distillation configs only: sd15-feedback.yaml is the feedback stage's
    names = sorted(p for pattern in ("*tscd*.yaml", "*lcm*.yaml") for p in folder.glob(pattern))
    assert len(names) >= 6
    for path in names:
        cfg = load_config(DistillConfig, path)
        assert cfg.stages and all(1000 // k % cfg.skip == 0 for k in cfg.stages)


def test_tscd_edge_probability_and_teacher_real_class(tiny_models: Any, tmp_path: Path) -> None:
    """``edge_probability=1``: every k = 1 sample targets x0 (t_end = -1); with
    ``adversarial_real="teacher"`` the discriminator still steps and the stage exports."""
    torch.set_num_threads(1)
    cfg = tiny_config(
        tiny_models.sd15,
        tmp_path / "run",
        stages=(1,),
        edge_probability=1.0,
        adversarial_real="teacher",
    )
    assert list(run(cfg, "tscd")) == [1]
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]
    assert all(line["student/t_end"] == -1.0 for line in lines)
    assert all("disc/loss" in line and line["student/adversarial"] != 0 for line in lines)
    state = json.loads((tmp_path / "run" / "k1" / "checkpoint" / "state.json").read_text())
    assert state["config"]["adversarial_real"] == "teacher"
    with pytest.raises(ValueError, match="adversarial_real"):
        load_config(DistillConfig, None, ["adversarial_real=render"])
