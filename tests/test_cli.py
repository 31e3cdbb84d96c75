"""The ``hypersd`` command line, run as a user runs it: a subprocess with the shipped registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hypersd.registry import load_registry

RED_CIRCLE = "a large red circle in the center on a white background"
DEFAULT = load_registry().get()  # the shipped default: the distilled model


def hypersd(*args: str, registry: Path | None = None) -> subprocess.CompletedProcess[str]:
    # One thread: on a shared 2-core machine, more makes OpenMP spin against other work.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYPERSD_REGISTRY", None)
    if registry is not None:
        env["HYPERSD_REGISTRY"] = str(registry)
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_generate_writes_a_64px_png_with_the_shipped_model(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    result = hypersd("generate", "--prompt", RED_CIRCLE, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"


def test_generate_several_images_to_a_folder(tmp_path: Path) -> None:
    result = hypersd(
        "generate",
        "--prompt",
        RED_CIRCLE,
        "--n",
        "2",
        "--seed",
        "7",
        "--out",
        str(tmp_path / "images"),
    )
    assert result.returncode == 0, result.stderr
    files = sorted((tmp_path / "images").glob("*.png"))
    assert [f.name for f in files] == ["image-0.png", "image-1.png"]
    first, second = (Image.open(f).tobytes() for f in files)
    assert first != second  # seeds 7 and 8


def test_models_lists_the_registry_with_its_default() -> None:
    result = hypersd("models")
    assert result.returncode == 0, result.stderr
    default = load_registry().default
    assert any(line.startswith(f"* {default} ") for line in result.stdout.splitlines())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'; known models:"),
        (["--model", "../../etc/passwd"], "never by file path"),
        (["--steps", "0"], "steps=0 is not allowed"),
        # no --model: the default (distilled) model, which does not take the teacher's 25 steps
        (["--steps", "25"], f"steps=25 is not allowed for model {DEFAULT.name!r}; allowed: "),
        (["--width", "65"], "width"),
        (["--n", "0"], "--n must be at least 1"),
    ],
)
def test_bad_arguments_fail_with_a_clear_message(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = hypersd("generate", "--prompt", RED_CIRCLE, *args, "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.png").exists()
