"""Benchmark: 1-step text->image of SD1.5 and SDXL architectures on a GPU, beside the FLOP floor.

    python -m bench.gpu [--archs sd15,sdxl] [--batch-sizes 1,4] [--repeats 10]
                        [--backends eager,compile,tensorrt] [--tiny]

Builds each pipeline from its real architecture (the UNet, VAE and text encoder configs of SD1.5
and SDXL in `training/configs/architectures/`, with the size, scheduler config and overrides in
`bench/configs/<arch>.json`: SD1.5 at 512x512, SDXL at 1024x1024) with random weights, so
nothing is downloaded, and times one whole `Generator.generate` call at 1 step
(Hyper-SD's 1-step recipe: text encoding, one UNet call, VAE decoding, conversion to images) per
backend and batch size:

- `eager`: diffusers in float16;
- `compile`: `torch.compile`, with CUDA graphs (the registry's `static_shapes`);
- `tensorrt`: engines built from the ONNX exports (float16 layers), where TensorRT is installed.

Beside each time: the call's FLOP count (`torch.utils.flop_counter.FlopCounterMode`) and the
floor it gives, FLOPs divided by this GPU's bf16 matmul rate, measured here on large square
matmuls. Medians over `--repeats` calls after a warm-up, synchronised with the GPU.

`--tiny` shrinks both architectures (the `tiny` overrides of the configs) and runs on the CPU in
float32: it checks the script, not the speed (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from bench.machine import describe_machine
from hypersd.backends import compiled
from hypersd.backends.tensorrt import TensorRTUnavailableError
from hypersd.lora import SDPipeline
from hypersd.pipeline import Generator, ImageRequest, build_scheduler
from hypersd.registry import ModelSpec

CONFIGS = Path(__file__).resolve().parent / "configs"
# The real architectures' configs, as their diffusers checkpoints ship them (shared with
# `training.memory`).
ARCHITECTURES = Path(__file__).resolve().parents[1] / "training" / "configs" / "architectures"
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# A CLIP-layout byte-level tokenizer that ships with the repository: every text tokenizes, and
# prompts are padded to the context length as with CLIP's own, so the text encoders' work is the
# real models'.
TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "shapes-base" / "tokenizer"
RECIPE = "1step-unet"
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
BACKENDS = ("eager", "compile", "tensorrt")


def architecture(name: str, tiny: bool) -> dict[str, Any]:
    """The configs of architecture `name` ("sd15" or "sdxl"), shrunk with `tiny`.

    Args:
        name: The config file's stem under `bench/configs`.
        tiny: Apply its `tiny` overrides.
    """
    config: dict[str, Any] = json.loads((CONFIGS / f"{name}.json").read_text())
    for part in PARTS:
        path = ARCHITECTURES / name / part / "config.json"
        if path.is_file():  # SD1.5 has one text encoder
            config[part] = json.loads(path.read_text()) | config.get(part, {})
    if tiny:
        overrides = config["tiny"]
        for part in PARTS:
            if part in config:
                config[part] |= overrides.get(part, {})
        config["size"] = overrides["size"]
    return config


def build_pipeline(config: dict[str, Any], dtype: torch.dtype, device: str) -> SDPipeline:
    """A pipeline of `config`'s architecture with random weights (seeded: the same every time).

    Args:
        config: `architecture(...)`.
        dtype: Weight dtype.
        device: Where it runs.
    """
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER, model_max_length=77)
    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel.from_config(config["unet"]),
        "vae": AutoencoderKL.from_config(config["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(config["text_encoder"])),
        "tokenizer": tokenizer,
        # from_config: keys of other scheduler classes (SD1.5 ships PNDM's) are ignored; the
        # recipe's scheduler replaces it anyway (`generator_for`).
        "scheduler": EulerDiscreteScheduler.from_config(config["scheduler"]),
    }
    pipe: SDPipeline
    if config["family"] == "sdxl":
        encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config["text_encoder_2"]))
        pipe = StableDiffusionXLPipeline(
            **parts, text_encoder_2=encoder_2, tokenizer_2=tokenizer, add_watermarker=False
        )
    else:
        pipe = StableDiffusionPipeline(
            **parts,
            safety_checker=None,  # type: ignore[arg-type]
            feature_extractor=None,  # type: ignore[arg-type]
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def spec_for(config: dict[str, Any], batch_sizes: list[int], folder: Path) -> ModelSpec:
    """A registry spec of the random pipeline: the 1-step recipe at the architecture's size.

    Args:
        config: `architecture(...)`.
        batch_sizes: The batch sizes benchmarked (TensorRT's static profiles).
        folder: Stands in for the base weights' folder (the pipeline is built in memory).
    """
    size = config["size"]
    return ModelSpec.model_validate(
        {
            "name": f"bench-{config['family']}",
            "family": config["family"],
            "path": folder,
            "recipe": RECIPE,
            "sizes": [[size, size]],
            "batch_sizes": batch_sizes,
            "static_shapes": True,
        }
    )


def generator_for(
    config: dict[str, Any], spec: ModelSpec, backend: str, device: str, work: Path
) -> Generator:
    """A ready `Generator` of the random pipeline on `backend`.

    Args:
        config: `architecture(...)`.
        spec: `spec_for(...)`.
        backend: "eager", "compile" or "tensorrt".
        device: "cuda", or "cpu" (`--tiny`).
        work: A scratch folder (TensorRT's engines and timing cache).
    """
    if backend == "tensorrt":
        from hypersd.backends import tensorrt, tensorrt_runtime

        # Before building anything: without TensorRT and a GPU there is nothing to time.
        tensorrt.require_tensorrt(torch.device(device))
    half = torch.float16 if device == "cuda" else torch.float32
    # TensorRT builds from a float32 export; its layers run in float16.
    pipe = build_pipeline(config, torch.float32 if backend == "tensorrt" else half, device)
    pipe.scheduler = build_scheduler(spec.recipe_info, pipe.scheduler.config)
    if backend == "compile":
        compiled.install(pipe, static_shapes=True)
    elif backend == "tensorrt":
        folder = Path(tempfile.mkdtemp(dir=work))
        tensorrt.build(pipe, spec, folder, work / "timing-cache.bin")
        tensorrt_runtime.install(pipe, folder, cuda_graphs=True)
    return Generator(spec, pipe)


def matmul_rate(device: str, dtype: torch.dtype, size: int, repeats: int = 20) -> float:
    """Measured matmul FLOP/s of `size`x`size` matrices in `dtype` on `device` (median).

    Args:
        device: "cuda" or "cpu".
        dtype: bfloat16 on a GPU (the tensor cores' rate).
        size: The matrices' side.
        repeats: Timed runs.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, repeats)
    return 2 * size**3 / seconds


def median_seconds(call: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall time of `call` over `repeats` runs after one warm-up, synchronised on CUDA."""

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    call()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(generator: Generator, batch: int) -> int:
    """FLOPs of one 1-step text->image call at `batch` (matmuls and convolutions)."""
    requests = [ImageRequest(PROMPT, seed) for seed in range(batch)]
    with FlopCounterMode(display=False) as counter:
        generator.generate(requests, steps=1)
    return int(counter.get_total_flops())


def time_generate(generator: Generator, batch: int, device: str, repeats: int) -> float:
    """Median seconds of one 1-step text->image call at `batch`."""
    requests = [ImageRequest(PROMPT, seed) for seed in range(batch)]
    return median_seconds(lambda: generator.generate(requests, steps=1), device, repeats)


def rows(
    generator: Generator,
    model: str,
    backend: str,
    flops: dict[int, int],
    rate: float,
    repeats: int,
) -> Iterator[str]:
    """The table's rows of one backend: per batch, its median time beside the FLOP floor.

    Args:
        generator: The pipeline on `backend`.
        model: The rows' first cells (arch and size).
        backend: Its name, for the row.
        flops: The call's FLOPs by batch (`count_flops`).
        rate: The GPU's measured matmul FLOP/s.
        repeats: Timed calls per batch.
    """
    device = generator.pipe.device.type
    for batch, count in flops.items():
        seconds = time_generate(generator, batch, device, repeats)
        floor = count / rate
        yield (
            f"{model} {batch} | {backend} | {seconds * 1000:.1f} | {count / 1e9:.1f} "
            f"| {floor * 1000:.2f} | {seconds / floor:.1f}x |"
        )


def run(args: argparse.Namespace) -> Iterator[str]:
    """The benchmark's markdown lines (machine, matmul rate, the table), each as soon as it is
    measured: a run stopped by a time limit keeps the rows it finished."""
    device = "cpu" if args.tiny else "cuda"
    rate_dtype = torch.float32 if args.tiny else torch.bfloat16
    rate = matmul_rate(device, rate_dtype, 256 if args.tiny else 8192)
    yield describe_machine(device)
    yield ""
    precision = str(rate_dtype).removeprefix("torch.")
    yield f"Measured {precision} matmul rate: {rate / 1e12:.1f} TFLOP/s"
    yield ""
    yield "| arch | size | batch | backend | ms (median) | GFLOPs | floor ms | vs floor |"
    yield "|---|---:|---:|---|---:|---:|---:|---:|"
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    backends = args.backends.split(",")
    for arch in args.archs.split(","):
        config = architecture(arch, args.tiny)
        size = config["size"]
        spec = spec_for(config, args.batch_sizes, work)

        # Counted on eager: what the model computes, whichever backend computes it. The same
        # pipeline gives eager's rows: building another would cost minutes for SDXL.
        eager = generator_for(config, spec, "eager", device, work)
        flops = {batch: count_flops(eager, batch) for batch in args.batch_sizes}
        if "eager" in backends:
            yield from rows(eager, f"| {arch} | {size} |", "eager", flops, rate, args.repeats)
        del eager  # before the next backend's pipeline: SDXL's take gigabytes each
        for backend in (name for name in backends if name != "eager"):
            if device == "cuda":
                torch.cuda.empty_cache()
            try:
                generator = generator_for(config, spec, backend, device, work)
            except TensorRTUnavailableError as error:  # a missing backend is a row, not a crash
                reason = f"{type(error).__name__}: {error}".replace("|", "/")
                yield f"| {arch} | {size} | - | {backend} | not run: {reason} | | | |"
                continue
            yield from rows(generator, f"| {arch} | {size} |", backend, flops, rate, args.repeats)
            del generator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="sd15,sdxl", help="configs under bench/configs")
    parser.add_argument(
        "--batch-sizes", type=lambda text: [int(v) for v in text.split(",")], default=[1, 4]
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backends", default=",".join(BACKENDS), help=", ".join(BACKENDS))
    parser.add_argument("--tiny", action="store_true", help="shrunk models on the CPU (a test)")
    args = parser.parse_args(argv)
    unknown = set(args.backends.split(",")) - set(BACKENDS)
    if unknown:
        parser.error(f"--backends: unknown {sorted(unknown)}; allowed: {', '.join(BACKENDS)}")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA GPU: this benchmark is for GPUs (--tiny runs it on the CPU)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    for line in run(args):
        print(line, flush=True)


if __name__ == "__main__":
    main()
