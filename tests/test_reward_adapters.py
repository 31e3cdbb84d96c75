"""The reward loader: Shapes rewards, the LAION aesthetic adapter on a tiny CLIP, clear skips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from training.rewards import RewardSpec, load_reward

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_shapes_rewards_score_renders_and_pass_gradients() -> None:
    from hypersd.shapes import ShapesDataset

    sample, other = ShapesDataset(0, 2)[0], ShapesDataset(0, 2)[1]
    assert sample.caption != other.caption
    image = torch.from_numpy(sample.rendered.image).permute(2, 0, 1)[None].float() / 255
    image.requires_grad_(True)
    alignment = load_reward(
        RewardSpec("shapes-alignment", str(ROOT / "models/shapes-attributes")), CPU
    )
    aesthetic = load_reward(
        RewardSpec("shapes-aesthetic", str(ROOT / "models/shapes-aesthetic")), CPU
    )
    assert alignment is not None and aesthetic is not None
    right = alignment(image, [sample.caption])
    assert float(right.detach()) > float(alignment(image, [other.caption]).detach())
    (right.sum() + aesthetic(image, [sample.caption]).sum()).backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0


def test_laion_aesthetic_adapter_on_a_tiny_clip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=24,
    )
    clip = CLIPVisionModelWithProjection(config)
    clip.save_pretrained(tmp_path / "clip", safe_serialization=True)
    shapes = {0: (1024, 24), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    head = {}
    for index, (rows, cols) in shapes.items():
        head[f"layers.{index}.weight"] = torch.randn(rows, cols) / cols**0.5
        head[f"layers.{index}.bias"] = torch.randn(rows) * 0.1
    save_file(head, tmp_path / "head.safetensors")

    spec = RewardSpec(
        "laion-aesthetic", str(tmp_path / "clip"), head=str(tmp_path / "head.safetensors")
    )
    reward = load_reward(spec, CPU)
    assert reward is not None
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    scores = reward(images, ["a", "b"])
    assert scores.shape == (2,)
    # the same score by hand: CLIP-normalised 32 px pixels, unit embedding, the MLP (eval mode)
    with torch.no_grad():
        pixels = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic")
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        embeds = clip.eval()(pixel_values=(pixels - mean) / std).image_embeds
        x = embeds / embeds.norm(dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):
            x = x @ head[f"layers.{index}.weight"].T + head[f"layers.{index}.bias"]
    torch.testing.assert_close(scores.detach(), x.squeeze(-1), atol=1e-4, rtol=1e-4)
    scores.sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0


def test_missing_or_unloadable_rewards_are_skipped_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load_reward(RewardSpec("imagereward", str(tmp_path)), CPU) is None
    assert "pickle" in capsys.readouterr().out
    assert load_reward(RewardSpec("shapes-aesthetic", str(tmp_path / "nope")), CPU) is None
    assert "no weights at" in capsys.readouterr().out
    assert load_reward(RewardSpec("laion-aesthetic", str(tmp_path), head=None), CPU) is None
    assert "no MLP head" in capsys.readouterr().out
    with pytest.raises(ValueError, match="shapes-alignment"):
        load_reward(RewardSpec("clip-score", str(tmp_path)), CPU)
