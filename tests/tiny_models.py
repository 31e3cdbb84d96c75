"""Tiny random-weight Stable Diffusion pipelines built from configs, for tests.

No hub access is possible on our machines, so every component is built from a config with random
weights: the pipelines run the real diffusers code paths (scheduler, CFG, LoRA, VAE decode) in well
under a second per image on a CPU. The architectures mirror SD1.5 and SDXL (SDXL's two text
encoders, pooled projection and `text_time` added conditioning) at a few hundred thousand
parameters. The VAE downsamples by 8 like the real ones, so a 64x64 image has 8x8 latents.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# Short context keeps the text encoders cheap; the pipelines read it from the tokenizer.
MAX_TOKENS = 16
TEXT_DIM = 32

# Every kind of layer a real Hyper-SD LoRA touches: attention projections, transformer in/out
# projections, feed-forward, and the ResNet convolutions and time projections.
UNET_LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "time_emb_proj",
]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
}


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with one token per character and no merges.

    transformers 5 ignores `vocab_file=` in the constructor, so the vocabulary is written to
    `folder` and loaded with `from_pretrained`, exactly like a real checkpoint's tokenizer.
    """
    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS, pad_token="!")


def _text_config(**overrides: int) -> CLIPTextConfig:
    config = {
        "vocab_size": 256,
        "hidden_size": TEXT_DIM,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "projection_dim": TEXT_DIM,
    }
    return CLIPTextConfig(**(config | overrides))


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def tiny_sd15_pipeline(tokenizer_folder: Path, seed: int = 0) -> StableDiffusionPipeline:
    """An SD1.5-architecture pipeline with random weights and SD1.5's PNDM scheduler config."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
    )
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=tiny_tokenizer(tokenizer_folder),
        unet=unet,
        scheduler=PNDMScheduler(**_SCHEDULER_CONFIG, skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """The SDXL-architecture UNet: `text_time` added conditioning over both text encoders."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # six micro-conditioning ids of 8 channels each, plus the pooled text embedding
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,
    )


def tiny_sdxl_pipeline(tokenizer_folder: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """An SDXL-architecture pipeline with random weights and SDXL's Euler scheduler config."""
    unet = tiny_sdxl_unet(seed)
    tokenizer = tiny_tokenizer(tokenizer_folder)
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config()),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_SCHEDULER_CONFIG, timestep_spacing="leading"),
    )


def random_lora_layers(
    model: torch.nn.Module, targets: list[str], *, rank: int, alpha: float, seed: int
) -> dict[str, torch.Tensor]:
    """Add a peft LoRA to `model`, randomise both factors and return its peft state dict.

    peft initialises `lora_B` to zero (a no-op LoRA), so both factors are redrawn: the LoRA must
    visibly change the images for the fuse/unfuse tests to mean anything. The adapter goes into
    a copy, so `model` stays unchanged.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    with_lora = inject_adapter_in_model(config, copy.deepcopy(model))
    generator = torch.Generator().manual_seed(seed)
    return {
        key: 0.3 * torch.randn(value.shape, generator=generator)
        for key, value in get_peft_model_state_dict(with_lora).items()
    }


@dataclass(frozen=True)
class TinyModels:
    """Files of the tiny test models, and a registry TOML naming them (see `REGISTRY_TOML`).

    Args:
        root: The folder holding everything.
        registry: The registry file.
        sd15: SD1.5-architecture diffusers folder.
        sdxl: SDXL-architecture diffusers folder.
        sd15_lora: diffusers-format LoRA (UNet + text encoder, alpha = rank).
        sd15_lora_2: A second, different diffusers-format LoRA.
        sd15_kohya: `sd15_lora`'s layers as a kohya file, alpha = rank: the same LoRA.
        sd15_kohya_half: `sd15_lora`'s layers as a kohya file with alpha = rank / 2.
        sdxl_kohya: kohya LoRA over the SDXL UNet and both text encoders.
        sdxl_unet: A different SDXL UNet's state dict, like Hyper-SDXL-1step-Unet.safetensors.
    """

    root: Path
    registry: Path
    sd15: Path
    sdxl: Path
    sd15_lora: Path
    sd15_lora_2: Path
    sd15_kohya: Path
    sd15_kohya_half: Path
    sdxl_kohya: Path
    sdxl_unet: Path


LORA_RANK = 4

# Every recipe over the tiny models; steps are kept low so the whole suite stays fast.
REGISTRY_TOML = """
default = "sd15-teacher"

[models.sd15-teacher]
family = "sd15"
path = "sd15"
recipe = "teacher"
steps = "1..30"
default_steps = 2
guidance_scale = 5.0
sizes = ["64x64", [64, 32]]

[models.sd15-nstep]
extends = "sd15-teacher"
recipe = "nstep-lora"
steps = [1, 2, 4]
default_steps = 2
loras = [{ name = "nstep", path = "sd15-lora.safetensors", format = "diffusers" }]

[models.sd15-nstep-kohya]
extends = "sd15-nstep"
recipe = "nstep-lora"
loras = [{ name = "nstep", path = "sd15-kohya.safetensors", format = "kohya" }]

[models.sd15-unified]
extends = "sd15-teacher"
recipe = "unified-1step-lora"
default_steps = 2
loras = [{ name = "unified", path = "sd15-lora.safetensors" }]

[models.sd15-cfg]
extends = "sd15-teacher"
recipe = "cfg-lora"
loras = [
  { name = "cfg", path = "sd15-lora.safetensors", scale = 0.5 },
  { name = "style", path = "sd15-lora-2.safetensors", scale = 0.7 },
]

[models.sdxl-teacher]
family = "sdxl"
path = "sdxl"
recipe = "teacher"
default_steps = 2
sizes = ["64x64"]

[models.sdxl-1step]
extends = "sdxl-teacher"
unet = "sdxl-1step-unet.safetensors"
recipe = "1step-unet"

[models.sdxl-cfg]
extends = "sdxl-teacher"
recipe = "cfg-lora"
guidance_scale = 6.0
loras = [{ name = "cfg", path = "sdxl-kohya.safetensors" }]

[models.missing]
family = "sd15"
path = "no-such-folder"
recipe = "teacher"
"""


def build_tiny_models(root: Path) -> TinyModels:
    """Save the tiny pipelines, LoRAs and 1-step UNet under `root` and write the registry."""
    from hypersd.lora import save_kohya_lora

    sd15 = tiny_sd15_pipeline(root / "tokenizer")
    sd15.save_pretrained(root / "sd15", safe_serialization=True)
    sdxl = tiny_sdxl_pipeline(root / "tokenizer")
    sdxl.save_pretrained(root / "sdxl", safe_serialization=True)

    loras = {}
    for seed, name in enumerate(("sd15-lora", "sd15-lora-2")):
        unet_layers = random_lora_layers(
            sd15.unet, UNET_LORA_TARGETS, rank=LORA_RANK, alpha=LORA_RANK, seed=2 * seed
        )
        text_layers = random_lora_layers(
            sd15.text_encoder,
            TEXT_ENCODER_LORA_TARGETS,
            rank=LORA_RANK,
            alpha=LORA_RANK,
            seed=2 * seed + 1,
        )
        StableDiffusionPipeline.save_lora_weights(
            root,
            unet_lora_layers=convert_state_dict_to_diffusers(unet_layers),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(text_layers),
            weight_name=f"{name}.safetensors",
        )
        loras[name] = (unet_layers, text_layers)

    unet_layers, text_layers = loras["sd15-lora"]
    save_kohya_lora(root / "sd15-kohya.safetensors", unet_layers, text_layers)
    save_kohya_lora(
        root / "sd15-kohya-half.safetensors", unet_layers, text_layers, alpha=LORA_RANK / 2
    )
    save_kohya_lora(
        root / "sdxl-kohya.safetensors",
        random_lora_layers(sdxl.unet, UNET_LORA_TARGETS, rank=LORA_RANK, alpha=1, seed=10),
        random_lora_layers(sdxl.text_encoder, TEXT_ENCODER_LORA_TARGETS, rank=2, alpha=1, seed=11),
        random_lora_layers(
            sdxl.text_encoder_2, TEXT_ENCODER_LORA_TARGETS, rank=2, alpha=1, seed=12
        ),
        alpha=LORA_RANK,
    )
    save_file(tiny_sdxl_unet(seed=7).state_dict(), root / "sdxl-1step-unet.safetensors")

    (root / "registry.toml").write_text(REGISTRY_TOML)
    return TinyModels(
        root=root,
        registry=root / "registry.toml",
        sd15=root / "sd15",
        sdxl=root / "sdxl",
        sd15_lora=root / "sd15-lora.safetensors",
        sd15_lora_2=root / "sd15-lora-2.safetensors",
        sd15_kohya=root / "sd15-kohya.safetensors",
        sd15_kohya_half=root / "sd15-kohya-half.safetensors",
        sdxl_kohya=root / "sdxl-kohya.safetensors",
        sdxl_unet=root / "sdxl-1step-unet.safetensors",
    )


# image sizes (width, height) of `tiny_image_captions`: landscape, square and portrait, so
# that at resolution 64 with 16-pixel buckets every aspect bucket (48x80, 64x64, 80x48) is used
TINY_IMAGE_SIZES = ((96, 56), (72, 72), (56, 96), (120, 72), (64, 64), (60, 100))


def tiny_image_captions(count: int, seed: int = 1) -> list[tuple[Image.Image, str]]:
    """`count` Shapes renders resized to `TINY_IMAGE_SIZES` in turn, with their captions."""
    from hypersd.shapes import ShapesDataset

    return [
        (
            Image.fromarray(sample.rendered.image).resize(
                TINY_IMAGE_SIZES[i % len(TINY_IMAGE_SIZES)], Image.Resampling.BICUBIC
            ),
            f"{i}: {sample.caption}",  # numbered: every caption differs
        )
        for i, sample in enumerate(ShapesDataset(seed, count))
    ]


def write_webdataset(folder: Path, samples: list[tuple[Image.Image, str]], shards: int) -> Path:
    """`samples` as `shards` webdataset .tar files in `folder` (`<key>.png` + `<key>.txt`
    members, a sample's next to each other), split in order; returns `folder`."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(samples) // shards)
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard:03d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(len(samples), (shard + 1) * per_shard)):
                image, caption = samples[i]
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                for suffix, data in ((".png", buffer.getvalue()), (".txt", caption.encode())):
                    member = tarfile.TarInfo(f"sample{i:05d}{suffix}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    return folder
