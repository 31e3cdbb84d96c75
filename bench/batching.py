"""Benchmark: images/s of one batched pipeline call against one call per image.

    python -m bench.batching [--model NAME] [--steps 1,4,25] [--batch-sizes 1,4,8] [--repeats 5]
                             [--threads N]

The model defaults to the registry's default, the steps to that model's default steps (the README's
table names `--model shapes-base --steps 1,4,25`, the teacher it was measured on).

Prints a markdown table: the median seconds per call, per image, images/s and the
speed-up over batch size 1 measured in the same process. This is what the serving
micro-batcher relies on: several compatible requests cost less as one call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.machine import describe_machine
from hypersd.pipeline import ImageRequest, load
from hypersd.registry import load_registry


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="registry name (default: the registry's default)")
    parser.add_argument("--steps", type=_ints, help="e.g. 1,4,25 (default: the model's default)")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    registry = load_registry()
    spec = registry.get(args.model or registry.default)
    steps_list: list[int] = args.steps or [spec.default_steps]
    generator = load(spec, device=args.device)
    width, height = spec.default_size
    device = generator.pipe.device
    print(f"model {spec.name}, {width}x{height}, device {device}")
    print(describe_machine(device))
    print()
    print("| steps | batch | s/call (median) | s/image | images/s | vs batch 1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for steps in steps_list:
        baseline: float | None = None
        for batch_size in args.batch_sizes:
            requests = [
                ImageRequest("a large red circle in the center on a white background", i)
                for i in range(batch_size)
            ]
            generator.generate(requests, steps=steps)  # warm this shape up
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                generator.generate(requests, steps=steps)
                seconds.append(time.perf_counter() - start)
            per_call = statistics.median(seconds)
            throughput = batch_size / per_call
            baseline = baseline or throughput
            print(
                f"| {steps} | {batch_size} | {per_call:.4f} | {per_call / batch_size:.4f} "
                f"| {throughput:.1f} | {throughput / baseline:.2f}x |"
            )


if __name__ == "__main__":
    main()
