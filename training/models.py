"""The networks of a stage, one set for every stage: TSCD, LCM, feedback and DMD.

Every stage trains a LoRA on a student UNet against a frozen teacher pipeline; each adds what
its objective needs: an EMA target and discriminator heads (TSCD, LCM's target), a fake score
(with DMD2's discriminator heads over it) and a regression anchor (DMD). ``build_models`` makes
them all in one fixed order, so that the LoRAs' random initialisations draw from the global
torch generator in the same order every run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from hypersd.lora import SDPipeline
from hypersd.pipeline import build_scheduler
from hypersd.recipes import RECIPES
from training.devices import to_device
from training.objectives.adversarial import TeacherFeatureDiscriminator
from training.teacher import TextEncoder, build_encoder


@dataclass
class Models:
    """The frozen teacher pipeline and the networks a stage trains or tracks, on one device."""

    pipe: SDPipeline  # the base pipeline: text encoders, VAE and the frozen teacher UNet
    teacher: UNet2DConditionModel
    student: UNet2DConditionModel  # frozen weights, plus the LoRA the stage trains
    encode: TextEncoder  # captions (+ SDXL's sizes, crops) -> every network's conditioning
    # the served sampler's DDIM algebra: its ᾱ table and its ᾱ at the clean end
    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    target: UNet2DConditionModel | None = None  # TSCD / LCM: the EMA copy of the student
    # TSCD's adversarial heads over the teacher; DMD2's GAN heads over the fake score
    discriminator: TeacherFeatureDiscriminator | None = None
    fake_score: UNet2DConditionModel | None = None  # DMD: the teacher plus its own LoRA
    anchor: UNet2DConditionModel | None = None  # DMD's regression target (None: the start)


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The UNet's LoRA parameters, in module order: what an optimizer and a checkpoint hold."""
    return [p for name, p in unet.named_parameters() if "lora_" in name]


def build_models(
    pipe: SDPipeline,
    device: torch.device,
    resolution: int,
    student_lora: LoraConfig,
    *,
    student: UNet2DConditionModel | None = None,
    gradient_checkpointing: bool = False,
    weight_dtype: torch.dtype = torch.float32,
    ema_target: bool = False,
    discriminator_hidden: int | None = None,
    fake_score_lora: LoraConfig | None = None,
    gan_hidden: int | None = None,
    anchor: UNet2DConditionModel | None = None,
) -> Models:
    """The teacher (frozen), the student with its new LoRA, and the stage's other networks.

    Args:
        pipe: the teacher pipeline (``load_teacher``); frozen and moved to ``device`` here.
        device: where every network trains.
        resolution: the training images' side (SDXL's size conditioning).
        student_lora: the student's new LoRA; its ``init_lora_weights`` is the stage's choice.
        student: the student's frozen base UNet; None: a copy of the teacher.
        gradient_checkpointing: trade activation memory for recomputation in every network
            that gradients flow through: the student, the teacher under TSCD's discriminator
            heads, the fake score (DMD), the VAE's decoder (the feedback rewards).
        weight_dtype: the frozen weights' dtype (text encoders, VAE, teacher, the student's
            and fake score's base layers, the anchor); the LoRAs and heads stay fp32. bf16
            and fp16 need the networks run under their autocast (fp16 also loss scaling).
        ema_target: add ``target``, a copy of the student (TSCD and LCM).
        discriminator_hidden: add TSCD's discriminator heads of this width over the teacher.
        fake_score_lora: add DMD's ``fake_score``, a copy of the teacher with this LoRA.
        gan_hidden: add DMD2's GAN heads of this width over the fake score's features (its
            LoRA stays trainable); needs ``fake_score_lora``.
        anchor: DMD's regression target network, built by the caller; given the conditioning.
    """
    pipe.set_progress_bar_config(disable=True)
    # fp32: the weights stay as loaded (and diffusers does not warn about a dtype cast)
    dtype = None if weight_dtype == torch.float32 else weight_dtype
    for component in ("vae", "text_encoder", "text_encoder_2", "unet"):
        module = getattr(pipe, component, None)
        if module is not None:
            to_device(module.requires_grad_(False), device, dtype).eval()
    if gradient_checkpointing:
        # the feedback rewards decode the student's x̂0 with grad (no effect where it has none)
        pipe.vae.enable_gradient_checkpointing()
    teacher = pipe.unet
    student = copy.deepcopy(teacher) if student is None else student
    student = to_device(student.requires_grad_(False), device, dtype)
    student.add_adapter(student_lora)
    cast_training_params(student, torch.float32)  # the LoRA trains in fp32 over bf16 weights
    target = copy.deepcopy(student).requires_grad_(False) if ema_target else None
    if gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train()
    fake_score = None
    if fake_score_lora is not None:
        # DMD2 starts the fake score at the teacher: a LoRA (B = 0) on a copy of it
        fake_score = copy.deepcopy(teacher).requires_grad_(False)
        fake_score.add_adapter(fake_score_lora)
        cast_training_params(fake_score, torch.float32)
        if gradient_checkpointing:
            fake_score.enable_gradient_checkpointing()
        fake_score.train()
    if anchor is not None:
        to_device(anchor, device, dtype)
    encode = build_encoder(pipe, device, resolution, (teacher, student, target, fake_score, anchor))
    discriminator = None
    if discriminator_hidden is not None:
        if gradient_checkpointing:
            # the student's adversarial loss backpropagates through the teacher to its input;
            # checkpointing acts only where grad is on, so its ε_φ calls stay as they were
            teacher.enable_gradient_checkpointing()
        discriminator = to_device(
            TeacherFeatureDiscriminator(teacher, discriminator_hidden), device
        )
    if gan_hidden is not None:
        if fake_score is None:
            raise ValueError("DMD2's GAN heads read the fake score's features: add a fake score")
        discriminator = to_device(
            TeacherFeatureDiscriminator(fake_score, gan_hidden, freeze=False), device
        )
    # the same DDIM algebra as the served sampler (DDIM trailing)
    ddim = build_scheduler(RECIPES["nstep-lora"], pipe.scheduler.config)
    assert isinstance(ddim, DDIMScheduler)
    return Models(
        pipe=pipe,
        teacher=teacher,
        student=student,
        encode=encode,
        alphas_cumprod=ddim.alphas_cumprod.float().to(device),
        final_alpha_cumprod=float(ddim.final_alpha_cumprod),
        target=target,
        discriminator=discriminator,
        fake_score=fake_score,
        anchor=anchor,
    )
