"""SDXL's conditioning in training is what ``StableDiffusionXLPipeline`` builds for the same inputs.

The pipeline is run (one step, guidance on) on the tiny random SDXL model with an original size,
a crop and a target size, and the UNet's inputs are recorded; the training encoder's packed
conditioning, unpacked by the UNet's hook, must give the same hidden states, pooled embedding
and time ids for the prompts, and the same zeros (``force_zeros_for_empty_prompt``) or encoded
"" for the unconditional half.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import tiny_sd15_pipeline, tiny_sdxl_pipeline

from training.teacher import build_encoder, micro_conditions

CAPTIONS = ["a red circle", "two blue squares"]
ORIGINAL, CROP, TARGET = (96, 80), (8, 4), (64, 64)


def pipeline_unet_inputs(pipe: Any) -> dict[str, torch.Tensor]:
    """The UNet's inputs in one guided step of the pipeline, for ``CAPTIONS`` with no negative
    prompt: rows [negative..., positive...]."""
    seen: dict[str, torch.Tensor] = {}

    def record(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        seen["sample"], seen["t"] = args[0], args[1]
        seen["hidden"] = kwargs["encoder_hidden_states"]
        seen["text_embeds"] = kwargs["added_cond_kwargs"]["text_embeds"]
        seen["time_ids"] = kwargs["added_cond_kwargs"]["time_ids"]
        seen["eps"] = output[0]  # the pipeline's own prediction (return_dict=False)

    handle = pipe.unet.register_forward_hook(record, with_kwargs=True)
    pipe(
        CAPTIONS,
        height=TARGET[0],
        width=TARGET[1],
        original_size=ORIGINAL,
        crops_coords_top_left=CROP,
        target_size=TARGET,
        num_inference_steps=1,
        guidance_scale=5.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    handle.remove()
    return seen


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_conditioning_matches_the_pipeline(tmp_path: Path, force_zeros: bool) -> None:
    torch.set_num_threads(1)
    pipe = tiny_sdxl_pipeline(tmp_path / "tokenizer")
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    pipe.set_progress_bar_config(disable=True)
    seen = pipeline_unet_inputs(pipe)
    n = len(CAPTIONS)

    # the time ids: _get_add_time_ids' for the same sizes, one row per sample
    micro = micro_conditions([ORIGINAL] * n, [CROP] * n, TARGET)
    projection = pipe.text_encoder_2.config.projection_dim
    expected_ids = pipe._get_add_time_ids(ORIGINAL, CROP, TARGET, torch.float32, projection)
    torch.testing.assert_close(micro, expected_ids.expand(n, 6))
    torch.testing.assert_close(seen["time_ids"], expected_ids.expand(2 * n, 6))

    encoder = build_encoder(pipe, torch.device("cpu"), 64, [pipe.unet])
    assert encoder.packer is not None
    with torch.no_grad():
        conditional = encoder(CAPTIONS, micro)
        unconditional = encoder.unconditional(micro)
    for packed, rows in ((unconditional, slice(0, n)), (conditional, slice(n, 2 * n))):
        hidden, added = encoder.packer.unpack(packed)
        torch.testing.assert_close(hidden, seen["hidden"][rows])
        torch.testing.assert_close(added["text_embeds"], seen["text_embeds"][rows])
        torch.testing.assert_close(added["time_ids"], seen["time_ids"][rows])
    # the negative is zeros exactly when the pipeline's config says so (SDXL base: it does)
    assert bool(torch.all(seen["hidden"][:n] == 0)) is force_zeros
    assert bool(torch.all(unconditional[:, :-1] == 0)) is force_zeros

    # and the hooked UNet, called as the objectives call it, gives the pipeline's prediction
    with torch.no_grad():
        eps = pipe.unet(seen["sample"], seen["t"], torch.cat([unconditional, conditional])).sample
    torch.testing.assert_close(eps, seen["eps"])


def test_sdxl_default_micro_conditions_are_the_generated_images(tmp_path: Path) -> None:
    """Without sizes (feedback / DMD: the student's own images) the time ids are the
    pipeline's defaults for a resolution² image: (res, res, 0, 0, res, res)."""
    pipe = tiny_sdxl_pipeline(tmp_path / "tokenizer")
    encoder = build_encoder(pipe, torch.device("cpu"), 64, [])
    assert encoder.packer is not None
    with torch.no_grad():
        _, added = encoder.packer.unpack(encoder(CAPTIONS))
        _, empty = encoder.packer.unpack(encoder.unconditional())
    projection = pipe.text_encoder_2.config.projection_dim
    expected = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, projection)
    torch.testing.assert_close(added["time_ids"], expected.expand(2, 6))
    torch.testing.assert_close(empty["time_ids"], expected)
    assert torch.all(empty["text_embeds"] == 0)


def test_sd15_unconditional_is_the_encoded_empty_prompt(tmp_path: Path) -> None:
    """SD1.5's pipeline encodes "" for no negative prompt; its conditioning ignores sizes."""
    pipe = tiny_sd15_pipeline(tmp_path / "tokenizer")
    encoder = build_encoder(pipe, torch.device("cpu"), 64, [pipe.unet])
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(CAPTIONS, torch.device("cpu"), 1, True)
        micro = micro_conditions([ORIGINAL] * 2, [CROP] * 2, TARGET)
        torch.testing.assert_close(encoder(CAPTIONS, micro), positive)
        empty = encoder.unconditional(micro)
    assert empty.shape == (1, *positive.shape[1:])
    assert negative is not None
    torch.testing.assert_close(empty.expand_as(negative), negative)
    assert not torch.all(empty == 0)
