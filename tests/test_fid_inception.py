"""FID in Inception-v3 features (``training.inception``): parity with torch-fidelity's extractor
on the same random weights, the one-time ``.pth`` -> safetensors conversion, the low-rank FID,
and ``hypersd-train evaluate --prompts ... --fid-inception`` on the tiny random SD1.5 pipeline.

The weights are random but real-shaped (21.8 M parameters, He-initialised so that activations
neither vanish nor explode through the 94 layers), written once per module as the released
file is laid out: a pickled state dict with the 1008-way classifier and no batch-norm counters.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TinyModels

from training.cli import main as cli
from training.evaluate import frechet_distance
from training.fid import fid
from training.inception import (
    FEATURES,
    InceptionFeatures,
    InceptionV3,
    convert_inception,
    resize_like_tensorflow,
)


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Random Inception weights as a released-style ``.pth``, and their conversion."""
    root = tmp_path_factory.mktemp("inception")
    g = torch.Generator().manual_seed(0)
    model = InceptionV3()
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # the released file has none
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            value = torch.randn(value.shape, generator=g) * (2 / fan_in) ** 0.5
        elif key.endswith("running_mean") or key.endswith("bn.bias"):
            value = torch.randn(value.shape, generator=g) * 0.1
        elif key.endswith("running_var") or key.endswith("bn.weight"):
            value = torch.rand(value.shape, generator=g) * 0.4 + 0.8
        state[key] = value
    state["fc.weight"] = torch.randn(1008, FEATURES, generator=g) * 0.01
    state["fc.bias"] = torch.zeros(1008)
    pth = root / "weights-inception-random.pth"
    torch.save(state, pth)
    converted = root / "inception.safetensors"
    assert cli(["convert-inception", "--checkpoint", str(pth), "--out", str(converted)]) == 0
    return {"pth": pth, "converted": converted, "state": state, "root": root}


def _images(count: int, seed: int, size: tuple[int, int] = (80, 56)) -> list[Image.Image]:
    """Smooth random colour fields (uint8 RGB, ``size`` = width x height)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize(size, Image.Resampling.BILINEAR))
    return images


def _torch_fidelity_extractor(monkeypatch: pytest.MonkeyPatch) -> Any:
    """torch-fidelity's ``FeatureExtractorInceptionV3``, or a skip when it is not installed.

    Its package ``__init__`` imports every extractor, some built on torchvision (CLIP, VGG16,
    DINOv2, the CIFAR/STL datasets); the Inception one compared here uses none of it. PyPI's
    torchvision does not load beside the project's CPU torch (``torchvision::nms does not
    exist``), so for this import only an empty stand-in ``torchvision`` is put in
    ``sys.modules`` (monkeypatch removes it after the test); nothing of it is ever called.
    """
    if importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)")

    class Placeholder:
        """Any torchvision name torch-fidelity's other modules import."""

    def stub(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__path__ = []  # a package: its submodules import too
        module.__getattr__ = lambda attribute: Placeholder  # type: ignore[method-assign]
        return module

    for name in (
        "torchvision",
        "torchvision.datasets",
        "torchvision.models",
        "torchvision.transforms",
        "torchvision.transforms.functional",
    ):
        module = stub(name)
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent:  # `import torchvision.transforms.functional as F` reads the attributes
            setattr(sys.modules[parent], child, module)
    module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    return module.FeatureExtractorInceptionV3


def test_features_match_torch_fidelity_on_the_same_weights(
    released: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    extractor = _torch_fidelity_extractor(monkeypatch)
    theirs = extractor(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(released["pth"])
    )
    images = _images(2, seed=1)
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    with torch.no_grad():
        (expected,) = theirs(pixels)
    ours = InceptionFeatures(released["converted"])(images)
    assert ours.shape == (2, FEATURES)
    # not a degenerate net: features of order one that differ between the images
    assert 0.05 < np.abs(ours).mean() < 50 and np.abs(ours[0] - ours[1]).max() > 1e-2
    np.testing.assert_allclose(ours, expected.double().numpy(), rtol=1e-4, atol=1e-5)


def test_the_conversion_keeps_every_feature_weight_and_drops_the_classifier(
    released: dict[str, Any],
) -> None:
    from safetensors.torch import load_file

    converted = load_file(released["converted"])
    assert not any(key.startswith("fc.") for key in converted)
    for key, value in released["state"].items():
        if not key.startswith("fc."):
            assert torch.equal(converted[key], value), key
    # a state dict of another network is refused, naming what does not fit
    wrong = released["root"] / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="not FID's Inception-v3"):
        convert_inception(wrong, released["root"] / "wrong.safetensors")


def test_tensorflow_resize_samples_without_a_half_pixel_offset() -> None:
    row = torch.arange(4.0).view(1, 1, 1, 4)
    # 4 -> 8: output i samples input i / 2, the last one clamped at the edge
    out = resize_like_tensorflow(row.expand(1, 1, 4, 4), size=8)
    expected = torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3])
    torch.testing.assert_close(out[0, 0, 0], expected)
    # the identity at the same size
    image = torch.rand(1, 3, 5, 5)
    torch.testing.assert_close(resize_like_tensorflow(image, size=5), image)


def test_low_rank_fid_is_the_matrix_square_root_one() -> None:
    rng = np.random.default_rng(0)
    for n_a, n_b, dims in ((5, 7, 64), (3, 4, 200)):
        a = rng.normal(size=(n_a, dims))
        b = rng.normal(size=(n_b, dims)) + 0.3
        assert fid(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-5)
        assert fid(a, a) == pytest.approx(0.0, abs=1e-9)


def test_evaluate_reports_fid_in_inception_features(
    tiny_models: TinyModels, released: dict[str, Any], tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\nthe dog on a cat\na blue square\n")
    reference = tmp_path / "reference"
    reference.mkdir()
    for i, image in enumerate(_images(4, seed=2, size=(48, 48))):
        image.save(reference / f"{i}.png")
    out = tmp_path / "out"
    model = ["--model", "sd15-teacher", "--registry", str(tiny_models.registry)]
    code = cli(
        [
            "evaluate",
            *("--prompts", str(prompts)),
            *model,
            *("--steps-list", "1,2"),
            *("--fid-reference", str(reference)),
            *("--fid-inception", str(released["converted"])),
            *("--out", str(out), "--batch-size", "3", "--device", "cpu"),
        ]
    )
    assert code == 0
    report = json.loads((out / "real-eval.json").read_text())
    assert report["fid_features"] == "inception"
    assert report["fid_weights"] == str(released["converted"])
    fids = {steps: row["fid"] for steps, row in report["rows"].items()}
    assert set(fids) == {"1", "2"} and all(np.isfinite(v) and v > 0 for v in fids.values())
    # the table names the feature space
    table = (out / "real-eval.md").read_text()
    assert "| FID (Inception) |" in table and "CLIP" not in table
    # the same images' FID, recomputed from their Inception features
    features = InceptionFeatures(released["converted"])
    reference_features = features([Image.open(p) for p in sorted(reference.glob("*.png"))])
    generated = [Image.open(p) for p in sorted((out / "steps-1").glob("*.png"))]
    assert fids["1"] == pytest.approx(fid(features(generated), reference_features), rel=1e-3)
    # Inception weights and a CLIP folder together are refused
    with pytest.raises(SystemExit):
        cli(
            [
                "evaluate",
                *("--prompts", str(prompts)),
                *model,
                *("--fid-reference", str(reference)),
                *("--fid-inception", str(released["converted"])),
                *("--fid-features", str(tmp_path)),
            ]
        )
