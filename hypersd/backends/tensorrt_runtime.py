"""Running TensorRT engines on torch CUDA tensors, on torch's current stream.

`TrtEngine` has the call signature of `hypersd.backends.ort.Session` (inputs by name and the
outputs' shapes in, torch tensors out), so the same swapped-in modules (`ExportedTextEncoder`,
`ExportedUNet`, `ExportedVaeDecoder`) serve both backends. Each call binds the tensors' device
addresses (`set_tensor_address`: no copies) and enqueues on `torch.cuda.current_stream()`
(`execute_async_v3`), so TensorRT's work is ordered with torch's without synchronising.

With `cuda_graphs` (the registry's `static_shapes`), the first call of each shape is captured
into a CUDA graph over static input and output buffers and later calls replay it: one launch
instead of one per layer.

The micro-batcher forms batches of any size up to its limit, and a job may hold up to 8 images,
while an engine's profiles take only the registry's `batch_sizes` (each one alone with
`static_shapes`). A batch no profile takes runs padded up to the next batch one does (repeating
its last sample), or in chunks of the largest when it is larger than every profile's: every
input and output has the batch as its first axis, and samples do not mix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hypersd.backends.ort import swap_in
from hypersd.backends.tensorrt import ENGINE_SUFFIX, require_tensorrt
from hypersd.lora import SDPipeline

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
# One optimisation profile: each input's (min, opt, max) shapes, by name.
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]
Run = Callable[[dict[str, torch.Tensor], dict[str, Shape]], list[torch.Tensor]]


def _takes(profile: ProfileShapes, shapes: dict[str, Shape], batch_axis: bool) -> bool:
    """Whether `profile` takes `shapes` (with `batch_axis` False: all but their batch axes)."""
    first = 0 if batch_axis else 1
    for name, shape in shapes.items():
        low, _, high = profile[name]
        pairs = zip(low[first:], shape[first:], high[first:], strict=True)
        if not all(lo <= dim <= hi for lo, dim, hi in pairs):
            return False
    return True


def profile_index(profiles: Sequence[ProfileShapes], shapes: dict[str, Shape]) -> int | None:
    """The first of an engine's `profiles` that takes the input `shapes`, or None.

    Args:
        profiles: The engine's optimisation profiles, in order.
        shapes: Each input's shape, by name.
    """
    return next(
        (index for index, profile in enumerate(profiles) if _takes(profile, shapes, True)), None
    )


def batch_ranges(
    profiles: Sequence[ProfileShapes], shapes: dict[str, Shape]
) -> list[tuple[int, int]]:
    """The (min, max) batch of each profile that takes `shapes` but for their batch axes.

    Args:
        profiles: The engine's optimisation profiles.
        shapes: Each input's shape, by name (the batch first).
    """
    ranges = []
    for profile in profiles:
        if _takes(profile, shapes, False):
            low = max(profile[name][0][0] for name in shapes)
            high = min(profile[name][2][0] for name in shapes)
            if low <= high:
                ranges.append((low, high))
    return ranges


def batch_chunks(batch: int, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """How `batch` samples run through profiles whose batch axes take `ranges`: per call, the
    samples it holds and the batch it runs at (padded up to the smallest batch a profile takes).

    Chunks take the largest batch any profile takes; the last holds the rest.

    Args:
        batch: The samples to run.
        ranges: Each profile's (min, max) batch (`batch_ranges`).

    Raises:
        ValueError: if no profile takes these shapes at any batch.
    """
    if not ranges:
        raise ValueError(
            "no optimisation profile of the engine takes these shapes at any batch; its profiles "
            "cover the registry entry's sizes (rebuild after changing them)"
        )
    largest = max(high for _, high in ranges)
    chunks = []
    while batch > 0:
        take = min(batch, largest)
        chunks.append((take, min(max(take, low) for low, high in ranges if high >= take)))
        batch -= take
    return chunks


def run_in_profile_batches(
    run: Run,
    inputs: dict[str, torch.Tensor],
    output_shapes: dict[str, Shape],
    ranges: Sequence[tuple[int, int]],
) -> list[torch.Tensor]:
    """`run(inputs, output_shapes)` at batches the engine's profiles take (`batch_chunks`).

    Args:
        run: One engine call at a batch a profile takes.
        inputs: Input tensors by name, the batch first.
        output_shapes: Each output's shape by name, the batch first.
        ranges: The batch ranges of the profiles that take the inputs' other axes.
    """
    batch = next(iter(inputs.values())).shape[0]
    chunks = batch_chunks(batch, ranges)
    if chunks == [(batch, batch)]:
        return run(inputs, output_shapes)
    parts, start = [], 0
    for take, padded in chunks:
        part = {}
        for name, tensor in inputs.items():
            piece = tensor[start : start + take]
            repeats = piece[-1:].expand(padded - take, *piece.shape[1:])
            part[name] = torch.cat([piece, repeats]).contiguous()
        shapes = {name: (padded, *shape[1:]) for name, shape in output_shapes.items()}
        parts.append([output[:take] for output in run(part, shapes)])
        start += take
    return [torch.cat(pieces) for pieces in zip(*parts, strict=True)]


class TrtEngine:
    """One deserialized engine, called with and returning torch CUDA tensors.

    Args:
        path: The serialized engine (`.plan`).
        device: The CUDA device it runs on.
        cuda_graphs: Capture each input shape's first call as a CUDA graph and replay it.
    """

    def __init__(self, path: Path, device: torch.device, cuda_graphs: bool) -> None:
        self.trt = require_tensorrt(device)
        logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {path} (built by another version?)")
        names = [self.engine.get_tensor_name(index) for index in range(self.engine.num_io_tensors)]
        mode = self.trt.TensorIOMode.INPUT
        self.input_names = [name for name in names if self.engine.get_tensor_mode(name) == mode]
        self.output_names = [name for name in names if name not in self.input_names]
        self.profiles = [
            {name: self._profile_shapes(name, index) for name in self.input_names}
            for index in range(self.engine.num_optimization_profiles)
        ]
        self.device = device
        self.cuda_graphs = cuda_graphs
        # One execution context per optimisation profile: a captured graph belongs to one.
        self._contexts: dict[int, Any] = {}
        self._graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, dict, list]] = {}

    def _profile_shapes(self, name: str, index: int) -> tuple[Shape, Shape, Shape]:
        low, opt, high = self.engine.get_tensor_profile_shape(name, index)
        return tuple(low), tuple(opt), tuple(high)

    def _dtype(self, name: str) -> torch.dtype:
        types = {
            self.trt.DataType.FLOAT: torch.float32,
            self.trt.DataType.HALF: torch.float16,
            self.trt.DataType.BF16: torch.bfloat16,
            self.trt.DataType.INT64: torch.int64,
            self.trt.DataType.INT32: torch.int32,
        }
        return types[self.engine.get_tensor_dtype(name)]

    def _context(self, profile: int, stream: int) -> Any:
        if profile not in self._contexts:
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(profile, stream)
            self._contexts[profile] = context
        return self._contexts[profile]

    def _enqueue(
        self,
        context: Any,
        inputs: dict[str, torch.Tensor],
        outputs: list[torch.Tensor],
        stream: int,
    ) -> None:
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in zip(self.output_names, outputs, strict=True):
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(stream):
            raise RuntimeError("TensorRT's execute_async_v3 failed (see its log)")

    def __call__(
        self, inputs: dict[str, torch.Tensor], output_shapes: dict[str, Shape]
    ) -> list[torch.Tensor]:
        """Run on `inputs` (by name) and return the outputs as tensors on `device`.

        Args:
            inputs: Input tensors by name, at any batch (`run_in_profile_batches`).
            output_shapes: Each output's shape by name; torch allocates the outputs.
        """
        bound = {
            name: inputs[name].to(self.device, self._dtype(name)).contiguous()
            for name in self.input_names
        }
        shapes = {name: tuple(tensor.shape) for name, tensor in bound.items()}
        ranges = batch_ranges(self.profiles, shapes)
        return run_in_profile_batches(self._run, bound, output_shapes, ranges)

    def _run(
        self, bound: dict[str, torch.Tensor], output_shapes: dict[str, Shape]
    ) -> list[torch.Tensor]:
        """One engine call at a batch one of its profiles takes."""
        shapes = {name: tuple(tensor.shape) for name, tensor in bound.items()}
        index = profile_index(self.profiles, shapes)
        assert index is not None, "run_in_profile_batches runs profiles' batches only"
        stream = torch.cuda.current_stream(self.device).cuda_stream
        context = self._context(index, stream)
        key = tuple(sorted(shapes.items()))
        if self.cuda_graphs and key in self._graphs:
            graph, static_inputs, static_outputs = self._graphs[key]
            for name, tensor in bound.items():
                static_inputs[name].copy_(tensor)
            graph.replay()
            # Copies: the next replay overwrites the static outputs.
            return [tensor.clone() for tensor in static_outputs]

        outputs = [
            torch.empty(output_shapes[name], dtype=self._dtype(name), device=self.device)
            for name in self.output_names
        ]
        if self.cuda_graphs:
            # The graph's own input buffers: `bound` may be the caller's tensors, which later
            # replays must not overwrite.
            bound = {name: tensor.clone() for name, tensor in bound.items()}
        # A first call per shape outside any graph: TensorRT sets up shape-dependent state then.
        self._enqueue(context, bound, outputs, stream)
        if self.cuda_graphs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                capture_stream = torch.cuda.current_stream(self.device).cuda_stream
                self._enqueue(context, bound, outputs, capture_stream)
            self._graphs[key] = (graph, bound, outputs)
            return [tensor.clone() for tensor in outputs]
        return outputs


def install(pipe: SDPipeline, folder: Path, cuda_graphs: bool) -> None:
    """Load the engines of `folder` and swap them into `pipe` (`hypersd.backends.ort.swap_in`).

    Args:
        pipe: The loaded pipeline whose engines `folder` holds, on a CUDA device.
        folder: The artefact folder `hypersd.backends.tensorrt.build` wrote.
        cuda_graphs: Replay each shape as a CUDA graph (the registry's `static_shapes`).
    """
    swap_in(
        pipe, lambda name: TrtEngine(folder / f"{name}{ENGINE_SUFFIX}", pipe.device, cuda_graphs)
    )
