"""Tiny random CLIP models saved as local folders, for the preference reward and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import MAX_TOKENS, tiny_tokenizer
from torch import Tensor
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

CLIP_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


def tiny_clip(folder: Path, seed: int = 0) -> CLIPModel:
    """A random CLIPModel (32 px, 24-d projections) and its tokenizer, saved in ``folder``."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": 200,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": MAX_TOKENS,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
        vision_config=CLIP_VISION,
        projection_dim=24,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(folder)
    return model


def tiny_clip_vision(folder: Path, seed: int = 0) -> CLIPVisionModelWithProjection:
    """A random CLIP vision tower with projection (the LAION predictor's), saved in ``folder``."""
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION, projection_dim=24)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


# ImageReward: a tiny BLIP in the released checkpoint's layout (ImageReward.pt)
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
TEXT = {
    "vocab_size": 16,
    "hidden_size": 24,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 40,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "add_cross_attention": True,
    "encoder_width": 768,
}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog", "on", "the"]


def original_state(seed: int = 0) -> dict[str, Tensor]:
    """Random tensors named and shaped as in ImageReward.pt (plus keys the reward ignores)."""
    g = torch.Generator().manual_seed(seed)
    d, f, p = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]
    h, i = TEXT["hidden_size"], TEXT["intermediate_size"]
    tokens = (VISION["image_size"] // p) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "blip.visual_encoder.cls_token": (1, 1, d),
        "blip.visual_encoder.pos_embed": (1, tokens, d),
        "blip.visual_encoder.patch_embed.proj.weight": (d, 3, p, p),
        "blip.visual_encoder.patch_embed.proj.bias": (d,),
        "blip.visual_encoder.norm.weight": (d,),
        "blip.visual_encoder.norm.bias": (d,),
        "blip.text_encoder.embeddings.word_embeddings.weight": (TEXT["vocab_size"], h),
        "blip.text_encoder.embeddings.position_embeddings.weight": (
            TEXT["max_position_embeddings"],
            h,
        ),
        "blip.text_encoder.embeddings.LayerNorm.weight": (h,),
        "blip.text_encoder.embeddings.LayerNorm.bias": (h,),
        "blip.vision_proj.weight": (8, d),
        "blip.text_proj.weight": (8, h),
    }
    for n in range(VISION["num_hidden_layers"]):
        block = f"blip.visual_encoder.blocks.{n}"
        for name in ("norm1", "norm2"):
            shapes |= {f"{block}.{name}.weight": (d,), f"{block}.{name}.bias": (d,)}
        shapes |= {
            f"{block}.attn.qkv.weight": (3 * d, d),
            f"{block}.attn.qkv.bias": (3 * d,),
            f"{block}.attn.proj.weight": (d, d),
            f"{block}.attn.proj.bias": (d,),
            f"{block}.mlp.fc1.weight": (f, d),
            f"{block}.mlp.fc1.bias": (f,),
            f"{block}.mlp.fc2.weight": (d, f),
            f"{block}.mlp.fc2.bias": (d,),
        }
    for n in range(TEXT["num_hidden_layers"]):
        layer = f"blip.text_encoder.encoder.layer.{n}"
        for attention, width in (("attention", h), ("crossattention", d)):
            shapes |= {
                f"{layer}.{attention}.self.query.weight": (h, h),
                f"{layer}.{attention}.self.query.bias": (h,),
                f"{layer}.{attention}.self.key.weight": (h, width),
                f"{layer}.{attention}.self.key.bias": (h,),
                f"{layer}.{attention}.self.value.weight": (h, width),
                f"{layer}.{attention}.self.value.bias": (h,),
                f"{layer}.{attention}.output.dense.weight": (h, h),
                f"{layer}.{attention}.output.dense.bias": (h,),
                f"{layer}.{attention}.output.LayerNorm.weight": (h,),
                f"{layer}.{attention}.output.LayerNorm.bias": (h,),
            }
        shapes |= {
            f"{layer}.intermediate.dense.weight": (i, h),
            f"{layer}.intermediate.dense.bias": (i,),
            f"{layer}.output.dense.weight": (h, i),
            f"{layer}.output.dense.bias": (h,),
            f"{layer}.output.LayerNorm.weight": (h,),
            f"{layer}.output.LayerNorm.bias": (h,),
        }
    for index, (fan_in, fan_out) in zip(
        (0, 2, 4, 6, 7), ((h, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)), strict=True
    ):
        shapes |= {f"mlp.layers.{index}.weight": (fan_out, fan_in)}
        shapes |= {f"mlp.layers.{index}.bias": (fan_out,)}
    state = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=g) * 0.2
        if "LayerNorm.weight" in key or key.endswith(
            ("norm1.weight", "norm2.weight", "norm.weight")
        ):
            value = 1 + value
        state[key] = value
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    return state


def tiny_imagereward(root: Path) -> Path:
    """A tiny ImageReward.pt, med_config.json and BERT vocabulary in ``root``, converted into
    ``root/converted`` by the command; returns that folder."""
    from training import imagereward

    root.mkdir(parents=True, exist_ok=True)
    torch.save(original_state(), root / "ImageReward.pt")
    (root / "med_config.json").write_text(json.dumps(TEXT))
    (root / "bert").mkdir(exist_ok=True)
    (root / "bert" / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    (root / "vision.json").write_text(json.dumps(VISION))
    code = imagereward.main(
        [
            *("--checkpoint", str(root / "ImageReward.pt")),
            *("--blip-config", str(root / "med_config.json")),
            *("--tokenizer", str(root / "bert")),
            *("--out", str(root / "converted")),
            *("--vision-config", str(root / "vision.json")),
        ]
    )
    assert code == 0
    return root / "converted"


def tiny_mask2former(folder: Path, seed: int = 0) -> Path:
    """A random Mask2Former (tiny Swin backbone, 8 queries, 5 classes) saved in ``folder``,
    with a processor config resizing images to 64 px on their shorter side."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    torch.manual_seed(seed)
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=5,
        num_queries=8,
        hidden_dim=32,
        feature_size=32,
        mask_feature_size=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        num_attention_heads=2,
        common_stride=4,
    )
    Mask2FormerForUniversalSegmentation(config).save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 64}}))
    return folder
