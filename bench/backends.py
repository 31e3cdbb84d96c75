"""Benchmark: eager against the compiled CPU backends, UNet alone and whole text->image calls.

    python -m bench.backends [--models shapes-hyper-1step,shapes-hyper-4step,shapes-base]
                             [--batch-sizes 1,8] [--repeats 5] [--threads 1]
                             [--backends eager,onnxruntime[,compile]]

Each model runs at its default steps (and guidance: the teacher's UNet batch is twice the image
batch under CFG). Per backend it measures the start-up cost (load, and for a compiled backend the
export into an empty cache, then a load from the cache; for torch.compile the first call, which
compiles), one UNet call at the batch the pipeline
gives it, and one whole `Generator.generate` call (text encoding, all steps, VAE decoding). It
prints markdown tables of medians, with each backend's speed-up over eager measured in the same
process, and the largest pixel difference from eager's images for the same seeds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.machine import describe_machine
from hypersd.pipeline import Generator, ImageRequest, load
from hypersd.registry import ModelSpec, load_registry

PROMPT = "a small blue triangle to the left of a large yellow square on a black background"
# torch.compile is opt-in (--backends eager,onnxruntime,compile): minutes of compiling per shape
DEFAULT_BACKENDS = ("eager", "onnxruntime")


def _names(text: str) -> list[str]:
    return text.split(",")


def _ints(text: str) -> list[int]:
    return [int(value) for value in text.split(",")]


def median_seconds(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The median wall time of each call over `repeats` runs, after one untimed warm-up run each.

    The calls take turns within each repeat, so that a change in the machine's load (it is
    shared) weighs on every backend alike instead of on whichever ran at the time.

    Args:
        calls: What to time, by name.
        repeats: Timed runs of each.
    """
    for call in calls.values():
        call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def unet_call(generator: Generator, batch_size: int) -> Callable[[], object]:
    """One UNet call as the pipeline makes it, at `batch_size` images (doubled under CFG).

    Args:
        generator: The loaded model.
        batch_size: Images per call.
    """
    pipe = generator.pipe
    cfg = generator.spec.guidance_scale > 1
    rows = batch_size * (2 if cfg else 1)
    size = generator.spec.default_size
    factor = pipe.vae_scale_factor
    shape = (rows, pipe.unet.config.in_channels, size[1] // factor, size[0] // factor)
    sample = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    tokens = pipe.tokenizer.model_max_length
    context = torch.randn((rows, tokens, pipe.unet.config.cross_attention_dim))
    timestep = torch.tensor(999)

    def call() -> object:
        with torch.no_grad():
            return pipe.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)

    return call


def whole_call(generator: Generator, requests: list[ImageRequest]) -> Callable[[], object]:
    """One whole text->image call of `requests`.

    Args:
        generator: The loaded model.
        requests: The batch.
    """
    return lambda: generator.generate(requests)


def load_backend(spec: ModelSpec, backend: str, cache_dir: Path) -> tuple[Generator, str]:
    """Load `spec` on `backend` and describe what starting cost.

    Args:
        spec: The registry spec.
        backend: The backend to load it on.
        cache_dir: An empty artefact cache: a compiled backend is built there, then loaded again.
    """
    variant = spec.model_copy(update={"backend": backend, "strict": True})
    start = time.perf_counter()
    generator = load(variant, device="cpu", warmup=False, cache_dir=cache_dir)
    first = time.perf_counter() - start
    if backend == "eager":
        return generator, f"load {first:.1f} s"
    if backend == "compile":
        # torch.compile builds nothing at load: the first call compiles (each new shape again)
        start = time.perf_counter()
        generator.generate([ImageRequest(PROMPT, 0)])
        compiling = time.perf_counter() - start
        return generator, f"load {first:.1f} s, first call (compiling) {compiling:.1f} s"
    start = time.perf_counter()
    generator = load(variant, device="cpu", warmup=False, cache_dir=cache_dir)
    cached = time.perf_counter() - start
    return generator, f"load + build {first:.1f} s, load from cache {cached:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--models", type=_names, default=["shapes-hyper-1step", "shapes-hyper-4step", "shapes-base"]
    )
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 8])
    parser.add_argument(
        "--backends", type=_names, default=list(DEFAULT_BACKENDS), help="eager first, then others"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="CPU threads of torch and ONNX Runtime")
    args = parser.parse_args()
    if args.backends[0] != "eager":
        parser.error("--backends must start with eager: every ratio is against it")
    if args.threads:
        torch.set_num_threads(args.threads)

    registry = load_registry()
    print(describe_machine("cpu"))
    print()
    startup: list[str] = []
    rows: list[str] = []
    for name in args.models:
        spec = registry.get(name)
        with tempfile.TemporaryDirectory() as cache_dir:
            generators = {}
            for backend in args.backends:
                generators[backend], cost = load_backend(spec, backend, Path(cache_dir))
                startup.append(f"| {name} | {backend} | {cost} |")
            for batch_size in args.batch_sizes:
                requests = [ImageRequest(PROMPT, seed) for seed in range(batch_size)]
                images = {
                    backend: np.stack(
                        [np.asarray(image, np.int16) for image in g.generate(requests).images]
                    )
                    for backend, g in generators.items()
                }
                unet = median_seconds(
                    {backend: unet_call(g, batch_size) for backend, g in generators.items()},
                    args.repeats,
                )
                whole = median_seconds(
                    {backend: whole_call(g, requests) for backend, g in generators.items()},
                    args.repeats,
                )
                for backend in generators:
                    difference = np.abs(images[backend] - images["eager"]).max()
                    rows.append(
                        f"| {name} | {spec.default_steps} | {batch_size} | {backend} "
                        f"| {unet[backend] * 1000:.2f} | {unet['eager'] / unet[backend]:.2f}x "
                        f"| {whole[backend] * 1000:.1f} "
                        f"| {whole['eager'] / whole[backend]:.2f}x | {difference} |"
                    )
    print("| model | backend | start-up |")
    print("|---|---|---|")
    print("\n".join(startup))
    print()
    print(
        "| model | steps | batch | backend | UNet ms | UNet vs eager | text->image ms "
        "| text->image vs eager | max pixel diff |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
