"""``hypersd-train tscd`` and ``hypersd-train lcm``: distil a base model into a few-step LoRA.

TSCD (Hyper-SD §3.1): the teacher is the frozen base pipeline, the student the same UNet with a
peft LoRA, the target an EMA of the student's LoRA. Stages k = 8 -> 4 -> 2 -> 1 split the
trajectory into k segments; each stage starts from the previous stage's LoRA. The loss is the
``training.objectives.tscd`` distance plus an adversarial term over the frozen teacher's features
(alternating student / discriminator steps, weight growing as k falls).

LCM (the baseline): the same loop, data and budget with ``training.objectives.lcm.lcm_losses``
(k = 1 consistency distillation, diffusers' LCM-LoRA recipe).

One stage (``out_dir/k<K>/`` or ``out_dir/lcm/``), resumable at any checkpoint:
  1. data: captions + VAE latents, encoded once and cached  -> out_dir/data/*.safetensors
  2. models: teacher (frozen), student (+ LoRA, started from the previous stage's LoRA or
     ``init_from``), target (EMA copy), discriminator heads
  3. the loop: student step (+ discriminator step), EMA, log, checkpoint, sample grid
  4. export: raw LoRA (next stage's start), diffusers + kohya LoRA files, registry entry

A stage whose ``lora.safetensors`` exists is done and skipped; ``stop_after`` ends a call early
(e.g. a time-boxed session), leaving a checkpoint the next call resumes from.

Data interface (``load_data``): any source that yields (RGB image, caption) pairs, centre-cropped
to ``resolution``; ``data=shapes`` renders the Shapes world, ``data=folder`` reads
``<stem>.png|jpg|webp`` + ``<stem>.txt`` pairs from ``data_path``, ``data=webdataset`` the same
pairs from ``.tar`` shards, ``data=parquet`` rows of ``image_column`` (encoded image bytes, or
Hugging Face datasets' ``{bytes, path}`` struct) and ``caption_column`` from one ``.parquet``
file or a folder of them (pyarrow, the ``training`` extra). Each source is encoded to latents once.

Several GPUs or nodes: the same command under ``accelerate launch``, e.g.

    accelerate launch --multi_gpu --num_processes 8 -m training.cli tscd --config FILE

trains data-parallel: each process draws its own ``batch_size`` batches (the global batch is
``batch_size x processes``) and the LoRA (and discriminator heads) gradients are averaged over
processes every step, so every process holds the same weights. Only the main process writes the
log, checkpoints, sample grids and exports; ``out_dir`` must be on storage every node sees.
With ``device=cpu`` the processes are CPU ones talking over gloo (how the tests run it;
accelerate's ``--cpu`` flag alone starts one process). Without the launcher: one process.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_lcm import LCMScheduler
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from hypersd.lora import SDPipeline
from hypersd.recipes import RECIPES
from hypersd.shapes import ShapesDataset, fixed_captions
from training.base import RunLog, save_grid
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import config_to_dict, load_config
from training.devices import resolve_device, to_device
from training.lora_export import (
    export_lora,
    load_lora_into,
    lora_state_dict,
    read_lora,
    registry_entry,
    save_peft_lora,
)
from training.objectives.adversarial import TeacherFeatureDiscriminator, adversarial_weight
from training.objectives.lcm import lcm_losses
from training.objectives.solvers import Distance
from training.objectives.tscd import (
    ema_update,
    tscd_discriminator_losses,
    tscd_losses,
    tscd_predict,
)

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
    data: str = "shapes"  # shapes | folder | webdataset | parquet
    data_path: str | None = None  # the folder (<stem>.png + .txt), .tar or .parquet file(s)
    image_column: str = "image"  # data=parquet: encoded bytes, or a struct with a bytes field
    caption_column: str = "text"  # data=parquet
    train_images: int = 20_000  # Shapes renders (data=shapes)
    resolution: int = 64
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
    target: str = "ema"  # ema | online (LCM-LoRA's choice: the student itself, no grad)
    ema_decay: float = 0.95
    # teacher ODE step and distance
    skip: int = 25  # TSCD's DDIM skip s (must divide T/k); LCM uses T / lcm_ddim_timesteps
    guidance_range: tuple[float, ...] = (3.0, 7.0)  # teacher CFG ω ~ U[a, b]; () for no CFG
    distance: str = "mse"  # mse | huber
    huber_c: float = 0.001
    noise_offset: float = 0.05
    # adversarial term (TSCD)
    adversarial: bool = True
    adversarial_scale: float = 1.0  # multiplies adversarial_weight(k)
    disc_hidden: int = 64
    disc_lr: float = 1e-4
    disc_every: int = 1  # a discriminator step after every n-th student step
    # memory / speed (weights stay fp32; autocast runs the networks in bf16)
    mixed_precision: str = "no"  # no | bf16
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


def stage_steps(cfg: DistillConfig, index: int) -> int:
    """The optimisation steps of stage ``index`` (``steps_per_stage`` broadcast over stages)."""
    steps = cfg.steps_per_stage
    if len(steps) == 1:
        return steps[0]
    if len(steps) != len(cfg.stages):
        raise ValueError("steps_per_stage needs one value, or one per stage")
    return steps[index]


def stage_dir(cfg: DistillConfig, method: Method, k: int) -> Path:
    return Path(cfg.out_dir) / ("lcm" if method == "lcm" else f"k{k}")


def stage_names(method: Method, k: int, cfg: DistillConfig) -> str:
    return f"{cfg.export_name}-lcm" if method == "lcm" else f"{cfg.export_name}-{k}step"


# ---------------------------------------------------------------------------------------------
# 1. data


def _shapes_pairs(cfg: DistillConfig) -> tuple[np.ndarray, list[str]]:
    dataset = ShapesDataset(cfg.seed, cfg.train_images)
    images = np.empty((len(dataset), 64, 64, 3), dtype=np.uint8)
    captions = []
    for i, sample in enumerate(tqdm(dataset, desc="render", mininterval=5)):
        images[i] = sample.rendered.image
        captions.append(sample.caption)
    if cfg.resolution != 64:
        images = np.stack(
            [
                np.asarray(
                    Image.fromarray(im).resize((cfg.resolution,) * 2, Image.Resampling.BICUBIC)
                )
                for im in images
            ]
        )
    return images, captions


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _square(image: Image.Image, resolution: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``resolution``: (H, W, 3) uint8."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return np.asarray(image.resize((resolution,) * 2, Image.Resampling.BICUBIC))


def _folder_pairs(cfg: DistillConfig) -> tuple[np.ndarray, list[str]]:
    """``data=folder``: every ``<stem>.png|jpg|webp`` with a ``<stem>.txt`` caption beside it."""
    if cfg.data_path is None:
        raise ValueError("data=folder needs data_path=<folder of <stem>.png + <stem>.txt>")
    folder = Path(cfg.data_path)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    files = [p for p in files if p.with_suffix(".txt").exists()]
    if not files:
        raise ValueError(f"no <stem>.png|jpg|webp + <stem>.txt pairs in {folder}")
    images = [_square(Image.open(path), cfg.resolution) for path in files]
    captions = [path.with_suffix(".txt").read_text().strip() for path in files]
    return np.stack(images), captions


def _source_files(cfg: DistillConfig, suffix: str) -> tuple[Path, list[Path]]:
    """``data_path`` and its files: the file itself, or the folder's ``*<suffix>`` files."""
    if cfg.data_path is None:
        raise ValueError(f"data={cfg.data} needs data_path=<a {suffix} file or a folder of them>")
    source = Path(cfg.data_path)
    return source, sorted(source.glob(f"*{suffix}")) if source.is_dir() else [source]


def _webdataset_pairs(cfg: DistillConfig) -> tuple[np.ndarray, list[str]]:
    """``data=webdataset``: ``.tar`` shards (one file, or a folder of them) holding
    ``<key>.jpg|png|webp`` + ``<key>.txt`` members, read with the standard library."""
    source, shards = _source_files(cfg, ".tar")
    images, captions = [], []
    for shard in shards:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                file = tar.extractfile(member) if member.isfile() else None
                if file is None:
                    continue
                # webdataset's rule: the key is the path up to the first dot of the file name
                folder, _, name = member.name.rpartition("/")
                stem, _, suffix = name.partition(".")
                key = f"{folder}/{stem}"
                members.setdefault(key, {})[f".{suffix.lower()}"] = file.read()
        for key in sorted(members):
            sample = members[key]
            image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
            if image is None or ".txt" not in sample:
                continue
            images.append(_square(Image.open(io.BytesIO(image)), cfg.resolution))
            captions.append(sample[".txt"].decode().strip())
    if not images:
        raise ValueError(f"no <key>.jpg|png|webp + <key>.txt samples in {source}")
    return np.stack(images), captions


def _parquet_pairs(cfg: DistillConfig) -> tuple[np.ndarray, list[str]]:
    """``data=parquet``: one ``.parquet`` file or a folder of them, a batch of rows at a time.

    ``image_column`` holds encoded images: bytes, or a struct with a ``bytes`` field (Hugging
    Face datasets' Image feature); rows without image bytes or caption are skipped.
    """
    # imported here: pyarrow is the training extra's, only this source needs it
    import pyarrow as pa
    import pyarrow.parquet as pq

    source, files = _source_files(cfg, ".parquet")
    images, captions = [], []
    for file in files:
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
        for key, column in (
            ("image_column", cfg.image_column),
            ("caption_column", cfg.caption_column),
        ):
            if column not in schema.names:
                raise ValueError(
                    f"{file} has no column {column!r} ({key}); its columns: "
                    + ", ".join(schema.names)
                )
        kind = schema.field(cfg.image_column).type
        if not (
            pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)
            or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)
        ):
            raise ValueError(
                f"{file}: image_column {cfg.image_column!r} is {kind}, not image bytes "
                "or a struct with a bytes field"
            )
        # batches, so that a large file is never read whole
        for batch in parquet.iter_batches(
            batch_size=256, columns=list(dict.fromkeys([cfg.image_column, cfg.caption_column]))
        ):
            rows = zip(
                batch.column(cfg.image_column).to_pylist(),
                batch.column(cfg.caption_column).to_pylist(),
                strict=True,
            )
            for image, caption in rows:
                data = image.get("bytes") if isinstance(image, dict) else image
                if data is None or caption is None:
                    continue
                images.append(_square(Image.open(io.BytesIO(data)), cfg.resolution))
                captions.append(str(caption).strip())
    if not images:
        raise ValueError(f"no rows with image bytes and a caption in {source}")
    return np.stack(images), captions


def load_data(
    cfg: DistillConfig, pipe: SDPipeline, device: torch.device, write_cache: bool = True
) -> tuple[torch.Tensor, list[str]]:
    """Scaled VAE latents ``(N, C, h, w)`` and their captions, encoded once and cached.

    The cache's name hashes the data settings and the VAE's scaling factor, so a changed source
    is encoded again. Under a launcher every process encodes a missing cache itself (no process
    waits out another's encoding at a barrier, which may time out) and only the main one writes
    it (``write_cache``).
    """
    settings: list[Any] = [
        cfg.data,
        cfg.data_path,
        cfg.train_images,
        cfg.resolution,
        cfg.seed,
        cfg.teacher,
    ]
    if cfg.data == "parquet":
        # only here: the other sources' cache names (and so running jobs' caches) stay as they were
        settings += [cfg.image_column, cfg.caption_column]
    digest = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:12]
    path = Path(cfg.out_dir) / "data" / f"latents-{digest}.safetensors"
    if path.exists():
        cached = load_file(str(path))
        captions = json.loads(path.with_suffix(".json").read_text())
        return cached["latents"], captions
    if cfg.data == "shapes":
        images, captions = _shapes_pairs(cfg)
    elif cfg.data == "folder":
        images, captions = _folder_pairs(cfg)
    elif cfg.data == "webdataset":
        images, captions = _webdataset_pairs(cfg)
    elif cfg.data == "parquet":
        images, captions = _parquet_pairs(cfg)
    else:
        raise ValueError(
            f"data must be 'shapes', 'folder', 'webdataset' or 'parquet', got {cfg.data!r}"
        )
    vae = pipe.vae
    scale = float(vae.config["scaling_factor"])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    chunks = []
    with torch.no_grad():
        for batch in tqdm(pixels.split(64), desc="encode", mininterval=5):
            posterior = vae.encode(batch.to(device, vae.dtype)).latent_dist
            chunks.append((posterior.mean * scale).float().cpu())
    latents = torch.cat(chunks).contiguous()
    if write_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(captions))
        # the latents last and renamed into place: their presence means a complete cache
        partial = path.with_suffix(".partial")
        save_file({"latents": latents}, str(partial))
        partial.replace(path)
    return latents, captions


# ---------------------------------------------------------------------------------------------
# 2. models


def load_teacher(teacher: str, registry: str | None = None) -> SDPipeline:
    """The base pipeline on the CPU: a diffusers folder, or a registry model (LoRAs fused)."""
    folder = Path(teacher)
    if (folder / "model_index.json").exists():
        index = json.loads((folder / "model_index.json").read_text())
        pipe: SDPipeline
        if "XL" in index.get("_class_name", ""):
            pipe = StableDiffusionXLPipeline.from_pretrained(
                folder, use_safetensors=True, local_files_only=True, add_watermarker=False
            )
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                folder,
                use_safetensors=True,
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
            )
        return pipe
    from hypersd.lora import fuse_loras
    from hypersd.pipeline import _load_pipeline
    from hypersd.registry import load_registry

    spec = load_registry(registry).get(teacher)
    pipe = _load_pipeline(spec, torch.float32)
    fuse_loras(pipe, spec.loras)
    return pipe


class PackedConditioning:
    """SDXL's added conditioning (pooled text embedding, size/crop ids) as one extra text token.

    The objectives call every network as ``unet(x, t, encoder_hidden_states)``; for an SDXL
    UNet the pooled embedding and time ids ride along as the last token of the hidden states,
    through every concatenation (guided teacher, discriminator), and a forward pre-hook unpacks
    them into ``added_cond_kwargs`` (calls that pass ``added_cond_kwargs``, like the pipeline's,
    are left alone).
    """

    def __init__(self, pooled_dim: int, resolution: int) -> None:
        self.pooled_dim = pooled_dim
        self.time_ids = torch.tensor(
            [resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32
        )

    def pack(self, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        n, _, width = embeds.shape
        if self.pooled_dim + 6 > width:
            raise ValueError("the pooled embedding and time ids do not fit in one text token")
        token = embeds.new_zeros(n, 1, width)
        token[:, 0, : self.pooled_dim] = pooled
        token[:, 0, self.pooled_dim : self.pooled_dim + 6] = self.time_ids.to(token)
        return torch.cat([embeds, token], dim=1)

    def hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if kwargs.get("added_cond_kwargs") is not None:
            return None
        if len(args) > 2:
            packed, args = args[2], args[:2] + args[3:]
        else:
            packed = kwargs.pop("encoder_hidden_states")
        extra = packed[:, -1]
        kwargs["encoder_hidden_states"] = packed[:, :-1]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": extra[:, : self.pooled_dim],
            "time_ids": extra[:, self.pooled_dim : self.pooled_dim + 6],
        }
        return args, kwargs


def build_encoder(
    pipe: SDPipeline,
    device: torch.device,
    resolution: int,
    unets: Sequence[UNet2DConditionModel | None],
) -> Callable[[list[str]], torch.Tensor]:
    """captions -> the text conditioning every network of a stage is called with.

    For SDXL the pooled embedding and size ids are packed into one extra token
    (``PackedConditioning``) and each of ``unets`` gets the hook that unpacks them.
    """
    if isinstance(pipe, StableDiffusionXLPipeline):
        encoder_2 = pipe.text_encoder_2
        assert encoder_2 is not None
        packer = PackedConditioning(int(encoder_2.config.projection_dim), resolution)
        for unet in unets:
            if unet is not None:
                unet.register_forward_pre_hook(packer.hook, with_kwargs=True)
        xl_pipe = pipe

        def encode_xl(captions: list[str]) -> torch.Tensor:
            embeds, _, pooled, _ = xl_pipe.encode_prompt(
                captions,  # type: ignore[arg-type]  # annotated str, takes a list too
                device=device,
                do_classifier_free_guidance=False,
            )
            assert pooled is not None
            return packer.pack(embeds, pooled)

        return encode_xl
    sd_pipe = pipe

    def encode(captions: list[str]) -> torch.Tensor:
        embeds, _ = sd_pipe.encode_prompt(captions, device, 1, False)
        return embeds

    return encode


@dataclass
class Models:
    """The frozen teacher pipeline and the networks a stage trains or tracks."""

    pipe: SDPipeline
    teacher: UNet2DConditionModel
    student: UNet2DConditionModel
    target: UNet2DConditionModel
    discriminator: TeacherFeatureDiscriminator | None
    encode: Callable[[list[str]], torch.Tensor]
    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float

    def lora_parameters(self, unet: UNet2DConditionModel) -> list[torch.nn.Parameter]:
        return [p for name, p in unet.named_parameters() if "lora_" in name]


def build_models(
    cfg: DistillConfig, pipe: SDPipeline, device: torch.device, with_discriminator: bool
) -> Models:
    """Teacher, student (+ LoRA), target (EMA copy) and discriminator, on ``device``."""
    pipe.set_progress_bar_config(disable=True)
    for component in ("vae", "text_encoder", "text_encoder_2", "unet"):
        module = getattr(pipe, component, None)
        if module is not None:
            module.requires_grad_(False)
            to_device(module, device).eval()
    teacher = pipe.unet
    student = copy.deepcopy(teacher)
    student.add_adapter(
        LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=list(cfg.lora_targets),
        )
    )
    target = copy.deepcopy(student).requires_grad_(False)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train()

    encode = build_encoder(pipe, device, cfg.resolution, (teacher, student, target))

    discriminator = None
    if with_discriminator:
        discriminator = to_device(TeacherFeatureDiscriminator(teacher, cfg.disc_hidden), device)
    # The same DDIM algebra as the served sampler: its ᾱ table and its ᾱ at the clean end.
    ddim = RECIPES["nstep-lora"].build_scheduler(pipe.scheduler.config)
    assert isinstance(ddim, DDIMScheduler)
    return Models(
        pipe=pipe,
        teacher=teacher,
        student=student,
        target=target,
        discriminator=discriminator,
        encode=encode,
        alphas_cumprod=ddim.alphas_cumprod.to(device),
        final_alpha_cumprod=float(ddim.final_alpha_cumprod),
    )


def initial_lora(cfg: DistillConfig, method: Method, index: int) -> Path | None:
    """Where stage ``index`` starts from: the previous stage's LoRA, else ``init_from``."""
    if index > 0:
        return stage_dir(cfg, method, cfg.stages[index - 1]) / "lora.safetensors"
    if cfg.init_from:
        return Path(cfg.init_from)
    if method == "tscd":
        # Resuming a stage list one stage per call: the next larger k already trained here.
        done = [k for k in (8, 4, 2) if k > cfg.stages[0]]
        for k in reversed(done):
            path = stage_dir(cfg, method, k) / "lora.safetensors"
            if path.exists():
                return path
    return None


# ---------------------------------------------------------------------------------------------
# 3. the loop


def loop_seed(cfg: DistillConfig, k: int, step: int, rank: int) -> int:
    """The loop's generator seed: per stage and start step, and per process under a launcher.

    Rank 0 keeps the single-process seed; every other rank hashes it with its index, so that
    each process draws its own batches and noise. A hash, not an offset: torch's CPU generator
    keeps only a seed's low 32 bits, so an offset above them would change nothing.
    """
    seed = cfg.seed * 1000 + 17 * k + step
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def average_gradients(accelerator: Accelerator, params: Sequence[torch.nn.Parameter]) -> None:
    """Replace every process's gradients of ``params`` by their mean over processes.

    Data parallelism without DDP: the student stays the plain peft UNet that the objectives,
    the SDXL conditioning hooks, the online target and the sampler all use, and the discriminator
    heads' gradients are averaged only for their own step (DDP would also all-reduce the ones
    the student's adversarial loss leaves on them, which are dropped). One flat all-reduce per
    step does what DDP's would: with equal starting weights and equal mean gradients, every
    process's clipped AdamW step (and so its EMA target) is the same. A no-op in one process.
    """
    if accelerator.num_processes == 1:
        return
    # a parameter without a gradient joins as zeros: every process must send the same sizes
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    mean = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    for p, g in zip(params, mean.split([g.numel() for g in grads]), strict=True):
        p.grad = g.view_as(p)


def lr_at(step: int, base: float, warmup: int) -> float:
    """Linear warm-up, then constant (the LCM scripts' schedule)."""
    return base * min(1.0, (step + 1) / max(1, warmup))


@functools.cache
def trailing_timesteps(num_train_timesteps: int, steps: int) -> tuple[int, ...]:
    """The served sampler's timesteps (DDIM, trailing spacing): e.g. 1000, 4 -> 999, 749, 499,
    249. Asked by the diffusers scheduler itself, so training follows the served schedule."""
    scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    return tuple(int(t) for t in scheduler.timesteps)


def sample_grid_from(
    pipe: SDPipeline,
    unet: UNet2DConditionModel,
    captions: list[str],
    steps: int,
    resolution: int,
    path: Path,
    sampler: Literal["ddim-trailing", "lcm"] = "ddim-trailing",
    timesteps: tuple[int, ...] | None = None,
) -> None:
    """A grid of ``unet``'s images, one per caption (seed = index), no CFG; ``timesteps``
    overrides the sampler's spacing (e.g. (800,): one step from t = 800)."""
    scheduler: DDIMScheduler | LCMScheduler
    if sampler == "lcm":
        scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    else:
        built = RECIPES["nstep-lora"].build_scheduler(pipe.scheduler.config)
        assert isinstance(built, DDIMScheduler)
        scheduler = built
    components: dict[str, Any] = {**pipe.components, "unet": unet, "scheduler": scheduler}
    if isinstance(pipe, StableDiffusionXLPipeline):
        sampling: SDPipeline = StableDiffusionXLPipeline(**components)
    else:
        sampling = StableDiffusionPipeline(**components, requires_safety_checker=False)
    sampling.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(len(captions))]
    was_training = unet.training
    unet.eval()
    with torch.no_grad():
        images = sampling(
            prompt=captions,
            num_inference_steps=None if timesteps else steps,
            timesteps=list(timesteps) if timesteps else None,
            guidance_scale=0.0,
            generator=generators,
            height=resolution,
            width=resolution,
        ).images
    unet.train(was_training)
    save_grid(images, path, columns=min(8, len(images)))


def write_samples(
    cfg: DistillConfig,
    method: Method,
    models: Models,
    k: int,
    captions: list[str],
    path: Path,
) -> None:
    """A grid from the student: DDIM trailing at k steps (TSCD) or LCM's sampler (4 steps)."""
    steps = cfg.sample_steps or (4 if method == "lcm" else k)
    sampler: Literal["ddim-trailing", "lcm"] = "lcm" if method == "lcm" else "ddim-trailing"
    sample_grid_from(models.pipe, models.student, captions, steps, cfg.resolution, path, sampler)


def train_stage(
    cfg: DistillConfig,
    method: Method,
    index: int,
    models: Models,
    data: tuple[torch.Tensor, list[str]],
    device: torch.device,
    log: RunLog,
    accelerator: Accelerator,
) -> bool:
    """Train stage ``index`` (k = ``cfg.stages[index]``) to its end; False if stopped early.

    Under a launcher every process runs this with its own batches (``average_gradients``); only
    the main process logs, checkpoints and samples.
    """
    main = accelerator.is_main_process
    k = cfg.stages[index] if method == "tscd" else 1
    folder = stage_dir(cfg, method, k)
    total = stage_steps(cfg, index)
    latents, captions = data
    student, target, discriminator = models.student, models.target, models.discriminator
    student_params = models.lora_parameters(student)
    target_params = models.lora_parameters(target)
    for p in student_params:
        p.requires_grad_(True)

    # 3.1 start from the previous stage's LoRA (or a fresh one), then resume a checkpoint
    start = initial_lora(cfg, method, index)
    if start is not None:
        load_lora_into(student, read_lora(start))
        accelerator.print(f"{folder.name}: LoRA initialised from {start}")
    ema_update(target_params, student_params, 0.0)  # target = student at the stage's start
    optimizer = torch.optim.AdamW(student_params, lr=cfg.lr, weight_decay=0.0)
    weight = adversarial_weight(k) * cfg.adversarial_scale if method == "tscd" else 0.0
    use_disc = discriminator is not None and weight > 0
    disc_optimizer = None
    if use_disc:
        assert discriminator is not None
        for head in discriminator.heads:
            for layer in head.modules():
                if isinstance(layer, torch.nn.Conv2d | torch.nn.GroupNorm):
                    layer.reset_parameters()
        disc_optimizer = torch.optim.AdamW(
            discriminator.heads.parameters(), lr=cfg.disc_lr, betas=(0.0, 0.99)
        )
    modules: dict[str, torch.nn.Module] = {
        "lora": torch.nn.ParameterList(student_params),
        "target": torch.nn.ParameterList(target_params),
    }
    optimizers: dict[str, torch.optim.Optimizer] = {"student": optimizer}
    if use_disc and discriminator is not None and disc_optimizer is not None:
        modules["heads"] = discriminator.heads
        optimizers["disc"] = disc_optimizer
    step = 0
    checkpoint = folder / "checkpoint"
    if (checkpoint / "state.json").exists():
        step = load_checkpoint(checkpoint, modules=modules, optimizers=optimizers)["step"]
        accelerator.print(f"{folder.name}: resumed from {checkpoint} at step {step}")
    if accelerator.num_processes > 1:
        # what DDP does on wrapping: every process starts from the main process's weights
        broadcast([p.data for module in modules.values() for p in module.parameters()])

    empty = models.encode([""])
    guidance = tuple(cfg.guidance_range)
    guidance_range = (guidance[0], guidance[1]) if guidance else None
    distance_kind: Distance = "huber" if cfg.distance == "huber" else "mse"
    if cfg.distance not in ("mse", "huber"):
        raise ValueError(f"distance must be 'mse' or 'huber', got {cfg.distance!r}")
    seed = loop_seed(cfg, k, step, accelerator.process_index)
    # noise on the training device; batch indices on the CPU, where the cached latents are
    generator = torch.Generator(device).manual_seed(seed)
    cpu_generator = torch.Generator().manual_seed(seed)
    sample_captions = (
        fixed_captions(cfg.sample_count) if cfg.data == "shapes" else captions[: cfg.sample_count]
    )
    online = cfg.target == "online"
    stopped_at = step + cfg.stop_after if cfg.stop_after else None
    progress = tqdm(
        range(step, total), desc=folder.name, initial=step, total=total, disable=not main
    )
    for step in progress:
        if stopped_at is not None and step >= stopped_at:
            progress.close()
            if main:
                save_checkpoint(
                    checkpoint,
                    step=step,
                    config=config_to_dict(cfg),
                    modules=modules,
                    optimizers=optimizers,
                    extra={"method": method, "k": k},
                )
            accelerator.print(
                f"{folder.name}: stopped at step {step} (stop_after); rerun to resume"
            )
            return False
        # 1. a batch of latents and captions (the frozen text encoders run here)
        index_batch = torch.randint(0, len(captions), (cfg.batch_size,), generator=cpu_generator)
        batch = latents[index_batch].to(device)
        with torch.no_grad():
            text = models.encode([captions[i] for i in index_batch.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps)
        # 2. the student's step: consistency distance (+ adversarial generator loss)
        target_net = student if online else target
        prediction = None
        # cfg.mixed_precision, through the Accelerator (bf16 autocast, or nothing)
        with accelerator.autocast():
            if method == "tscd":
                # made once: the student's loss and the discriminator's step share it
                prediction = tscd_predict(
                    student,
                    target_net,
                    models.teacher,
                    models.alphas_cumprod,
                    batch,
                    text,
                    k=k,
                    skip=cfg.skip,
                    uncond_hidden_states=empty,
                    guidance_range=guidance_range,
                    noise_offset=cfg.noise_offset,
                    final_alpha_cumprod=models.final_alpha_cumprod,
                    generator=generator,
                )
                losses = tscd_losses(
                    prediction,
                    batch,
                    text,
                    models.alphas_cumprod,
                    k=k,
                    distance_kind=distance_kind,
                    huber_c=cfg.huber_c,
                    final_alpha_cumprod=models.final_alpha_cumprod,
                    discriminator=discriminator if use_disc else None,
                    adversarial_weight=weight,
                    generator=generator,
                )
            else:
                losses = lcm_losses(
                    student,
                    target_net,
                    models.teacher,
                    models.alphas_cumprod,
                    batch,
                    text,
                    uncond_hidden_states=empty,
                    # LCM's guidance form: ω = 1 + w
                    w_range=(guidance[0] - 1, guidance[1] - 1) if guidance else None,
                    num_ddim_timesteps=cfg.lcm_ddim_timesteps,
                    distance_kind=distance_kind,
                    huber_c=cfg.huber_c,
                    generator=generator,
                )
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        average_gradients(accelerator, student_params)
        torch.nn.utils.clip_grad_norm_(student_params, cfg.grad_clip)
        optimizer.step()
        if not online:
            ema_update(target_params, student_params, cfg.ema_decay)
        values = {f"student/{key}": float(v.detach()) for key, v in losses.items()}
        # 3. the discriminator's step on the student's (detached) prediction of this batch
        disc_step = use_disc and step % cfg.disc_every == 0
        if disc_step and discriminator is not None and disc_optimizer is not None:
            assert prediction is not None
            with accelerator.autocast():
                disc_losses = tscd_discriminator_losses(
                    discriminator,
                    prediction,
                    batch,
                    text,
                    models.alphas_cumprod,
                    k=k,
                    final_alpha_cumprod=models.final_alpha_cumprod,
                    generator=generator,
                )
            # the generator loss left gradients on the heads: zero_grad drops them
            disc_optimizer.zero_grad(set_to_none=True)
            disc_losses["loss"].backward()
            average_gradients(accelerator, list(discriminator.heads.parameters()))
            disc_optimizer.step()
            values |= {f"disc/{key}": float(v.detach()) for key, v in disc_losses.items()}
        # 4. log, checkpoint, sample
        if step % cfg.log_every == 0 or step + 1 == total:
            if accelerator.num_processes > 1:
                # the logged losses are the global batch's: the mean over processes
                means = accelerator.reduce(
                    torch.tensor(list(values.values()), device=device), reduction="mean"
                )
                values = dict(zip(values, means.tolist(), strict=True))
            progress.set_postfix(loss=f"{values['student/loss']:.4f}")
            if main:
                log.write(folder.name, step, values)
        if main and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == total):
            save_checkpoint(
                checkpoint,
                step=step + 1,
                config=config_to_dict(cfg),
                modules=modules,
                optimizers=optimizers,
                extra={"method": method, "k": k},
            )
        if main and cfg.sample_every and (step + 1) % cfg.sample_every == 0 and step + 1 < total:
            path = folder / "samples" / f"step-{step + 1:06d}.png"
            write_samples(cfg, method, models, k, sample_captions, path)
    if main:
        write_samples(cfg, method, models, k, sample_captions, folder / "samples" / "final.png")
    return True


# ---------------------------------------------------------------------------------------------
# 4. export


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
        models = build_models(cfg, teacher, torch.device("cpu"), False)
        lora = torch.nn.ParameterList(models.lora_parameters(models.student))
        step = load_checkpoint(checkpoint, modules={"lora": lora})["step"]
        out = folder / "checkpoint-export"
        print(export_stage(cfg, method, k, models, out))
        print(f"exported {folder.name} at step {step} to {out}")
        return out
    raise ValueError(f"no unfinished stage with a checkpoint under {cfg.out_dir}")


def make_accelerator(cfg: DistillConfig) -> tuple[Accelerator, torch.device]:
    """This process's Accelerator and training device.

    One plain process trains on ``cfg.device`` (``cuda:N`` included); under ``accelerate
    launch`` each process takes the device the launcher gave it, of ``cfg.device``'s type.
    accelerate's state is one per process: a second run in the same process must keep the
    device type and ``mixed_precision``.
    """
    device = resolve_device(cfg.device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.mixed_precision)
    if accelerator.device.type != device.type:
        raise ValueError(
            f"device={cfg.device} but this process's accelerate state is on "
            f"{accelerator.device} (--cpu, or an earlier run in the same process)"
        )
    if accelerator.num_processes > 1:
        device = accelerator.device
    return accelerator, device


def run(cfg: DistillConfig, method: Method) -> dict[int, Path]:
    """Run every stage not yet done; returns {k: the stage's diffusers LoRA file} of done ones."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if method == "lcm":
        cfg = replace(cfg, stages=(1,))
    if cfg.target not in ("ema", "online"):
        raise ValueError(f"target must be 'ema' or 'online', got {cfg.target!r}")
    if cfg.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {cfg.mixed_precision!r}")
    accelerator, device = make_accelerator(cfg)
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
        models = build_models(cfg, pipe, device, cfg.adversarial and method == "tscd")
        data = load_data(cfg, pipe, device, write_cache=main)
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
    args = parser.parse_args(argv)
    cfg = load_config(DistillConfig, args.config, args.overrides)
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
