"""``hypersd-train tscd`` and ``hypersd-train lcm``: distil a base model into a few-step LoRA.

TSCD (Hyper-SD §3.1): the teacher is the frozen base pipeline, the student the same UNet with a
peft LoRA, the target an EMA of the student's LoRA. Stages k = 8 -> 4 -> 2 -> 1 split the
trajectory into k segments; each stage starts from the previous stage's LoRA. The loss is the
``training.objectives.tscd`` distance plus an adversarial term over the frozen teacher's features
(alternating student / discriminator steps, weight growing as k falls). Options: the sampler's
own jump (t_end = the segment's edge) drawn more often (``edge_probability``), and the teacher's
trajectory as the adversarial term's real class (``adversarial_real``).

LCM (the baseline): the same loop, data and budget with ``training.objectives.lcm.lcm_losses``
(k = 1 consistency distillation, diffusers' LCM-LoRA recipe).

One stage (``out_dir/k<K>/`` or ``out_dir/lcm/``), resumable at any checkpoint:
  1. data: streamed image-caption batches of one aspect bucket, VAE-encoded per batch, or
     latents and text embeddings pre-encoded by ``hypersd-train encode`` (``training.data``)
  2. models: teacher (frozen), student (+ LoRA, started from the previous stage's LoRA or
     ``init_from``), target (EMA copy), discriminator heads (``training.models``)
  3. the loop (``train_stage``): student step (+ discriminator step), EMA, log, checkpoint,
     sample grid
  4. export: raw LoRA (next stage's start), diffusers + kohya LoRA files, registry entry

A stage whose ``lora.safetensors`` exists is done and skipped; ``stop_after`` ends a call early
(e.g. a time-boxed session), leaving a checkpoint the next call resumes from.

Several GPUs or nodes: the same command under ``accelerate launch``, e.g.

    accelerate launch --multi_gpu --num_processes 8 -m training.cli tscd --config FILE

trains data-parallel (``training.distributed``): each process draws its own ``batch_size``
batches from its own share of the data (``training.data``; the global batch is ``batch_size x
processes``) and the LoRA (and discriminator heads)
gradients are averaged over processes every step, so every process holds the same weights. Only
the main process writes the log, checkpoints, sample grids and exports; ``out_dir`` must be on
storage every node sees. With ``device=cpu`` the processes are CPU ones talking over gloo (how
the tests run it; accelerate's ``--cpu`` flag alone starts one process). Without the launcher:
one process.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig

from hypersd.lora import SDPipeline
from training.base import RunLog
from training.checkpoint import load_checkpoint
from training.config import config_to_dict, load_config
from training.data import Crop, DataSource, TrainingData, vae_factor
from training.devices import WeightDtype, torch_dtype
from training.distill_loop import stage_dir, train_stage
from training.distributed import MixedPrecision, compute_precision, make_accelerator
from training.lora_export import export_lora, lora_state_dict, registry_entry, save_peft_lora
from training.memory import distill_estimate
from training.models import Models, build_models, lora_parameters
from training.objectives.solvers import Distance
from training.objectives.tscd import AdversarialReal
from training.optim import OptimizerKind
from training.teacher import load_teacher

Method = Literal["tscd", "lcm"]


@dataclass(frozen=True)
class DistillConfig:
    """Every setting of a distillation run; saved inside each checkpoint and beside each LoRA."""

    # where things are
    teacher: str = "models/shapes-base"  # a diffusers folder, or a registry model name
    registry: str | None = None  # registry file for a model name (default: the project's)
    out_dir: str = "runs/tscd-shapes"
    init_from: str | None = None  # a LoRA (ours or diffusers-format) the first stage starts from
    export_name: str = "shapes-hyper"  # LoRA files / registry names: <export_name>-<k>step
    registry_base: str = "shapes-base"  # the registry entry the exported LoRAs extend
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    # data
    data: DataSource = "shapes"  # shapes | folder | webdataset | parquet | encoded: training.data
    # the folder (<stem>.png + .txt), .tar or .parquet file(s), or the encoded folder
    data_path: str | None = None
    image_column: str = "image"  # data=parquet: encoded bytes, or a struct with a bytes field
    caption_column: str = "text"  # data=parquet
    train_images: int = 20_000  # Shapes renders (data=shapes)
    resolution: int = 64
    # aspect-ratio buckets of ~resolution² pixels (sides multiples of bucket_step, aspect ratio
    # up to bucket_max_ratio; 1: square only); crop to the bucket: center | random
    bucket_step: int = 64
    bucket_max_ratio: float = 2.0
    crop: Crop = "center"
    # LoRA
    lora_rank: int = 16
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # schedule
    stages: tuple[int, ...] = (8, 4, 2, 1)  # TSCD's k per stage (LCM: one stage)
    steps_per_stage: tuple[int, ...] = (2_000,)  # one value for every stage, or one per stage
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    target: Literal["ema", "online"] = "ema"  # online: LCM-LoRA's, the student itself, no grad
    ema_decay: float = 0.95
    # teacher ODE step and distance
    skip: int = 25  # TSCD's DDIM skip s (must divide T/k); LCM uses T / lcm_ddim_timesteps
    guidance_range: tuple[float, ...] = (3.0, 7.0)  # teacher CFG ω ~ U[a, b]; () for no CFG
    distance: Distance = "mse"
    huber_c: float = 0.001
    noise_offset: float = 0.05
    # TSCD: the chance that t_end is the segment's edge, the jump the k-step sampler makes; else
    # t_end is uniform on the grid in [t_b, t_{n-1}] (0: only that, ~11% of k = 1's targets x0)
    edge_probability: float = 0.0
    # adversarial term (TSCD)
    adversarial: bool = True
    adversarial_scale: float = 1.0  # multiplies adversarial_weight(k)
    disc_hidden: int = 64
    disc_lr: float = 1e-4
    disc_every: int = 1  # a discriminator step after every n-th student step
    # the discriminator's real class: data latents, or "teacher": the teacher trajectory's
    # x_{t_end} (the consistency target), so it judges the jump rather than the data's look
    adversarial_real: AdversarialReal = "data"
    # memory / speed: mixed_precision (no | bf16 | fp16) autocasts the networks; weight_dtype
    # (fp32 | bf16 | fp16) also stores the frozen weights (teacher, VAE, text encoders, the
    # student's base) in that type, which implies its autocast; fp16 scales the losses
    # (training.loss_scaling, state kept in checkpoints); the LoRAs, heads and optimizer states
    # stay fp32 (adamw8bit: 8-bit states, needs bitsandbytes).
    # `hypersd-train tscd --config FILE --dry-run` estimates the memory.
    mixed_precision: MixedPrecision = "no"
    weight_dtype: WeightDtype = "fp32"
    # fp16: the first loss scale (halved at each overflowing, skipped step, doubled after 2000
    # clean ones); lower it where the first steps are skipped
    loss_scale: float = 65536.0
    optimizer: OptimizerKind = "adamw"
    gradient_checkpointing: bool = False
    # LCM baseline
    lcm_ddim_timesteps: int = 50
    # bookkeeping
    log_every: int = 25
    checkpoint_every: int = 250
    sample_every: int = 500  # 0: only the end-of-stage grid
    sample_count: int = 16
    sample_steps: int = 0  # 0: k steps (TSCD, DDIM trailing); LCM's grid uses 4 (LCMScheduler)
    stop_after: int = 0  # end this call after n optimisation steps (a checkpoint is kept)


def stage_names(method: Method, k: int, cfg: DistillConfig) -> str:
    """The stage's LoRA and registry name: ``<export_name>-<k>step``, or ``-lcm``."""
    return f"{cfg.export_name}-lcm" if method == "lcm" else f"{cfg.export_name}-{k}step"


# ---------------------------------------------------------------------------------------------
# 2. models (3. the loop: ``training.distill_loop``)


def distill_models(
    cfg: DistillConfig, pipe: SDPipeline, device: torch.device, with_discriminator: bool
) -> Models:
    """Teacher, student (+ LoRA), target (EMA copy) and discriminator, on ``device``."""
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        init_lora_weights="gaussian",
        target_modules=list(cfg.lora_targets),
    )
    return build_models(
        pipe,
        device,
        cfg.resolution,
        lora,
        gradient_checkpointing=cfg.gradient_checkpointing,
        weight_dtype=torch_dtype(cfg.weight_dtype),
        ema_target=True,
        discriminator_hidden=cfg.disc_hidden if with_discriminator else None,
    )


# ---------------------------------------------------------------------------------------------
# 4. export, and the command


def export_stage(
    cfg: DistillConfig, method: Method, k: int, models: Models, folder: Path | None = None
) -> str:
    """Write the stage's LoRA files and registry entry; returns the entry's TOML.

    Into the stage's folder (marking the stage done), or into ``folder`` (a snapshot).
    """
    done = folder is None
    folder = stage_dir(cfg, method, k) if folder is None else folder
    layers = lora_state_dict(models.student)
    name = stage_names(method, k, cfg)
    export_lora(
        folder,
        name,
        layers,
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        target_modules=list(cfg.lora_targets),
    )
    recipe = "unified-1step-lora" if method == "lcm" or k == 1 else "nstep-lora"
    description = (
        f"{cfg.registry_base} + LCM-LoRA baseline (TCD; LCM's sampler is eta = 1)"
        if method == "lcm"
        else ""
    )
    entry = registry_entry(
        name,
        f"{name}.safetensors",
        base=cfg.registry_base,
        steps=k,
        recipe=recipe,
        description=description,
    )
    (folder / "registry.toml").write_text(entry)
    (folder / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    # written last: its presence marks the stage as done
    save_peft_lora(folder / ("lora.safetensors" if done else "lora-snapshot.safetensors"), layers)
    return entry


def export_checkpoint(cfg: DistillConfig, method: Method) -> Path:
    """Export the LoRA of the first unfinished stage's checkpoint (a run may still be going).

    Writes ``<stage>/checkpoint-export/``: the diffusers and kohya files and the registry entry,
    e.g. to evaluate a long stage part-way.
    """
    if method == "lcm":
        cfg = replace(cfg, stages=(1,))
    for k in cfg.stages:
        folder = stage_dir(cfg, method, k)
        checkpoint = folder / "checkpoint"
        if (folder / "lora.safetensors").exists() or not (checkpoint / "state.json").exists():
            continue
        teacher = load_teacher(cfg.teacher, cfg.registry)
        models = distill_models(cfg, teacher, torch.device("cpu"), with_discriminator=False)
        lora = torch.nn.ParameterList(lora_parameters(models.student))
        step = load_checkpoint(checkpoint, modules={"lora": lora})["step"]
        out = folder / "checkpoint-export"
        print(export_stage(cfg, method, k, models, out))
        print(f"exported {folder.name} at step {step} to {out}")
        return out
    raise ValueError(f"no unfinished stage with a checkpoint under {cfg.out_dir}")


def run(cfg: DistillConfig, method: Method) -> dict[int, Path]:
    """Run every stage not yet done; returns {k: the stage's diffusers LoRA file} of done ones."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if method == "lcm":
        cfg = replace(cfg, stages=(1,))
    precision = compute_precision(cfg.weight_dtype, cfg.mixed_precision)
    accelerator, device = make_accelerator(cfg.device, precision)
    main = accelerator.is_main_process
    out = Path(cfg.out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{method}-config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    log = RunLog(out / "log.jsonl")

    pending = [
        i
        for i, k in enumerate(cfg.stages)
        if not (stage_dir(cfg, method, k) / "lora.safetensors").exists()
    ]
    if pending:
        pipe = load_teacher(cfg.teacher, cfg.registry)
        models = distill_models(cfg, pipe, device, cfg.adversarial and method == "tscd")
        data = TrainingData(
            cfg,
            cfg.batch_size,
            accelerator.process_index,
            accelerator.num_processes,
            vae_factor(pipe.vae),
        )
        for index in pending:
            k = cfg.stages[index]
            if not train_stage(cfg, method, index, models, data, device, log, accelerator):
                break
            if main:
                entry = export_stage(cfg, method, k, models)
                print(f"stage {stage_dir(cfg, method, k).name} done; registry entry:\n{entry}")
            # the next stage starts from this LoRA file, in every process
            accelerator.wait_for_everyone()
    # every process reports the same stages done, after the main one's last writes
    accelerator.wait_for_everyone()
    done = {}
    entries = []
    for k in cfg.stages:
        folder = stage_dir(cfg, method, k)
        if (folder / "lora.safetensors").exists():
            done[k] = folder / f"{stage_names(method, k, cfg)}.safetensors"
            entries.append((folder / "registry.toml").read_text())
    if entries and main:
        (out / f"{method}-registry.toml").write_text("\n".join(entries))
    return done


def _main(method: Method, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"hypersd-train {method}", description=__doc__)
    parser.add_argument("--config", help="YAML file of DistillConfig keys")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument(
        "--export-checkpoint",
        action="store_true",
        help="export the LoRA of the unfinished stage's last checkpoint now, then exit",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the per-process memory estimate (no weights or data loaded), then exit",
    )
    parser.add_argument("--architecture", choices=["sd15", "sdxl"], help="for --dry-run")
    args = parser.parse_args(argv)
    cfg = load_config(DistillConfig, args.config, args.overrides)
    if args.dry_run:
        print(distill_estimate(cfg, method, args.architecture).table())
        return 0
    if args.export_checkpoint:
        export_checkpoint(cfg, method)
        return 0
    done = run(cfg, method)
    for k, path in done.items():
        print(f"k={k}: {path}")
    left = len(cfg.stages if method == "tscd" else (1,)) - len(done)
    return 0 if left == 0 or cfg.stop_after else 1


def main(argv: list[str]) -> int:
    """``hypersd-train tscd``."""
    return _main("tscd", argv)


def main_lcm(argv: list[str]) -> int:
    """``hypersd-train lcm``: the LCM-LoRA baseline, same loop, data and budget as TSCD."""
    return _main("lcm", argv)
