"""Benchmark: one TSCD, one feedback and one DMD step on an SDXL-architecture model.

    python -m bench.gpu_training [--resolution 1024] [--batch-size 2] [--steps 2] [--tiny]

The networks are built from the published SDXL configs shipped in
``training/configs/architectures/sdxl`` with random weights (no download): bf16 frozen weights,
fp32 LoRAs (rank 64 on every layer kind the SDXL configs train), gradient checkpointing, bf16
autocast: what ``training/configs/sdxl-*.yaml`` run. Each stage's networks are built on their
own and freed after it; each step is the training loop's own (``distill_loop.student_step`` and
``discriminator_step``; ``enhance_loop.fake_score_step`` and ``student_losses``, with a
differentiable image reward so that the VAE decodes the student's output with grad, as the
real rewards make it). The first step warms up; the table gives the mean of the others and the
stage's peak GPU memory (``torch.cuda.max_memory_allocated``; on a CPU: not measured).

``--tiny``: the same steps on tiny random SDXL-architecture networks at 64², on the CPU (how
the tests run it).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from bench.machine import describe_machine
from training.data import Batch
from training.distill import DistillConfig
from training.distill_loop import Stage, discriminator_step, student_step
from training.distributed import make_accelerator
from training.enhance import EnhanceConfig
from training.enhance_loop import Rewards, fake_score_step, student_losses
from training.loss_scaling import LossScaler
from training.memory import ARCHITECTURES
from training.models import Models, build_models, lora_parameters
from training.objectives.adversarial import adversarial_weight
from training.objectives.feedback import RewardTerm
from training.optim import make_optimizer

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TINY_TEXT = 32
TINY_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "sample_size": 8,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 2 * TINY_TEXT,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + TINY_TEXT,
}
TINY_VAE = {
    "block_out_channels": (8, 8, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _tokenizer(folder: Path, max_length: int) -> CLIPTokenizer:
    """A one-token-per-character CLIP tokenizer (random text encoders need no real vocabulary)."""
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for c in (chr(i) for i in range(33, 127)):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(
        folder, model_max_length=max_length, pad_token="!"
    )
    return tokenizer


def sdxl_pipeline(tiny: bool, folder: Path) -> StableDiffusionXLPipeline:
    """An SDXL-architecture pipeline with random weights: the shipped SDXL configs, or tiny."""
    torch.manual_seed(0)
    if tiny:
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text = dict(hidden_size=TINY_TEXT, intermediate_size=64, num_attention_heads=4)
        configs = [CLIPTextConfig(**text, num_hidden_layers=2, max_position_embeddings=16)] * 2
        configs[1] = CLIPTextConfig(**configs[1].to_dict() | {"projection_dim": TINY_TEXT})
        max_length = 16
    else:
        sdxl = ARCHITECTURES / "sdxl"
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sdxl / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(sdxl / "vae"))
        configs = [
            CLIPTextConfig.from_pretrained(sdxl / n) for n in ("text_encoder", "text_encoder_2")
        ]
        max_length = 77
    tokenizer = _tokenizer(folder, max_length)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(configs[0]),
        text_encoder_2=CLIPTextModelWithProjection(configs[1]),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
    )


def _lora(rank: int, init: str | bool) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=init, target_modules=list(TARGETS))


def tscd_step(
    pipe: StableDiffusionXLPipeline,
    device: torch.device,
    args: argparse.Namespace,
    acc: Accelerator,
) -> Callable[[], None]:
    """One TSCD step (k = 4, adversarial term on): ``distill_loop``'s student and
    discriminator steps."""
    cfg = DistillConfig(
        resolution=args.resolution,
        batch_size=args.batch_size,
        weight_dtype="bf16",
        mixed_precision="bf16",
        gradient_checkpointing=True,
        lora_rank=64,
        lora_targets=TARGETS,
    )
    models = build_models(
        pipe,
        device,
        cfg.resolution,
        _lora(64, "gaussian"),
        gradient_checkpointing=True,
        weight_dtype=torch.bfloat16,
        ema_target=True,
        discriminator_hidden=cfg.disc_hidden,
    )
    assert models.discriminator is not None and models.target is not None
    student = lora_parameters(models.student)
    heads = models.discriminator.heads
    stage = Stage(
        method="tscd",
        k=4,
        folder=Path(args.out),
        total_steps=args.steps,
        adversarial_weight=adversarial_weight(4),
        student_params=student,
        target_params=lora_parameters(models.target),
        optimizer=make_optimizer(student, "adamw", cfg.lr),
        heads=heads,
        disc_optimizer=make_optimizer(
            heads.parameters(), "adamw", cfg.disc_lr, weight_decay=0.01, betas=(0.0, 0.99)
        ),
        precision="bf16",
        # bf16: no loss scaling (the scalers are off, the steps the plain ones)
        scalers={"student": LossScaler(device, "bf16"), "disc": LossScaler(device, "bf16")},
    )
    latents, text, empty = _inputs(models, args, device)
    generator = torch.Generator(device).manual_seed(0)

    def step() -> None:
        _, prediction = student_step(cfg, stage, models, latents, text, empty, acc, generator)
        assert prediction is not None
        discriminator_step(cfg, stage, models, prediction, latents, text, acc, generator)

    return step


def enhance_step(
    method: str,
    pipe: StableDiffusionXLPipeline,
    device: torch.device,
    args: argparse.Namespace,
    acc: Accelerator,
) -> Callable[[], None]:
    """One feedback or DMD step: ``enhance_loop``'s fake-score updates (DMD) and the student's
    loss and update, an image reward on the decoded output."""
    dmd = method == "dmd"
    cfg = EnhanceConfig(
        resolution=args.resolution,
        batch_size=args.batch_size,
        weight_dtype="bf16",
        mixed_precision="bf16",
        gradient_checkpointing=True,
        lora_rank=64,
        fake_rank=64,
        lora_targets=TARGETS,
        fake_updates=1,
    )
    student = copy.deepcopy(pipe.unet)
    models = build_models(
        pipe,
        device,
        cfg.resolution,
        _lora(64, True),
        student=student,
        gradient_checkpointing=True,
        weight_dtype=torch.bfloat16,
        fake_score_lora=_lora(64, True) if dmd else None,
    )
    params = lora_parameters(models.student)
    optimizer = make_optimizer(params, "adamw", cfg.lr)
    fake_optimizer = None
    if models.fake_score is not None:
        fake_optimizer = make_optimizer(lora_parameters(models.fake_score), "adamw", cfg.fake_lr)
    # a differentiable image reward: the decoded x̂0's brightness, towards a margin of 0.6
    brightness = RewardTerm("brightness", lambda images, _: images.mean(dim=(1, 2, 3)), 1.0, 0.6)
    rewards = Rewards([brightness], None)
    latents, text, empty = _inputs(models, args, device)
    batch = Batch(["a photo"] * args.batch_size, tuple(latents.shape))
    generator = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, torch.bfloat16)

    def step() -> None:
        if fake_optimizer is not None:
            fake_score_step(
                cfg,
                models,
                fake_optimizer,
                batch,
                text,
                autocast,
                generator,
                acc,
                LossScaler(device, "bf16"),
            )
        with autocast:
            losses = student_losses(
                cfg, "dmd" if dmd else "feedback", models, rewards, batch, text, empty, generator
            )
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    return step


def _inputs(
    models: Models, args: argparse.Namespace, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random latents of the batch, its conditioning, and the unconditional one."""
    side = args.resolution // 8
    latents = torch.randn(args.batch_size, 4, side, side, device=device)
    with torch.no_grad():
        text = models.encode(["a photo of a cat"] * args.batch_size)
        empty = models.encode.unconditional()
    return latents, text, empty


def measure(
    name: str, build: Callable[[], Callable[[], None]], steps: int, device: torch.device
) -> tuple[str, float, float | None]:
    """The stage's mean seconds per step after the first, and its peak GPU memory (GiB)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step = build()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 1024**3 if cuda else None
    del step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    timed = times[1:] or times
    return name, sum(timed) / len(timed), peak


def header(args: argparse.Namespace) -> list[str]:
    """The table's title and column lines."""
    return [
        f"SDXL architecture{' (tiny)' if args.tiny else ''}, {args.resolution}², batch "
        f"{args.batch_size}, bf16 weights, fp32 LoRAs (rank 64), gradient checkpointing; "
        f"{describe_machine(args.device)}",
        "",
        "| stage | seconds per step | peak memory (GiB) |",
        "|---|---:|---:|",
    ]


def row(name: str, seconds: float, peak: float | None) -> str:
    """One stage's table row (`measure`'s result)."""
    memory = "not measured (CPU)" if peak is None else f"{peak:.1f}"
    return f"| {name} | {seconds:.2f} | {memory} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny networks at 64², on the CPU")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="steps per stage (the first warms up)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--stages", default="tscd,feedback,dmd")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (64 if args.tiny else 1024)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.tiny:
        torch.set_num_threads(1)
    accelerator, device = make_accelerator(args.device, "bf16")
    # Each line as soon as it is known: a run stopped by a time limit keeps the stages it measured.
    for line in header(args):
        print(line, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        args.out = tmp
        for name in args.stages.split(","):
            if name not in ("tscd", "feedback", "dmd"):
                raise ValueError(f"stages are tscd, feedback, dmd; got {name!r}")

            def build(name: str = name) -> Callable[[], None]:
                pipe = sdxl_pipeline(args.tiny, Path(tmp) / "tokenizer")
                if name == "tscd":
                    return tscd_step(pipe, device, args, accelerator)
                return enhance_step(name, pipe, device, args, accelerator)

            print(row(*measure(name, build, args.steps, device)), flush=True)


if __name__ == "__main__":
    main()
