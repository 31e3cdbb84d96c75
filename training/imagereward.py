"""ImageReward (Xu et al. 2023) rebuilt from transformers' BLIP parts, loaded from safetensors.

The architecture (THUDM/ImageReward, ``ImageReward/ImageReward.py``): BLIP's ViT-L/16 image
encoder (224 px, LayerNorm eps 1e-6), BLIP's BERT text encoder whose layers cross-attend to the
image tokens, the text's first token ([CLS]) through an MLP 768 → 1024 → 128 → 64 → 16 → 1 (with
dropouts, no activations), then ``(r - 0.16717362830052426) / 1.0333394966054072``. Prompts are
tokenised by BLIP's BERT tokenizer (bert-base-uncased plus ``[DEC]`` and ``[ENC]``), padded to 35
tokens; images are resized (bicubic, shorter side) and centre-cropped to 224, CLIP-normalised.

Its weights are published as a pickle (``ImageReward.pt``). ``hypersd-train convert-imagereward``
reads that file once with ``torch.load(..., weights_only=True)`` (tensors only, no code), maps its
keys onto ``BlipVisionModel`` / ``BlipTextModel`` and writes ``model.safetensors``, ``config.json``
and the tokenizer; training and evaluation load only those (``load_imagereward``)::

    hypersd-train convert-imagereward --checkpoint ImageReward.pt --blip-config med_config.json \\
        --tokenizer weights/bert-base-uncased --out models/imagereward
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from training.rewards import preference_mlp

# ImageReward.py: the reward's normalisation, and the prompt length of its tokenizer calls
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TOKENS = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# BLIP's ViT-L/16 at 224 px (BLIP create_vit('large', 224)): timm's ViT with eps 1e-6
VIT_LARGE = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
}
# med_config.json keys (BLIP's BertConfig) that BlipTextConfig takes as they are
TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "pad_token_id",
)
# original ViT (timm layout) names -> BlipVisionModel names, under blip.visual_encoder.
VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)


def clip_pixels(images: Tensor, size: int) -> Tensor:
    """``(N, 3, H, W)`` [0, 1] images as CLIP/BLIP input: shorter side resized to ``size``
    (bicubic), centre-cropped to ``size``², CLIP-normalised; differentiable.

    Args:
        images: the images, in [0, 1].
        size: the model's input size.
    """
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    resized = (max(size, round(height * scale)), max(size, round(width * scale)))
    pixels = F.interpolate(images.float(), size=resized, mode="bicubic", align_corners=False)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    pixels = pixels[..., top : top + size, left : left + size]
    mean = pixels.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = pixels.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


class ImageReward(nn.Module):
    """ImageReward: ``forward(images, captions) -> (N,)`` normalised rewards, differentiable in
    the ``(N, 3, H, W)`` [0, 1] images.

    Args:
        vision_config: BLIP's image encoder (ViT-L/16 at 224 for the released model).
        text_config: BLIP's text encoder, cross-attending to the image (``is_decoder`` builds
            the cross-attention layers; it runs bidirectionally, as ImageReward's does).
        tokenizer: BLIP's BERT tokenizer.
    """

    def __init__(
        self, vision_config: BlipVisionConfig, text_config: BlipTextConfig, tokenizer: Any
    ) -> None:
        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.tokenizer = tokenizer
        size = vision_config.image_size
        self.image_size = size if isinstance(size, int) else int(size[0])
        width = text_config.hidden_size
        # the indices of ImageReward's MLP.layers (the dropouts have no weights)
        self.mlp = preference_mlp(width)

    def tokens(self, captions: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask of the captions, as ImageReward tokenises them."""
        batch = self.tokenizer(
            [str(caption) for caption in captions],
            padding="max_length",
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        return batch.input_ids.to(device), batch.attention_mask.to(device)

    def score_pixels(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N,) rewards of already preprocessed pixels (``clip_pixels``) and tokens."""
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=pixels.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state
        reward = self.mlp(text[:, 0, :].float()).squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD

    def forward(self, images: Tensor, captions: Sequence[Any]) -> Tensor:
        """(N,) ImageReward scores of the images against their captions; keeps the graph."""
        pixels = clip_pixels(images, self.image_size)
        input_ids, attention_mask = self.tokens(captions, images.device)
        dtype = next(self.mlp.parameters()).dtype
        return self.score_pixels(pixels.to(dtype), input_ids, attention_mask)


# ---------------------------------------------------------------------------------------------
# conversion (once, from the released pickle) and loading (safetensors only)


def text_config_from_med(
    med_config: dict[str, Any], encoder_width: int, tokenizer: Any
) -> BlipTextConfig:
    """BlipTextConfig from ImageReward's ``med_config.json`` (BLIP's BertConfig), dropouts off,
    cross-attending to ``encoder_width``-wide image tokens, special tokens from ``tokenizer``."""
    values = {key: med_config[key] for key in TEXT_KEYS if key in med_config}
    return BlipTextConfig(
        **values,
        bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id,
        encoder_hidden_size=encoder_width,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_decoder=True,
    )


def map_checkpoint(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """ImageReward.pt's keys mapped onto ``ImageReward``'s modules.

    ``blip.visual_encoder.*`` -> ``vision.*`` (renamed, ``VISION_RENAMES``),
    ``blip.text_encoder.*`` -> ``text.*`` (same names: transformers ported BLIP's med.py),
    ``mlp.layers.*`` -> ``mlp.*``. Returns the mapped tensors and the keys left out (BLIP's
    contrastive projections and buffers, which the reward does not use).
    """
    mapped: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            for pattern, replacement in VISION_RENAMES:
                name, count = re.subn(pattern, replacement, name)
                if count:
                    mapped[f"vision.{name}"] = value
                    break
            else:
                skipped.append(key)
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            mapped["text." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp.layers."):
            mapped["mlp." + key.removeprefix("mlp.layers.")] = value
        else:
            skipped.append(key)
    return mapped, skipped


def blip_tokenizer(folder: str | Path) -> Any:
    """BLIP's tokenizer: a local BERT (bert-base-uncased) tokenizer plus ``[DEC]`` and ``[ENC]``."""
    tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def convert_checkpoint(
    checkpoint: str | Path,
    med_config: str | Path,
    tokenizer: str | Path,
    out: str | Path,
    vision_overrides: dict[str, Any] | None = None,
) -> Path:
    """Convert ImageReward.pt once into ``out/`` (model.safetensors, config.json, tokenizer).

    Args:
        checkpoint: the released ``ImageReward.pt``, read with ``weights_only=True``.
        med_config: its ``med_config.json`` (the text encoder's BERT config).
        tokenizer: a local bert-base-uncased tokenizer folder (``vocab.txt``).
        out: the folder to write.
        vision_overrides: BlipVisionConfig values over ViT-L/16 224 (tests use a tiny ViT).

    Raises ``ValueError`` when the checkpoint's tensors do not fill the model exactly.
    """
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    if "state_dict" in state:
        state = state["state_dict"]
    vision = {**VIT_LARGE, **(vision_overrides or {})}
    bert = blip_tokenizer(tokenizer)
    med = json.loads(Path(med_config).read_text())
    text = text_config_from_med(med, vision["hidden_size"], bert)
    model = ImageReward(BlipVisionConfig(**vision), text, bert)
    mapped, skipped = map_checkpoint(state)
    result = model.load_state_dict(mapped, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint does not fit ImageReward: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "model_type": "imagereward",
        "vision_config": vision,
        "text_config": text.to_dict(),
        "reward_mean": REWARD_MEAN,
        "reward_std": REWARD_STD,
        "max_tokens": MAX_TOKENS,
        "converted_from": Path(checkpoint).name,
        "skipped_keys": skipped,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model.tokenizer.save_pretrained(str(folder / "tokenizer"))
    shutil.copy(med_config, folder / "med_config.json")
    return folder


def load_imagereward(folder: str | Path, device: torch.device | str = "cpu") -> ImageReward:
    """A converted ImageReward (``convert_checkpoint``'s folder), frozen, in eval mode; reads
    safetensors and JSON only."""
    path = Path(folder)
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "imagereward":
        raise ValueError(f"{path}: not a converted ImageReward (run convert-imagereward)")
    tokenizer = BertTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    model = ImageReward(
        BlipVisionConfig(**config["vision_config"]),
        BlipTextConfig(**config["text_config"]),
        tokenizer,
    )
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.requires_grad_(False).eval().to(device)


def main(argv: Sequence[str] | None = None) -> int:
    """``hypersd-train convert-imagereward``: ImageReward.pt -> a safetensors folder."""
    parser = argparse.ArgumentParser(
        prog="hypersd-train convert-imagereward",
        description="Convert ImageReward.pt (tensors only) to safetensors, once.",
    )
    parser.add_argument("--checkpoint", required=True, help="ImageReward.pt")
    parser.add_argument("--blip-config", required=True, help="ImageReward's med_config.json")
    parser.add_argument("--tokenizer", required=True, help="local bert-base-uncased folder")
    parser.add_argument("--out", default="models/imagereward", help="folder to write")
    parser.add_argument("--vision-config", help="JSON of BlipVisionConfig values over ViT-L/16")
    args = parser.parse_args(list(argv or []))
    overrides = json.loads(Path(args.vision_config).read_text()) if args.vision_config else None
    folder = convert_checkpoint(
        args.checkpoint, args.blip_config, args.tokenizer, args.out, overrides
    )
    print(f"imagereward: {folder}")
    return 0
