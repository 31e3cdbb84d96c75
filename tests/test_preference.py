"""The CLIP preference reward (PickScore / HPS layout) on a tiny random CLIPModel folder."""

from __future__ import annotations

from pathlib import Path

import torch
from reward_models import tiny_clip

from training.imagereward import CLIP_MEAN, CLIP_STD
from training.rewards import RewardSpec, load_reward

CPU = torch.device("cpu")


def test_pickscore_reward_is_logit_scale_times_cosine(tmp_path: Path) -> None:
    clip = tiny_clip(tmp_path / "clip")
    reward = load_reward(RewardSpec("pickscore", str(tmp_path / "clip")), CPU)
    assert reward is not None
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    captions = ["a red cat", "two blue dogs", "a cat"]
    scores = reward(images, captions)
    with torch.no_grad():  # by hand: CLIP-normalised pixels, the tokenizer, the projections
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        image = clip.get_image_features(pixel_values=(images - mean) / std).pooler_output
        tokens = reward.tokenizer(
            captions, padding="max_length", max_length=16, return_tensors="pt"
        )
        text = clip.get_text_features(**tokens).pooler_output
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        expected = clip.logit_scale.exp() * (image * text).sum(-1)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert scores.std() > 0


def test_pickscore_reward_is_differentiable_and_frozen(tmp_path: Path) -> None:
    tiny_clip(tmp_path / "clip")
    reward = load_reward(RewardSpec("pickscore", str(tmp_path / "clip")), CPU)
    assert isinstance(reward, torch.nn.Module)
    images = torch.rand(2, 3, 40, 56, requires_grad=True)
    reward(images, ["a", "b"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())
