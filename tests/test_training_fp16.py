"""fp16 frozen weights with loss scaling (``training.loss_scaling``).

The scaler skips a step whose gradients overflow (the weights, the optimizer's step count and
the learning-rate schedule stay put) and its scale survives a checkpoint; every stage (TSCD,
LCM, feedback, DMD) trains two steps on the tiny random SD1.5 model with fp16 weights, and a
resumed TSCD stage goes on with the checkpoint's scale. The stages run in one fresh process:
accelerate's state keeps one precision per process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import load_config
from training.distill import DistillConfig
from training.distributed import compute_precision, make_accelerator
from training.loss_scaling import LossScaler
from training.memory import distill_estimate

ROOT = Path(__file__).resolve().parents[1]
# a scale whose loss overflows fp16 gradients at once, and the backoff that brings it to 1
HUGE_SCALE, TO_ONE = 2.0**120, 2.0**-120


def test_an_overflowing_step_is_skipped_and_the_scale_is_checkpointed(tmp_path: Path) -> None:
    accelerator, device = make_accelerator("cpu", "no")
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scaler = LossScaler(device, "fp16")
    start = scaler.scaler.get_scale()
    # an inf gradient: no step, the scale halves, the skip is counted
    assert not scaler.update((weight * float("inf")).sum(), optimizer, [weight], accelerator, 1.0)
    assert torch.equal(weight.detach(), torch.ones(4))
    assert optimizer.state_dict()["state"] == {}
    assert scaler.skipped == 1 and scaler.scaler.get_scale() == start / 2
    # a finite one steps, unscaled: AdamW's first step moves each weight by ~lr
    assert scaler.update(weight.pow(2).sum(), optimizer, [weight], accelerator, 1.0)
    torch.testing.assert_close(weight.detach(), torch.full((4,), 0.9), atol=1e-3, rtol=0)
    save_checkpoint(
        tmp_path / "ckpt",
        step=2,
        config={},
        modules={},
        optimizers={"student": optimizer},
        scalers={"student": scaler},
    )
    resumed = LossScaler(device, "fp16")
    load_checkpoint(tmp_path / "ckpt", modules={}, scalers={"student": resumed})
    assert resumed.skipped == 1 and resumed.scaler.get_scale() == start / 2
    # without fp16 the scaler is off: the plain step
    plain = LossScaler(device, "bf16")
    assert not plain.enabled
    assert plain.update(weight.pow(2).sum(), optimizer, [weight], accelerator)


def test_fp16_precision_settings() -> None:
    assert compute_precision("fp16", "no") == "fp16"
    assert compute_precision("fp32", "fp16") == "fp16"
    with pytest.raises(ValueError, match=r"mixed_precision must be one of no, fp16"):
        compute_precision("fp16", "bf16")
    with pytest.raises(ValueError, match=r"weight_dtype.*fp32, bf16, fp16"):
        compute_precision("fp8", "no")  # type: ignore[arg-type]


def _overflow_once(checkpoint: Path) -> None:
    """Edit a checkpoint's student scale so that the resumed run's first step overflows, and
    its backoff so that the scale then falls to 1."""
    state_file = checkpoint / "state.json"
    state = json.loads(state_file.read_text())
    state["loss_scaling"]["student"] |= {"scale": HUGE_SCALE, "backoff_factor": TO_ONE}
    state_file.write_text(json.dumps(state))


def drive(out: str, teacher: str) -> None:
    """Run in a fresh process (the test's): every stage two steps with fp16 weights; TSCD
    (three steps) and feedback stopped after one step, their checkpoints' scales set to
    overflow once, then resumed."""
    from training.cli import main

    common = [
        f"teacher={teacher}",
        "device=cpu",
        "threads=1",
        "weight_dtype=fp16",
        # at the default first scale (2**16) the tiny models' first steps overflow and are
        # skipped (the rewards' loss is ~100): two steps would train nothing
        "loss_scale=16",
        "lora_rank=4",
        "lora_alpha=4",
        "sample_count=2",
        "log_every=1",
    ]
    distill = [*common, "train_images=8", "batch_size=2", "sample_every=0", "warmup_steps=100"]
    tscd = [*distill, f"out_dir={out}/tscd", "stages=[1]", "steps_per_stage=3", "disc_hidden=8"]
    assert main(["tscd", *tscd, "stop_after=1"]) == 0
    _overflow_once(Path(out) / "tscd" / "k1" / "checkpoint")
    assert main(["tscd", *tscd]) == 0
    assert main(["lcm", *distill, f"out_dir={out}/lcm", "steps_per_stage=2"]) == 0
    enhance = [
        *common,
        "steps=2",
        "batch_size=2",
        "aesthetic=none",
        f"alignment_path={ROOT / 'models' / 'shapes-attributes'}",
        f"segmentation_path={ROOT / 'models' / 'shapes-segmentation'}",
    ]
    feedback = [*enhance, f"out_dir={out}/feedback"]
    assert main(["feedback", *feedback, "stop_after=1"]) == 0
    _overflow_once(Path(out) / "feedback" / "checkpoint")
    assert main(["feedback", *feedback]) == 0
    dmd = ["structure_weight=0", "fake_rank=4", "fake_updates=1", "gan_weight=0.01", "gan_hidden=8"]
    assert main(["dmd", *enhance, f"out_dir={out}/dmd", *dmd]) == 0


def _losses(log: Path) -> list[float]:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [value for row in rows for key, value in row.items() if key.endswith("loss")]


def test_every_stage_trains_with_fp16_weights(tiny_models: Any, tmp_path: Path) -> None:
    code = (
        f"from test_training_fp16 import drive; drive({str(tmp_path)!r}, {str(tiny_models.sd15)!r})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = {
        "tscd": tmp_path / "tscd" / "k1",
        "lcm": tmp_path / "lcm" / "lcm",
        "feedback": tmp_path / "feedback",
        "dmd": tmp_path / "dmd",
    }
    for name, folder in stages.items():
        log = (tmp_path / name / "log.jsonl") if name in ("tscd", "lcm") else folder / "log.jsonl"
        losses = _losses(log)
        assert losses and all(math.isfinite(v) for v in losses), (name, losses)
        # the LoRA trained (its B matrices start at zero) and stayed fp32
        lora = load_file(folder / "lora.safetensors")
        assert {v.dtype for v in lora.values()} == {torch.float32}, name
        assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k), name
        state = json.loads((folder / "checkpoint" / "state.json").read_text())
        assert state["config"]["weight_dtype"] == "fp16", name
        assert state["loss_scaling"]["student"]["scale"] > 0, name
    # the resumed TSCD stage took the edited scale: its first step overflowed and was skipped
    # (AdamW stepped twice in three steps), the scale backed off to 1, and the learning rate
    # counts the two updates made (warm-up: lr * updates / 100)
    checkpoint = stages["tscd"] / "checkpoint"
    student = json.loads((checkpoint / "state.json").read_text())["loss_scaling"]["student"]
    assert student["skipped"] == 1 and student["scale"] == 1.0
    adam = load_file(checkpoint / "optimizer-student.safetensors")
    assert {float(v) for k, v in adam.items() if k.endswith(".step")} == {2.0}
    groups = json.loads((checkpoint / "optimizer-student.json").read_text())["param_groups"]
    assert groups[0]["lr"] == pytest.approx(1e-4 * 2 / 100)
    # so did the resumed feedback stage (its loop: training.enhance_loop)
    state = json.loads((stages["feedback"] / "checkpoint" / "state.json").read_text())
    assert state["loss_scaling"]["student"]["skipped"] == 1
    assert state["loss_scaling"]["student"]["scale"] == 1.0


def test_the_memory_estimate_stores_fp16_weights_in_two_bytes() -> None:
    configs = ROOT / "training" / "configs"
    bf16 = load_config(DistillConfig, str(configs / "sd15-lcm.yaml"))
    fp16 = replace(bf16, weight_dtype="fp16", mixed_precision="fp16")
    estimate = distill_estimate(fp16, "lcm")
    rows = {what: nbytes for what, _, nbytes in estimate.rows}
    assert rows["teacher UNet (fp16)"] == 2 * 859_520_964
    # the same bytes as bf16 weights, activations included (both half types are two bytes)
    assert estimate.total == distill_estimate(bf16, "lcm").total
