"""The shipped Shapes reward networks of feedback learning: the aesthetic model (a ReFL
reward) and the instance-segmentation model (the structure loss's SOLO analogue).

Both are checked on fresh renders, from dataset seeds their training and evaluation
never used, and through the objective functions they plug into.
"""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path

import pytest
import torch

from hypersd.shapes import Scene, ShapeObject, ShapesDataset, render
from training import aesthetic, segmentation
from training.aesthetic import (
    DEGRADATIONS,
    LEVELS,
    AestheticNet,
    AestheticNetConfig,
    degrade,
    load_aesthetic_model,
    save_aesthetic_model,
)
from training.cli import STAGES
from training.image_ops import images_to_tensor
from training.objectives.feedback import refl_loss, structure_loss
from training.segmentation import (
    SegmentationNet,
    SegmentationNetConfig,
    load_segmentation_model,
    mask_iou,
    masks_tensor,
    save_segmentation_model,
    slot_masks,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def aesthetic_net() -> AestheticNet:
    return load_aesthetic_model()


@pytest.fixture(scope="module")
def segmentation_net() -> SegmentationNet:
    return load_segmentation_model()


@pytest.fixture(scope="module")
def fresh() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """200 fresh renders: images (N, 3, 64, 64), slot masks (N, 2, 64, 64), captions."""
    samples = list(ShapesDataset(seed=777_003, length=200))
    images = images_to_tensor([s.rendered.image for s in samples])
    return images, masks_tensor([s.rendered for s in samples]), [s.caption for s in samples]


# ----------------------------------------------------------------------------- aesthetic


@pytest.fixture(scope="module")
def degraded_scores(
    aesthetic_net: AestheticNet, fresh: tuple[torch.Tensor, torch.Tensor, list[str]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clean scores (N,) and, per degradation, scores (levels, N)."""
    images = fresh[0]
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        clean = aesthetic_net(images)
        per_kind = {
            kind: torch.stack(
                [aesthetic_net(degrade(images, kind, level, generator)) for level in LEVELS]
            )
            for kind in DEGRADATIONS
        }
    return clean, per_kind


@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_aesthetic_ranks_clean_above_every_degradation(
    degraded_scores: tuple[torch.Tensor, dict[str, torch.Tensor]], kind: str
) -> None:
    clean, per_kind = degraded_scores
    for level, scores in zip(LEVELS, per_kind[kind], strict=True):
        accuracy = (clean > scores).float().mean().item()
        assert accuracy >= 0.95, f"{kind} at severity {level}: clean ranked above on {accuracy:.1%}"


@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_aesthetic_is_graded_by_severity(
    degraded_scores: tuple[torch.Tensor, dict[str, torch.Tensor]], kind: str
) -> None:
    clean, per_kind = degraded_scores
    means = [clean.mean().item(), *per_kind[kind].mean(dim=1).tolist()]
    assert all(a > b for a, b in itertools.pairwise(means)), means


def test_aesthetic_clean_scores_near_one(
    degraded_scores: tuple[torch.Tensor, dict[str, torch.Tensor]],
) -> None:
    clean, per_kind = degraded_scores
    assert 0.8 <= clean.mean().item() <= 1.2
    assert all(scores[-1].mean().item() < 0.4 for scores in per_kind.values())


def test_aesthetic_is_a_differentiable_refl_reward(
    aesthetic_net: AestheticNet, fresh: tuple[torch.Tensor, torch.Tensor, list[str]]
) -> None:
    images, _, captions = fresh
    blurred = degrade(images[:8], "blur", 0.5, torch.Generator().manual_seed(0))
    x0 = blurred.clone().requires_grad_(True)
    terms = refl_loss(x0, captions[:8], aesthetic_net.reward, alpha=1.0)
    assert terms["loss"].item() > 0
    terms["loss"].backward()
    assert x0.grad is not None and torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in aesthetic_net.parameters())
    # a step up the reward's gradient raises the reward
    with torch.no_grad():
        before = aesthetic_net.reward(x0, captions[:8]).mean()
        after = aesthetic_net.reward((x0 - 0.01 * x0.grad.sign()).clamp(0, 1), None).mean()
    assert after > before
    # larger images are resized to the 64 px canvas
    big = torch.nn.functional.interpolate(images[:2], scale_factor=4, mode="nearest")
    assert aesthetic_net.reward(big, captions[:2]).shape == (2,)


def test_degrade_is_reproducible_and_checked() -> None:
    images = images_to_tensor([s.rendered.image for s in ShapesDataset(seed=3, length=4)])
    severity = torch.tensor([0.0, 0.3, 0.6, 1.0])
    for kind in DEGRADATIONS:
        a = degrade(images, kind, severity, torch.Generator().manual_seed(1))
        b = degrade(images, kind, severity, torch.Generator().manual_seed(1))
        assert a.shape == images.shape and torch.equal(a, b)
        assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, images)
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(images, "sepia", 0.5, torch.Generator())


# ----------------------------------------------------------------------------- segmentation


def test_slot_masks_follow_the_scene_order() -> None:
    left = ShapeObject("large", "red", "circle", "left")
    right = ShapeObject("small", "blue", "square", "right")
    masks = slot_masks(render(Scene("white", (left, right))))
    assert masks.shape == (2, 64, 64)
    columns = [m.nonzero()[1].mean() for m in masks]
    assert columns[0] < 32 < columns[1]
    lone = slot_masks(render(Scene("black", (ShapeObject("small", "red", "cross", "right"),))))
    assert lone[0].any() and not lone[1].any()


def test_segmentation_iou_on_fresh_renders(
    segmentation_net: SegmentationNet, fresh: tuple[torch.Tensor, torch.Tensor, list[str]]
) -> None:
    images, masks, _ = fresh
    predicted = segmentation_net.predict_masks(images)
    iou = mask_iou(predicted, masks)
    present = masks.sum((-2, -1)) > 0
    assert iou[present[:, 0], 0].mean().item() >= 0.9
    assert present[:, 1].sum() >= 50
    assert iou[present[:, 1], 1].mean().item() >= 0.9
    # one-object scenes leave slot 1 empty
    assert (predicted[~present[:, 1], 1].sum((-2, -1)) < 5).float().mean().item() >= 0.95


def test_structure_loss_with_the_segmentation_model(
    segmentation_net: SegmentationNet, fresh: tuple[torch.Tensor, torch.Tensor, list[str]]
) -> None:
    images, masks, _ = fresh
    images, masks = images[:64], masks[:64]
    own = structure_loss(images, masks, segmentation_net, from_logits=True)
    swapped = structure_loss(images, masks.flip(1), segmentation_net, from_logits=True)
    shuffled = structure_loss(images, masks.roll(1, dims=0), segmentation_net, from_logits=True)
    assert own["loss"].item() < 0.15
    assert swapped["loss"].item() > 5 * own["loss"].item()
    assert shuffled["loss"].item() > 5 * own["loss"].item()
    # masks at another resolution are resized to the network's 64 px output
    half = torch.nn.functional.interpolate(masks, size=(32, 32), mode="nearest")
    coarse = structure_loss(images, half, segmentation_net, from_logits=True)
    assert coarse["loss"].item() < 0.5
    # probabilities work as well (from_logits=False)
    probs = structure_loss(images, masks, segmentation_net.probabilities)
    assert probs["loss"].item() < 0.15


def test_structure_loss_gradients_reach_the_images(
    segmentation_net: SegmentationNet, fresh: tuple[torch.Tensor, torch.Tensor, list[str]]
) -> None:
    images, masks, _ = fresh
    x0 = degrade(images[:8], "blur", 1.0, torch.Generator().manual_seed(0)).requires_grad_(True)
    terms = structure_loss(x0, masks[:8], segmentation_net, from_logits=True)
    terms["loss"].backward()
    assert x0.grad is not None and torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in segmentation_net.parameters())


# ----------------------------------------------------------------------------- save / load / CLI


@pytest.mark.parametrize(
    ("module", "loader", "model_type"),
    [
        (aesthetic, load_aesthetic_model, "shapes-aesthetic-net"),
        (segmentation, load_segmentation_model, "shapes-segmentation-net"),
    ],
)
def test_shipped_weights_load_without_pickle(
    monkeypatch: pytest.MonkeyPatch, module: object, loader: object, model_type: str
) -> None:
    directory = Path(module.DEFAULT_MODEL_DIR)  # type: ignore[attr-defined]
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    assert (directory / "model.safetensors").stat().st_size < 2_000_000

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle must not be used to load a reward network")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    net = loader()  # type: ignore[operator]
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == model_type
    assert {"architecture", "training", "metrics"} <= set(config)


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    aes = AestheticNet(AestheticNetConfig(channels=(4, 8), strides=(2, 2), hidden_dim=8)).eval()
    loaded_aes = load_aesthetic_model(save_aesthetic_model(aes, tmp_path / "aes"))
    assert torch.allclose(aes(images), loaded_aes(images))
    seg = SegmentationNet(SegmentationNetConfig(channels=(4, 8))).eval()
    loaded_seg = load_segmentation_model(save_segmentation_model(seg, tmp_path / "seg"))
    assert torch.allclose(seg(images), loaded_seg(images))
    with pytest.raises(ValueError, match="not a shapes-segmentation-net"):
        load_segmentation_model(tmp_path / "aes")


def test_stages_are_registered() -> None:
    assert STAGES["aesthetic"] == "training.aesthetic:main"
    assert STAGES["segmentation"] == "training.segmentation:main"


def test_training_clis_run_and_save(tmp_path: Path) -> None:
    assert (
        aesthetic.main(
            [
                "steps=2",
                "batch_size=4",
                "eval_size=6",
                "channels=[4,8]",
                "strides=[2,2]",
                "hidden_dim=8",
                f"out={tmp_path / 'aes'}",
                f"log_dir={tmp_path / 'aes-log'}",
                "device=cpu",
            ]
        )
        == 0
    )
    assert isinstance(load_aesthetic_model(tmp_path / "aes"), AestheticNet)
    assert (tmp_path / "aes-log" / "train_log.jsonl").read_text().strip()
    assert (
        segmentation.main(
            [
                "steps=2",
                "batch_size=4",
                "eval_size=6",
                "channels=[4,8]",
                f"out={tmp_path / 'seg'}",
                f"log_dir={tmp_path / 'seg-log'}",
                "device=cpu",
            ]
        )
        == 0
    )
    assert isinstance(load_segmentation_model(tmp_path / "seg"), SegmentationNet)
