"""The Shapes evaluation: its maths on hand-made inputs; end to end on renders and a random model.

A measure is only trusted when it is seen to pass what must pass (renders, ~100 %)
and fail what must fail (an untrained diffusion model, ~0 %).
"""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from PIL import Image

from hypersd.shapes import (
    FINAL_CAPTION_SET,
    Scene,
    ShapeObject,
    fixed_captions,
    parse_caption,
    render,
)
from training import evaluate
from training.attributes import load_attribute_net
from training.evaluate import (
    EvalReport,
    adherence,
    attribute_accuracy,
    evaluate_images,
    frechet_distance,
    sample_grid,
)
from training.scene_labels import HEAD_NAMES, scene_labels

if TYPE_CHECKING:
    from tiny_models import TinyModels

torch.set_num_threads(1)

ONE = Scene("white", (ShapeObject("large", "red", "circle", "center"),))
ONE_B = Scene("black", (ShapeObject("small", "blue", "square", "left"),))
TWO = Scene(
    "gray",
    (ShapeObject("large", "red", "circle", "left"), ShapeObject("small", "blue", "cross", "right")),
)
TWO_B = Scene(
    "white",
    (
        ShapeObject("small", "green", "triangle", "top"),
        ShapeObject("small", "green", "cross", "bottom"),
    ),
)


# ----------------------------------------------------------------------------- pure maths


def test_adherence_on_hand_made_lists() -> None:
    truth = [ONE, ONE_B, TWO, TWO_B]
    assert adherence(truth, truth) == {"all": 1.0, "one": 1.0, "two": 1.0}
    assert adherence([ONE, None, TWO, ONE], truth) == {"all": 0.5, "one": 0.5, "two": 0.5}
    assert adherence([None, None, None, TWO_B], truth) == {"all": 0.25, "one": 0.0, "two": 0.5}
    assert adherence([ONE_B, ONE], [ONE, ONE_B]) == {"all": 0.0, "one": 0.0}  # no two-object kind
    with pytest.raises(ValueError):
        adherence([ONE], truth)
    with pytest.raises(ValueError):
        adherence([], [])


def test_attribute_accuracy_on_hand_made_labels() -> None:
    truth = [ONE, TWO]
    right = np.array([scene_labels(ONE), scene_labels(TWO)])
    perfect = attribute_accuracy(right, truth)
    names = ("background", "place", "color", "shape", "size", "nothing_else")
    assert perfect["all"] == dict.fromkeys(names, 1.0)
    wrong = right.copy()
    wrong[0, HEAD_NAMES.index("background")] = (wrong[0, 0] + 1) % 3  # one-object: background
    wrong[1, HEAD_NAMES.index("b_color")] = 0  # two-object: object B red, should be blue
    result = attribute_accuracy(wrong, truth)
    assert result["all"] == {
        "background": 0.5,
        "place": 1.0,
        "color": 0.5,
        "shape": 1.0,
        "size": 1.0,
        "nothing_else": 1.0,
    }
    assert result["one"]["background"] == 0.0 and result["one"]["color"] == 1.0
    assert result["two"]["background"] == 1.0 and result["two"]["color"] == 0.0
    # an extra object in a one-object image (object B not "none") is a colour/shape/size error
    extra = right.copy()
    extra[0, 5:] = scene_labels(TWO)[5:]
    assert attribute_accuracy(extra, truth)["one"] == {
        "background": 1.0,
        "place": 1.0,
        "color": 0.0,
        "shape": 0.0,
        "size": 0.0,
        "nothing_else": 1.0,
    }
    stray = right.copy()
    stray[1, HEAD_NAMES.index("extra")] = 1  # a stray blob in the two-object image
    assert attribute_accuracy(stray, truth)["two"]["nothing_else"] == 0.0


def test_frechet_distance() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    b = rng.normal(size=(400, 16))
    same_distribution = frechet_distance(a, b)
    shifted = frechet_distance(a, b + 1.0)
    far = frechet_distance(a, b + 3.0)
    assert 0 < same_distribution < 1.0
    assert shifted == pytest.approx(16.0, rel=0.15)  # |mean shift|^2 = 16 * 1^2
    assert far > shifted > same_distribution
    wider = frechet_distance(a, b * 2.0)  # same mean, other covariance: D * (2 - 1)^2
    assert wider == pytest.approx(16.0, rel=0.2)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_frechet_distance_with_fewer_samples_than_dimensions() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.5
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value > 0
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :10])
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)


# ----------------------------------------------------------------------------- on images


@pytest.fixture(scope="module")
def net() -> evaluate.AttributeNet:
    return load_attribute_net()


def test_evaluate_images_on_renders_and_noise(net: evaluate.AttributeNet) -> None:
    captions = fixed_captions(40)
    renders = evaluate.render_captions(captions, seed=3, stream="as-model")
    good = evaluate_images(renders, captions, net, seed=3)
    assert good.adherence["all"] >= 0.95
    assert good.correct.count(True) == round(good.adherence["all"] * 40)
    # the geometric judge, beside the network: renders pass, and say so per image
    assert good.geometric["adherence"] == {"all": 1.0, "one": 1.0, "two": 1.0}
    assert good.geometric_failed == [[]] * 40
    noise = [
        np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(40)
    ]
    bad = evaluate_images(noise, captions, net, seed=3)
    assert bad.adherence["all"] <= 0.05
    assert bad.geometric["adherence"]["all"] == 0.0
    assert sum(bad.geometric["failures"]["all"].values()) >= 40
    assert bad.fid["all"] > 10 * good.fid["all"]
    assert set(bad.fid) == {"all", "one", "two"}
    table = good.markdown("renders")
    assert "prompt adherence" in table and "FID (Shapes)" in table and "two objects (20)" in table
    assert "adherence, geometric judge" in table and "judge: shape wrong" in table


def test_sample_grid_frames_and_size() -> None:
    images = [np.full((64, 64, 3), 200, np.uint8) for _ in range(10)]
    grid = sample_grid(images, [True] * 5 + [False] * 5)
    assert grid.size == (8 * 68, 2 * 68)
    assert grid.getpixel((68 * 4, 0)) == evaluate.GOOD  # image 4: correct
    assert grid.getpixel((68 * 5, 0)) == evaluate.BAD  # image 5: wrong
    assert grid.getpixel((68 * 1 + 30, 68 + 30)) == (200, 200, 200)  # image 9 itself


def _read_json(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def test_cli_reference_renders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "renders"
    code = evaluate.main(["--reference", "renders", "--captions", "100", "--out", str(out)])
    assert code == 0
    data = _read_json(out)
    assert data["count"] == 100
    assert data["adherence"]["all"] >= 0.99
    # FID is biased upwards at small sample sizes (~25 for 100 vs 100 renders, ~5 at 500)
    assert data["fid"]["all"] < 40
    assert len(data["per_image"]) == 100
    assert data["geometric"]["adherence"]["all"] >= 0.99
    assert all(row["geometric_failed"] == [] for row in data["per_image"])
    assert "prompt adherence" in (out / "eval.md").read_text()
    assert "prompt adherence" in capsys.readouterr().out
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (8 * 68, 8 * 68)


def test_cli_held_out_caption_set(tmp_path: Path) -> None:
    """--caption-set picks another fixed caption set (for choosing between training runs
    without looking at the tables' captions); 0 is the tables' own."""
    argv = ["--reference", "renders", "--captions", "20", "--quiet"]
    assert evaluate.main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert evaluate.main([*argv, "--caption-set", "1", "--out", str(tmp_path / "b")]) == 0
    table, held_out = _read_json(tmp_path / "a"), _read_json(tmp_path / "b")
    assert table["grid_captions"] == fixed_captions(20)
    assert held_out["grid_captions"] == fixed_captions(20, seed=1) != fixed_captions(20)
    assert held_out["meta"]["caption_set"] == 1 and held_out["adherence"]["all"] >= 0.95
    final = ["--caption-set", str(FINAL_CAPTION_SET), "--out", str(tmp_path / "c")]
    assert evaluate.main([*argv, *final]) == 0
    assert _read_json(tmp_path / "c")["grid_captions"] == fixed_captions(20, seed=3)


def test_cli_registry_model_through_the_pipeline_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--model`` goes through the hypersd.registry / hypersd.pipeline API (faked: a renderer)."""
    calls: list[dict] = []

    class Generator:
        def generate(self, requests: list[Any], **options: Any) -> Any:
            calls.append({"n": len(requests), **options})
            images = [
                Image.fromarray(render(parse_caption(r.prompt), random.Random(r.seed)).image)
                for r in requests
            ]
            return types.SimpleNamespace(images=images)

    class Spec:  # a registry spec served by ONNX Runtime, as the shipped ones are
        def __init__(self, backend: str = "onnxruntime") -> None:
            self.backend = backend

        def model_copy(self, update: dict[str, str]) -> Spec:
            return Spec(**update)

    class Registry:
        default = "shapes-default"

        def get(self, name: str) -> Spec:
            assert name == "shapes-hyper-2step"
            return Spec()

    loaded: list[str] = []

    def load(spec: Spec, **options: Any) -> Generator:
        loaded.append(spec.backend)
        return Generator()

    registry = types.ModuleType("hypersd.registry")
    registry.load_registry = lambda path=None: Registry()  # type: ignore[attr-defined]
    pipeline = types.ModuleType("hypersd.pipeline")
    pipeline.load = load  # type: ignore[attr-defined]
    pipeline.ImageRequest = lambda prompt, seed, negative_prompt=None: types.SimpleNamespace(  # type: ignore[attr-defined]
        prompt=prompt, seed=seed
    )
    monkeypatch.setitem(sys.modules, "hypersd.registry", registry)
    monkeypatch.setitem(sys.modules, "hypersd.pipeline", pipeline)
    out = tmp_path / "model"
    argv = ["--model", "shapes-hyper-2step", "--steps", "2", "--guidance", "0", "--captions", "30"]
    assert evaluate.main([*argv, "--batch-size", "16", "--out", str(out), "--quiet"]) == 0
    assert [c["n"] for c in calls] == [16, 14]
    assert loaded == ["eager"]  # evaluations build the model eager, whatever serves it
    assert calls[0]["steps"] == 2 and calls[0]["guidance_scale"] == 0.0
    data = _read_json(out)
    assert data["adherence"]["all"] >= 0.95
    assert data["meta"]["source"] == "shapes-hyper-2step-2step"


# ----------------------------------------------------------------------------- a random model
# The project's tiny random-weight pipelines (tests/tiny_models.py, fixture ``tiny_models``).


def test_random_pipeline_scores_low(tiny_models: TinyModels, tmp_path: Path) -> None:
    out = tmp_path / "random"
    argv = ["--pipeline-dir", str(tiny_models.sd15), "--steps", "2", "--guidance", "3"]
    assert evaluate.main([*argv, "--captions", "16", "--out", str(out), "--quiet"]) == 0
    data = _read_json(out)
    assert data["adherence"]["all"] <= 0.1
    assert data["geometric"]["adherence"]["all"] <= 0.1
    assert data["meta"]["scheduler"] == "ddim-trailing"
    # its FID is far above that of renders at the same (small, so biased) sample size
    reference = tmp_path / "renders"
    argv = ["--reference", "renders", "--captions", "16", "--out", str(reference), "--quiet"]
    assert evaluate.main(argv) == 0
    assert data["fid"]["all"] > 3 * _read_json(reference)["fid"]["all"]


def test_random_registry_model_scores_low(tiny_models: TinyModels, tmp_path: Path) -> None:
    """The real hypersd.registry / hypersd.pipeline path, on a tiny random N-step LoRA model."""
    out = tmp_path / "nstep"
    argv = ["--registry", str(tiny_models.registry), "--model", "sd15-nstep", "--steps", "2"]
    assert evaluate.main([*argv, "--captions", "8", "--out", str(out), "--quiet"]) == 0
    data = _read_json(out)
    assert data["count"] == 8
    assert data["adherence"]["all"] <= 0.1


def test_reconstructions_of_a_random_vae_score_low(tiny_models: TinyModels, tmp_path: Path) -> None:
    out = tmp_path / "recon"
    argv = ["--reference", "reconstructions", "--vae", str(tiny_models.sd15), "--captions", "16"]
    assert evaluate.main([*argv, "--out", str(out), "--quiet"]) == 0
    assert _read_json(out)["adherence"]["all"] <= 0.1
    assert evaluate.main(["--reference", "reconstructions", "--captions", "4"]) == 2  # needs --vae


def test_report_json_round_trip() -> None:
    report = EvalReport(
        count=2,
        adherence={"all": 0.5, "one": 1.0, "two": 0.0},
        attributes={},
        fid={"all": 1.0},
        captions=[ONE.caption(), TWO.caption()],
        predicted=[ONE.caption(), None],
        correct=[True, False],
    )
    data = json.loads(json.dumps(report.to_json()))
    assert data["per_image"][1] == {"caption": TWO.caption(), "predicted": None, "correct": False}


def test_eval_summary_shows_the_geometric_judge(tmp_path: Path) -> None:
    """``hypersd-train eval-summary`` has the judge's adherence and the caption set beside the
    network's; reports written before the judge existed show "–"."""
    from training.eval_summary import summary_row, summary_table

    out = tmp_path / "renders"
    argv = ["--reference", "renders", "--captions", "10", "--caption-set", "3", "--quiet"]
    assert evaluate.main([*argv, "--out", str(out)]) == 0
    report = _read_json(out)
    assert summary_table([report]).splitlines()[0].endswith("| geometric judge | caption set |")
    cells = [c.strip() for c in summary_row(report).strip("|").split("|")]
    assert cells[-2:] == ["100.0%", "3"]
    old = {k: v for k, v in report.items() if k != "geometric"}
    assert [c.strip() for c in summary_row(old).strip("|").split("|")][-2] == "–"
