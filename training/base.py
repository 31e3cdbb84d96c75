"""``hypersd-train base``: train the Shapes base model from scratch and save a diffusers folder.

Three parts, each trained here with nothing downloaded: an x8 AutoencoderKL,
a CLIP-style text encoder (with the offline tokenizer of ``training.tokenizer``)
and a UNet2DConditionModel (their config and builders: ``training.base_models``).
The result loads with ``StableDiffusionPipeline.from_pretrained`` as-is, like SD1.5.

Phases (each resumes from its last checkpoint, so a run can span sessions):
  1. render the training set (deterministic from the seed)
  2. train the autoencoder                       -> <out_dir>/vae/final
  3. encode every image to latents once            -> <out_dir>/latents.safetensors
  4. train text encoder + UNet (EMA kept)          -> <out_dir>/unet
  5. fine-tune the decoder, encoder frozen         -> <out_dir>/vae/decoder
  6. export the pipeline (EMA weights)             -> <export_dir>

Phase 5 leaves the encoder, and so the latents, unchanged: on a machine with a
core to spare, ``--only decoder`` runs it in a second process beside phase 4,
and the main run then finds it done.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Imported from their defining modules: diffusers' lazy top-level names are opaque to mypy.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from hypersd.shapes import ShapesDataset, fixed_captions
from training.base_models import (
    BaseConfig,
    build_pipeline,
    build_text_encoder,
    build_unet,
    build_vae,
    noise_scheduler,
)
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import config_to_dict, load_config
from training.devices import resolve_device, to_device
from training.objectives.diffusion import (
    autoencoder_losses,
    denoising_losses,
    reconstruction_losses,
)
from training.schedule import lr_factor
from training.tokenizer import write_tokenizer


def render_training_set(seed: int, count: int) -> tuple[torch.Tensor, list[str]]:
    """(count, 3, 64, 64) uint8 images and their captions, the same for the same seed."""
    dataset = ShapesDataset(seed, count)
    images = np.empty((count, 64, 64, 3), dtype=np.uint8)
    captions = []
    for i, sample in enumerate(tqdm(dataset, desc="render", mininterval=5)):
        images[i] = sample.rendered.image
        captions.append(sample.caption)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def save_grid(images: list[Image.Image], path: Path, columns: int = 8) -> None:
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def apply_update(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    parameters: Iterable[torch.nn.Parameter],
    max_grad_norm: float = 1.0,
) -> None:
    """One optimisation step: backward, clip the gradient norm, step."""
    parameters = list(parameters)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()


class RunLog:
    """Appends one JSON line per logged step, so a resumed run keeps one history."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(
        self,
        phase: str,
        step: int,
        losses: Mapping[str, torch.Tensor | float],
        progress: tqdm | None = None,
        shown: str = "loss",
    ) -> None:
        """Log the loss terms of ``step``; show ``losses[shown]`` on the progress bar."""
        values = {
            k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in losses.items()
        }
        if progress is not None:
            progress.set_postfix({shown: f"{values[shown]:.4f}"})
        with self.path.open("a") as f:
            f.write(
                json.dumps({"phase": phase, "step": step, "time": time.time(), **values}) + "\n"
            )


def train_vae(
    cfg: BaseConfig, images: torch.Tensor, device: torch.device, log: RunLog
) -> AutoencoderKL:
    """Phase 2: the autoencoder, resumed from <out_dir>/vae/checkpoint when there is one."""
    folder = Path(cfg.out_dir) / "vae"
    final = folder / "final"
    if (final / "config.json").exists():
        return to_device(AutoencoderKL.from_pretrained(final, use_safetensors=True), device)
    vae = to_device(build_vae(cfg), device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step = 0
    if (folder / "checkpoint" / "state.json").exists():
        step = load_checkpoint(
            folder / "checkpoint", modules={"vae": vae}, optimizers={"vae": optimizer}
        )["step"]
    generator = torch.Generator().manual_seed(cfg.seed + step)
    vae.train()
    progress = tqdm(range(step, cfg.vae_steps), desc="vae", initial=step, total=cfg.vae_steps)
    for step in progress:
        # 1. a random batch of renders, in [-1, 1]
        index = torch.randint(0, len(images), (cfg.vae_batch_size,), generator=generator)
        batch = to_model_range(images[index]).to(device)
        # 2. loss and update at the scheduled learning rate
        for group in optimizer.param_groups:
            group["lr"] = cfg.vae_lr * lr_factor(
                step, warmup_steps=cfg.warmup_steps, total_steps=cfg.vae_steps, floor=0.1
            )
        losses = autoencoder_losses(vae, batch, cfg.vae_kl_weight)
        apply_update(optimizer, losses["loss"], vae.parameters())
        # 3. log and checkpoint
        if step % cfg.log_every == 0:
            log.write("vae", step, losses, progress, shown="l1")
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(
                folder / "checkpoint",
                step=step + 1,
                config=config_to_dict(cfg),
                modules={"vae": vae},
                optimizers={"vae": optimizer},
            )
    vae.eval()
    # The latents' scale: SD multiplies latents by 1 / their standard deviation.
    with torch.no_grad():
        sample = to_model_range(images[:2048]).to(device)
        latents = torch.cat([vae.encode(b).latent_dist.mean for b in sample.split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(final, safe_serialization=True)
    return vae


def finetune_decoder(
    cfg: BaseConfig, vae: AutoencoderKL, images: torch.Tensor, device: torch.device, log: RunLog
) -> AutoencoderKL:
    """Phase 5: train only the decoder on latents drawn from the frozen encoder's posterior.

    The autoencoder's reconstructions cap what the diffusion model can show (small
    crosses blur into blobs first); the decoder alone trains cheaper and leaves the
    latent space that the UNet learns untouched.
    """
    folder = Path(cfg.out_dir) / "vae" / "decoder"
    if (folder / "final" / "config.json").exists():
        return to_device(
            AutoencoderKL.from_pretrained(folder / "final", use_safetensors=True), device
        )
    decoder_parameters = list(vae.decoder.parameters())
    if vae.post_quant_conv is not None:
        decoder_parameters += vae.post_quant_conv.parameters()
    optimizer = torch.optim.AdamW(decoder_parameters, lr=cfg.decoder_lr, weight_decay=0.0)
    step = 0
    if (folder / "checkpoint" / "state.json").exists():
        step = load_checkpoint(
            folder / "checkpoint", modules={"vae": vae}, optimizers={"decoder": optimizer}
        )["step"]
    vae.requires_grad_(False)
    for parameter in decoder_parameters:
        parameter.requires_grad_(True)
    generator = torch.Generator().manual_seed(cfg.seed + 1 + step)
    total = cfg.decoder_steps
    progress = tqdm(range(step, total), desc="decoder", initial=step, total=total)
    for step in progress:
        # 1. a batch of renders and latents sampled from the frozen encoder
        index = torch.randint(0, len(images), (cfg.vae_batch_size,), generator=generator)
        batch = to_model_range(images[index]).to(device)
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.sample()
        # 2. reconstruction loss on the decoder only
        for group in optimizer.param_groups:
            group["lr"] = cfg.decoder_lr * lr_factor(
                step, warmup_steps=cfg.warmup_steps, total_steps=total, floor=0.1
            )
        reconstruction = vae.decode(latents).sample
        losses = reconstruction_losses(reconstruction, batch)
        apply_update(optimizer, losses["loss"], decoder_parameters)
        # 3. log and checkpoint
        if step % cfg.log_every == 0:
            log.write("decoder", step, losses, progress, shown="l1")
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(
                folder / "checkpoint",
                step=step + 1,
                config=config_to_dict(cfg),
                modules={"vae": vae},
                optimizers={"decoder": optimizer},
            )
    vae.eval()
    vae.save_pretrained(folder / "final", safe_serialization=True)
    return vae


def load_trained_vae(cfg: BaseConfig) -> AutoencoderKL:
    """The autoencoder to export: with the fine-tuned decoder once phase 5 has finished."""
    folder = Path(cfg.out_dir) / "vae"
    final = folder / "decoder" / "final"
    if not (final / "config.json").exists():
        final = folder / "final"
    return AutoencoderKL.from_pretrained(final, use_safetensors=True)


def encode_latents(
    cfg: BaseConfig, vae: AutoencoderKL, images: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 3: each image's posterior mean and std, computed once and cached on disk."""
    path = Path(cfg.out_dir) / "latents.safetensors"
    if path.exists():
        cached = load_file(path)
        return cached["mean"], cached["std"]
    means, stds = [], []
    with torch.no_grad():
        for batch in tqdm(images.split(256), desc="encode"):
            posterior = vae.encode(to_model_range(batch).to(device)).latent_dist
            means.append(posterior.mean.cpu())
            stds.append(posterior.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, path)
    return mean, std


def write_samples(cfg: BaseConfig, pipeline: StableDiffusionPipeline, path: Path) -> None:
    captions = fixed_captions(16)
    generators = [torch.Generator().manual_seed(i) for i in range(len(captions))]
    with torch.no_grad():
        images = pipeline(
            captions,
            num_inference_steps=25,
            guidance_scale=cfg.sample_guidance,
            generator=generators,
            height=64,
            width=64,
        ).images
    save_grid(images, path)


@dataclass
class DenoiserState:
    """Text encoder, UNet, their optimizer and EMA: what a phase-4 checkpoint holds."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    optimizer: torch.optim.Optimizer
    ema: EMAModel
    step: int

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.unet.parameters(), *self.text_encoder.parameters()]

    def modules(self) -> dict[str, torch.nn.Module]:
        # A ParameterList view lets the checkpoint save the EMA weights like a module.
        ema_module = torch.nn.ParameterList(self.ema.shadow_params)
        return {"unet": self.unet, "text_encoder": self.text_encoder, "ema": ema_module}

    @classmethod
    def restore(
        cls, cfg: BaseConfig, tokenizer: CLIPTokenizer, device: torch.device
    ) -> DenoiserState:
        """Fresh models, or the ones in <out_dir>/unet/checkpoint when it exists."""
        unet = to_device(build_unet(cfg), device)
        text_encoder = to_device(build_text_encoder(cfg, tokenizer), device)
        parameters = [*unet.parameters(), *text_encoder.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=cfg.unet_lr, weight_decay=0.01)
        ema = EMAModel(parameters, decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
        state = cls(unet, text_encoder, optimizer, ema, step=0)
        checkpoint = Path(cfg.out_dir) / "unet" / "checkpoint"
        if (checkpoint / "state.json").exists():
            saved = load_checkpoint(
                checkpoint, modules=state.modules(), optimizers={"unet": optimizer}
            )
            state.step = saved["step"]
            ema.optimization_step = saved["ema_step"]
        return state


def train_unet(
    cfg: BaseConfig,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    latents: tuple[torch.Tensor, torch.Tensor],
    captions: list[str],
    device: torch.device,
    log: RunLog,
) -> StableDiffusionPipeline:
    """Phase 4: text encoder and UNet, trained together with the diffusion loss; EMA kept."""
    folder = Path(cfg.out_dir) / "unet"
    state = DenoiserState.restore(cfg, tokenizer, device)
    unet, text_encoder, optimizer, ema = state.unet, state.text_encoder, state.optimizer, state.ema
    parameters, step = state.parameters, state.step
    token_ids = tokenizer(
        captions,
        padding="max_length",
        max_length=cfg.max_tokens,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    empty_ids = token_ids.new_tensor(
        tokenizer("", padding="max_length", max_length=cfg.max_tokens).input_ids
    )
    latent_mean, latent_std = latents
    scale = vae.config["scaling_factor"]
    scheduler = noise_scheduler()
    generator = torch.Generator(device).manual_seed(cfg.seed + step)
    cpu_generator = torch.Generator().manual_seed(cfg.seed + step)
    samples_dir = Path(cfg.out_dir) / "samples"
    print(
        f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M"
    )
    progress = tqdm(range(step, cfg.unet_steps), desc="unet", initial=step, total=cfg.unet_steps)
    for step in progress:
        # 1. a batch: latents drawn from each image's posterior, captions dropped for CFG
        index = torch.randint(0, len(captions), (cfg.unet_batch_size,), generator=cpu_generator)
        noise = torch.randn(latent_mean[index].shape, generator=cpu_generator)
        batch = ((latent_mean[index] + latent_std[index] * noise) * scale).to(device)
        ids = token_ids[index].clone()
        drop = torch.rand(len(ids), generator=cpu_generator) < cfg.uncond_prob
        ids[drop] = empty_ids
        # 2. loss and update
        for group in optimizer.param_groups:
            group["lr"] = cfg.unet_lr * lr_factor(
                step, warmup_steps=cfg.warmup_steps, total_steps=cfg.unet_steps, floor=0.1
            )
        text = text_encoder(ids.to(device))[0]
        losses = denoising_losses(
            unet, scheduler, batch, text, min_snr_gamma=cfg.min_snr_gamma, generator=generator
        )
        apply_update(optimizer, losses["loss"], parameters)
        ema.step(parameters)
        # 3. log, checkpoint, sample
        if step % cfg.log_every == 0:
            log.write("unet", step, losses, progress, shown="loss")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps:
            save_checkpoint(
                folder / "checkpoint",
                step=step + 1,
                config=config_to_dict(cfg),
                modules=state.modules(),
                optimizers={"unet": optimizer},
                extra={"ema_step": ema.optimization_step},
            )
        if (step + 1) % cfg.sample_every == 0:
            with ema_weights(ema, parameters):
                pipeline = build_pipeline(vae, text_encoder, tokenizer, unet)
                write_samples(cfg, pipeline, samples_dir / f"step-{step + 1:06d}.png")
    ema.copy_to(parameters)
    return build_pipeline(vae, text_encoder.eval(), tokenizer, unet.eval())


class ema_weights:
    """Swap the EMA weights in for the duration of a block (sampling during training)."""

    def __init__(self, ema: EMAModel, parameters: list[torch.nn.Parameter]) -> None:
        self.ema, self.parameters = ema, parameters

    def __enter__(self) -> None:
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)

    def __exit__(self, *exc: object) -> None:
        self.ema.restore(self.parameters)


def export(cfg: BaseConfig, pipeline: StableDiffusionPipeline) -> Path:
    """Phase 6: a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads as-is."""
    folder = Path(cfg.export_dir)
    pipeline.save_pretrained(folder, safe_serialization=True)
    (folder / "training_config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    return folder


def export_checkpoint(cfg: BaseConfig, tokenizer: CLIPTokenizer) -> Path:
    """Export the EMA weights of the latest phase-4 checkpoint, e.g. while training goes on."""
    vae = load_trained_vae(cfg)
    state = DenoiserState.restore(cfg, tokenizer, torch.device("cpu"))
    if state.step == 0:
        raise ValueError(f"no UNet checkpoint under {cfg.out_dir}/unet/checkpoint")
    state.ema.copy_to(state.parameters)
    pipeline = build_pipeline(vae, state.text_encoder.eval(), tokenizer, state.unet.eval())
    folder = export(cfg, pipeline)
    write_samples(cfg, pipeline, folder / "samples.png")
    return folder


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hypersd-train base", description=__doc__)
    parser.add_argument("--config", help="YAML file of BaseConfig keys")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument(
        "--export-checkpoint",
        action="store_true",
        help="export the EMA weights of the last UNet checkpoint now (a run may still be going)",
    )
    parser.add_argument(
        "--only",
        choices=["decoder"],
        help="run only this phase (after the autoencoder), e.g. beside a run in the UNet phase",
    )
    args = parser.parse_args(argv)
    cfg = load_config(BaseConfig, args.config, args.overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    log = RunLog(out / "log.jsonl")

    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(out / "tokenizer", cfg.max_tokens))
    if args.export_checkpoint:
        folder = export_checkpoint(cfg, tokenizer)
        print(f"saved {folder} from the phase-4 checkpoint")
        return 0
    images, captions = render_training_set(cfg.seed, cfg.train_images)
    vae = train_vae(cfg, images, device, log)
    if args.only == "decoder":
        finetune_decoder(cfg, vae, images, device, log)
        return 0
    latents = encode_latents(cfg, vae, images, device)
    pipeline = train_unet(cfg, vae, tokenizer, latents, captions, device, log)
    vae = finetune_decoder(cfg, vae, images, device, log)
    pipeline = build_pipeline(vae, pipeline.text_encoder, tokenizer, pipeline.unet)
    folder = export(cfg, pipeline)
    write_samples(cfg, pipeline.to("cpu"), folder / "samples.png")
    print(f"saved {folder}")
    return 0
