"""One stage of TSCD or LCM distillation (``training.distill``): its start, loop and checkpoint.

``train_stage`` is the loop, one optimisation step at a time: a batch of latents, the
student's step (``student_step``: the consistency distance, plus TSCD's adversarial generator
loss, then the EMA target), the discriminator heads' step (``discriminator_step``), then the
log, the checkpoint (``save_stage``) and the sample grids. Under ``accelerate launch`` every
process runs it on its own batches, with the gradients averaged (``training.distributed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from torch import nn
from torch.optim import Optimizer
from tqdm import tqdm

from hypersd.shapes import fixed_captions
from training.base import RunLog
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import config_to_dict
from training.data import TrainingData, batch_latents
from training.distributed import (
    MixedPrecision,
    autocast,
    compute_precision,
    mean_over_processes,
    process_seed,
)
from training.lora_export import load_lora_into, read_lora
from training.loss_scaling import LossScaler
from training.models import Models, lora_parameters
from training.objectives.adversarial import adversarial_weight
from training.objectives.lcm import lcm_losses
from training.objectives.tscd import (
    TSCDPrediction,
    ema_update,
    tscd_discriminator_losses,
    tscd_losses,
    tscd_predict,
)
from training.optim import make_optimizer
from training.sampling import Sampler, sample_grid_from
from training.schedule import lr_factor

if TYPE_CHECKING:  # the command's module, which runs this one
    from training.distill import DistillConfig, Method


def stage_steps(cfg: DistillConfig, index: int) -> int:
    """The optimisation steps of stage ``index`` (``steps_per_stage`` broadcast over stages)."""
    steps = cfg.steps_per_stage
    if len(steps) == 1:
        return steps[0]
    if len(steps) != len(cfg.stages):
        raise ValueError("steps_per_stage needs one value, or one per stage")
    return steps[index]


def stage_dir(cfg: DistillConfig, method: Method, k: int) -> Path:
    """The stage's folder: ``out_dir/k<k>``, or ``out_dir/lcm``."""
    return Path(cfg.out_dir) / ("lcm" if method == "lcm" else f"k{k}")


def initial_lora(cfg: DistillConfig, method: Method, index: int) -> Path | None:
    """Where stage ``index`` starts from: the previous stage's LoRA, else ``init_from``."""
    if index > 0:
        return stage_dir(cfg, method, cfg.stages[index - 1]) / "lora.safetensors"
    if cfg.init_from:
        return Path(cfg.init_from)
    if method == "tscd":
        # Resuming a stage list one stage per call: the next larger k already trained here.
        done = [k for k in (8, 4, 2) if k > cfg.stages[0]]
        for k in reversed(done):
            path = stage_dir(cfg, method, k) / "lora.safetensors"
            if path.exists():
                return path
    return None


def loop_seed(cfg: DistillConfig, k: int, step: int, rank: int) -> int:
    """The loop's generator seed: per stage and start step, and per process under a launcher
    (rank 0 keeps the single-process seed; see ``process_seed``)."""
    return process_seed(cfg.seed * 1000 + 17 * k + step, rank)


def write_samples(
    cfg: DistillConfig,
    method: Method,
    models: Models,
    k: int,
    captions: list[str],
    path: Path,
) -> None:
    """A grid from the student: DDIM trailing at k steps (TSCD) or LCM's sampler (4 steps)."""
    steps = cfg.sample_steps or (4 if method == "lcm" else k)
    sampler: Sampler = "lcm" if method == "lcm" else "ddim-trailing"
    sample_grid_from(models.pipe, models.student, captions, steps, cfg.resolution, path, sampler)


@dataclass
class Stage:
    """A stage in training: which one, and the weights and optimizers its checkpoint holds."""

    method: Method
    k: int
    folder: Path
    total_steps: int
    adversarial_weight: float  # λ_adv of the student's loss (0 for LCM)
    student_params: list[nn.Parameter]  # the student's LoRA
    target_params: list[nn.Parameter]  # the EMA target's LoRA
    optimizer: Optimizer
    heads: nn.Module | None  # the discriminator heads, with the adversarial term
    disc_optimizer: Optimizer | None
    precision: MixedPrecision  # the networks' autocast (`compute_precision`)
    # fp16 loss scaling ("student", and "disc" with the heads; disabled otherwise)
    scalers: dict[str, LossScaler]

    def checkpointed(
        self,
    ) -> tuple[dict[str, nn.Module], dict[str, Optimizer], dict[str, LossScaler]]:
        """The modules, optimizers and loss scalers of the stage's checkpoint, by name."""
        modules: dict[str, nn.Module] = {
            "lora": nn.ParameterList(self.student_params),
            "target": nn.ParameterList(self.target_params),
        }
        optimizers: dict[str, Optimizer] = {"student": self.optimizer}
        if self.heads is not None and self.disc_optimizer is not None:
            modules["heads"] = self.heads
            optimizers["disc"] = self.disc_optimizer
        return modules, optimizers, self.scalers


def start_stage(
    cfg: DistillConfig, method: Method, index: int, models: Models, accelerator: Accelerator
) -> tuple[Stage, int]:
    """Stage ``index`` ready to train, and the step it starts at.

    Its LoRA starts from the previous stage's (or a fresh one), the EMA target equal to it, with
    fresh optimizers and discriminator heads; then its checkpoint, if any, is resumed.
    """
    k = cfg.stages[index] if method == "tscd" else 1
    folder = stage_dir(cfg, method, k)
    assert models.target is not None
    student_params = lora_parameters(models.student)
    target_params = lora_parameters(models.target)
    for p in student_params:
        p.requires_grad_(True)
    start = initial_lora(cfg, method, index)
    if start is not None:
        load_lora_into(models.student, read_lora(start))
        accelerator.print(f"{folder.name}: LoRA initialised from {start}")
    ema_update(target_params, student_params, 0.0)  # target = student at the stage's start
    optimizer = make_optimizer(student_params, cfg.optimizer, cfg.lr)
    weight = adversarial_weight(k) * cfg.adversarial_scale if method == "tscd" else 0.0
    precision = compute_precision(cfg.weight_dtype, cfg.mixed_precision)
    scalers = {"student": LossScaler(accelerator.device, precision, cfg.loss_scale)}
    heads, disc_optimizer = None, None
    if models.discriminator is not None and weight > 0:
        heads = models.discriminator.heads
        for head in heads:
            for layer in head.modules():
                if isinstance(layer, nn.Conv2d | nn.GroupNorm):
                    layer.reset_parameters()
        disc_optimizer = make_optimizer(  # torch AdamW's default weight decay, 0.01
            heads.parameters(), cfg.optimizer, cfg.disc_lr, weight_decay=0.01, betas=(0.0, 0.99)
        )
        scalers["disc"] = LossScaler(accelerator.device, precision, cfg.loss_scale)
    stage = Stage(
        method=method,
        k=k,
        folder=folder,
        total_steps=stage_steps(cfg, index),
        adversarial_weight=weight,
        student_params=student_params,
        target_params=target_params,
        optimizer=optimizer,
        heads=heads,
        disc_optimizer=disc_optimizer,
        precision=precision,
        scalers=scalers,
    )
    step = 0
    checkpoint = folder / "checkpoint"
    modules, optimizers, scalers = stage.checkpointed()
    if (checkpoint / "state.json").exists():
        saved = load_checkpoint(checkpoint, modules=modules, optimizers=optimizers, scalers=scalers)
        step = saved["step"]
        accelerator.print(f"{folder.name}: resumed from {checkpoint} at step {step}")
    if accelerator.num_processes > 1:
        # what DDP does on wrapping: every process starts from the main process's weights
        broadcast([p.data for module in modules.values() for p in module.parameters()])
    return stage, step


def save_stage(cfg: DistillConfig, stage: Stage, step: int) -> None:
    """The stage's checkpoint after ``step`` optimisation steps."""
    modules, optimizers, scalers = stage.checkpointed()
    save_checkpoint(
        stage.folder / "checkpoint",
        step=step,
        config=config_to_dict(cfg),
        modules=modules,
        optimizers=optimizers,
        extra={"method": stage.method, "k": stage.k},
        scalers=scalers,
    )


def student_step(
    cfg: DistillConfig,
    stage: Stage,
    models: Models,
    latents: torch.Tensor,
    text: torch.Tensor,
    empty: torch.Tensor,
    accelerator: Accelerator,
    generator: torch.Generator,
) -> tuple[dict[str, float], TSCDPrediction | None]:
    """The student's update on one batch: its loss, the gradients averaged over processes and
    clipped, an AdamW step (skipped on fp16 overflow), then the EMA target's update (none after
    a skipped step: the student did not move).

    Returns the loss terms, and TSCD's prediction of the batch for the discriminator's step.
    """
    online = cfg.target == "online"
    target = models.student if online else models.target
    assert target is not None
    guidance = tuple(cfg.guidance_range)
    prediction = None
    with autocast(latents.device, stage.precision):
        if stage.method == "tscd":
            # made once: the student's loss and the discriminator's step share it
            prediction = tscd_predict(
                models.student,
                target,
                models.teacher,
                models.alphas_cumprod,
                latents,
                text,
                k=stage.k,
                skip=cfg.skip,
                uncond_hidden_states=empty,
                guidance_range=(guidance[0], guidance[1]) if guidance else None,
                noise_offset=cfg.noise_offset,
                edge_probability=cfg.edge_probability,
                final_alpha_cumprod=models.final_alpha_cumprod,
                generator=generator,
            )
            losses = tscd_losses(
                prediction,
                latents,
                text,
                models.alphas_cumprod,
                k=stage.k,
                distance_kind=cfg.distance,
                huber_c=cfg.huber_c,
                final_alpha_cumprod=models.final_alpha_cumprod,
                discriminator=models.discriminator if stage.heads is not None else None,
                adversarial_weight=stage.adversarial_weight,
                generator=generator,
            )
        else:
            losses = lcm_losses(
                models.student,
                target,
                models.teacher,
                models.alphas_cumprod,
                latents,
                text,
                uncond_hidden_states=empty,
                # LCM's guidance form: ω = 1 + w
                w_range=(guidance[0] - 1, guidance[1] - 1) if guidance else None,
                num_ddim_timesteps=cfg.lcm_ddim_timesteps,
                distance_kind=cfg.distance,
                huber_c=cfg.huber_c,
                generator=generator,
            )
    applied = stage.scalers["student"].update(
        losses["loss"], stage.optimizer, stage.student_params, accelerator, cfg.grad_clip
    )
    if applied and not online:
        ema_update(stage.target_params, stage.student_params, cfg.ema_decay)
    return {f"student/{key}": float(v.detach()) for key, v in losses.items()}, prediction


def discriminator_step(
    cfg: DistillConfig,
    stage: Stage,
    models: Models,
    prediction: TSCDPrediction,
    latents: torch.Tensor,
    text: torch.Tensor,
    accelerator: Accelerator,
    generator: torch.Generator,
) -> dict[str, float]:
    """The discriminator heads' update: the real class (the batch's latents, or the teacher
    trajectory's point: ``cfg.adversarial_real``) against the student's (detached) prediction
    of it, both re-noised into the stage's segment."""
    assert models.discriminator is not None and stage.heads is not None
    assert stage.disc_optimizer is not None
    with autocast(latents.device, stage.precision):
        losses = tscd_discriminator_losses(
            models.discriminator,
            prediction,
            latents,
            text,
            models.alphas_cumprod,
            k=stage.k,
            final_alpha_cumprod=models.final_alpha_cumprod,
            real=cfg.adversarial_real,
            generator=generator,
        )
    # the student's generator loss left gradients on the heads: the update's zero_grad drops them
    stage.scalers["disc"].update(
        losses["loss"], stage.disc_optimizer, list(stage.heads.parameters()), accelerator
    )
    return {f"disc/{key}": float(v.detach()) for key, v in losses.items()}


def train_stage(
    cfg: DistillConfig,
    method: Method,
    index: int,
    models: Models,
    data: TrainingData,
    device: torch.device,
    log: RunLog,
    accelerator: Accelerator,
) -> bool:
    """Train stage ``index`` (k = ``cfg.stages[index]``) to its end; False if stopped early.

    Under a launcher every process runs this with its own batches (``average_gradients``); only
    the main process logs, checkpoints and samples.
    """
    main = accelerator.is_main_process
    # 1. the stage's LoRA, target, optimizers and discriminator heads; its checkpoint resumed
    stage, start = start_stage(cfg, method, index, models, accelerator)
    total, name = stage.total_steps, stage.folder.name
    # 2. the loop's inputs: the batches (their order drawn from the stage and start step, so
    # that a resumed run draws anew), the noise's generator, the grid's captions
    batches = data.batches(loop_seed(cfg, stage.k, start, 0))
    generator = torch.Generator(device).manual_seed(
        loop_seed(cfg, stage.k, start, accelerator.process_index)
    )
    sample_captions = (
        fixed_captions(cfg.sample_count)
        if cfg.data == "shapes"
        else data.first_captions(cfg.sample_count)
    )
    stop_at = start + cfg.stop_after if cfg.stop_after else None
    progress = tqdm(range(start, total), desc=name, initial=start, total=total, disable=not main)
    for step in progress:
        # stop_after: this call ends here, leaving a checkpoint the next one resumes from
        if stop_at is not None and step >= stop_at:
            progress.close()
            if main:
                save_stage(cfg, stage, step)
            accelerator.print(f"{name}: stopped at step {step} (stop_after); rerun to resume")
            return False
        # 3. a batch of latents and its conditioning (the frozen VAE and text encoders run
        # here, unless pre-encoded); SDXL's time ids are each sample's size and crop, and its
        # unconditional input (CFG) is zeros with the same ids, as SDXL's pipeline makes them
        train_batch = next(batches)
        batch = batch_latents(train_batch, models.pipe.vae, device)
        micro = train_batch.micro_conditions
        with torch.no_grad():
            if train_batch.text is not None:
                text = models.encode.condition(train_batch.text, micro)
            else:
                text = models.encode(train_batch.captions, micro)
            empty = models.encode.unconditional(micro)
        # 4. the learning rate: linear warm-up, then constant (the LCM scripts' schedule), over
        # the updates made (fp16 steps skipped on overflow do not count)
        updates = step - stage.scalers["student"].skipped
        for group in stage.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(
                updates, warmup_steps=cfg.warmup_steps, total_steps=total, schedule="constant"
            )
        # 5. the student's step: consistency distance (+ adversarial generator loss), EMA
        values, prediction = student_step(
            cfg, stage, models, batch, text, empty, accelerator, generator
        )
        # 6. the discriminator's step on the student's (detached) prediction of this batch
        if stage.disc_optimizer is not None and step % cfg.disc_every == 0:
            assert prediction is not None
            values |= discriminator_step(
                cfg, stage, models, prediction, batch, text, accelerator, generator
            )
        # 7. log (the global batch's losses), checkpoint, sample grid
        if step % cfg.log_every == 0 or step + 1 == total:
            values = mean_over_processes(accelerator, values, device)
            progress.set_postfix(loss=f"{values['student/loss']:.4f}")
            if main:
                log.write(name, step, values)
        if main and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == total):
            save_stage(cfg, stage, step + 1)
        if main and cfg.sample_every and (step + 1) % cfg.sample_every == 0 and step + 1 < total:
            path = stage.folder / "samples" / f"step-{step + 1:06d}.png"
            write_samples(cfg, method, models, stage.k, sample_captions, path)
    if main:
        write_samples(
            cfg, method, models, stage.k, sample_captions, stage.folder / "samples" / "final.png"
        )
    return True
