"""The feedback and DMD stages (``hypersd-train feedback`` / ``dmd``) end to end.

Two optimisation steps on tiny random SD1.5- and SDXL-architecture pipelines with the shipped
Shapes reward networks: every loss term is computed, the exported LoRA loads in plain diffusers
and through ``hypersd.lora``, DMD stacks on the feedback LoRA (fused), the registry entry lists
both, and a stopped run resumes from its checkpoint; DMD2's GAN term and the 2-step DMD student
each run through the stage.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from test_training_distill import TARGETS, check_exported_lora

from hypersd.lora import load_lora
from hypersd.pipeline import build_scheduler
from hypersd.recipes import RECIPES
from hypersd.registry import LoraSpec, load_registry
from training import cli
from training.config import load_config
from training.enhance import ONE_STEP_RECIPES, EnhanceConfig, fused_unet, run
from training.enhance_loop import student_schedule
from training.sampling import sample_x0

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(teacher: Path | str, out: Path, **overrides: Any) -> EnhanceConfig:
    values: dict[str, Any] = {
        "teacher": str(teacher),
        "out_dir": str(out),
        "steps": 2,
        "batch_size": 2,
        "threads": 1,
        "device": "cpu",
        "lora_rank": 4,
        "lora_alpha": 4,
        "lora_targets": TARGETS,
        "lr": 1e-2,  # large, so that two steps visibly change the LoRA
        "warmup_steps": 1,
        "fake_rank": 4,
        "fake_updates": 2,
        "log_every": 1,
        "sample_count": 2,
        # the shipped Shapes networks: the judge stands in for the alignment reward here
        "alignment_path": str(ROOT / "models" / "shapes-attributes"),
        "aesthetic_path": str(ROOT / "models" / "shapes-aesthetic"),
        "segmentation_path": str(ROOT / "models" / "shapes-segmentation"),
    }
    return EnhanceConfig(**(values | overrides))


def log_lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_feedback_then_dmd_on_tiny_models(tiny_models: Any, tmp_path: Path, family: str) -> None:
    torch.set_num_threads(1)
    base = getattr(tiny_models, family)
    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline

    feedback_cfg = tiny_config(base, tmp_path / "feedback", export_name="tiny-feedback")
    feedback_file = run(feedback_cfg, "feedback")
    assert feedback_file == tmp_path / "feedback" / "tiny-feedback.safetensors"
    lines = log_lines(tmp_path / "feedback")
    assert [line["step"] for line in lines] == [0, 1]
    for term in ("alignment_reward", "aesthetic_reward", "structure", "anchor", "loss"):
        assert all(f"student/{term}" in line for line in lines), term
    # the new LoRA starts at zero: the first step's student is the starting model
    assert lines[0]["student/anchor"] == 0.0 and lines[1]["student/anchor"] > 0.0
    assert (tmp_path / "feedback" / "final.png").exists()
    check_exported_lora(pipeline_cls, base, tmp_path / "feedback", "tiny-feedback", feedback_cfg)

    dmd_cfg = tiny_config(
        base,
        tmp_path / "dmd",
        export_name="tiny-dmd",
        start_loras=(str(feedback_file),),
        aesthetic="none",
        structure_weight=0.0,
        # the regression target: base + the feedback LoRA sampled in 2 steps
        anchor_loras=(str(feedback_file),),
        anchor_steps=2,
    )
    assert run(dmd_cfg, "dmd") == tmp_path / "dmd" / "tiny-dmd.safetensors"
    lines = log_lines(tmp_path / "dmd")
    for term in ("student/dmd", "student/dmd_gap", "student/alignment_reward", "fake/loss"):
        assert all(term in line for line in lines), term
    skipped = ("student/aesthetic_reward", "student/structure")
    assert not any(term in line for line in lines for term in skipped)
    check_exported_lora(pipeline_cls, base, tmp_path / "dmd", "tiny-dmd", dmd_cfg)


def test_start_loras_are_fused_into_the_student(tiny_models: Any, tmp_path: Path) -> None:
    """The student starts as base + start LoRA, exactly as diffusers applies that LoRA."""
    torch.set_num_threads(1)
    cfg = tiny_config(tiny_models.sd15, tmp_path, start_loras=(str(tiny_models.sd15_lora),))
    student = fused_unet(cfg, torch.device("cpu"))
    assert not any("lora_" in name for name, _ in student.named_parameters())
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_models.sd15, local_files_only=True, use_safetensors=True
    )
    generator = torch.Generator().manual_seed(0)
    sample, t = torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500])
    hidden = torch.randn(1, 5, pipe.unet.config["cross_attention_dim"], generator=generator)
    with torch.no_grad():
        base = pipe.unet(sample, t, hidden).sample
        load_lora(pipe, LoraSpec(name="start", path=tiny_models.sd15_lora))
        pipe.set_adapters(["start"], adapter_weights=[1.0])
        expected = pipe.unet(sample, t, hidden).sample
        fused = student(sample, t, hidden).sample
    assert not torch.allclose(base, expected, atol=1e-5)
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)


def test_registry_entry_stacks_the_loras(tiny_models: Any, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    feedback = tiny_config(
        "sd15-teacher",
        tmp_path / "runs" / "feedback",
        registry=str(tiny_models.registry),
        export_name="tiny-feedback",
        registry_base="sd15-teacher",
        structure_weight=0.0,
        aesthetic="none",
    )
    first = run(feedback, "feedback")
    assert first is not None
    dmd = tiny_config(
        "sd15-teacher",
        tmp_path / "runs" / "dmd",
        registry=str(tiny_models.registry),
        export_name="tiny-dmd",
        registry_base="sd15-teacher",
        start_loras=(str(first),),
        structure_weight=0.0,
        aesthetic="none",
        # a 1-step model from t = 800, trained by the regression anchor and rewards only
        one_step_timestep=800,
        dmd_weight=0.0,
    )
    assert run(dmd, "dmd") is not None
    lines = log_lines(tmp_path / "runs" / "dmd")
    assert all("student/anchor" in line and "student/dmd" not in line for line in lines)
    assert not any("fake/loss" in line for line in lines)
    entry = (tmp_path / "runs" / "dmd" / "registry.toml").read_text()
    assert 'path = "../feedback/tiny-feedback.safetensors"' in entry
    # the entry validates beside a base entry, its LoRA paths relative to the stage folder
    shutil.copytree(tiny_models.sd15, tmp_path / "runs" / "dmd" / "sd15")
    base_entry = '[models.sd15-teacher]\nfamily = "sd15"\npath = "sd15"\nrecipe = "teacher"\n\n'
    registry_file = tmp_path / "runs" / "dmd" / "registry.toml"
    registry_file.write_text('default = "sd15-teacher"\n\n' + base_entry + entry)
    spec = load_registry(registry_file).get("tiny-dmd")
    assert [lora.name for lora in spec.loras] == ["tiny-feedback", "tiny-dmd"]
    assert all(lora.path.exists() for lora in spec.loras)
    assert (spec.recipe, spec.steps, spec.default_steps) == ("1step-unet", (1,), 1)


def test_the_trained_one_step_is_the_served_one(tiny_models: Any) -> None:
    """DMD's 1-step x̂0 from t = 800 in training is what the served ``1step-unet`` recipe (LCM,
    ``timesteps=[800]``) makes of the same noise; another timestep gives other images."""
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_models.sd15, local_files_only=True, use_safetensors=True
    )
    pipe.set_progress_bar_config(disable=True)
    recipe = RECIPES[ONE_STEP_RECIPES[800]]
    assert recipe.timesteps == (800,)
    pipe.scheduler = build_scheduler(recipe, pipe.scheduler.config)
    alphas = pipe.scheduler.alphas_cumprod.float()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a small red circle", "a large blue cross"]
    text = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)[0]
    with torch.no_grad():
        trained = sample_x0(pipe.unet, noise, text, alphas, (800,))
        served = pipe(
            prompts,
            latents=noise,
            timesteps=list(recipe.timesteps),
            guidance_scale=0.0,
            output_type="latent",
            height=64,
            width=64,
        ).images
        other = sample_x0(pipe.unet, noise, text, alphas, (500,))
    torch.testing.assert_close(trained, served, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(other, served, atol=1e-2)


def test_stopped_run_resumes(tiny_models: Any, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = tiny_config(tiny_models.sd15, tmp_path / "run", stop_after=1, structure_weight=0.0)
    assert run(cfg, "dmd") is None
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1 and state["config"]["stop_after"] == 1
    assert not (tmp_path / "run" / "lora.safetensors").exists()
    assert run(EnhanceConfig(**{**cfg.__dict__, "stop_after": 0}), "dmd") is not None
    assert [line["step"] for line in log_lines(tmp_path / "run")] == [0, 1]


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="feedback' or 'dmd"):
        run(tiny_config("x", tmp_path), "lcm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="structure_window"):
        run(tiny_config("x", tmp_path, structure_window=(1, 2, 3)), "feedback")
    # the fixed choices fail as the config loads
    with pytest.raises(ValueError, match=r"lr_schedule: .*'constant' or 'cosine'"):
        load_config(EnhanceConfig, None, ["lr_schedule=linear"])
    with pytest.raises(ValueError, match=r"one_step_timestep: .*999 or 800"):
        load_config(EnhanceConfig, None, ["one_step_timestep=500"])


def test_shapes_base_model(tmp_path: Path) -> None:
    """Both stages on the shipped Shapes base model, with the structure loss on its renders."""
    torch.set_num_threads(1)
    feedback = tiny_config(
        ROOT / "models" / "shapes-base", tmp_path / "feedback", lora_targets=("to_q", "to_v")
    )
    first = run(feedback, "feedback")
    assert first is not None and (tmp_path / "feedback" / "final.png").exists()
    dmd = tiny_config(
        ROOT / "models" / "shapes-base",
        tmp_path / "dmd",
        lora_targets=("to_q", "to_v"),
        start_loras=(str(first),),
        export_name="shapes-dmd",
    )
    assert run(dmd, "dmd") is not None
    lines = log_lines(tmp_path / "dmd")
    assert all(line["student/structure"] > 0 and line["student/dmd"] > 0 for line in lines)


def test_configs_and_cli() -> None:
    names = ("feedback-shapes", "dmd-shapes", "dmd2-shapes", "dmd-2step-shapes")
    names += tuple(
        f"{family}-{stage}" for family in ("sd15", "sdxl") for stage in ("feedback", "dmd")
    )
    for name in names:
        cfg = load_config(EnhanceConfig, ROOT / "training" / "configs" / f"{name}.yaml")
        assert cfg.steps > 0
    assert {"feedback", "dmd", "table"} <= set(cli.STAGES)


def test_prompts_file_for_real_models(
    tiny_models: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Prompts from a text file (real models): the structure loss is off, said so, not silent."""
    torch.set_num_threads(1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na red car on a street\n")
    # the Shapes alignment reward reads Shapes captions only; the aesthetic one any image
    cfg = tiny_config(tiny_models.sd15, tmp_path / "run", prompts=str(prompts), alignment="none")
    assert run(cfg, "feedback") is not None
    assert "structure loss off" in capsys.readouterr().out
    lines = log_lines(tmp_path / "run")
    assert [line["step"] for line in lines] == [0, 1]
    assert not any("student/structure" in line for line in lines)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        run(
            tiny_config(tiny_models.sd15, tmp_path / "e", prompts=str(tmp_path / "empty.txt")),
            "dmd",
        )


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_dmd2_gan_term(tiny_models: Any, tmp_path: Path, family: str) -> None:
    """``gan_weight`` > 0: heads over the fake score learn in the fake-score updates from the
    renders, the student's loss has the GAN term, the heads are checkpointed and resume."""
    torch.set_num_threads(1)
    cfg = tiny_config(
        getattr(tiny_models, family),
        tmp_path / "run",
        structure_weight=0.0,
        aesthetic="none",
        one_step_timestep=800,
        gan_weight=0.5,
        gan_hidden=8,
        stop_after=1,
    )
    assert run(cfg, "dmd") is None
    assert (tmp_path / "run" / "checkpoint" / "gan_heads.safetensors").exists()
    assert run(replace(cfg, stop_after=0), "dmd") is not None
    lines = log_lines(tmp_path / "run")
    assert [line["step"] for line in lines] == [0, 1]
    for term in ("student/gan", "student/gan_logit", "disc/loss", "disc/real_logit", "fake/loss"):
        assert all(term in line for line in lines), term
    # the student's loss is the sum of its terms, the GAN term weighted
    first = lines[0]
    total = (
        first["student/alignment_loss"]
        + first["student/anchor"]
        + first["student/dmd"]
        + 0.5 * first["student/gan"]
    )
    assert first["student/loss"] == pytest.approx(total, rel=1e-4)
    with pytest.raises(ValueError, match="GAN term"):
        run(replace(cfg, dmd_weight=0.0), "dmd")


def test_two_step_dmd_is_trained_and_served_in_its_own_schedule(
    tiny_models: Any, tmp_path: Path
) -> None:
    """``dmd_steps=2``: the student is sampled, with grad, in 2 DDIM-trailing steps, and its x̂0
    is the served ``nstep-lora`` recipe's x̂0 at its last step from the same noise (the served
    latent then keeps sqrt(1 - ᾱ_0) of ε); the export says so."""
    torch.set_num_threads(1)
    cfg = tiny_config(
        tiny_models.sd15, tmp_path / "run", structure_weight=0.0, aesthetic="none", dmd_steps=2
    )
    assert student_schedule(cfg, 1000) == (999, 499)
    assert student_schedule(replace(cfg, dmd_steps=1), 1000) == (999,)
    assert run(cfg, "dmd") is not None
    lines = log_lines(tmp_path / "run")
    assert all("student/dmd" in line and "fake/loss" in line for line in lines)
    entry = (tmp_path / "run" / "registry.toml").read_text()
    assert 'recipe = "nstep-lora"' in entry and "steps = [2]" in entry

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_models.sd15, local_files_only=True, use_safetensors=True
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler(RECIPES["nstep-lora"], pipe.scheduler.config)
    alphas = pipe.scheduler.alphas_cumprod.float()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a small red circle", "a large blue cross"]
    text = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)[0]
    served: list[tuple[int, torch.Tensor]] = []  # (t, x̂0) of every served step
    step = pipe.scheduler.step

    def recording_step(output: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = step(output, t, *args, **kwargs)
        served.append((int(t), result[1]))  # (prev_sample, pred_original_sample)
        return result

    pipe.scheduler.step = recording_step
    with torch.no_grad():
        trained = sample_x0(pipe.unet, noise, text, alphas, student_schedule(cfg, 1000))
        pipe(
            prompts,
            latents=noise,
            num_inference_steps=2,
            guidance_scale=0.0,
            output_type="latent",
            height=64,
            width=64,
        )
    assert [t for t, _ in served] == [999, 499]
    torch.testing.assert_close(trained, served[-1][1], atol=1e-4, rtol=1e-4)
