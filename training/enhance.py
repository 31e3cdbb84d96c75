"""``hypersd-train feedback`` and ``hypersd-train dmd``: the two stages after TSCD.

Feedback (Hyper-SD §3.2): a separate LoRA over the TSCD model (its LoRA fused into the UNet),
trained ReFL-style. The student samples from noise, without grad, to a random step of its own
few-step schedule, predicts x̂0 there with grad, and the decoded image is scored:
``L = Σ_r w_r · ReLU(α_r - r(x̂0, c)) + w_struct · structure`` with the alignment and aesthetic
rewards (``training.rewards``) and the structure loss: a *rendered* scene is diffused to t in
``structure_window``, the student predicts x̂0, and the segmentation network's masks of the
decoded x̂0 are compared with the render's true masks. An ``anchor`` MSE to the starting model's
own x̂0 keeps the LoRA from drifting where the rewards are blind.

DMD (§3.3, one-step enhancement): a third LoRA on the one-step output of TSCD + feedback. The
fake score (a LoRA on a copy of the teacher) learns the student's output distribution with the
diffusion loss, ``fake_updates`` times per student update (two time scales); the student
follows the normalised (fake - real) score difference (``training.objectives.dmd``), plus the
anchor MSE and the feedback rewards on its decoded output. Options: DMD2's GAN term
(``gan_weight``: heads over the fake score's features, rendered scenes as the real class), and
a 2-step student (``dmd_steps``: sampled, with grad, in its own DDIM-trailing schedule).

Several GPUs or nodes: the same command under ``accelerate launch`` trains data-parallel, as
TSCD does (``training.distill``): each process takes its own prompts (global batch index
``step x processes + rank``) and noise, the new LoRA's gradients (and the fake score's and GAN
heads') are averaged over processes every step, and only the main process logs, checkpoints
and exports.

One stage (``out_dir``), resumable at any checkpoint:
  1. models: teacher (frozen), student = teacher + fused start LoRAs + a new LoRA,
     (DMD) fake score = teacher + its own LoRA, the reward networks
  2. the loop (``training.enhance_loop``): Shapes scenes -> (DMD) fake-score updates ->
     student update -> log / checkpoint
  3. export: the new LoRA (diffusers + kohya), sample grid, and a registry entry listing every
     LoRA of the model (the start LoRAs, then this one): served fused, i.e. merged.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from peft import LoraConfig

from hypersd.lora import fuse_loras
from hypersd.registry import LoraSpec
from hypersd.shapes import fixed_captions
from training.config import config_to_dict, load_config
from training.devices import WeightDtype, to_device, torch_dtype
from training.distributed import MixedPrecision, compute_precision, make_accelerator
from training.enhance_loop import train
from training.instance_structure import is_instance_segmenter
from training.lora_export import export_lora, lora_state_dict, registry_entry, save_peft_lora
from training.memory import enhance_estimate
from training.models import Models, build_models
from training.objectives.adversarial import GanLoss
from training.optim import OptimizerKind
from training.rewards import RewardKind
from training.sampling import Sampler, sample_grid_from
from training.schedule import LrSchedule
from training.teacher import load_teacher

Method = Literal["feedback", "dmd"]
OneStepTimestep = Literal[999, 800]
# the served recipe of a DMD 1-step model, by the timestep its one step starts from
# (tests check it against the recipes' own timesteps)
ONE_STEP_RECIPES: dict[OneStepTimestep, str] = {999: "unified-1step-lora", 800: "1step-unet"}


@dataclass(frozen=True)
class EnhanceConfig:
    """Every setting of a feedback or DMD run; saved inside each checkpoint and beside the LoRA."""

    # where things are
    teacher: str = "models/shapes-base"  # the base diffusers folder (the real score for DMD)
    registry: str | None = None  # registry file, when ``teacher`` is a registry model name
    start_loras: tuple[str, ...] = ()  # diffusers-format LoRA files fused into the student first
    out_dir: str = "runs/feedback-shapes"
    export_name: str = "shapes-hyper-feedback"
    registry_base: str = "shapes-base"  # the registry entry the exported model extends
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    # prompts: None for Shapes scenes (rendered, for the structure loss), a text file (one per
    # line), a webdataset (.tar or folder) or an encoded folder: their captions (data.next_batch)
    prompts: str | None = None
    # the new LoRA
    lora_rank: int = 8
    lora_alpha: int = 8
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # schedule
    steps: int = 300  # student updates
    batch_size: int = 16
    lr: float = 5e-5
    warmup_steps: int = 20
    lr_schedule: LrSchedule = "constant"  # after the warm-up; cosine decays to 10% of lr
    grad_clip: float = 1.0
    resolution: int = 64
    # the student's sampler (ReFL stops at a random step of it): DDIM trailing, this many steps
    sampler_steps: int = 4
    # rewards: kind (training.rewards.REWARD_KINDS, or "none"), weights folder, weight, margin α
    alignment: RewardKind | Literal["none"] = "shapes-alignment"
    alignment_path: str = "models/shapes-alignment"
    alignment_weight: float = 1.0
    alignment_margin: float = -0.05  # a log-probability: ~95% sure of every attribute
    aesthetic: RewardKind | Literal["none"] = "shapes-aesthetic"
    aesthetic_path: str = "models/shapes-aesthetic"
    aesthetic_head: str | None = None  # laion-aesthetic: the MLP's .safetensors
    aesthetic_weight: float = 1.0
    aesthetic_margin: float = 1.0  # clean renders score ~1.04
    # structure loss on rendered scenes (data=shapes only: it needs ground-truth masks)
    structure_weight: float = 1.0
    segmentation_path: str = "models/shapes-segmentation"
    structure_window: tuple[int, ...] = (100, 700)
    # on prompts, with a Mask2Former folder as segmentation_path: the student's x̂0 against the
    # teacher's sample of the same prompts and noise (training.instance_structure)
    structure_teacher_steps: int = 8
    structure_guidance: float = 5.0
    structure_threshold: float = 0.5
    anchor_weight: float = 1.0  # MSE to the anchor's x̂0 (latents)
    # DMD's anchor: by default the starting model's own 1-step output; with anchor_loras, the
    # output of base + these LoRAs sampled from the same noise in anchor_steps DDIM-trailing
    # steps (e.g. the 4-step TSCD LoRA: a cheap stand-in for the teacher's ODE solution, DMD's
    # regression target)
    anchor_loras: tuple[str, ...] = ()
    anchor_steps: int = 4
    # DMD: the student's one step starts from pure noise labelled with this timestep: 999 for
    # the unified LoRA (TCD), 800 for a fixed-timestep 1-step model (Hyper-SDXL's 1-step UNet:
    # ᾱ is 8x larger there, so an ε error weighs 5x in x̂0 instead of 15x)
    one_step_timestep: OneStepTimestep = 999
    dmd_weight: float = 1.0  # 0: no fake score (the anchor regression and rewards only)
    dmd_guidance: float = 2.0  # the real score's CFG ω
    fake_rank: int = 32
    fake_lr: float = 1e-4
    fake_updates: int = 3  # fake-score updates per student update
    # DMD's student: 1 = one step from one_step_timestep; N > 1 = its own N-step DDIM-trailing
    # schedule (as served: recipe nstep-lora), with grad through every step
    dmd_steps: int = 1
    # DMD2's GAN term (0: off): heads over the fake score's block outputs tell Shapes renders
    # from the student's outputs, both noised to one t ~ U[0, T); they learn in the fake-score
    # updates (loss · gan_disc_weight added to the fake score's, reaching its LoRA too, as DMD2's
    # classifier branch does); the student's loss adds gan_weight · its generator loss.
    # DMD2 (SDXL): 5e-3 and 1e-2. It sharpens what the regression and DMD terms blur.
    gan_weight: float = 0.0
    gan_disc_weight: float = 1e-2
    gan_loss: GanLoss = "non-saturating"  # DMD2's softplus pair, or hinge
    gan_hidden: int = 64  # the width of each head's hidden conv
    # memory / speed: mixed_precision (no | bf16 | fp16) autocasts the networks; weight_dtype
    # (fp32 | bf16 | fp16) also stores the frozen weights (teacher, VAE, text encoders, the
    # student's, fake score's and anchor's base layers) in that type, which implies its
    # autocast; fp16 scales the losses (training.loss_scaling, state kept in checkpoints); the
    # LoRAs, heads and optimizer states stay fp32 (adamw8bit: 8-bit states, needs
    # bitsandbytes). --dry-run estimates the memory.
    mixed_precision: MixedPrecision = "no"
    weight_dtype: WeightDtype = "fp32"
    # fp16: the first loss scale (halved at each overflowing, skipped step, doubled after 2000
    # clean ones); lower it where the first steps are skipped
    loss_scale: float = 65536.0
    optimizer: OptimizerKind = "adamw"
    gradient_checkpointing: bool = False
    # bookkeeping
    log_every: int = 10
    checkpoint_every: int = 50
    sample_count: int = 16
    stop_after: int = 0  # end this call after n student updates (a checkpoint is kept)


# ---------------------------------------------------------------------------------------------
# 1. models (2. the loop: ``training.enhance_loop``)


def fused_unet(
    cfg: EnhanceConfig, device: torch.device, loras: Sequence[str] | None = None
) -> UNet2DConditionModel:
    """A fresh copy of the base UNet with ``loras`` (default: ``start_loras``) fused into its
    weights, no adapters.

    Only UNet layers are taken (the distilled LoRAs have no text-encoder layers).
    """
    pipe = load_teacher(cfg.teacher, cfg.registry)
    files = cfg.start_loras if loras is None else loras
    specs = [LoraSpec(name=f"lora{i}", path=Path(path).resolve()) for i, path in enumerate(files)]
    fuse_loras(pipe, specs)
    if specs:
        # fused weights stay in the base layers; this only drops the LoRA layers themselves
        pipe.unload_lora_weights()
    return to_device(pipe.unet.requires_grad_(False), device)


def enhance_models(cfg: EnhanceConfig, method: Method, device: torch.device) -> Models:
    """Teacher (frozen), student = teacher + fused start LoRAs + the new LoRA, and for DMD the
    fake score (teacher + its own LoRA, with GAN heads over it when ``gan_weight`` > 0) and the
    anchor (``anchor_loras`` fused)."""
    pipe = load_teacher(cfg.teacher, cfg.registry)
    student = fused_unet(cfg, device)
    dmd = method == "dmd"
    anchor = fused_unet(cfg, device, cfg.anchor_loras).eval() if dmd and cfg.anchor_loras else None
    fake_score_lora = None
    if dmd and cfg.dmd_weight > 0:
        fake_score_lora = LoraConfig(
            r=cfg.fake_rank,
            lora_alpha=cfg.fake_rank,
            init_lora_weights=True,
            target_modules=list(cfg.lora_targets),
        )
    student_lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        init_lora_weights=True,  # B = 0: the stage starts exactly at the start model
        target_modules=list(cfg.lora_targets),
    )
    return build_models(
        pipe,
        device,
        cfg.resolution,
        student_lora,
        student=student,
        gradient_checkpointing=cfg.gradient_checkpointing,
        weight_dtype=torch_dtype(cfg.weight_dtype),
        fake_score_lora=fake_score_lora,
        gan_hidden=cfg.gan_hidden if fake_score_lora is not None and cfg.gan_weight > 0 else None,
        anchor=anchor,
    )


# ---------------------------------------------------------------------------------------------
# 3. export, and the command


def served_recipe(cfg: EnhanceConfig, method: Method) -> str:
    """The registry recipe the exported model is served with: the one it was trained in."""
    if method == "feedback":
        return "unified-1step-lora"
    return ONE_STEP_RECIPES[cfg.one_step_timestep] if cfg.dmd_steps == 1 else "nstep-lora"


def export(cfg: EnhanceConfig, method: Method, models: Models) -> str:
    """The new LoRA (diffusers + kohya), a sample grid and the model's registry entry."""
    out = Path(cfg.out_dir)
    layers = lora_state_dict(models.student)
    export_lora(
        out,
        cfg.export_name,
        layers,
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        target_modules=list(cfg.lora_targets),
    )
    captions = fixed_captions(cfg.sample_count)
    grid = out / "final.png"
    sampler: Sampler
    if method == "dmd" and cfg.dmd_steps == 1:  # the served sampler: one step from a fixed t
        steps, sampler, timesteps = 1, "lcm", (cfg.one_step_timestep,)
    else:  # DDIM trailing, the N-step LoRAs' recipe
        steps = cfg.dmd_steps if method == "dmd" else cfg.sampler_steps
        sampler, timesteps = "ddim-trailing", None
    sample_grid_from(
        models.pipe, models.student, captions, steps, cfg.resolution, grid, sampler, timesteps
    )
    # every LoRA of the model, the start ones first, as paths relative to out_dir
    loras = [
        (Path(path).stem, os.path.relpath(Path(path).resolve(), out.resolve()))
        for path in cfg.start_loras
    ]
    loras.append((cfg.export_name, f"{cfg.export_name}.safetensors"))
    entry = registry_entry(
        cfg.export_name,
        loras,
        base=cfg.registry_base,
        steps=steps,
        recipe=served_recipe(cfg, method),
        description=f"{cfg.registry_base} + " + " + ".join(name for name, _ in loras),
    )
    (out / "registry.toml").write_text(entry)
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    save_peft_lora(out / "lora.safetensors", layers)  # written last: marks the stage done
    return entry


def run(cfg: EnhanceConfig, method: Method) -> Path | None:
    """Train (or resume) the stage and export it; returns the LoRA file, None if stopped early."""
    if method not in ("feedback", "dmd"):
        raise ValueError(f"method must be 'feedback' or 'dmd', got {method!r}")
    if (
        cfg.prompts is not None
        and cfg.structure_weight > 0
        and not is_instance_segmenter(cfg.segmentation_path)
    ):
        print("structure loss off: on a prompts file it needs a Mask2Former segmentation_path")
        cfg = replace(cfg, structure_weight=0.0)
    if cfg.anchor_steps < 1 or cfg.dmd_steps < 1:
        raise ValueError("anchor_steps and dmd_steps must be >= 1")
    if method == "dmd" and cfg.gan_weight > 0 and (cfg.prompts is not None or cfg.dmd_weight == 0):
        raise ValueError(
            "the GAN term needs rendered Shapes scenes and the fake score (dmd_weight > 0)"
        )
    if len(cfg.structure_window) != 2:
        raise ValueError("structure_window needs two timesteps: [low, high]")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    lora_file = out / f"{cfg.export_name}.safetensors"
    if (out / "lora.safetensors").exists():
        print(f"{method}: already done ({lora_file})")
        return lora_file
    precision = compute_precision(cfg.weight_dtype, cfg.mixed_precision)
    accelerator, device = make_accelerator(cfg.device, precision)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    models = enhance_models(cfg, method, device)
    finished = train(cfg, method, models, device, accelerator)
    if finished and accelerator.is_main_process:
        print(export(cfg, method, models))
    # every process returns once the main one has written the LoRA
    accelerator.wait_for_everyone()
    return lora_file if finished else None


def _main(method: Method, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"hypersd-train {method}", description=__doc__)
    parser.add_argument("--config", help="YAML file of EnhanceConfig keys")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the per-process memory estimate (no weights or data loaded), then exit",
    )
    parser.add_argument("--architecture", choices=["sd15", "sdxl"], help="for --dry-run")
    args = parser.parse_args(argv)
    cfg = load_config(EnhanceConfig, args.config, args.overrides)
    if args.dry_run:
        print(enhance_estimate(cfg, method, args.architecture).table())
        return 0
    path = run(cfg, method)
    if path is not None:
        print(f"{method}: {path}")
    return 0 if path is not None or cfg.stop_after else 1


def main(argv: list[str]) -> int:
    """``hypersd-train feedback``."""
    return _main("feedback", argv)


def main_dmd(argv: list[str]) -> int:
    """``hypersd-train dmd``."""
    return _main("dmd", argv)
