"""Load a registry spec into a ready `Generator`, and generate batches of images with it.

`load` builds the diffusers pipeline a spec describes (SD1.5 or SDXL; base weights from a local
folder, a single file or the local Hugging Face cache; optional UNet override; fused LoRAs; the
recipe's scheduler), moves it to the device, swaps in the spec's backend (`hypersd.backends`) and
warms it up. `Generator.generate` runs a whole batch of requests as one pipeline call, each
request with its own prompt, negative prompt and seed, after validating the shared sampling values
against the spec and its recipe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import diffusers
import PIL.Image
import safetensors.torch
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from hypersd.backends import BackendResult, install_backend
from hypersd.lora import SDPipeline, fuse_loras
from hypersd.recipes import Recipe, Sampling
from hypersd.registry import ARTEFACT_BACKENDS, ModelSpec

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds


@dataclass(frozen=True)
class ImageRequest:
    """One image to generate.

    Args:
        prompt: The text prompt.
        seed: Seed of this image's noise: the same seed, prompt and settings give the same image,
            alone or in any batch.
        negative_prompt: What to steer away from; only recipes with CFG accept one.
    """

    prompt: str
    seed: int
    negative_prompt: str | None = None


@dataclass
class BatchResult:
    """The images of one `Generator.generate` call, in request order.

    Args:
        images: One PIL image per request.
        seeds: The seed of each image.
        timings: Seconds spent in "text_encoding", "denoising", "vae_decode" and in "total".
    """

    images: list[PIL.Image.Image]
    seeds: list[int]
    timings: dict[str, float]


class Generator:
    """A loaded, warmed-up model that turns batches of `ImageRequest`s into images.

    Calls are serialised by a lock: a diffusers pipeline keeps per-call state (the scheduler's
    timesteps), so two threads must never run it at once.

    Args:
        spec: The registry spec the pipeline was built from; it supplies defaults and limits.
        pipe: The diffusers pipeline, on its device, with the recipe's scheduler and fused LoRAs.
        backend: What `install_backend` did: the backend in use (`backend.backend`, which is
            `eager` after a fallback) and why the spec's one is not, if it is not.
    """

    def __init__(
        self, spec: ModelSpec, pipe: SDPipeline, backend: BackendResult | None = None
    ) -> None:
        self.spec = spec
        self.pipe = pipe
        self.backend = backend or BackendResult("eager")
        self._lock = threading.Lock()

    def generate(
        self,
        requests: Sequence[ImageRequest],
        *,
        steps: int | None = None,
        width: int | None = None,
        height: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> BatchResult:
        """Generate one image per request in a single pipeline call.

        Args:
            requests: The batch; prompts, negative prompts and seeds are per request.
            steps: Denoising steps; `None` for the spec's default.
            width: Image width; `None` for the spec's default size.
            height: Image height; `None` for the spec's default size.
            guidance_scale: CFG scale; `None` for the spec's default.
            eta: TCD `eta`; only for recipes that take it, `None` for the recipe's default.
            on_step: Called with the number of denoising steps done after each one (progress).

        Raises:
            ValueError: naming the field and its allowed values when a value is not allowed for
                this model (steps, size, guidance, eta, a negative prompt, a seed out of range).
        """
        if not requests:
            raise ValueError("requests: at least one ImageRequest is needed")
        for request in requests:
            if not 0 <= request.seed <= MAX_SEED:
                raise ValueError(f"seed={request.seed} is out of range; allowed: 0 to 2**64 - 1")
        sampling = self.spec.resolve_sampling(
            steps,
            guidance_scale,
            eta,
            negative_prompt=any(request.negative_prompt for request in requests),
        )
        width, height = self.spec.resolve_size(width, height)
        padding = [requests[-1]] * (self.padded_batch(len(requests)) - len(requests))
        result = self._run([*requests, *padding], sampling, width, height, on_step)
        if padding:
            del result.images[len(requests) :], result.seeds[len(requests) :]
        return result

    def warmup(self) -> None:
        """Generate one 1-step image, so that the first request does not pay for lazy set-up.

        The first call of a pipeline selects kernels and fills memory pools; doing it at load
        time keeps it out of the first user's latency. torch.compile with static shapes
        compiles per batch size: it is warmed up at every batch size it runs
        (`padded_batch`).
        """
        sampling = replace(self.spec.resolve_sampling(), steps=1)
        batches = self.spec.batch_sizes if self._pads_batches() else (1,)
        for batch in batches:
            requests = [ImageRequest(prompt="warm-up", seed=seed) for seed in range(batch)]
            self._run(requests, sampling, *self.spec.default_size)

    def _pads_batches(self) -> bool:
        """Whether batches run padded to the registry's `batch_sizes` (`padded_batch`)."""
        return self.backend.backend == "compile" and self.spec.static_shapes

    def padded_batch(self, size: int) -> int:
        """The batch a call of `size` images runs at.

        torch.compile with `static_shapes` compiles (and captures a CUDA graph) per batch size,
        at that size's first call; the micro-batcher forms any size, so each new one would
        compile during a request, and past torch's recompile limit run eager. Such a model runs
        padded up to the next of the registry's `batch_sizes` (warmed up at load), the padding
        images dropped: an image depends only on its own seed, not on its batch mates. Larger
        batches than the largest listed run as they are. Every other backend runs `size`.

        Args:
            size: The images asked for.
        """
        if not self._pads_batches():
            return size
        return min((batch for batch in self.spec.batch_sizes if batch >= size), default=size)

    def warmup_as_served(self) -> None:
        """`warmup` here, then again from another thread, as a worker's micro-batcher calls it.

        The second call catches backends that fail in a thread other than the one that first
        ran them: torch.compile's CUDA graphs ("reduce-overhead") do in torch releases before
        pytorch/pytorch#184357 (mid-2026). Run as a compiled backend's check at load, such a
        failure falls back to eager there (or fails the load, `strict`) instead of failing every
        job.
        """
        self.warmup()
        with ThreadPoolExecutor(1, thread_name_prefix="warm-up") as other_thread:
            other_thread.submit(self.warmup).result()

    def _run(
        self,
        requests: Sequence[ImageRequest],
        sampling: Sampling,
        width: int,
        height: int,
        on_step: Callable[[int], None] | None = None,
    ) -> BatchResult:
        seeds = [request.seed for request in requests]
        # CPU generators: the SD pipelines draw each image's noise from its own generator, so an
        # image depends only on its seed, not on the batch; drawing on the CPU also makes it the
        # same on every device.
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        # With CFG, always pass the negative prompts as strings (empty for none): SDXL encodes
        # "no negative prompt" as zeros when the whole batch has none, which would make an image
        # depend on its batch mates.
        negative_prompts = (
            [request.negative_prompt or "" for request in requests]
            if sampling.guidance_scale > 1
            else None
        )
        with self._lock, _PhaseTimer(self.pipe, on_step) as timer:
            output = self.pipe(
                prompt=[request.prompt for request in requests],
                negative_prompt=negative_prompts,
                width=width,
                height=height,
                generator=generators,
                callback_on_step_end=timer.on_step_end,
                **sampling.call_kwargs(),
            )
        return BatchResult(images=list(output.images), seeds=seeds, timings=timer.timings)


class _PhaseTimer:
    """Splits a pipeline call's time into text encoding, denoising and VAE decoding.

    The phases end at the last text-encoder forward and at the end of the last denoising step.
    On CUDA those marks synchronise the device, so the split is right; the denoising steps
    themselves are never synchronised, so timing does not slow them down.
    """

    def __init__(self, pipe: SDPipeline, on_step: Callable[[int], None] | None = None) -> None:
        self.pipe = pipe
        self.on_step = on_step
        self.marks: dict[str, float] = {}
        self.timings: dict[str, float] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._start = 0.0

    def _mark(self, phase: str) -> None:
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize(self.pipe.device)
        self.marks[phase] = time.perf_counter()

    def on_step_end(
        self, pipe: SDPipeline, step: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """`callback_on_step_end` hook of the pipeline call: marks the end of the last step and
        reports each step to `on_step`."""
        if step == pipe.num_timesteps - 1:
            self._mark("denoising")
        if self.on_step is not None:
            self.on_step(step + 1)
        return callback_kwargs

    def __enter__(self) -> _PhaseTimer:
        encoders = [self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)]
        self._hooks = [
            encoder.register_forward_hook(lambda *_: self._mark("text_encoding"))
            for encoder in encoders
            if encoder is not None
        ]
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        end = time.perf_counter()
        for hook in self._hooks:
            hook.remove()
        text_end = self.marks.get("text_encoding", self._start)
        denoise_end = self.marks.get("denoising", text_end)
        self.timings = {
            "text_encoding": text_end - self._start,
            "denoising": denoise_end - text_end,
            "vae_decode": end - denoise_end,
            "total": end - self._start,
        }


def load(
    spec: ModelSpec,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    warmup: bool = True,
    cache_dir: Path | None = None,
) -> Generator:
    """Build the pipeline that `spec` describes and return it as a ready `Generator`.

    Weights are read with safetensors only (never pickle) and from local files only: `hub_id`
    models must already be in the Hugging Face cache.

    Args:
        spec: The registry spec.
        device: Torch device; defaults to "cuda" when available, else "cpu".
        dtype: Weight dtype; defaults to float16 on CUDA (float32 for the `onnxruntime` and
            `tensorrt` backends, which export float32 graphs, until one falls back to eager)
            and float32 elsewhere.
        warmup: Run one 1-step image before returning. For a compiled backend it is the first
            call, where torch.compile compiles, made here and from another thread
            (`Generator.warmup_as_served`): only with it does a backend that fails there fall
            back to eager at load; without it, that failure raises at the first `generate`.
        cache_dir: The artefact cache of compiled backends; default
            `hypersd.backends.cache.cache_dir()` ($HYPERSD_ENGINE_CACHE, else
            ~/.cache/hypersd/engines).

    Raises:
        FileNotFoundError: if a weights file or folder named by the spec is missing.
        Exception: when the spec's backend fails and the spec is `strict` (else it falls back to
            eager, see `Generator.backend`).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    # ONNX exports are float32 (ONNX Runtime's CUDA provider runs them as they are; TensorRT
    # builds its half-precision layers from them); eager runs half on CUDA.
    exported = spec.backend in ARTEFACT_BACKENDS
    half_if_eager = dtype is None and cuda
    if dtype is None:
        dtype = torch.float16 if cuda and not exported else torch.float32

    pipe = load_pipeline(spec, dtype)
    pipe.scheduler = build_scheduler(spec.recipe_info, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    fuse_loras(pipe, spec.loras)
    # The backend asked for while its check runs (the warm-up compiles every padded batch size);
    # what install_backend returns replaces it.
    generator = Generator(spec, pipe, BackendResult(spec.backend))
    # A compiled backend's warm-up is its first call, which may fail (and then fall back).
    generator.backend = install_backend(
        pipe, spec, cache_dir, check=generator.warmup_as_served if warmup else None
    )
    if generator.backend.backend == "eager" and exported and half_if_eager:
        # fell back from a float32 export: eager on CUDA runs half, as it would have loaded
        pipe.to(dtype=torch.float16)
    if warmup and generator.backend.backend == "eager":
        generator.warmup()
    return generator


def build_scheduler(recipe: Recipe, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """The recipe's scheduler, made from a model's own scheduler config.

    Args:
        recipe: The inference recipe (names the diffusers scheduler class and its overrides).
        base_config: The model's scheduler config (`pipe.scheduler.config`).
    """
    scheduler_cls = getattr(diffusers, recipe.scheduler)
    scheduler: SchedulerMixin = scheduler_cls.from_config(base_config, **recipe.scheduler_kwargs)
    return scheduler


def load_pipeline(spec: ModelSpec, dtype: torch.dtype) -> SDPipeline:
    """The spec's base pipeline with its UNet override, on the CPU.

    Without the spec's LoRAs and the recipe's scheduler, which `load` adds: the bare base model.

    Raises:
        FileNotFoundError: if a weights file or folder named by the spec is missing.
    """
    for field in ("path", "single_file", "unet"):
        location = getattr(spec, field)
        if location is not None and not location.exists():
            raise FileNotFoundError(
                f"model {spec.name!r}: {field} {str(location)!r} does not exist"
            )

    pipeline_cls: type[SDPipeline]
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if spec.family == "sdxl":
        pipeline_cls = StableDiffusionXLPipeline
        kwargs["add_watermarker"] = False
    else:
        pipeline_cls = StableDiffusionPipeline
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    if spec.unet is not None and spec.unet.is_dir():
        kwargs["unet"] = UNet2DConditionModel.from_pretrained(
            spec.unet, dtype=dtype, use_safetensors=True, local_files_only=True
        )

    pipe: SDPipeline
    if spec.single_file is not None:
        pipe = pipeline_cls.from_single_file(str(spec.single_file), **kwargs)
    else:
        source = str(spec.path or spec.hub_id)  # the registry guarantees exactly one source
        pipe = pipeline_cls.from_pretrained(source, use_safetensors=True, **kwargs)

    if spec.unet is not None and spec.unet.is_file():
        # A bare state dict (like Hyper-SDXL-1step-Unet.safetensors): the base UNet's config and
        # module tree, the file's weights.
        pipe.unet.load_state_dict(safetensors.torch.load_file(spec.unet), strict=True)
    return pipe
