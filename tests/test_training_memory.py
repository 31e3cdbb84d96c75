"""``--dry-run``'s memory estimate (``training.memory``).

The shipped SD1.5 / SDXL configs build the published architectures; the estimate's parameter
counts are those of the networks a run really builds (tiny random models); its activation
figure matches what a real forward and backward pass allocates on the CPU; and SDXL TSCD at
1024², batch 8, bf16 weights and gradient checkpointing fits an 80 GB GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_training_distill import TARGETS

from training import cli
from training.config import load_config
from training.distill import DistillConfig, distill_models
from training.enhance import EnhanceConfig, enhance_models
from training.memory import (
    ARCHITECTURES,
    GIB,
    count_params,
    distill_estimate,
    enhance_estimate,
    meta_unet,
    meta_vae,
    text_encoder_params,
    unet_activations,
)
from training.models import lora_parameters
from training.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "training" / "configs"


def test_shipped_configs_are_the_published_architectures() -> None:
    # the parameter counts of the released SD1.5 and SDXL base checkpoints
    assert count_params(meta_unet(ARCHITECTURES / "sd15")) == 859_520_964
    assert count_params(meta_unet(ARCHITECTURES / "sdxl")) == 2_567_463_684
    for family in ("sd15", "sdxl"):
        assert count_params(meta_vae(ARCHITECTURES / family)) == 83_653_863
    assert text_encoder_params(ARCHITECTURES / "sd15") == 123_060_480
    assert text_encoder_params(ARCHITECTURES / "sdxl") == 123_060_480 + 694_659_840


def test_sdxl_tscd_at_1024_batch_8_fits_an_80_gb_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(DistillConfig, str(CONFIGS / "sdxl-tscd.yaml"), ["batch_size=8"])
    assert cfg.weight_dtype == "bf16" and cfg.gradient_checkpointing and cfg.resolution == 1024
    estimate = distill_estimate(cfg, "tscd")
    print(estimate.table())
    rows = {what: nbytes for what, _, nbytes in estimate.rows}
    assert rows["teacher UNet (bf16)"] == 2 * 2_567_463_684
    assert estimate.total < 80 * GIB
    # without checkpointing the two UNet graphs alone would not fit
    unchecked = distill_estimate(
        load_config(
            DistillConfig,
            str(CONFIGS / "sdxl-tscd.yaml"),
            ["batch_size=8", "gradient_checkpointing=false"],
        ),
        "tscd",
    )
    assert unchecked.total > 80 * GIB
    assert "| **total** |" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["tscd", "lcm", "feedback", "dmd"])
def test_dry_run_command(stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = CONFIGS / f"sd15-{stage}.yaml"
    assert cli.main([stage, "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "teacher UNet (bf16)" in out and "| **total** |" in out


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_parameter_counts_are_the_built_networks(
    tiny_models: Any, tmp_path: Path, family: str
) -> None:
    torch.set_num_threads(1)
    teacher = str(getattr(tiny_models, family))
    common = {"teacher": teacher, "device": "cpu", "lora_targets": TARGETS, "resolution": 64}
    distill = DistillConfig(**common, lora_rank=4, disc_hidden=8, batch_size=2)
    rows = {what: params for what, params, _ in distill_estimate(distill, "tscd").rows}
    models = distill_models(distill, load_teacher(teacher), torch.device("cpu"), True)
    assert models.discriminator is not None and models.target is not None
    pipe = models.pipe
    text = sum(
        count_params(encoder)
        for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
        if encoder is not None
    )
    assert rows["teacher UNet (fp32)"] == count_params(models.teacher)
    assert rows["VAE (fp32)"] == count_params(pipe.vae)
    assert rows["text encoder(s) (fp32)"] == text
    lora = sum(p.numel() for p in lora_parameters(models.student))
    assert rows["student LoRA (fp32)"] == lora
    assert rows["EMA target's LoRA (fp32)"] == sum(
        p.numel() for p in lora_parameters(models.target)
    )
    heads = count_params(models.discriminator.heads)
    assert rows["discriminator heads (fp32)"] == heads
    assert rows["gradients (fp32)"] == lora + heads

    dmd = EnhanceConfig(
        **common, out_dir=str(tmp_path), lora_rank=4, fake_rank=8, gan_weight=0.01, gan_hidden=8
    )
    rows = {what: params for what, params, _ in enhance_estimate(dmd, "dmd").rows}
    models = enhance_models(dmd, "dmd", torch.device("cpu"))
    assert models.fake_score is not None and models.discriminator is not None
    assert rows["student UNet (fp32)"] == count_params(models.student) - sum(
        p.numel() for p in lora_parameters(models.student)
    )
    assert rows["fake score LoRA (fp32)"] == sum(
        p.numel() for p in lora_parameters(models.fake_score)
    )
    assert rows["GAN heads (fp32)"] == count_params(models.discriminator.heads)


# Runs in a fresh process: one real forward and backward pass of a small UNet with a LoRA on
# the CPU, its peak resident memory over the resident memory before it (glibc told to hand
# freed memory back at once, so that the resident size follows the live tensors).
MEASURE = """
import ctypes, gc, json, sys
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

torch.set_num_threads(1)
config, batch, side, checkpointing = json.loads(sys.argv[1])
unet = UNet2DConditionModel(**config)
unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"]))
if checkpointing:
    unet.enable_gradient_checkpointing()
x = torch.randn(batch, 4, side, side, requires_grad=True)
text = torch.randn(batch, 77, config["cross_attention_dim"])
t = torch.full((batch,), 500)


def step():
    unet(x, t, text).sample.float().pow(2).mean().backward()


def resident(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024


step()  # one-time allocations (kernels' caches) happen before the measurement
x.grad = None
unet.zero_grad(set_to_none=True)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current size
before = resident("VmRSS")
step()
print(resident("VmHWM") - before)
"""

SMALL_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "sample_size": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_a_measured_cpu_peak(
    tmp_path: Path, checkpointing: bool
) -> None:
    batch, side = 4, 64
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        # fixed thresholds: every large block is mmapped and unmapped on free
        "MALLOC_MMAP_THRESHOLD_": "16384",
        "MALLOC_TRIM_THRESHOLD_": "0",
    }
    result = subprocess.run(
        [sys.executable, str(script), json.dumps([SMALL_UNET, batch, side, checkpointing])],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    measured = int(result.stdout.split()[-1])
    unet = meta_unet_from(SMALL_UNET)
    estimated = unet_activations(unet, batch, (side, side), torch.float32, checkpointing)
    print(
        f"checkpointing={checkpointing}: estimated {estimated / 2**20:.1f} MiB, "
        f"measured {measured / 2**20:.1f} MiB"
    )
    assert measured > 10 * 2**20  # activations, not noise, dominate the measurement
    assert 1 / 1.5 < estimated / measured < 1.5


def meta_unet_from(config: dict[str, Any]) -> Any:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"]))
    return unet
