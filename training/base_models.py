"""The Shapes base model: its config and the networks, schedulers and pipeline it describes.

An x8 ``AutoencoderKL`` (64 px -> 8x8 latents, as SD does at 512 px), a CLIP-style text
encoder and a ``UNet2DConditionModel`` with attention on its low-resolution levels, put
together as a ``StableDiffusionPipeline`` with SD1.5's schedules; ``training.base`` trains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Imported from their defining modules: diffusers' lazy top-level names are opaque to mypy.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


@dataclass(frozen=True)
class BaseConfig:
    """Every setting of a base-model run; saved inside each checkpoint and beside the export."""

    out_dir: str = "runs/shapes-base"
    export_dir: str = "models/shapes-base"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    train_images: int = 60_000
    # autoencoder (x8: 64 px -> 8x8 latents, as SD does at 512 px)
    vae_channels: tuple[int, ...] = (16, 32, 64, 128)
    vae_layers_per_block: int = 1
    vae_steps: int = 4_000
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # decoder fine-tune with the encoder frozen: sharper small shapes, same latents
    decoder_steps: int = 3_000
    decoder_lr: float = 3e-4
    # text encoder
    max_tokens: int = 24
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    # UNet: attention only on the low-resolution levels
    unet_channels: tuple[int, ...] = (64, 96, 128)
    unet_attention_levels: int = 2
    unet_layers_per_block: int = 1
    unet_steps: int = 12_000
    unet_batch_size: int = 64
    unet_lr: float = 5e-4
    warmup_steps: int = 300
    ema_decay: float = 0.999
    uncond_prob: float = 0.1
    min_snr_gamma: float = 5.0
    # bookkeeping
    log_every: int = 50
    checkpoint_every: int = 500
    sample_every: int = 2_500
    sample_guidance: float = 5.0


def build_vae(cfg: BaseConfig) -> AutoencoderKL:
    levels = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def build_text_encoder(cfg: BaseConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_width,
        intermediate_size=cfg.text_width * 4,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(cfg: BaseConfig) -> UNet2DConditionModel:
    levels = len(cfg.unet_channels)
    plain = levels - cfg.unet_attention_levels
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=["DownBlock2D"] * plain + ["CrossAttnDownBlock2D"] * (levels - plain),
        up_block_types=["CrossAttnUpBlock2D"] * (levels - plain) + ["UpBlock2D"] * plain,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def noise_scheduler() -> DDPMScheduler:
    """SD1.5's training schedule: 1000 steps, scaled-linear betas, epsilon prediction."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def inference_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
) -> StableDiffusionPipeline:
    # A dict, because diffusers annotates these arguments more narrowly than it accepts them.
    components: dict[str, Any] = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": inference_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
    }
    pipeline = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
