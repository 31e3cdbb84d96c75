"""Backends: what runs a loaded pipeline's text encoder(s), UNet and VAE decoder.

A backend swaps compiled versions of those modules into the diffusers pipeline that
`hypersd.pipeline.load` built (LoRAs fused, the recipe's scheduler set), so recipes, schedulers,
per-request seeds and the micro-batcher stay exactly as they are with `eager`.

- `eager`: the torch modules as loaded.
- `onnxruntime`: ONNX exports run by ONNX Runtime (`hypersd.backends.ort`), built once per key
  into the artefact cache (`hypersd.backends.cache`) and loaded from it afterwards.
- `compile`: `torch.compile` (`hypersd.backends.compiled`); Inductor caches its own kernels.
- `tensorrt`: TensorRT engines built from the ONNX exports (`hypersd.backends.tensorrt`), keyed
  by TensorRT's version and the GPU architecture as well; CUDA only.

`install_backend` returns the backend actually in use: when a compiled one fails to build, load
or run its first call, the pipeline's own modules are put back (with a logged warning), unless
the registry entry says `strict = true`, in which case the error is raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
import transformers

# `ort` imports onnxruntime only when it runs, so this package loads where it is not installed.
from hypersd.backends import cache, compiled, onnx_export, ort, tensorrt
from hypersd.backends.onnx_export import Parity
from hypersd.lora import SDPipeline
from hypersd.registry import ARTEFACT_BACKENDS, BACKENDS, ModelSpec

log = logging.getLogger(__name__)

# The pipeline attributes a backend may replace, restored when it fails.
_SWAPPED = ("text_encoder", "text_encoder_2", "unet", "vae")


@dataclass
class BackendResult:
    """What `install_backend` did.

    Args:
        backend: The backend in use now (`eager` after a fallback).
        artefact: The artefact folder loaded, if any.
        built: Whether this call built the artefact (else it came from the cache).
        parity: Each exported component's error against eager, when this call built it.
        error: Why the requested backend is not in use, after a fallback.
    """

    backend: str
    artefact: Path | None = None
    built: bool = False
    parity: list[Parity] = field(default_factory=list)
    error: str | None = None


def onnxruntime_key(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> str:
    """The artefact key of `spec` for the `onnxruntime` backend on `device` in `dtype`.

    Args:
        spec: The registry spec.
        device: The pipeline's device.
        dtype: The pipeline's weight dtype.
    """
    return cache.artefact_key(
        spec,
        backend="onnxruntime",
        precision=str(dtype).removeprefix("torch."),
        device=device.type,
        versions=_export_versions() | {"onnxruntime": ort.version()},
    )


def _export_versions() -> dict[str, str]:
    return {
        "hypersd-export": f"{onnx_export.EXPORT_VERSION}, opset {onnx_export.OPSET}",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        # the text encoders are transformers modules
        "transformers": transformers.__version__,
    }


def tensorrt_key(
    spec: ModelSpec, tensorrt_version: str, gpu_architecture: str, base_hash: str | None = None
) -> str:
    """The artefact key of `spec` for the `tensorrt` backend.

    Engines are specific to the TensorRT version that built them and to the GPU architecture
    they were built on, and to their precision and optimisation profiles: all are in the key.

    Args:
        spec: The registry spec (precision, batch sizes, static shapes, sizes).
        tensorrt_version: `tensorrt.__version__`.
        gpu_architecture: `hypersd.backends.tensorrt.gpu_architecture(device)`, e.g. "sm_90".
        base_hash: `cache.weights_hash(spec)` when already known.
    """
    return cache.artefact_key(
        spec,
        backend="tensorrt",
        precision=tensorrt.engine_precision(spec),
        device=gpu_architecture,
        versions=_export_versions() | {"tensorrt": tensorrt_version},
        base_hash=base_hash,
        profile=tensorrt.profile_settings(spec),
    )


# In a TensorRT artefact: the key it would have without its LoRAs (what a refit may start from).
BASE_KEY_FILE = "base_key.txt"


def _refit_source(root: Path, base_key: str) -> Path | None:
    """A finished TensorRT artefact under `root` of the same base model and build settings."""
    for marker in sorted(root.glob(f"*/{BASE_KEY_FILE}")):
        folder = marker.parent
        finished = not folder.name.startswith(".") and (folder / cache.KEY_FILE).is_file()
        if finished and marker.read_text() == base_key:  # not a build still in progress
            return folder
    return None


def _build_tensorrt(pipe: SDPipeline, spec: ModelSpec, root: Path) -> BackendResult:
    trt = tensorrt.require_tensorrt(pipe.device)
    architecture = tensorrt.gpu_architecture(pipe.device)
    # One timing cache per TensorRT version and GPU, shared by every model's builds.
    timing_cache = root / f"timing-cache-trt{trt.__version__}-{architecture}.bin"

    parity: list[Parity] = []
    # The same engine but for the LoRAs: an artefact with this base key is refitted, not rebuilt.
    base = spec.model_copy(update={"loras": (), "name": "base"})
    base_hash = cache.weights_hash(spec)  # hashed once: SDXL's weights take seconds
    base_key = tensorrt_key(base, str(trt.__version__), architecture, base_hash)

    def build(folder: Path) -> None:
        (folder / BASE_KEY_FILE).write_text(base_key)
        source = _refit_source(root, base_key)
        if source is not None:
            try:
                tensorrt.refit_artefact(source, pipe, folder)
                log.info("model %s: refitted the engines of %s", spec.name, source.name)
                return
            except ValueError as reason:  # `tensorrt.RefitError` among them
                log.info("model %s: cannot refit (%s), building", spec.name, reason)
                for partial in folder.glob(f"*{tensorrt.ENGINE_SUFFIX}"):
                    partial.unlink()
        parity.extend(tensorrt.build(pipe, spec, folder, timing_cache))

    key = tensorrt_key(spec, str(trt.__version__), architecture, base_hash)
    folder, built = cache.get_or_build(root, key, build)
    return BackendResult("tensorrt", artefact=folder, built=built, parity=parity)


def build_artefact(
    pipe: SDPipeline, spec: ModelSpec, cache_root: Path | None = None
) -> BackendResult:
    """Build (or find) the artefact of `spec`'s backend for `pipe`, without installing it.

    Args:
        pipe: The loaded pipeline (LoRAs fused), eager.
        spec: Its registry spec; `spec.backend` names the backend.
        cache_root: The cache folder; default `hypersd.backends.cache.cache_dir()`.

    Raises:
        ValueError: if the backend has no artefact (eager) or is unknown, listing the allowed ones.
    """
    if spec.backend not in ARTEFACT_BACKENDS:
        raise ValueError(
            f"backend {spec.backend!r} builds no artefact; backends with artefacts: "
            f"{', '.join(ARTEFACT_BACKENDS)} (all backends: {', '.join(BACKENDS)})"
        )
    if pipe.dtype != torch.float32:
        raise ValueError(f"the {spec.backend} backend exports float32 weights, got {pipe.dtype}")
    root = cache.cache_dir(cache_root)
    if spec.backend == "tensorrt":
        return _build_tensorrt(pipe, spec, root)
    # Checked first: an artefact keyed for CUDA that this ONNX Runtime cannot run is not built.
    ort.require_provider(pipe.device)
    parity: list[Parity] = []

    def build(folder: Path) -> None:
        parity.extend(ort.build(pipe, folder))

    key = onnxruntime_key(spec, pipe.device, pipe.dtype)
    folder, built = cache.get_or_build(root, key, build)
    return BackendResult("onnxruntime", artefact=folder, built=built, parity=parity)


def install_backend(
    pipe: SDPipeline,
    spec: ModelSpec,
    cache_root: Path | None = None,
    check: Callable[[], object] | None = None,
) -> BackendResult:
    """Swap `spec.backend`'s compiled modules into `pipe`, building the artefact if needed.

    Args:
        pipe: The loaded pipeline (LoRAs fused, scheduler set), eager.
        spec: Its registry spec: `backend`, `static_shapes` and `strict`.
        cache_root: The artefact cache folder; default `hypersd.backends.cache.cache_dir()`.
        check: A first call through the swapped modules (the warm-up), run here so that a
            backend failing at its first call (torch.compile compiles then) falls back as well;
            not run for `eager`.

    Raises:
        Exception: whatever failed, when `spec.strict` is set; otherwise a failure leaves `pipe`
            eager and is reported in the result.
    """
    if spec.backend == "eager":
        return BackendResult("eager")
    originals = {name: getattr(pipe, name, None) for name in _SWAPPED}
    decoder = pipe.vae.decoder
    try:
        if spec.backend == "compile":
            compiled.install(pipe, spec.static_shapes)
            result = BackendResult("compile")
        elif spec.backend == "tensorrt":
            # Checked first: without TensorRT or a GPU nothing is exported in vain.
            tensorrt.require_tensorrt(pipe.device)
            result = build_artefact(pipe, spec, cache_root)
            assert result.artefact is not None
            from hypersd.backends import tensorrt_runtime

            tensorrt_runtime.install(pipe, result.artefact, cuda_graphs=spec.static_shapes)
        else:
            result = build_artefact(pipe, spec, cache_root)
            assert result.artefact is not None
            ort.install(pipe, result.artefact)
        if check is not None:
            check()
    except Exception as error:
        for name, module in originals.items():
            if module is not None:
                setattr(pipe, name, module)
        pipe.vae.decoder = decoder
        if spec.strict:
            raise
        log.warning(
            "model %s: backend %s failed (%s: %s); running eager instead",
            spec.name,
            spec.backend,
            type(error).__name__,
            error,
        )
        return BackendResult("eager", error=f"{type(error).__name__}: {error}")
    source = "" if result.artefact is None else f" from {result.artefact}"
    state = "" if result.artefact is None else (" (built)" if result.built else " (cached)")
    log.info("model %s: backend %s%s%s", spec.name, spec.backend, source, state)
    return result
