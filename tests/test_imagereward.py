"""ImageReward's conversion: a tiny checkpoint in the released layout, converted and scored.

The reference score is computed here in plain torch straight from the original-layout tensors
(timm ViT + BLIP's post-LN BERT with cross-attention + MLP), so the key mapping, the packed qkv
layout, the LayerNorm epsilons and the normalisation are all checked against an independent
implementation, not against the modules the converter fills.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reward_models import TEXT, VISION, WORDS, original_state, tiny_imagereward
from torch import Tensor

from training import imagereward
from training.imagereward import REWARD_MEAN, REWARD_STD, convert_checkpoint, load_imagereward


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None) -> Tensor:
    n, lq, d = q.shape
    split = lambda x: x.view(n, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(n, lq, d)


def reference_score(s: dict[str, Tensor], pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """ImageReward's forward in plain torch, from the original-layout tensors."""

    def lin(x: Tensor, name: str) -> Tensor:
        return F.linear(x, s[f"{name}.weight"], s[f"{name}.bias"])

    def ln(x: Tensor, name: str, eps: float) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], s[f"{name}.weight"], s[f"{name}.bias"], eps)

    v = "blip.visual_encoder"
    x = F.conv2d(pixels, s[f"{v}.patch_embed.proj.weight"], s[f"{v}.patch_embed.proj.bias"], 8)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s[f"{v}.cls_token"].expand(len(x), -1, -1), x], 1) + s[f"{v}.pos_embed"]
    d = VISION["hidden_size"]
    for n in range(VISION["num_hidden_layers"]):
        b = f"{v}.blocks.{n}"
        q, k, val = lin(ln(x, f"{b}.norm1", 1e-6), f"{b}.attn.qkv").split(d, -1)
        x = x + lin(attention(q, k, val, 4, None), f"{b}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{b}.norm2", 1e-6), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
    image = ln(x, f"{v}.norm", 1e-6)
    t = "blip.text_encoder"
    h = s[f"{t}.embeddings.word_embeddings.weight"][ids]
    h = h + s[f"{t}.embeddings.position_embeddings.weight"][: ids.shape[1]]
    h = ln(h, f"{t}.embeddings.LayerNorm", 1e-12)
    for n in range(TEXT["num_hidden_layers"]):
        layer = f"{t}.encoder.layer.{n}"
        for kind, source, source_mask in (("attention", h, mask), ("crossattention", image, None)):
            a = f"{layer}.{kind}"
            context = attention(
                lin(h, f"{a}.self.query"),
                lin(source if kind == "crossattention" else h, f"{a}.self.key"),
                lin(source if kind == "crossattention" else h, f"{a}.self.value"),
                4,
                source_mask,
            )
            h = ln(lin(context, f"{a}.output.dense") + h, f"{a}.output.LayerNorm", 1e-12)
        inner = F.gelu(lin(h, f"{layer}.intermediate.dense"))
        h = ln(lin(inner, f"{layer}.output.dense") + h, f"{layer}.output.LayerNorm", 1e-12)
    r = h[:, 0]
    for index in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{index}")
    return (r.squeeze(-1) - REWARD_MEAN) / REWARD_STD


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    """The command's output folder for ``original_state()``, and that state."""
    return tiny_imagereward(tmp_path_factory.mktemp("imagereward")), original_state()


def test_converted_score_matches_the_original_computation(
    converted: tuple[Path, dict[str, Tensor]],
) -> None:
    folder, state = converted
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "med_config.json",
        "model.safetensors",
        "tokenizer",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert sorted(config["skipped_keys"]) == [
        "blip.text_encoder.embeddings.position_ids",
        "blip.text_proj.weight",
        "blip.vision_proj.weight",
    ]
    model = load_imagereward(folder)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    captions = ["a red cat", "the dog on a cat", "a zebra"]  # "zebra" is [UNK]
    scores = model(images, captions)
    ids, mask = model.tokens(captions, images.device)
    assert ids.shape == (3, 35) and ids[0, 0].item() == WORDS.index("[CLS]")
    mean = torch.tensor(imagereward.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(imagereward.CLIP_STD).view(1, 3, 1, 1)
    expected = reference_score(state, (images - mean) / std, ids, mask)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert scores.std() > 1e-3  # the images and captions are told apart


def test_score_is_differentiable_in_the_image_at_any_size(
    converted: tuple[Path, dict[str, Tensor]],
) -> None:
    model = load_imagereward(converted[0])
    images = torch.rand(2, 3, 48, 64, requires_grad=True)
    model(images, ["a cat", "a dog"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())


def test_loading_never_unpickles(
    converted: tuple[Path, dict[str, Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model = load_imagereward(converted[0])
    assert model(torch.rand(1, 3, 32, 32), ["a cat"]).shape == (1,)


def test_a_checkpoint_that_does_not_fit_is_refused(
    converted: tuple[Path, dict[str, Tensor]], tmp_path: Path
) -> None:
    folder, state = converted
    broken = {k: v for k, v in state.items() if not k.startswith("blip.visual_encoder.norm.")}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="post_layernorm"):
        convert_checkpoint(
            tmp_path / "broken.pt",
            folder / "med_config.json",
            folder / "tokenizer",
            tmp_path / "out",
            VISION,
        )
