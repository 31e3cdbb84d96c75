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
anchor MSE and the feedback rewards on its decoded output.

One stage (``out_dir``), resumable at any checkpoint:
  1. models: teacher (frozen), student = teacher + fused start LoRAs + a new LoRA,
     (DMD) fake score = teacher + its own LoRA, the reward networks
  2. the loop: Shapes scenes -> (DMD) fake-score updates -> student update -> log / checkpoint
  3. export: the new LoRA (diffusers + kohya), sample grid, and a registry entry listing every
     LoRA of the model (the start LoRAs, then this one): served fused, i.e. merged.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from peft import LoraConfig
from torch import Tensor
from tqdm import tqdm

from hypersd.lora import SDPipeline, fuse_loras
from hypersd.recipes import RECIPES
from hypersd.registry import LoraSpec
from hypersd.shapes import ShapesDataset, fixed_captions
from training.base import RunLog
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import config_to_dict, load_config
from training.devices import resolve_device, to_device
from training.distill import build_encoder, load_teacher, sample_grid_from, trailing_timesteps
from training.lora_export import export_lora, lora_state_dict, registry_entry, save_peft_lora
from training.netio import warmup_cosine
from training.objectives.dmd import dmd_losses, fake_score_losses
from training.objectives.feedback import (
    RewardFn,
    denoised_x0_prediction,
    latents_to_images,
    noised_x0_prediction,
    refl_loss,
    structure_loss,
)
from training.objectives.solvers import ddim_step, x0_from_epsilon
from training.rewards import RewardSpec, load_reward

Method = Literal["feedback", "dmd"]
# the served recipe of a DMD 1-step model, by the timestep its one step starts from
# (tests check it against the recipes' own timesteps)
ONE_STEP_RECIPES = {999: "unified-1step-lora", 800: "1step-unet"}


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
    # prompts: Shapes scenes (rendered, for the structure loss), or a text file, one per line
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
    lr_schedule: str = "constant"  # after the warm-up: constant | cosine (decay to 10% of lr)
    grad_clip: float = 1.0
    resolution: int = 64
    # the student's sampler (ReFL stops at a random step of it): DDIM trailing, this many steps
    sampler_steps: int = 4
    # rewards: kind (training.rewards.REWARD_KINDS, or "none"), weights folder, weight, margin α
    alignment: str = "shapes-alignment"
    alignment_path: str = "models/shapes-alignment"
    alignment_weight: float = 1.0
    alignment_margin: float = -0.05  # a log-probability: ~95% sure of every attribute
    aesthetic: str = "shapes-aesthetic"
    aesthetic_path: str = "models/shapes-aesthetic"
    aesthetic_head: str | None = None  # laion-aesthetic: the MLP's .safetensors
    aesthetic_weight: float = 1.0
    aesthetic_margin: float = 1.0  # clean renders score ~1.04
    # structure loss on rendered scenes (data=shapes only: it needs ground-truth masks)
    structure_weight: float = 1.0
    segmentation_path: str = "models/shapes-segmentation"
    structure_window: tuple[int, ...] = (100, 700)
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
    one_step_timestep: int = 999
    dmd_weight: float = 1.0  # 0: no fake score (the anchor regression and rewards only)
    dmd_guidance: float = 2.0  # the real score's CFG ω
    fake_rank: int = 32
    fake_lr: float = 1e-4
    fake_updates: int = 3  # fake-score updates per student update
    # memory / speed (weights stay fp32; autocast runs the networks in bf16)
    mixed_precision: str = "no"  # no | bf16
    gradient_checkpointing: bool = False
    # bookkeeping
    log_every: int = 10
    checkpoint_every: int = 50
    sample_count: int = 16
    stop_after: int = 0  # end this call after n student updates (a checkpoint is kept)


# ---------------------------------------------------------------------------------------------
# 1. models


@dataclass
class Models:
    pipe: SDPipeline  # the base pipeline: text encoder, VAE and the frozen teacher UNet
    teacher: UNet2DConditionModel
    student: UNet2DConditionModel  # start LoRAs fused, the new LoRA as the adapter
    fake_score: UNet2DConditionModel | None
    anchor: UNet2DConditionModel | None  # DMD's regression target network (None: the start)
    encode: Callable[[list[str]], Tensor]
    alphas_cumprod: Tensor


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in unet.named_parameters() if "lora_" in name]


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


def build_models(cfg: EnhanceConfig, method: Method, device: torch.device) -> Models:
    pipe = load_teacher(cfg.teacher, cfg.registry)
    for component in ("vae", "text_encoder", "text_encoder_2", "unet"):
        module = getattr(pipe, component, None)
        if module is not None:
            to_device(module.requires_grad_(False), device).eval()
    student = fused_unet(cfg, device)
    student.add_adapter(
        LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            init_lora_weights=True,  # B = 0: the stage starts exactly at the start model
            target_modules=list(cfg.lora_targets),
        )
    )
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train()
    fake_score = None
    if method == "dmd" and cfg.dmd_weight > 0:
        # DMD2 starts the fake score at the teacher: a LoRA (B = 0) on a copy of it
        fake_score = copy.deepcopy(pipe.unet).requires_grad_(False)
        fake_score.add_adapter(
            LoraConfig(
                r=cfg.fake_rank,
                lora_alpha=cfg.fake_rank,
                init_lora_weights=True,
                target_modules=list(cfg.lora_targets),
            )
        )
        fake_score.train()
    anchor = None
    if method == "dmd" and cfg.anchor_loras:
        anchor = fused_unet(cfg, device, cfg.anchor_loras).eval()
    # the served sampler's ᾱ table (DDIM trailing), as in the TSCD stages
    ddim = RECIPES["nstep-lora"].build_scheduler(pipe.scheduler.config)
    assert isinstance(ddim, DDIMScheduler)
    alphas = ddim.alphas_cumprod.float()
    return Models(
        pipe=pipe,
        teacher=pipe.unet,
        student=student,
        fake_score=fake_score,
        anchor=anchor,
        encode=build_encoder(
            pipe, device, cfg.resolution, (pipe.unet, student, fake_score, anchor)
        ),
        alphas_cumprod=alphas.to(device),
    )


@dataclass
class Rewards:
    """The loaded reward terms: (name, function, weight, margin), plus the segmentation net."""

    terms: list[tuple[str, RewardFn, float, float]]
    segmentation: Callable[[Tensor], Tensor] | None

    def feedback(self, images: Tensor, captions: Sequence[str]) -> dict[str, Tensor]:
        """Σ w · ReLU(α - r) over the reward terms, with each term's mean reward."""
        out: dict[str, Tensor] = {}
        total = images.new_zeros(())
        for name, reward_fn, weight, margin in self.terms:
            term = refl_loss(images, captions, reward_fn, margin)
            total = total + weight * term["loss"]
            out[f"{name}_loss"] = term["loss"].detach()
            out[f"{name}_reward"] = term["reward"]
        out["feedback"] = total
        return out


def load_rewards(cfg: EnhanceConfig, device: torch.device) -> Rewards:
    terms = []
    for name, kind, path, weight, margin, head in (
        (
            "alignment",
            cfg.alignment,
            cfg.alignment_path,
            cfg.alignment_weight,
            cfg.alignment_margin,
            None,
        ),
        (
            "aesthetic",
            cfg.aesthetic,
            cfg.aesthetic_path,
            cfg.aesthetic_weight,
            cfg.aesthetic_margin,
            cfg.aesthetic_head,
        ),
    ):
        if kind == "none" or weight == 0:
            continue
        reward_fn = load_reward(RewardSpec(kind, path, weight, margin, head), device)
        if reward_fn is not None:
            terms.append((name, reward_fn, weight, margin))
    segmentation = None
    if cfg.structure_weight > 0:
        if Path(cfg.segmentation_path).exists():
            from training.segmentation import load_segmentation_model

            segmentation = load_segmentation_model(cfg.segmentation_path, device)
        else:
            print(f"structure loss skipped: no segmentation network at {cfg.segmentation_path}")
    return Rewards(terms, segmentation)


# ---------------------------------------------------------------------------------------------
# 2. the loop


@dataclass
class Batch:
    """One step's prompts; for Shapes also their renders' latents and true instance masks."""

    captions: list[str]
    latent_shape: tuple[int, ...]
    render_latents: Tensor | None = None
    masks: Tensor | None = None


def next_batch(cfg: EnhanceConfig, step: int, models: Models, device: torch.device) -> Batch:
    """Step ``step``'s batch: Shapes scenes (rendered), or lines of the ``prompts`` file."""
    vae = models.pipe.vae
    if cfg.prompts is not None:
        lines = [line.strip() for line in Path(cfg.prompts).read_text().splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise ValueError(f"no prompts in {cfg.prompts}")
        start = step * cfg.batch_size
        captions = [lines[(start + i) % len(lines)] for i in range(cfg.batch_size)]
        factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
        side = cfg.resolution // factor
        shape = (cfg.batch_size, int(vae.config["latent_channels"]), side, side)
        return Batch(captions, shape)
    from training.segmentation import masks_tensor

    dataset = ShapesDataset(cfg.seed + 7, 10**9)
    samples = [dataset[step * cfg.batch_size + i] for i in range(cfg.batch_size)]
    pixels = torch.from_numpy(np.stack([s.rendered.image for s in samples]))
    pixels = pixels.permute(0, 3, 1, 2).float().to(device) / 127.5 - 1.0
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * float(vae.config["scaling_factor"])
    masks = masks_tensor([s.rendered for s in samples], device)
    return Batch([s.caption for s in samples], tuple(latents.shape), latents, masks)


@contextlib.contextmanager
def adapters_off(unet: UNet2DConditionModel) -> Iterator[None]:
    """The UNet without its LoRA adapter: the stage's starting model."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def sample_x0(
    unet: UNet2DConditionModel,
    noise: Tensor,
    text: Tensor,
    alphas: Tensor,
    timesteps: Sequence[int],
) -> Tensor:
    """x̂0 of DDIM from ``noise`` through ``timesteps`` (no CFG, as served): the trailing
    schedule of an N-step model, or ``(t,)`` for a 1-step model labelling pure noise t."""
    x = noise
    for i, step_t in enumerate(timesteps):
        t = torch.full((noise.shape[0],), step_t, device=noise.device, dtype=torch.long)
        eps = unet(x, t, text).sample
        x0 = x0_from_epsilon(x, eps, t, alphas)
        if i + 1 < len(timesteps):
            s = torch.full_like(t, timesteps[i + 1])
            x = ddim_step(x, eps, t, s, alphas)
    return x0


def student_losses(
    cfg: EnhanceConfig,
    method: Method,
    models: Models,
    rewards: Rewards,
    batch: Batch,
    text: Tensor,
    empty: Tensor,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """The student's loss terms for one batch (feedback: ReFL + structure; DMD: + DMD)."""
    student, alphas, vae = models.student, models.alphas_cumprod, models.pipe.vae
    device = text.device
    noise = torch.randn(batch.latent_shape, generator=generator, device=device)
    terms: dict[str, Tensor] = {}
    if method == "feedback":
        schedule = trailing_timesteps(alphas.shape[0], cfg.sampler_steps)
        x0, x_t, t = denoised_x0_prediction(
            student, alphas, noise, text, schedule=schedule, generator=generator
        )
        # the starting model's x̂0 from the same point (the new LoRA switched off)
        with torch.no_grad(), adapters_off(student):
            timesteps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
            x0_start = x0_from_epsilon(x_t, student(x_t, timesteps, text).sample, timesteps, alphas)
    else:
        x0 = sample_x0(student, noise, text, alphas, (cfg.one_step_timestep,))
        with torch.no_grad():
            if models.anchor is not None:
                anchor_schedule = trailing_timesteps(alphas.shape[0], cfg.anchor_steps)
                x0_start = sample_x0(models.anchor, noise, text, alphas, anchor_schedule)
            else:
                with adapters_off(student):
                    x0_start = sample_x0(student, noise, text, alphas, (cfg.one_step_timestep,))
    if models.fake_score is not None:
        dmd = dmd_losses(
            x0,
            models.teacher,
            models.fake_score,
            alphas,
            text,
            uncond_hidden_states=empty,
            guidance=cfg.dmd_guidance,
            generator=generator,
        )
        terms["dmd"] = dmd["loss"]
        terms["dmd_gap"] = dmd["real_fake_gap"]
    terms["anchor"] = F.mse_loss(x0.float(), x0_start.float())
    feedback = rewards.feedback(latents_to_images(vae, x0), batch.captions)
    terms |= {k: v for k, v in feedback.items() if k != "feedback"}
    loss = feedback["feedback"] + cfg.anchor_weight * terms["anchor"]
    if "dmd" in terms:
        loss = loss + cfg.dmd_weight * terms["dmd"]
    if rewards.segmentation is not None and batch.render_latents is not None:
        assert batch.masks is not None
        low, high = cfg.structure_window
        x0_render, _ = noised_x0_prediction(
            student, alphas, batch.render_latents, text, window=(low, high), generator=generator
        )
        structure = structure_loss(
            latents_to_images(vae, x0_render), batch.masks, rewards.segmentation, from_logits=True
        )
        terms["structure"] = structure["loss"]
        loss = loss + cfg.structure_weight * structure["loss"]
    terms["loss"] = loss
    return terms


def train(cfg: EnhanceConfig, method: Method, models: Models, device: torch.device) -> bool:
    """Train the stage to its end; False if stopped early by ``stop_after``."""
    out = Path(cfg.out_dir)
    rewards = load_rewards(cfg, device)
    student_params = lora_parameters(models.student)
    optimizer = torch.optim.AdamW(student_params, lr=cfg.lr, weight_decay=0.0)
    modules: dict[str, torch.nn.Module] = {"lora": torch.nn.ParameterList(student_params)}
    optimizers: dict[str, torch.optim.Optimizer] = {"student": optimizer}
    fake_optimizer = None
    if models.fake_score is not None:
        fake_params = lora_parameters(models.fake_score)
        fake_optimizer = torch.optim.AdamW(fake_params, lr=cfg.fake_lr, weight_decay=0.0)
        modules["fake"] = torch.nn.ParameterList(fake_params)
        optimizers["fake"] = fake_optimizer
    step = 0
    checkpoint = out / "checkpoint"
    if (checkpoint / "state.json").exists():
        step = load_checkpoint(checkpoint, modules=modules, optimizers=optimizers)["step"]
        print(f"{method}: resumed from {checkpoint} at step {step}")
    log = RunLog(out / "log.jsonl")
    empty = models.encode([""])
    generator = torch.Generator(device).manual_seed(cfg.seed * 1000 + step)
    stop_at = step + cfg.stop_after if cfg.stop_after else None
    floor = 0.1 if cfg.lr_schedule == "cosine" else 1.0  # a floor of 1: constant after warm-up
    lr_factor = warmup_cosine(cfg.warmup_steps, cfg.steps, floor=floor)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.mixed_precision == "bf16")

    def save(done: int) -> None:
        save_checkpoint(
            checkpoint,
            step=done,
            config=config_to_dict(cfg),
            modules=modules,
            optimizers=optimizers,
            extra={"method": method},
        )

    progress = tqdm(range(step, cfg.steps), desc=method, initial=step, total=cfg.steps)
    for step in progress:
        if stop_at is not None and step >= stop_at:
            progress.close()
            save(step)
            print(f"{method}: stopped at step {step} (stop_after); rerun to resume")
            return False
        # 1. this step's prompts (Shapes: with their renders' latents and true masks)
        batch = next_batch(cfg, step, models, device)
        with torch.no_grad():
            text = models.encode(batch.captions)
        values: dict[str, float] = {}
        # 2. (DMD) the fake score catches up with the student's current outputs
        if models.fake_score is not None and fake_optimizer is not None:
            for _ in range(cfg.fake_updates):
                noise = torch.randn(batch.latent_shape, generator=generator, device=device)
                with torch.no_grad(), autocast:
                    generated = sample_x0(
                        models.student, noise, text, models.alphas_cumprod, (cfg.one_step_timestep,)
                    )
                with autocast:
                    fake = fake_score_losses(
                        models.fake_score,
                        generated,
                        models.alphas_cumprod,
                        text,
                        generator=generator,
                    )
                fake_optimizer.zero_grad(set_to_none=True)
                fake["loss"].backward()
                fake_optimizer.step()
            values["fake/loss"] = float(fake["loss"].detach())
        # 3. the student's update
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step)
        with autocast:
            losses = student_losses(cfg, method, models, rewards, batch, text, empty, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(student_params, cfg.grad_clip)
        optimizer.step()
        values |= {f"student/{key}": float(v.detach()) for key, v in losses.items()}
        # 4. log, checkpoint
        if step % cfg.log_every == 0 or step + 1 == cfg.steps:
            progress.set_postfix(loss=f"{values['student/loss']:.4f}")
            log.write(method, step, values)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save(step + 1)
    return True


# ---------------------------------------------------------------------------------------------
# 3. export


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
    sampler: Literal["ddim-trailing", "lcm"]
    if method == "dmd":  # the served 1-step sampler: one step from one_step_timestep
        steps, sampler, timesteps = 1, "lcm", (cfg.one_step_timestep,)
    else:
        steps, sampler, timesteps = cfg.sampler_steps, "ddim-trailing", None
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
        steps=1,
        recipe=ONE_STEP_RECIPES[cfg.one_step_timestep] if method == "dmd" else "unified-1step-lora",
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
    if cfg.prompts is not None and cfg.structure_weight > 0:
        print("structure loss off: it needs rendered Shapes scenes, not a prompts file")
        cfg = replace(cfg, structure_weight=0.0)
    if cfg.one_step_timestep not in ONE_STEP_RECIPES:
        raise ValueError(
            f"one_step_timestep must be one of {', '.join(map(str, ONE_STEP_RECIPES))} "
            f"(the 1-step recipes' timesteps), got {cfg.one_step_timestep}"
        )
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    if cfg.anchor_steps < 1:
        raise ValueError(f"anchor_steps must be >= 1, got {cfg.anchor_steps}")
    if cfg.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {cfg.mixed_precision!r}")
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
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    models = build_models(cfg, method, device)
    if not train(cfg, method, models, device):
        return None
    print(export(cfg, method, models))
    return lora_file


def _main(method: Method, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"hypersd-train {method}", description=__doc__)
    parser.add_argument("--config", help="YAML file of EnhanceConfig keys")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    cfg = load_config(EnhanceConfig, args.config, args.overrides)
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
