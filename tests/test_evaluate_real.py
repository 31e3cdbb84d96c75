"""``hypersd-train evaluate --prompts``: the real-model table on tiny random SD1.5 and SDXL
pipelines, with tiny random CLIP, LAION-aesthetic and ImageReward models; FID_CLIP's sanity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reward_models import tiny_clip, tiny_clip_vision, tiny_imagereward
from safetensors.torch import save_file
from tiny_models import TinyModels

from training.cli import main as cli
from training.fid import ClipFeatures, fid, folder_features

METRICS = ("CLIP score", "Aesthetic", "ImageReward", "PickScore", "FID (CLIP)")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every metric's local weights (tiny, random) and two image folders for FID."""
    root = tmp_path_factory.mktemp("metric-weights")
    tiny_clip(root / "clip", seed=0)
    tiny_clip(root / "pickscore", seed=1)
    tiny_clip_vision(root / "aesthetic-clip", seed=2)
    g = torch.Generator().manual_seed(3)
    sizes = {0: (1024, 24), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    head = {}
    for index, (rows, cols) in sizes.items():
        head[f"layers.{index}.weight"] = torch.randn(rows, cols, generator=g) / cols**0.5
        head[f"layers.{index}.bias"] = torch.zeros(rows)
    save_file(head, root / "aesthetic-head.safetensors")
    imagereward = tiny_imagereward(root / "imagereward")
    rng = np.random.default_rng(0)
    smooth, noise = root / "smooth", root / "noise"
    smooth.mkdir()
    noise.mkdir()
    ramp = np.linspace(0, 1, 48)
    for i in range(10):  # smooth colour gradients, and uniform noise
        colour = rng.uniform(0.2, 1.0, 3)
        angle = rng.uniform(0, np.pi)
        field = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
        pixels = (field[..., None] * colour * 255 / field.max()).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(smooth / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(noise / f"{i}.png")
    return {
        "clip": root / "clip",
        "pickscore": root / "pickscore",
        "aesthetic-clip": root / "aesthetic-clip",
        "aesthetic-head": root / "aesthetic-head.safetensors",
        "imagereward": imagereward,
        "smooth": smooth,
        "noise": noise,
    }


def test_fid_of_a_folder_against_itself_is_zero_and_against_noise_is_not(
    weights: dict[str, Path],
) -> None:
    features = ClipFeatures(weights["clip"])
    smooth = folder_features(features, weights["smooth"])
    noise = folder_features(features, weights["noise"])
    assert smooth.shape == (10, 32)
    assert fid(smooth, smooth) < 1e-6
    assert fid(smooth, noise) > 1.0
    assert fid(smooth, noise) > 1000 * fid(smooth, smooth[::-1].copy())


@pytest.mark.parametrize("source", ["sd15-registry", "sdxl-folder"])
def test_evaluate_writes_the_table_at_every_step_count(
    source: str, tiny_models: TinyModels, weights: dict[str, Path], tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\nthe dog on a cat\na blue square\n")
    if source == "sd15-registry":
        model = ["--model", "sd15-teacher", "--registry", str(tiny_models.registry)]
    else:
        model = ["--pipeline-dir", str(tiny_models.sdxl), "--recipe", "teacher", "--size", "64"]
    out = tmp_path / "out"
    code = cli(
        [
            "evaluate",
            *("--prompts", str(prompts)),
            *model,
            *("--clip", str(weights["clip"])),
            *("--pickscore", str(weights["pickscore"])),
            *("--aesthetic-clip", str(weights["aesthetic-clip"])),
            *("--aesthetic-head", str(weights["aesthetic-head"])),
            *("--imagereward", str(weights["imagereward"])),
            *("--fid-reference", str(weights["smooth"])),
            *("--fid-features", str(weights["clip"])),
            *("--out", str(out), "--batch-size", "2", "--device", "cpu"),
        ]
    )
    assert code == 0
    report = json.loads((out / "real-eval.json").read_text())
    assert report["prompts"] == 3
    rows = report["rows"]
    assert list(rows) == ["1", "2", "4", "8"]
    for row in rows.values():
        assert set(row) == {"clip_score", "aesthetic", "imagereward", "pickscore", "fid"}
        assert all(np.isfinite(value) for value in row.values())
        assert 0 <= row["clip_score"] <= 100 and row["fid"] >= 0
    # the images differ between step counts, so their metrics do
    assert len({row["imagereward"] for row in rows.values()}) > 1
    for n in (1, 2, 4, 8):
        assert len(list((out / f"steps-{n}").glob("*.png"))) == 3
    table = (out / "real-eval.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| steps"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == ["steps", *METRICS]
    body = [line for line in table if line.startswith("| ") and line[2].isdigit()]
    assert [line.split("|")[1].strip() for line in body] == ["1", "2", "4", "8"]
    for line in body:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == 6 and all(cell and cell != "–" for cell in cells)


def test_a_metric_without_weights_is_left_out_and_bad_steps_are_refused(
    tiny_models: TinyModels, weights: dict[str, Path], tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    base = ["evaluate", "--prompts", str(prompts), "--registry", str(tiny_models.registry)]
    code = cli([*base, "--model", "sd15-teacher", "--steps-list", "1", "--out", str(tmp_path)])
    assert code == 0
    assert json.loads((tmp_path / "real-eval.json").read_text())["rows"] == {"1": {}}
    with pytest.raises(ValueError, match="not allowed by recipe nstep-lora"):
        cli([*base, "--model", "sd15-nstep", "--steps-list", "3", "--out", str(tmp_path)])
