"""The shipped Shapes attribute network: the judge of prompt adherence, FID features and reward.

If it is wrong, every adherence number in the project is wrong, so it is held
to near-perfect accuracy on fresh renders and must reject near-miss images.
"""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hypersd.shapes import Scene, ShapeObject, ShapesDataset, render, sample_scene
from hypersd.shapes.spec import BACKGROUND_COLORS, OBJECT_COLORS, SHAPES, SLOTS
from training import attributes
from training.attributes import (
    DEFAULT_MODEL_DIR,
    AttributeNet,
    AttributeNetConfig,
    load_attribute_net,
    save_attribute_net,
)
from training.image_ops import AugmentConfig, augment, images_to_tensor
from training.negatives import odd_shape_coverage, render_batch
from training.scene_labels import HEAD_SIZES, decode_labels, scene_labels

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net() -> AttributeNet:
    return load_attribute_net()


@pytest.fixture(scope="module")
def fresh() -> tuple[torch.Tensor, list[Scene]]:
    """300 renders from a dataset seed neither training nor its evaluation used."""
    samples = list(ShapesDataset(seed=777_001, length=300))
    return images_to_tensor([s.rendered.image for s in samples]), [s.scene for s in samples]


def test_classifies_fresh_renders(
    net: AttributeNet, fresh: tuple[torch.Tensor, list[Scene]]
) -> None:
    images, scenes = fresh
    correct = net.is_correct(images, scenes)
    assert correct.dtype == torch.bool
    assert correct.float().mean().item() >= 0.99
    predicted = net.predict(images)
    assert np.mean([p == s for p, s in zip(predicted, scenes, strict=True)]) >= 0.99
    # captions work as well as scenes
    assert net.is_correct(images[:20], [s.caption() for s in scenes[:20]]).equal(correct[:20])


def _swap_color(scene: Scene, rng: random.Random) -> Scene:
    index = rng.randrange(len(scene.objects))
    while True:
        color = rng.choice([c for c in OBJECT_COLORS if c != scene.objects[index].color])
        objects = list(scene.objects)
        objects[index] = replace(objects[index], color=color)
        try:
            return Scene(scene.background, tuple(objects))
        except ValueError:  # the two objects became identical
            continue


def _swap_shape(scene: Scene, rng: random.Random) -> Scene:
    index = rng.randrange(len(scene.objects))
    while True:
        shape = rng.choice([s for s in SHAPES if s != scene.objects[index].shape])
        objects = list(scene.objects)
        objects[index] = replace(objects[index], shape=shape)
        try:
            return Scene(scene.background, tuple(objects))
        except ValueError:
            continue


def _wrong_place(scene: Scene, rng: random.Random) -> Scene:
    if len(scene.objects) == 1:
        (obj,) = scene.objects
        slot = rng.choice([s for s in SLOTS if s != obj.slot])
        return Scene(scene.background, (replace(obj, slot=slot),))
    first, second = scene.objects
    if rng.random() < 0.5:  # the objects trade places
        return Scene(
            scene.background, (replace(second, slot=first.slot), replace(first, slot=second.slot))
        )
    other = ("top", "bottom") if first.slot == "left" else ("left", "right")
    return Scene(scene.background, (replace(first, slot=other[0]), replace(second, slot=other[1])))


@pytest.mark.parametrize("mutate", [_swap_color, _swap_shape, _wrong_place])
def test_flags_near_miss_renders(net: AttributeNet, mutate: object) -> None:
    """A render of a slightly different scene is judged wrong for the original caption."""
    rng = random.Random(f"near-miss:{getattr(mutate, '__name__', '')}")
    captions, wrong_images = [], []
    for _ in range(80):
        scene = sample_scene(rng)
        wrong = mutate(scene, rng)  # type: ignore[operator]
        assert wrong != scene
        captions.append(scene.caption())
        wrong_images.append(render(wrong, rng).image)
    flagged = ~net.is_correct(images_to_tensor(wrong_images), captions)
    assert flagged.all()


@pytest.mark.parametrize("variant", ["clutter", "odd"])
def test_flags_renders_with_something_no_caption_describes(net: AttributeNet, variant: str) -> None:
    """A stray extra object, or an object of no Shapes shape: wrong for the caption."""
    dataset = ShapesDataset(seed=777_002, length=100)
    options = {"clutter_prob": 1.0} if variant == "clutter" else {"odd_prob": 1.0}
    images, scenes, _, variants = render_batch(dataset, 0, 100, **options)
    keep = [v == variant for v in variants]
    x = images_to_tensor(images.numpy())[torch.tensor(keep)]
    captions = [s.caption() for s, k in zip(scenes, keep, strict=True) if k]
    assert len(captions) >= 90
    assert (~net.is_correct(x, captions)).float().mean() >= 0.95
    # and the same renders without it are right
    clean, _, _, _ = render_batch(dataset, 0, 100)
    assert net.is_correct(images_to_tensor(clean.numpy()), scenes).float().mean() >= 0.98


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_diamond_is_no_cross(net: AttributeNet, size: str) -> None:
    """What a blurry decoder makes of a small cross (a diamond) must not pass as one."""
    rng = random.Random(size)
    captions, images = [], []
    for _ in range(40):
        scene = sample_scene(rng, "one")
        scene = Scene(scene.background, (replace(scene.objects[0], shape="cross", size=size),))
        rendered = render(scene, rng)
        alpha = odd_shape_coverage("diamond", rendered.placements[0], rng)[..., None]
        color = np.asarray(OBJECT_COLORS[scene.objects[0].color], np.float32)
        background = np.asarray(BACKGROUND_COLORS[scene.background], np.float32)
        images.append(np.rint(background * (1 - alpha) + color * alpha).astype(np.uint8))
        captions.append(scene.caption())
    assert not net.is_correct(images_to_tensor(images), captions).any()


def test_reward_prefers_the_right_caption(
    net: AttributeNet, fresh: tuple[torch.Tensor, list[Scene]]
) -> None:
    images, scenes = fresh
    images, scenes = images[:60], scenes[:60]
    rng = random.Random(5)
    right = net.log_prob(images, scenes)
    assert right.shape == (60,)
    assert (right <= 0).all()
    for mutate in (_swap_color, _swap_shape, _wrong_place):
        wrong = net.log_prob(images, [mutate(s, rng) for s in scenes])
        assert (right > wrong).all()
        assert (right - wrong).mean() > 5  # a clear margin, not a coin flip


def test_reward_is_differentiable_in_the_images(net: AttributeNet) -> None:
    scenes = [sample_scene(random.Random(i)) for i in range(4)]
    images = images_to_tensor([render(s, random.Random(i)).image for i, s in enumerate(scenes)])
    images = (images * 0.8 + 0.1).requires_grad_(True)
    score = net.log_prob(images, scenes)
    score.sum().backward()
    assert images.grad is not None
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    assert not net.training


def test_features_are_the_penultimate_layer(net: AttributeNet) -> None:
    images = images_to_tensor([render(sample_scene(random.Random(1)), random.Random(1)).image])
    features, logits = net.features_and_logits(images)
    assert features.shape == (1, net.config.feature_dim)
    assert torch.allclose(net.heads(features), logits)
    assert torch.allclose(net(images), logits)


def test_labels_round_trip() -> None:
    rng = random.Random(0)
    for _ in range(300):
        scene = sample_scene(rng)
        labels = scene_labels(scene)
        assert len(labels) == len(HEAD_SIZES)
        assert all(0 <= i < n for i, n in zip(labels, HEAD_SIZES, strict=True))
        assert decode_labels(labels) == scene


ONE_SCENE = Scene("gray", (ShapeObject("small", "cyan", "cross", "top"),))


def test_inconsistent_labels_decode_to_none() -> None:
    one = scene_labels(Scene("white", (ShapeObject("large", "red", "circle", "center"),)))
    two = scene_labels(
        Scene(
            "white",
            (
                ShapeObject("large", "red", "circle", "left"),
                ShapeObject("small", "blue", "cross", "right"),
            ),
        )
    )
    # a one-object layout with an object B
    assert decode_labels((*one[:5], *two[5:])) is None
    # a two-object layout whose object B is "none"
    assert decode_labels((*two[:5], *one[5:])) is None
    # two identical objects
    assert decode_labels((*two[:5], *two[2:5], 0)) is None
    # something else drawn
    assert decode_labels((*one[:-1], 1)) is None
    assert decode_labels(scene_labels(ONE_SCENE, extra=True)) is None
    assert decode_labels(scene_labels(ONE_SCENE)) == ONE_SCENE


def test_images_to_tensor_accepts_pil_arrays_and_other_sizes() -> None:
    from PIL import Image

    image = render(sample_scene(random.Random(2)), random.Random(2)).image
    a = images_to_tensor([image])
    b = images_to_tensor([Image.fromarray(image)])
    c = images_to_tensor([Image.fromarray(image).resize((256, 256), Image.Resampling.NEAREST)])
    assert a.shape == (1, 3, 64, 64)
    assert torch.equal(a, b)
    assert torch.allclose(a, c, atol=1e-6)
    assert a.min() >= 0 and a.max() <= 1


def test_shipped_weights_load_without_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted(p.name for p in Path(DEFAULT_MODEL_DIR).iterdir())
    assert files == ["config.json", "model.safetensors"]

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle must not be used to load the attribute network")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    net = load_attribute_net()
    assert isinstance(net, AttributeNet)
    config = json.loads((Path(DEFAULT_MODEL_DIR) / "config.json").read_text())
    assert {"architecture", "heads", "training", "metrics"} <= set(config)
    assert config["metrics"]["clean"]["exact"] >= 0.995
    assert config["metrics"]["clutter"]["judged_correct"] <= 0.02
    assert config["metrics"]["odd"]["judged_correct"] <= 0.02
    assert sum(p.numel() for p in net.parameters()) < 1_000_000


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = AttributeNet(AttributeNetConfig(channels=(8, 8), strides=(4, 4), feature_dim=16)).eval()
    save_attribute_net(net, tmp_path, {"note": "tiny"})
    loaded = load_attribute_net(tmp_path)
    x = torch.rand(3, 3, 64, 64)
    assert torch.allclose(net(x), loaded(x))
    assert json.loads((tmp_path / "config.json").read_text())["note"] == "tiny"


def test_augment_is_mild_and_reproducible() -> None:
    samples = list(ShapesDataset(seed=3, length=32))
    images = images_to_tensor([s.rendered.image for s in samples])
    config = AugmentConfig(prob=1.0)
    a = augment(images, config, torch.Generator().manual_seed(1))
    b = augment(images, config, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert (a - images).abs().mean() < 0.05  # degraded, not destroyed
    untouched = augment(images, AugmentConfig(prob=0.0), torch.Generator().manual_seed(1))
    assert torch.equal(untouched, images)


def test_training_cli_runs_and_saves(tmp_path: Path) -> None:
    out = tmp_path / "net"
    code = attributes.main(
        [
            "steps=3",
            "batch_size=8",
            "eval_size=16",
            "channels=8,8",
            "strides=4,4",
            "feature_dim=16",
            f"out={out}",
            f"log_dir={tmp_path / 'log'}",
        ]
    )
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["steps"] == 3
    assert config["architecture"]["channels"] == [8, 8]
    assert set(config["metrics"]) >= {"clean", "augmented", "clutter", "odd", "train_seconds"}
    assert (tmp_path / "log" / "train_log.jsonl").read_text().count("\n") >= 1
    load_attribute_net(out)
