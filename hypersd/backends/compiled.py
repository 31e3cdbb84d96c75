"""The `compile` backend: `torch.compile` over the pipeline's text encoder(s), UNet and VAE decoder.

On CUDA the UNet and VAE switch to channels_last (the layout cuDNN's fast convolutions want) in
the pipeline's half precision, and with `static_shapes` the UNet compiles in "reduce-overhead"
mode, which replays each (batch, size) as a captured CUDA graph: one launch per step instead of
hundreds. Without `static_shapes` shapes are compiled dynamic, so a new batch size or image size
does not trigger a recompile.

Nothing goes into the artefact cache: Inductor keeps its compiled kernels in its own on-disk
cache (`TORCHINDUCTOR_CACHE_DIR`), and compiling happens lazily at the first call of each shape,
which `Generator.warmup` makes at load. On a CPU that first call takes minutes.

With `static_shapes` each shape compiles on its own, so batches run padded up to the registry's
`batch_sizes`, each compiled by the warm-up at load (`Generator.padded_batch`); another image
size compiles at its first request (and past torch's recompile limit, 8 by default, runs eager).
CUDA graphs fail in a thread other than the one that first ran them in torch releases before
pytorch/pytorch#184357; the worker runs batches on its micro-batcher thread, so the load's check
(`Generator.warmup_as_served`) calls the model from a second thread and falls back to eager there
rather than failing every job.
"""

from __future__ import annotations

from typing import Any

import torch

from hypersd.lora import SDPipeline


def install(pipe: SDPipeline, static_shapes: bool) -> None:
    """Replace `pipe`'s text encoder(s), UNet and VAE decoder by compiled versions.

    Args:
        pipe: The loaded pipeline (LoRAs fused), on its device.
        static_shapes: Compile for the shapes seen (CUDA graphs on CUDA) instead of dynamic ones.
    """
    cuda = pipe.device.type == "cuda"
    if cuda:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    dynamic = not static_shapes
    unet_mode = "reduce-overhead" if cuda and static_shapes else None
    compiled: dict[str, Any] = {
        "unet": torch.compile(pipe.unet, mode=unet_mode, dynamic=dynamic),
        "text_encoder": torch.compile(pipe.text_encoder, dynamic=dynamic),
    }
    if getattr(pipe, "text_encoder_2", None) is not None:
        compiled["text_encoder_2"] = torch.compile(pipe.text_encoder_2, dynamic=dynamic)
    for name, module in compiled.items():
        setattr(pipe, name, module)
    # The decoder inside the VAE (all of decoding but a 1x1 convolution): the VAE itself stays, so
    # that the pipelines read its config and call its `decode` as before.
    pipe.vae.decoder = torch.compile(pipe.vae.decoder, dynamic=dynamic)
