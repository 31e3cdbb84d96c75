"""Export a loaded pipeline's text encoder(s), UNet and VAE decoder to ONNX, and check the exports.

The exports are taken from the pipeline as `hypersd.pipeline.load` builds it, so the registry's
LoRAs are already fused into the weights at their scales: an artefact is one model, LoRAs and all.
Every input has a dynamic batch axis (the micro-batcher and CFG change the batch), and the UNet's
and VAE's spatial axes are dynamic too, so one export serves every size a model allows.

The TorchScript-based exporter (`dynamo=False`) is used: it needs no `onnxscript` and traces the
diffusers modules as they are (their shape-dependent branches are fixed at the traced values,
which only select memory layouts, never results).

Protobuf cannot hold a model over 2 GiB, so SDXL's float32 UNet and second text encoder keep
their weights outside the graph. The exporter would write one file per tensor, named after the
tensor, beside the graph; the components of a model share one artefact folder, so two components'
tensors of one name (`onnx::MatMul_<n>` is numbered per graph) would overwrite each other. Each
component's weights therefore go to one file of its own, `<name>.onnx.data`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from hypersd.lora import SDPipeline

log = logging.getLogger(__name__)

OPSET = 17
# Raised whenever a change here changes the exported graphs: part of the artefact key, so that
# artefacts exported by older code are rebuilt rather than loaded.
EXPORT_VERSION = 2
# Exports whose weights take more bytes than this keep them in `<name>.onnx.data`: below
# protobuf's 2 GiB limit on a whole model, with room for the graph itself.
EXTERNAL_DATA_ABOVE = 1 << 30
# What each exported component is called: the ONNX file is `<name>.onnx` in the artefact folder.
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
UNET = "unet"
VAE_DECODER = "vae_decoder"

# Output names of the text encoders. Both give the last and the penultimate hidden states (SD1.5
# uses the last, SDXL the penultimate); SDXL's second encoder also gives its pooled projection.
TEXT_OUTPUTS = ("last_hidden_state", "penultimate_hidden_state")
TEXT_OUTPUTS_PROJECTED = ("text_embeds", *TEXT_OUTPUTS)


class _TextEncoderGraph(torch.nn.Module):
    """A CLIP text encoder as a graph of plain tensors: ids in, hidden states (and pooled) out."""

    def __init__(self, encoder: torch.nn.Module, projected: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.projected = projected

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
        hidden = (output.last_hidden_state, output.hidden_states[-2])
        return (output.text_embeds, *hidden) if self.projected else hidden


class _UNetGraph(torch.nn.Module):
    """The UNet with SDXL's added conditions as plain inputs and a per-sample timestep."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        output: torch.Tensor = self.unet(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]
        return output


class _VaeDecoderGraph(torch.nn.Module):
    """The VAE's decoding half: scaled latents in, image in [-1, 1] out."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        image: torch.Tensor = self.vae.decode(latent, return_dict=False)[0]
        return image


@dataclass(frozen=True)
class Component:
    """One exportable part of a pipeline, with example inputs to trace it and check it.

    Args:
        name: The ONNX file's stem (`unet`, `vae_decoder`, `text_encoder`, `text_encoder_2`).
        module: The traceable module.
        inputs: Example inputs by name, in the module's argument order.
        outputs: Output names, in the module's output order.
        dynamic_axes: Per input and output name, its dynamic axes (index -> axis name).
    """

    name: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]


# Image (width, height) of the example inputs: small, since the exports take any size.
EXAMPLE_SIZE = (64, 64)


def components(pipe: SDPipeline, batch_size: int = 2) -> list[Component]:
    """The text encoder(s), UNet and VAE decoder of `pipe`, with example inputs on its device.

    Args:
        pipe: The loaded pipeline (LoRAs fused), in float32.
        batch_size: Batch of the example inputs; the exports take any batch.
    """
    generator = torch.Generator().manual_seed(0)
    width, height = EXAMPLE_SIZE
    factor = pipe.vae_scale_factor
    latent_shape = (batch_size, pipe.unet.config.in_channels, height // factor, width // factor)
    tokens = pipe.tokenizer.model_max_length
    vocab = pipe.tokenizer.vocab_size
    ids = torch.randint(0, vocab, (batch_size, tokens), generator=generator)
    batch = {0: "batch"}
    text_axes = {name: batch for name in ("input_ids", *TEXT_OUTPUTS_PROJECTED)}
    sdxl = getattr(pipe, "text_encoder_2", None) is not None

    parts = [
        Component(
            TEXT_ENCODER,
            _TextEncoderGraph(pipe.text_encoder, projected=False),
            {"input_ids": ids},
            TEXT_OUTPUTS,
            text_axes,
        )
    ]
    unet_inputs = {
        "sample": torch.randn(latent_shape, generator=generator),
        "timestep": torch.full((batch_size,), 999.0),
        "encoder_hidden_states": torch.randn(
            (batch_size, tokens, pipe.unet.config.cross_attention_dim), generator=generator
        ),
    }
    if sdxl:
        parts.append(
            Component(
                TEXT_ENCODER_2,
                _TextEncoderGraph(pipe.text_encoder_2, projected=True),
                {"input_ids": ids},
                TEXT_OUTPUTS_PROJECTED,
                text_axes,
            )
        )
        projection_dim = pipe.text_encoder_2.config.projection_dim
        unet_inputs["text_embeds"] = torch.randn((batch_size, projection_dim), generator=generator)
        unet_inputs["time_ids"] = torch.tensor([[height, width, 0, 0, height, width]] * batch_size)
        unet_inputs["time_ids"] = unet_inputs["time_ids"].float()
    spatial = {0: "batch", 2: "height", 3: "width"}
    parts.append(
        Component(
            UNET,
            _UNetGraph(pipe.unet),
            unet_inputs,
            ("noise_pred",),
            {name: batch for name in unet_inputs} | {"sample": spatial, "noise_pred": spatial},
        )
    )
    parts.append(
        Component(
            VAE_DECODER,
            _VaeDecoderGraph(pipe.vae),
            {"latent": torch.randn(latent_shape, generator=generator)},
            ("image",),
            {"latent": spatial, "image": spatial},
        )
    )
    device = pipe.device
    return [
        replace(part, inputs={name: value.to(device) for name, value in part.inputs.items()})
        for part in parts
    ]


def external_data_file(onnx_name: str) -> str:
    """The name of the file that holds the weights of the export `onnx_name`, beside it.

    Args:
        onnx_name: The export's file name (`unet.onnx`).
    """
    return f"{onnx_name}.data"


def export_onnx(
    component: Component, path: Path, external_data_above: int = EXTERNAL_DATA_ABOVE
) -> None:
    """Trace `component` and write it to `path`, an `.onnx` file, with its weights.

    The weights are inside the file, or in `external_data_file(path.name)` beside it when the
    traced export takes more than `external_data_above` bytes (ONNX Runtime, TensorRT and
    `onnx.load` find them there by that name).

    Args:
        component: What to export, with its example inputs.
        path: The file to write.
        external_data_above: Size in bytes above which the weights go to the separate file.
    """
    # Traced into a folder of its own: the tracer's one-file-per-tensor external data (above
    # 2 GiB) must not land beside the other components' files.
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as staging:
        traced = Path(staging) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about every shape-dependent Python branch in diffusers; see the
            # module docstring for why those are safe here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                component.module.eval(),
                tuple(component.inputs.values()),
                str(traced),
                dynamo=False,
                input_names=list(component.inputs),
                output_names=list(component.outputs),
                dynamic_axes=component.dynamic_axes,
                opset_version=OPSET,
            )
        written = list(Path(staging).iterdir())
        if len(written) == 1 and traced.stat().st_size <= external_data_above:
            os.replace(traced, path)
            return
        import onnx

        model = onnx.load(str(traced))  # with the tracer's external files, if it wrote any
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=external_data_file(path.name),
        )


@dataclass(frozen=True)
class Parity:
    """How far an export's outputs are from eager's on the same inputs.

    Args:
        name: The component.
        max_abs: Largest absolute difference over all outputs.
        max_rel: Largest absolute difference divided by the largest eager magnitude of its output.
    """

    name: str
    max_abs: float
    max_rel: float

    def __str__(self) -> str:
        return f"{self.name}: max abs error {self.max_abs:.2e}, max rel error {self.max_rel:.2e}"


# Largest error an export may have against eager, relative to its output's scale (`Parity`).
# Float32 exports measure 1e-7 to 1e-5 (float rounding); a wrong graph (a branch traced at
# the wrong value, a dropped input) is off by 1e-1 or more.
MAX_REL_ERROR = 1e-2


class ExportMismatchError(RuntimeError):
    """An export's outputs are further from eager's than `MAX_REL_ERROR`: it is not used."""


def compare(
    name: str, expected: tuple[torch.Tensor, ...] | torch.Tensor, actual: list[np.ndarray]
) -> Parity:
    """The `Parity` of `actual` (the export's outputs) against `expected` (eager's).

    Args:
        name: The component, for the report.
        expected: Eager outputs, in output order.
        actual: The export's outputs, in the same order.
    """
    eager = expected if isinstance(expected, tuple) else (expected,)
    max_abs = max_rel = 0.0
    for reference, value in zip(eager, actual, strict=True):
        reference_np = reference.detach().float().cpu().numpy()
        error = float(np.abs(reference_np - value).max())
        # Relative to the output's scale, not per element: near-zero elements would make a
        # per-element ratio meaningless.
        scale = float(np.abs(reference_np).max()) or 1.0
        max_abs, max_rel = max(max_abs, error), max(max_rel, error / scale)
    return Parity(name, max_abs, max_rel)


@contextlib.contextmanager
def _true_float32() -> Iterator[None]:
    """float32 matmuls and convolutions: on CUDA, torch lets cuDNN run float32 convolutions in
    TF32 by default, whose errors (1e-3 of the output's scale in a deep UNet) the export would be
    blamed for (`MAX_REL_ERROR`)."""
    matmul, convolution = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = convolution


def eager_outputs(component: Component, inputs: dict[str, torch.Tensor]) -> Any:
    """`component`'s eager outputs on `inputs` (a tensor or a tuple of tensors), in true float32.

    Args:
        component: The component.
        inputs: Its inputs by name.
    """
    with torch.no_grad(), _true_float32():
        return component.module(*inputs.values())
