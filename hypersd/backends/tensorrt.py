"""The `tensorrt` backend: TensorRT engines built from the ONNX exports, run on torch's CUDA stream.

`build` exports the pipeline's components to ONNX (`hypersd.backends.onnx_export`, LoRAs fused),
builds one engine per component with the TensorRT Python API (fp16 or bf16 layers, optimisation
profiles over the registry's batch sizes and sizes, a timing cache shared by every build on the
same TensorRT version and GPU), and keeps the ONNX files and a refit map beside the engines.
`hypersd.backends.tensorrt_runtime.install` swaps the engines into the pipeline: each call binds
torch CUDA tensors to the engine's inputs and outputs (`set_tensor_address`) and enqueues on
torch's current stream (`execute_async_v3`); with `static_shapes` every (batch, size) profile is
replayed as a CUDA graph.

A LoRA change never refits one LoRA over another (that leaves a blend of both): the new weights
come from the *base* model with the new LoRAs fused at their scales (`hypersd.backends.refit`),
written into a copy of a refittable engine of the same base model (`refit_artefact`); where
there is none, or a weight cannot be refitted, the engines are built under the new key.

TensorRT and a CUDA GPU are needed at build and run time; `require_tensorrt` says what to install
where either is missing, and `install_backend` then falls back to eager (or fails, `strict`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from hypersd.backends import cache, onnx_export, ort, refit
from hypersd.backends.onnx_export import Parity
from hypersd.lora import SDPipeline
from hypersd.registry import ModelSpec, format_size

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install tensorrt --extra-index-url https://pypi.nvidia.com (TensorRT 10 or later), "
    "on a machine with a CUDA GPU and torch built for CUDA"
)
# Each component's engine is `<name>.plan` in the artefact folder, beside `<name>.onnx`.
ENGINE_SUFFIX = ".plan"
# Inputs with spatial axes (batch, channels, height, width), in latent pixels.
_LATENT_INPUTS = ("sample", "latent")
Shape = tuple[int, ...]


class TensorRTUnavailableError(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message says what to install."""


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module.

    Raises:
        TensorRTUnavailableError: if it is not installed, naming what to install.
    """
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTUnavailableError(
            f"the tensorrt backend needs TensorRT, which is not installed: {INSTALL_HINT}"
        ) from error
    return tensorrt


def require_tensorrt(device: torch.device) -> ModuleType:
    """The `tensorrt` module, after checking that `device` is a CUDA GPU TensorRT can use.

    Args:
        device: The pipeline's device.

    Raises:
        TensorRTUnavailableError: if TensorRT or a CUDA device is missing, naming what to install.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        raise TensorRTUnavailableError(
            f"the tensorrt backend runs on CUDA GPUs only (the pipeline is on {device}): "
            f"{INSTALL_HINT}"
        )
    return import_tensorrt()


def gpu_architecture(device: torch.device) -> str:
    """The GPU's architecture, e.g. "sm_90": engines are built for one and run only there.

    Args:
        device: A CUDA device.
    """
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def engine_precision(spec: ModelSpec) -> str:
    """The engine's layer precision: the registry's, "auto" meaning float16.

    Args:
        spec: The registry spec.
    """
    return "float16" if spec.precision == "auto" else spec.precision


@dataclass(frozen=True)
class ShapeRange:
    """One input's (min, opt, max) shapes in an optimisation profile.

    Args:
        min: The smallest shape the profile takes.
        opt: The shape TensorRT tunes its kernels for.
        max: The largest shape the profile takes.
    """

    min: Shape
    opt: Shape
    max: Shape


Profile = dict[str, ShapeRange]


def _batch_ranges(spec: ModelSpec, name: str) -> Iterator[tuple[int, int, int]]:
    """(min, opt, max) batches of component `name`'s profiles, from the registry's batch sizes.

    The UNet sees twice the image batch under CFG (the negative prompts' half); the text
    encoders and the VAE decoder see the image batch.
    """
    cfg = name == onnx_export.UNET and spec.recipe_info.guidance_range[1] > 1
    factors = (1, 2) if cfg else (1,)
    if spec.static_shapes:
        batches = sorted({batch * factor for batch in spec.batch_sizes for factor in factors})
        for batch in batches:
            yield batch, batch, batch
    else:
        # Tuned for the smallest listed batch: a one-step model is served for latency.
        yield 1, min(spec.batch_sizes), max(spec.batch_sizes) * max(factors)


def profile_settings(spec: ModelSpec) -> dict[str, object]:
    """What the engines' optimisation profiles are made from, for their cache key: sizes and
    every component's batch ranges (the UNet's doubled under CFG, so an entry with CFG never
    reuses or refits the engines of one without it).

    Args:
        spec: The registry spec.
    """
    return {
        "sizes": [format_size(size) for size in spec.sizes],
        "static": spec.static_shapes,
        "unet_batches": list(_batch_ranges(spec, onnx_export.UNET)),
        "batches": list(_batch_ranges(spec, onnx_export.VAE_DECODER)),
    }


def _input_shape(name: str, example: torch.Tensor, batch: int, latent: tuple[int, int]) -> Shape:
    """An input's shape at `batch`, with latent inputs at `latent` (height, width)."""
    dims = [batch, *example.shape[1:]]
    if name in _LATENT_INPUTS:
        dims[2:] = latent
    return tuple(dims)


def profiles(
    spec: ModelSpec, component: onnx_export.Component, vae_scale_factor: int
) -> list[Profile]:
    """The optimisation profiles of one component's engine.

    One profile per size (and per batch size with `static_shapes`); batch axes range over the
    registry's `batch_sizes`, spatial axes are fixed per profile. Non-batch axes of the other
    inputs (token count, embedding widths) take the example inputs' values, which are fixed by
    the model.

    Args:
        spec: The registry spec (`sizes`, `batch_sizes`, `static_shapes`, the recipe's CFG).
        component: The exported component with example inputs.
        vae_scale_factor: Image pixels per latent pixel.
    """
    spatial = component.name in (onnx_export.UNET, onnx_export.VAE_DECODER)
    sizes = spec.sizes if spatial else (spec.default_size,)
    result = []
    for low, opt, high in _batch_ranges(spec, component.name):
        for width, height in sizes:
            latent = (height // vae_scale_factor, width // vae_scale_factor)
            result.append(
                {
                    name: ShapeRange(
                        _input_shape(name, example, low, latent),
                        _input_shape(name, example, opt, latent),
                        _input_shape(name, example, high, latent),
                    )
                    for name, example in component.inputs.items()
                }
            )
    return result


def _save_timing_cache(config: Any, path: Path) -> None:
    """Merge a finished build's timing cache into the file at `path`.

    Builds of other models on this GPU share the file and may have written to it since this
    one read it, so their entries are combined in under a lock rather than overwritten. The
    file is written through a temporary file and a rename, so readers never see half of it.
    """
    timing_cache = config.get_timing_cache()
    with cache.exclusive_lock(path.parent / f"{path.name}.lock"):
        if path.is_file():
            timing_cache.combine(config.create_timing_cache(path.read_bytes()), True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(descriptor, "wb") as file:
            file.write(bytes(timing_cache.serialize()))
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from workers of other users
        os.replace(temporary, path)


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    engine_profiles: list[Profile],
    precision: str,
    timing_cache: Path,
) -> None:
    """Build a refittable TensorRT engine from an ONNX file.

    Args:
        onnx_path: The exported component.
        engine_path: Where the serialized engine goes.
        engine_profiles: Its optimisation profiles (`profiles`).
        precision: "float16", "bfloat16" or "float32": the layers' precision (TensorRT keeps
            float32 where a layer needs it).
        timing_cache: The timing cache file, read if present and merged back after the build:
            kernels timed once are not timed again by the next build on this GPU.

    Raises:
        TensorRTUnavailableError: if TensorRT is not installed.
        RuntimeError: if the ONNX file does not parse or the build fails, with TensorRT's errors.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are explicit-batch; no creation flags are needed.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    flags = {"float16": [trt.BuilderFlag.FP16], "bfloat16": [trt.BuilderFlag.BF16], "float32": []}
    if precision not in flags:
        raise ValueError(f"precision {precision!r}; allowed: {', '.join(flags)}")
    for flag in flags[precision]:
        config.set_flag(flag)
    # Refittable: a LoRA change rewrites the weights instead of rebuilding (see `refit_engine`).
    config.set_flag(trt.BuilderFlag.REFIT)
    known = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(known, ignore_mismatch=False)
    for shapes in engine_profiles:
        profile = builder.create_optimization_profile()
        for name, shape_range in shapes.items():
            profile.set_shape(name, shape_range.min, shape_range.opt, shape_range.max)
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see log)")
    engine_path.write_bytes(bytes(serialized))
    _save_timing_cache(config, timing_cache)


def build(pipe: SDPipeline, spec: ModelSpec, folder: Path, timing_cache: Path) -> list[Parity]:
    """Export `pipe`'s components to ONNX and build an engine of each into `folder`.

    The exports are `onnxruntime`'s (`hypersd.backends.ort.build`), each checked against eager
    on the same inputs; they stay in `folder` beside the engines with the refit map of their
    weights (`hypersd.backends.refit`).

    Args:
        pipe: The loaded pipeline (LoRAs fused), float32, on the GPU.
        spec: The registry spec (profiles and precision).
        folder: An empty artefact folder.
        timing_cache: The timing cache file of this TensorRT version and GPU.

    Returns:
        Each export's parity with eager.
    """
    parity = ort.build(pipe, folder)
    precision = engine_precision(spec)
    maps = {}
    for component in onnx_export.components(pipe):
        onnx_path = folder / f"{component.name}.onnx"
        maps[component.name] = refit.refit_map(onnx_path, component.module)
        engine_profiles = profiles(spec, component, pipe.vae_scale_factor)
        build_engine(
            onnx_path,
            folder / f"{component.name}{ENGINE_SUFFIX}",
            engine_profiles,
            precision,
            timing_cache,
        )
        log.info("built the %s engine (%d profiles)", component.name, len(engine_profiles))
    (folder / refit.REFIT_MAP_FILE).write_text(json.dumps(maps))
    return parity


class RefitError(ValueError):
    """An engine cannot take a model's weights by refitting: it is built instead."""


def refit_artefact(source: Path, pipe: SDPipeline, target: Path) -> None:
    """Write into `target` the engines of `source` with `pipe`'s weights, without rebuilding.

    `pipe` is the base model with the *new* LoRAs fused at their scales (`load` of the new
    entry, eager): every refittable weight is taken from it, so nothing of the LoRAs that
    `source` was built with remains. `target` gets the engines and the refit map (not the ONNX
    files, which hold the old weights).

    Args:
        source: An artefact folder `build` (or this function) wrote for the same base model,
            precision and profiles.
        pipe: The new model, float32.
        target: An empty artefact folder.

    Raises:
        ValueError: if a weight cannot be refitted (see `refit.refit_weights`), or `RefitError`
            if TensorRT cannot refit an engine: either way, build instead.
    """
    trt = import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    maps = json.loads((source / refit.REFIT_MAP_FILE).read_text())
    for component in onnx_export.components(pipe):
        if component.name not in maps:
            raise RefitError(f"{source.name} has no refit map of the {component.name}")
        weights = refit.refit_weights(maps[component.name], component.module.state_dict())
        plan = f"{component.name}{ENGINE_SUFFIX}"
        engine = runtime.deserialize_cuda_engine((source / plan).read_bytes())
        if engine is None:
            raise RefitError(f"TensorRT could not load {source.name}/{plan}")
        refit_engine(engine, weights)
        (target / plan).write_bytes(bytes(engine.serialize()))
    (target / refit.REFIT_MAP_FILE).write_text(json.dumps(maps))


def refit_engine(engine: Any, weights: dict[str, np.ndarray]) -> None:
    """Write new weights into a deserialized refittable engine.

    Args:
        engine: A `tensorrt.ICudaEngine` built with the REFIT flag.
        weights: Every refittable weight by ONNX initializer name (`refit.refit_weights` of the
            base model with the new LoRAs fused: never of the engine's current weights).

    Raises:
        RefitError: if TensorRT reports a weight unknown or still missing, or the refit fails.
    """
    trt = import_tensorrt()
    refitter = trt.Refitter(engine, trt.Logger(trt.Logger.WARNING))
    kept = []  # TensorRT reads the arrays during refit_cuda_engine
    for name, array in weights.items():
        contiguous = np.ascontiguousarray(array)
        kept.append(contiguous)
        if not refitter.set_named_weights(name, trt.Weights(contiguous)):
            raise RefitError(f"the engine has no refittable weight {name!r}")
    missing = refitter.get_missing_weights()
    if missing:
        raise RefitError(f"refit is missing weights: {', '.join(missing[:5])}...")
    if not refitter.refit_cuda_engine():
        raise RefitError("TensorRT's refit failed (see its log)")
