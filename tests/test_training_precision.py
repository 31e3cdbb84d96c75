"""Precision and memory options: bf16 frozen weights with fp32 LoRAs, gradient checkpointing
wherever gradients flow through a network, and the optimizer choice.

bf16 weights run every stage on tiny random models (a fresh process each: accelerate's state
keeps one precision per process); checkpointing changes no gradient; the default (fp32) path
builds exactly the networks it built before.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig
from test_objectives_solvers import tiny_unet
from test_training_distill import TARGETS

from training.config import load_config
from training.distill import DistillConfig
from training.distributed import compute_precision
from training.lora_export import read_lora
from training.models import build_models, lora_parameters
from training.objectives.adversarial import TeacherFeatureDiscriminator
from training.optim import make_optimizer
from training.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def _lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_bf16_weights_fp32_loras_and_checkpointing(tiny_models: Any, family: str) -> None:
    pipe = load_teacher(str(getattr(tiny_models, family)))
    models = build_models(
        pipe,
        torch.device("cpu"),
        64,
        _lora(),
        gradient_checkpointing=True,
        weight_dtype=torch.bfloat16,
        ema_target=True,
        discriminator_hidden=8,
        fake_score_lora=_lora(),
    )
    assert models.target is not None and models.fake_score is not None
    frozen = [models.teacher, models.pipe.vae, models.pipe.text_encoder]
    for net in (*frozen, models.student, models.target, models.fake_score):
        dtypes = {p.dtype for name, p in net.named_parameters() if "lora_" not in name}
        assert dtypes == {torch.bfloat16}
    for net in (models.student, models.target, models.fake_score):
        assert {p.dtype for p in lora_parameters(net)} == {torch.float32}
    # every network that gradients flow through recomputes its activations
    for net in (models.student, models.teacher, models.fake_score, models.pipe.vae):
        assert net.is_gradient_checkpointing
    # bf16 weights run under bf16 autocast, the LoRA's gradients fp32
    text = models.encode(["a red circle", "a blue square"])
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", torch.bfloat16):
        out = models.student(x, torch.tensor([10, 500]), text).sample
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in lora_parameters(models.student)]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_the_fp32_default_casts_nothing(tiny_models: Any) -> None:
    pipe = load_teacher(str(tiny_models.sd15))
    before = {name: p for name, p in pipe.unet.named_parameters()}
    models = build_models(pipe, torch.device("cpu"), 64, _lora(), ema_target=True)
    # the teacher's parameters are the very tensors loaded (no copy, no cast)
    assert all(p is before[name] for name, p in models.teacher.named_parameters())
    assert not models.teacher.is_gradient_checkpointing


def test_teacher_checkpointing_changes_no_gradient() -> None:
    grads = []
    for checkpointing in (False, True):
        unet = tiny_unet()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        torch.manual_seed(1)
        disc = TeacherFeatureDiscriminator(unet, 8)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        x.requires_grad_(True)
        logits = disc(x, torch.tensor([100, 600]), torch.ones(2, 5, 32))
        sum(logit.mean() for logit in logits).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_precision_settings_are_checked() -> None:
    assert compute_precision("bf16", "no") == "bf16"
    assert compute_precision("fp32", "bf16") == "bf16"
    assert compute_precision("fp32", "no") == "no"
    with pytest.raises(ValueError, match=r"weight_dtype.*fp32.*bf16.*fp16"):
        load_config(DistillConfig, None, ["weight_dtype=fp8"])
    with pytest.raises(ValueError, match=r"optimizer.*adamw8bit"):
        load_config(DistillConfig, None, ["optimizer=sgd"])


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed"
)
def test_8bit_adam_without_bitsandbytes_says_what_to_install() -> None:
    params = [torch.nn.Parameter(torch.zeros(4))]
    assert isinstance(make_optimizer(params, "adamw", 1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        make_optimizer(params, "adamw8bit", 1e-3)


def _cli(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", *args],
        cwd=ROOT,
        env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_stage_runs_with_bf16_weights(tiny_models: Any, tmp_path: Path, family: str) -> None:
    teacher = str(getattr(tiny_models, family))
    common = [
        f"teacher={teacher}",
        "device=cpu",
        "threads=1",
        "weight_dtype=bf16",
        "gradient_checkpointing=true",
        "lora_rank=4",
        "lora_alpha=4",
        "sample_count=2",
        "log_every=1",
    ]
    tscd = tmp_path / "tscd"
    _cli(
        "tscd",
        *common,
        f"out_dir={tscd}",
        "train_images=8",
        "batch_size=2",
        "stages=[1]",
        "steps_per_stage=2",
        "disc_hidden=8",
        "sample_every=0",
    )
    lora = read_lora(tscd / "k1" / "lora.safetensors")
    assert {v.dtype for v in lora.values()} == {torch.float32}
    enhance = [
        *common,
        "steps=2",
        "batch_size=2",
        "aesthetic=none",
        f"alignment_path={ROOT / 'models' / 'shapes-attributes'}",
        f"segmentation_path={ROOT / 'models' / 'shapes-segmentation'}",
    ]
    _cli("feedback", *enhance, f"out_dir={tmp_path / 'feedback'}")
    _cli(
        "dmd",
        *enhance,
        f"out_dir={tmp_path / 'dmd'}",
        "structure_weight=0",
        "fake_rank=4",
        "fake_updates=1",
        "gan_weight=0.01",
        "gan_hidden=8",
    )
    for stage in ("feedback", "dmd"):
        assert (tmp_path / stage / "lora.safetensors").exists()
