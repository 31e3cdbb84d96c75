"""The `onnxruntime` backend: ONNX Runtime sessions in place of the pipeline's torch modules.

`build` exports the pipeline's text encoder(s), UNet and VAE decoder (LoRAs already fused) into an
artefact folder and checks each export against eager on the same inputs; `install` opens the
sessions and `swap_in` puts them into the diffusers pipeline as modules with the same call
signatures, so the pipeline's own code (scheduler, CFG, per-image generators, SDXL's added
conditions) runs unchanged around them.

The CPU execution provider always; the CUDA one where `onnxruntime-gpu` is installed and the
pipeline is on CUDA. On CUDA, inputs and outputs are bound to torch's own CUDA tensors (IO
binding: no copy through the host) and ONNX Runtime runs on torch's current stream, so the two
never need to synchronise. On the CPU tensors cross as NumPy arrays that share their memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPTextModelOutput

from hypersd.backends import onnx_export
from hypersd.backends.onnx_export import Parity
from hypersd.lora import SDPipeline

log = logging.getLogger(__name__)


def version() -> str:
    """ONNX Runtime's version: part of the artefact key (another runtime may optimise otherwise)."""
    import onnxruntime

    return str(onnxruntime.__version__)


# NumPy element types of the tensors that cross into ONNX Runtime (IO binding names them).
_ELEMENT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
Provider = str | tuple[str, dict[str, str]]


def providers(
    device: torch.device, available: list[str], stream: int | None = None
) -> list[Provider]:
    """The execution providers for `device`: CUDA first where it is installed and wanted.

    Args:
        device: The pipeline's device.
        available: `onnxruntime.get_available_providers()`.
        stream: The CUDA stream (`torch.cuda.current_stream().cuda_stream`) ONNX Runtime should
            run on, so that its work is ordered with torch's; `None` for its own stream.

    Raises:
        RuntimeError: if `device` is CUDA but the installed ONNX Runtime has no CUDA provider,
            naming the package to install (a CPU-only run would copy every tensor to the host).
    """
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            "the onnxruntime backend on CUDA needs ONNX Runtime's CUDA execution provider: "
            f"pip install onnxruntime-gpu (the `gpu` extra); installed providers: {available}"
        )
    options = {"device_id": str(device.index or 0)}
    if stream is not None:
        options |= {"has_user_compute_stream": "1", "user_compute_stream": str(stream)}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def require_provider(device: torch.device) -> None:
    """Check that the installed ONNX Runtime can run on `device` (see `providers`).

    Raises:
        RuntimeError: if `device` is CUDA and ONNX Runtime has no CUDA provider.
    """
    import onnxruntime

    providers(device, onnxruntime.get_available_providers())


class Session:
    """One ONNX Runtime inference session, called with and returning torch tensors.

    It runs on torch's current number of threads, so that a worker's `--threads` holds for both
    runtimes. `io_binding` (on CUDA, where it saves two host copies per call) binds torch's
    tensors to the session's inputs and outputs instead of passing NumPy arrays.

    Args:
        path: The `.onnx` file.
        device: Where the returned tensors go (the pipeline's device).
    """

    def __init__(self, path: Path, device: torch.device) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        cuda = device.type == "cuda"
        stream = torch.cuda.current_stream(device).cuda_stream if cuda else None
        chosen = providers(device, onnxruntime.get_available_providers(), stream)
        self.session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=chosen
        )
        self.device = device
        self.io_binding = cuda
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.output_names = [node.name for node in self.session.get_outputs()]

    def run_numpy(self, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """Run on `inputs` (by name) and return the outputs as NumPy arrays."""
        feed = {name: inputs[name].detach().cpu().numpy() for name in self.input_names}
        return list(self.session.run(None, feed))

    def run_bound(
        self, inputs: dict[str, torch.Tensor], output_shapes: dict[str, tuple[int, ...]]
    ) -> list[torch.Tensor]:
        """Run on `inputs` with IO binding: ONNX Runtime reads and writes torch's memory.

        Args:
            inputs: Input tensors by name, on `device` (float32 or int64).
            output_shapes: Each output's shape, by name: the outputs are allocated by torch
                (its caching allocator on CUDA) and written in place by the session.
        """
        binding = self.session.io_binding()
        kept = []  # the contiguous copies must outlive the run
        for name in self.input_names:
            tensor = inputs[name].to(self.device).contiguous()
            kept.append(tensor)
            binding.bind_input(
                name,
                self.device.type,
                self.device.index or 0,
                _ELEMENT_TYPES[tensor.dtype],
                tuple(tensor.shape),
                tensor.data_ptr(),
            )
        outputs = [
            torch.empty(output_shapes[name], dtype=torch.float32, device=self.device)
            for name in self.output_names
        ]
        for name, tensor in zip(self.output_names, outputs, strict=True):
            binding.bind_output(
                name,
                self.device.type,
                self.device.index or 0,
                np.float32,
                tuple(tensor.shape),
                tensor.data_ptr(),
            )
        self.session.run_with_iobinding(binding)
        return outputs

    def __call__(
        self, inputs: dict[str, torch.Tensor], output_shapes: dict[str, tuple[int, ...]]
    ) -> list[torch.Tensor]:
        """Run on `inputs` (by name) and return the outputs as tensors on `device`.

        Args:
            inputs: Input tensors by name.
            output_shapes: Each output's shape by name (used by IO binding).
        """
        if self.io_binding:
            return self.run_bound(inputs, output_shapes)
        return [torch.from_numpy(array).to(self.device) for array in self.run_numpy(inputs)]


class Runner(Protocol):
    """What runs an exported component: a `Session`, or a TensorRT engine
    (`hypersd.backends.tensorrt_runtime.TrtEngine`)."""

    device: torch.device
    input_names: list[str]

    def __call__(
        self, inputs: dict[str, torch.Tensor], output_shapes: dict[str, tuple[int, ...]]
    ) -> list[torch.Tensor]: ...


class _ExportedModule(torch.nn.Module):
    """Base of the swapped-in components: a module without parameters that calls its runner
    (an ONNX Runtime session or a TensorRT engine).

    diffusers reads `device` and `dtype` off every component, and the phase timer hooks the text
    encoders' forward, so these stay `torch.nn.Module`s.
    """

    def __init__(self, runner: Runner, config: Any) -> None:
        super().__init__()
        self.runner = runner
        self.config = config

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32


class ExportedTextEncoder(_ExportedModule):
    """A CLIP text encoder (`CLIPTextModel` or `CLIPTextModelWithProjection`), exported.

    Args:
        runner: What runs the exported encoder.
        config: The torch encoder's config (the pipelines read `projection_dim` from it).
        projected: Whether it is SDXL's second encoder (its first output is the pooled projection).
    """

    def __init__(self, runner: Runner, config: Any, projected: bool) -> None:
        super().__init__(runner, config)
        self.projected = projected

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **unused: Any,
    ) -> BaseModelOutputWithPooling | CLIPTextModelOutput:
        if attention_mask is not None:
            raise ValueError("the exported text encoder takes no attention mask (CLIP uses none)")
        batch, tokens = input_ids.shape
        hidden = (batch, tokens, self.config.hidden_size)
        shapes: dict[str, tuple[int, ...]] = {name: hidden for name in onnx_export.TEXT_OUTPUTS}
        if self.projected:
            shapes["text_embeds"] = (batch, self.config.projection_dim)
        outputs = self.runner({"input_ids": input_ids.to(torch.int64)}, shapes)
        # Only the penultimate and last hidden states are exported: what the SD1.5 and SDXL
        # pipelines read without `clip_skip` (which no recipe uses).
        last, penultimate = outputs[-2], outputs[-1]
        if self.projected:
            return CLIPTextModelOutput(
                text_embeds=outputs[0], last_hidden_state=last, hidden_states=(penultimate, last)
            )
        return BaseModelOutputWithPooling(last_hidden_state=last, hidden_states=(penultimate, last))


class ExportedUNet(_ExportedModule):
    """A `UNet2DConditionModel` run by an exported graph.

    Args:
        runner: What runs the exported UNet.
        unet: The torch UNet: its config, and for SDXL its `add_embedding` (a few linear layers),
            which the SDXL pipeline reads to check its added time ids.
    """

    def __init__(self, runner: Runner, unet: torch.nn.Module) -> None:
        super().__init__(runner, unet.config)
        self.sdxl = "text_embeds" in runner.input_names
        if self.sdxl:
            self.add_embedding = unet.add_embedding

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor]:
        if timestep_cond is not None or cross_attention_kwargs:
            raise ValueError(
                "the exported UNet takes no timestep_cond or cross_attention_kwargs "
                "(guidance-embedded UNets and unfused LoRA scales are not exported)"
            )
        batch = sample.shape[0]
        # The pipelines pass one timestep for the whole batch; the graph takes one per sample.
        timesteps = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch)
        inputs = {
            "sample": sample.float(),
            "timestep": timesteps,
            "encoder_hidden_states": encoder_hidden_states.float(),
        }
        if self.sdxl:
            assert added_cond_kwargs is not None, "the SDXL pipeline always passes added conditions"
            inputs["text_embeds"] = added_cond_kwargs["text_embeds"].float()
            inputs["time_ids"] = added_cond_kwargs["time_ids"].float()
        shape = (batch, self.config.out_channels, *sample.shape[2:])
        return (self.runner(inputs, {"noise_pred": shape})[0],)


class ExportedVaeDecoder(_ExportedModule):
    """An `AutoencoderKL`'s `decode` run by an exported graph (the pipelines never encode).

    Args:
        runner: What runs the exported decoder.
        config: The torch VAE's config (scaling factor, latent statistics).
    """

    def decode(
        self, latent: torch.Tensor, return_dict: bool = False, generator: Any = None
    ) -> tuple[torch.Tensor]:
        batch, _, height, width = latent.shape
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        shape = (batch, self.config.out_channels, height * factor, width * factor)
        return (self.runner({"latent": latent.float()}, {"image": shape})[0],)


def build(
    pipe: SDPipeline,
    folder: Path,
    external_data_above: int = onnx_export.EXTERNAL_DATA_ABOVE,
) -> list[Parity]:
    """Export `pipe`'s components into `folder` and check each against eager.

    Args:
        pipe: The loaded pipeline (LoRAs fused), in float32.
        folder: An empty folder for the `.onnx` files (and their `.onnx.data` weights).
        external_data_above: Export size in bytes above which a component's weights go to
            their own file (`onnx_export.export_onnx`).

    Returns:
        Each component's parity with eager on its example inputs (at another batch size than
        the one traced, so that the dynamic batch axis is checked too).

    Raises:
        onnx_export.ExportMismatchError: if an export is further from eager than
            `onnx_export.MAX_REL_ERROR`; nothing of it is cached then.
    """
    report = []
    for traced in onnx_export.components(pipe, batch_size=2):
        path = folder / f"{traced.name}.onnx"
        onnx_export.export_onnx(traced, path, external_data_above)
        check = onnx_export.components(pipe, batch_size=3)
        component = next(part for part in check if part.name == traced.name)
        session = Session(path, torch.device("cpu"))
        parity = onnx_export.compare(
            traced.name,
            onnx_export.eager_outputs(component, component.inputs),
            session.run_numpy(component.inputs),
        )
        if not parity.max_rel <= onnx_export.MAX_REL_ERROR:  # NaN fails too
            raise onnx_export.ExportMismatchError(
                f"the export does not match eager: {parity} (allowed: max rel error "
                f"{onnx_export.MAX_REL_ERROR:g})"
            )
        log.info("exported %s", parity)
        report.append(parity)
    return report


def swap_in(pipe: SDPipeline, runner: Callable[[str], Runner]) -> None:
    """Swap runners of the exported components into `pipe` in place of its torch modules.

    Every runner is made before anything is swapped, so a failure leaves `pipe` as it was.

    Args:
        pipe: The loaded pipeline the components were exported from.
        runner: The runner of a component, by its name (`onnx_export.UNET`, ...).
    """
    swaps: dict[str, torch.nn.Module] = {
        "text_encoder": ExportedTextEncoder(
            runner(onnx_export.TEXT_ENCODER), pipe.text_encoder.config, projected=False
        ),
        "unet": ExportedUNet(runner(onnx_export.UNET), pipe.unet),
        "vae": ExportedVaeDecoder(runner(onnx_export.VAE_DECODER), pipe.vae.config),
    }
    if getattr(pipe, "text_encoder_2", None) is not None:
        swaps["text_encoder_2"] = ExportedTextEncoder(
            runner(onnx_export.TEXT_ENCODER_2), pipe.text_encoder_2.config, projected=True
        )
    for name, module in swaps.items():
        setattr(pipe, name, module)


def install(pipe: SDPipeline, folder: Path) -> None:
    """Open the sessions of `folder` and swap them into `pipe` (`swap_in`).

    Args:
        pipe: The loaded pipeline whose export `folder` holds.
        folder: The artefact folder `build` wrote.
    """
    swap_in(pipe, lambda name: Session(folder / f"{name}.onnx", pipe.device))
