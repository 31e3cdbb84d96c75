"""Running TensorRT engines on torch CUDA tensors, on torch's current stream.

`TrtEngine` has the call signature of `hypersd.backends.ort.Session` (inputs by name and the
outputs' shapes in, torch tensors out), so the same swapped-in modules (`OrtTextEncoder`,
`OrtUNet`, `OrtVaeDecoder`) serve both backends. Each call binds the tensors' device addresses
(`set_tensor_address`: no copies) and enqueues on `torch.cuda.current_stream()`
(`execute_async_v3`), so TensorRT's work is ordered with torch's without synchronising.

With `cuda_graphs` (the registry's `static_shapes`), the first call of each shape is captured
into a CUDA graph over static input and output buffers and later calls replay it: one launch
instead of one per layer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from hypersd.backends import onnx_export
from hypersd.backends.ort import OrtTextEncoder, OrtUNet, OrtVaeDecoder
from hypersd.backends.tensorrt import ENGINE_SUFFIX, require_tensorrt
from hypersd.lora import SDPipeline

log = logging.getLogger(__name__)


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
        self.device = device
        self.cuda_graphs = cuda_graphs
        # One execution context per optimisation profile: a captured graph belongs to one.
        self._contexts: dict[int, Any] = {}
        self._graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, dict, list]] = {}

    def _dtype(self, name: str) -> torch.dtype:
        types = {
            self.trt.DataType.FLOAT: torch.float32,
            self.trt.DataType.HALF: torch.float16,
            self.trt.DataType.BF16: torch.bfloat16,
            self.trt.DataType.INT64: torch.int64,
            self.trt.DataType.INT32: torch.int32,
        }
        return types[self.engine.get_tensor_dtype(name)]

    def _profile(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """The first optimisation profile whose ranges take `shapes`."""
        for index in range(self.engine.num_optimization_profiles):
            ranges = {name: self.engine.get_tensor_profile_shape(name, index) for name in shapes}
            if all(
                all(low <= dim <= high for low, dim, high in zip(lo, shape, hi, strict=True))
                for name, shape in shapes.items()
                for lo, _, hi in [ranges[name]]
            ):
                return index
        raise ValueError(
            f"no optimisation profile of the engine takes the shapes {shapes}; its profiles cover "
            "the registry entry's batch_sizes and sizes (rebuild after changing them)"
        )

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
        self, inputs: dict[str, torch.Tensor], output_shapes: dict[str, tuple[int, ...]]
    ) -> list[torch.Tensor]:
        """Run on `inputs` (by name) and return the outputs as tensors on `device`.

        Args:
            inputs: Input tensors by name.
            output_shapes: Each output's shape by name; torch allocates the outputs.
        """
        bound = {
            name: inputs[name].to(self.device, self._dtype(name)).contiguous()
            for name in self.input_names
        }
        shapes = {name: tuple(tensor.shape) for name, tensor in bound.items()}
        stream = torch.cuda.current_stream(self.device).cuda_stream
        context = self._context(self._profile(shapes), stream)
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
    """Load the engines of `folder` and swap them into `pipe` in place of its torch modules.

    All engines load before anything is swapped, so a failure leaves `pipe` as it was.

    Args:
        pipe: The loaded pipeline whose engines `folder` holds, on a CUDA device.
        folder: The artefact folder `hypersd.backends.tensorrt.build` wrote.
        cuda_graphs: Replay each shape as a CUDA graph (the registry's `static_shapes`).
    """

    def engine(name: str) -> TrtEngine:
        return TrtEngine(folder / f"{name}{ENGINE_SUFFIX}", pipe.device, cuda_graphs)

    swaps: dict[str, torch.nn.Module] = {
        "text_encoder": OrtTextEncoder(
            engine(onnx_export.TEXT_ENCODER), pipe.text_encoder.config, projected=False
        ),
        "unet": OrtUNet(engine(onnx_export.UNET), pipe.unet),
        "vae": OrtVaeDecoder(engine(onnx_export.VAE_DECODER), pipe.vae.config),
    }
    if getattr(pipe, "text_encoder_2", None) is not None:
        swaps["text_encoder_2"] = OrtTextEncoder(
            engine(onnx_export.TEXT_ENCODER_2), pipe.text_encoder_2.config, projected=True
        )
    for name, module in swaps.items():
        setattr(pipe, name, module)
