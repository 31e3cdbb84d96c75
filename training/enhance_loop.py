"""The feedback and DMD stages' loop (``training.enhance``): rewards, losses, updates.

``train`` runs one stage to its end, one student update at a time: the step's prompts
(``training.data.next_batch``), DMD's fake-score updates (``fake_score_step``, with DMD2's GAN
heads when on), the student's loss terms (``student_losses``: the feedback rewards, the anchor
MSE, DMD's distribution matching, the GAN term and the structure loss) and update, then the log
and the checkpoint. Under ``accelerate launch`` every process runs it on its own prompts, with
the gradients averaged (``training.distributed``); only the main process logs and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast
from torch import Tensor
from tqdm import tqdm

from training.base import RunLog
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import config_to_dict
from training.data import Batch, next_batch
from training.distributed import autocast, compute_precision, mean_over_processes, process_seed
from training.instance_structure import (
    InstanceSegmenter,
    is_instance_segmenter,
    load_instance_segmenter,
    real_structure_loss,
)
from training.loss_scaling import LossScaler
from training.models import Models, lora_parameters
from training.objectives.dmd import (
    dmd_losses,
    fake_score_losses,
    gan_discriminator_losses,
    gan_generator_losses,
)
from training.objectives.feedback import (
    RewardTerm,
    SegmentationFn,
    denoised_x0_prediction,
    feedback_losses,
    latents_to_images,
    noised_x0_prediction,
    structure_loss,
)
from training.objectives.solvers import x0_from_epsilon
from training.optim import make_optimizer
from training.rewards import RewardSpec, load_reward
from training.sampling import adapters_off, sample_x0, trailing_timesteps
from training.schedule import lr_factor
from training.segmentation import load_segmentation_model

if TYPE_CHECKING:  # the command's module, which runs this one
    from training.enhance import EnhanceConfig, Method


@dataclass
class Rewards:
    """The feedback loss's reward terms, and the segmentation network of the structure loss."""

    terms: list[RewardTerm]
    segmentation: SegmentationFn | None
    instance: InstanceSegmenter | None = None  # on prompts: training.instance_structure


def load_rewards(cfg: EnhanceConfig, device: torch.device) -> Rewards:
    """The reward terms that have a weight and whose networks load here (a skipped one says
    why), and the segmentation network when the structure loss is on."""
    specs = {
        "alignment": RewardSpec(
            cfg.alignment, cfg.alignment_path, cfg.alignment_weight, cfg.alignment_margin
        ),
        "aesthetic": RewardSpec(
            cfg.aesthetic,
            cfg.aesthetic_path,
            cfg.aesthetic_weight,
            cfg.aesthetic_margin,
            cfg.aesthetic_head,
        ),
    }
    terms = []
    for name, spec in specs.items():
        if spec.kind == "none" or spec.weight == 0:
            continue
        reward_fn = load_reward(spec, device)
        if reward_fn is not None:
            terms.append(RewardTerm(name, reward_fn, spec.weight, spec.margin))
    segmentation = instance = None
    if cfg.structure_weight > 0:
        if is_instance_segmenter(cfg.segmentation_path):
            instance = load_instance_segmenter(cfg.segmentation_path, device)
        elif Path(cfg.segmentation_path).exists():
            segmentation = load_segmentation_model(cfg.segmentation_path, device)
        else:
            print(f"structure loss skipped: no segmentation network at {cfg.segmentation_path}")
    return Rewards(terms, segmentation, instance)


def student_schedule(cfg: EnhanceConfig, num_train_timesteps: int) -> tuple[int, ...]:
    """DMD's student sampler, as served: one step from ``one_step_timestep``, or its own
    ``dmd_steps``-step DDIM-trailing schedule (e.g. 999, 499)."""
    if cfg.dmd_steps == 1:
        return (cfg.one_step_timestep,)
    return trailing_timesteps(num_train_timesteps, cfg.dmd_steps)


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
    """The student's loss terms for one batch (feedback: ReFL + structure; DMD: + DMD, + GAN)."""
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
        schedule = student_schedule(cfg, alphas.shape[0])
        x0 = sample_x0(student, noise, text, alphas, schedule)
        with torch.no_grad():
            if models.anchor is not None:
                anchor_schedule = trailing_timesteps(alphas.shape[0], cfg.anchor_steps)
                x0_start = sample_x0(models.anchor, noise, text, alphas, anchor_schedule)
            else:
                with adapters_off(student):
                    x0_start = sample_x0(student, noise, text, alphas, schedule)
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
    if models.discriminator is not None:  # DMD2's GAN term, through the fake score's features
        gan = gan_generator_losses(
            models.discriminator, x0, alphas, text, kind=cfg.gan_loss, generator=generator
        )
        terms["gan"] = gan["loss"]
        terms["gan_logit"] = gan["fake_logit"]
    terms["anchor"] = F.mse_loss(x0.float(), x0_start.float())
    images = latents_to_images(vae, x0)
    feedback = feedback_losses(images, batch.captions, rewards.terms)
    terms |= {k: v for k, v in feedback.items() if k != "loss"}
    loss = feedback["loss"] + cfg.anchor_weight * terms["anchor"]
    if "dmd" in terms:
        loss = loss + cfg.dmd_weight * terms["dmd"]
    if "gan" in terms:
        loss = loss + cfg.gan_weight * terms["gan"]
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
    if rewards.instance is not None:  # prompts: against the teacher's image, same noise
        terms |= real_structure_loss(
            images,
            noise,
            text,
            empty,
            teacher=models.teacher,
            vae=vae,
            alphas_cumprod=alphas,
            segmenter=rewards.instance,
            teacher_steps=cfg.structure_teacher_steps,
            guidance=cfg.structure_guidance,
            score_threshold=cfg.structure_threshold,
        )
        loss = loss + cfg.structure_weight * terms["structure"]
    terms["loss"] = loss
    return terms


def fake_score_step(
    cfg: EnhanceConfig,
    models: Models,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    text: Tensor,
    amp: torch.autocast,
    generator: torch.Generator,
    accelerator: Accelerator,
    scaler: LossScaler,
) -> dict[str, float]:
    """DMD's fake score catches up with the student: ``fake_updates`` steps of its diffusion
    loss on the student's current outputs (made without grad: the student stays put); with the
    GAN term, the heads' loss on the batch's renders against those outputs is added (DMD2).
    Each update's gradients are averaged over processes, its loss scaled by ``scaler`` (fp16).

    Args:
        cfg: the stage's config.
        models: the stage's networks (with the fake score).
        optimizer: the fake score's (and GAN heads') optimizer.
        batch: this step's prompts (and Shapes renders).
        text: the prompts' conditioning.
        amp: the run's autocast (``training.distributed.autocast``).
        generator: the step's random source.
        accelerator: this process's Accelerator.
        scaler: the fake score's loss scaler.
    """
    assert models.fake_score is not None
    alphas = models.alphas_cumprod
    schedule = student_schedule(cfg, alphas.shape[0])
    values: dict[str, Tensor] = {}
    for _ in range(cfg.fake_updates):
        noise = torch.randn(batch.latent_shape, generator=generator, device=text.device)
        with torch.no_grad(), amp:
            generated = sample_x0(models.student, noise, text, alphas, schedule)
        with amp:
            fake = fake_score_losses(
                models.fake_score, generated, alphas, text, generator=generator
            )
            loss = fake["loss"]
            values = {"fake/loss": fake["loss"]}
            if models.discriminator is not None:
                assert batch.render_latents is not None  # run() refuses a prompts file
                gan = gan_discriminator_losses(
                    models.discriminator,
                    generated,
                    batch.render_latents,
                    alphas,
                    text,
                    kind=cfg.gan_loss,
                    generator=generator,
                )
                loss = loss + cfg.gan_disc_weight * gan["loss"]
                values |= {f"disc/{key}": value for key, value in gan.items()}
        scaler.update(loss, optimizer, optimizer_params(optimizer), accelerator)
    return {key: float(value.detach()) for key, value in values.items()}


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The parameters ``optimizer`` steps, in its groups' order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def train(
    cfg: EnhanceConfig,
    method: Method,
    models: Models,
    device: torch.device,
    accelerator: Accelerator,
) -> bool:
    """Train the stage to its end; False if stopped early by ``stop_after``.

    Under a launcher every process runs this with its own prompts and noise
    (``average_gradients``); only the main process logs and checkpoints.
    """
    out = Path(cfg.out_dir)
    main, rank, world = (
        accelerator.is_main_process,
        accelerator.process_index,
        accelerator.num_processes,
    )
    # 1. the rewards, the optimizers (the new LoRA's; DMD: the fake score's), a checkpoint resumed
    rewards = load_rewards(cfg, device)
    student_params = lora_parameters(models.student)
    optimizer = make_optimizer(student_params, cfg.optimizer, cfg.lr)
    modules: dict[str, torch.nn.Module] = {"lora": torch.nn.ParameterList(student_params)}
    optimizers: dict[str, torch.optim.Optimizer] = {"student": optimizer}
    # fp16 loss scaling, one scaler per optimizer (disabled otherwise)
    precision = compute_precision(cfg.weight_dtype, cfg.mixed_precision)
    scalers = {name: LossScaler(device, precision, cfg.loss_scale) for name in optimizers}
    fake_optimizer = None
    if models.fake_score is not None:
        fake_params = lora_parameters(models.fake_score)
        modules["fake"] = torch.nn.ParameterList(fake_params)
        if models.discriminator is not None:  # DMD2: the GAN heads learn with the fake score
            modules["gan_heads"] = models.discriminator.heads
            fake_params = fake_params + list(models.discriminator.heads.parameters())
        fake_optimizer = make_optimizer(fake_params, cfg.optimizer, cfg.fake_lr)
        optimizers["fake"] = fake_optimizer
        scalers["fake"] = LossScaler(device, precision, cfg.loss_scale)
    step = 0
    checkpoint = out / "checkpoint"
    if (checkpoint / "state.json").exists():
        saved = load_checkpoint(checkpoint, modules=modules, optimizers=optimizers, scalers=scalers)
        step = saved["step"]
        accelerator.print(f"{method}: resumed from {checkpoint} at step {step}")
    if world > 1:
        # what DDP does on wrapping: every process starts from the main process's weights
        broadcast([p.data for module in modules.values() for p in module.parameters()])

    def save(done: int) -> None:
        """The stage's checkpoint after ``done`` student updates (the main process's)."""
        if not main:
            return
        save_checkpoint(
            checkpoint,
            step=done,
            config=config_to_dict(cfg),
            modules=modules,
            optimizers=optimizers,
            extra={"method": method},
            scalers=scalers,
        )

    # 2. the loop's inputs: the empty caption (DMD's CFG), the random source (per process,
    # rank 0 keeping the single-process seed), autocast (cfg's precision: bf16, fp16 or none)
    log = RunLog(out / "log.jsonl")
    empty = models.encode.unconditional()  # SDXL: zeros, as its pipeline (teacher.py)
    generator = torch.Generator(device).manual_seed(process_seed(cfg.seed * 1000 + step, rank))
    stop_at = step + cfg.stop_after if cfg.stop_after else None
    amp = autocast(device, precision)
    progress = tqdm(
        range(step, cfg.steps), desc=method, initial=step, total=cfg.steps, disable=not main
    )
    for step in progress:
        # stop_after: this call ends here, leaving a checkpoint the next one resumes from
        if stop_at is not None and step >= stop_at:
            progress.close()
            save(step)
            accelerator.print(f"{method}: stopped at step {step} (stop_after); rerun to resume")
            return False
        # 3. this step's prompts, this process's share of the global batch (Shapes: with their
        # renders' latents and true masks)
        batch = next_batch(cfg, step, models.pipe.vae, device, rank, world)
        with torch.no_grad():
            text = models.encode(batch.captions)
        values: dict[str, float] = {}
        # 4. (DMD) the fake score catches up with the student's current outputs
        if fake_optimizer is not None:
            values |= fake_score_step(
                cfg,
                models,
                fake_optimizer,
                batch,
                text,
                amp,
                generator,
                accelerator,
                scalers["fake"],
            )
        # 5. the student's update: linear warm-up, then constant or cosine learning rate, over
        # the updates made (fp16 steps skipped on overflow do not count)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(
                step - scalers["student"].skipped,
                warmup_steps=cfg.warmup_steps,
                total_steps=cfg.steps,
                schedule=cfg.lr_schedule,
                floor=0.1,
            )
        with amp:
            losses = student_losses(cfg, method, models, rewards, batch, text, empty, generator)
        scalers["student"].update(
            losses["loss"], optimizer, student_params, accelerator, cfg.grad_clip
        )
        values |= {f"student/{key}": float(v.detach()) for key, v in losses.items()}
        # 6. log (the global batch's losses), checkpoint
        if step % cfg.log_every == 0 or step + 1 == cfg.steps:
            values = mean_over_processes(accelerator, values, device)
            progress.set_postfix(loss=f"{values['student/loss']:.4f}")
            if main:
                log.write(method, step, values)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save(step + 1)
    return True
