"""ONNX Runtime's execution providers and IO binding.

The CUDA provider (onnxruntime-gpu) cannot run here: its selection is checked as the pure
function it is, and the IO binding path it uses (torch tensors bound in place, outputs allocated
by torch) runs here on the CPU provider, which binds CPU tensors the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from hypersd.backends import ort
from hypersd.backends.ort import ExportedTextEncoder, ExportedUNet, ExportedVaeDecoder
from hypersd.pipeline import ImageRequest, load
from hypersd.registry import ModelSpec, load_registry

if TYPE_CHECKING:
    from tiny_models import TinyModels

pytest.importorskip("onnxruntime")


def test_the_cuda_provider_is_chosen_on_cuda_with_torchs_stream() -> None:
    cpu_only = ["CPUExecutionProvider"]
    with_cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort.providers(torch.device("cpu"), with_cuda) == ["CPUExecutionProvider"]
    chosen = ort.providers(torch.device("cuda:1"), with_cuda, stream=1234)
    assert chosen == [
        (
            "CUDAExecutionProvider",
            {"device_id": "1", "has_user_compute_stream": "1", "user_compute_stream": "1234"},
        ),
        "CPUExecutionProvider",
    ]
    with pytest.raises(RuntimeError, match="pip install onnxruntime-gpu"):
        ort.providers(torch.device("cuda"), cpu_only)


def test_a_cuda_pipeline_without_the_cuda_provider_exports_nothing(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from hypersd.backends import build_artefact

    exports: list[Path] = []
    monkeypatch.setattr(ort, "build", lambda pipe, folder: exports.append(folder) or [])
    spec = ModelSpec.model_validate(
        load_registry(tiny_models.registry).get("sd15-nstep").model_dump()
        | {"backend": "onnxruntime"}
    )
    # What build_artefact reads of a pipeline on a GPU (none here; this ONNX Runtime is CPU-only)
    on_cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    with pytest.raises(RuntimeError, match="pip install onnxruntime-gpu"):
        build_artefact(on_cuda, spec, tmp_path)  # type: ignore[arg-type]
    assert not exports and not any(tmp_path.iterdir())


@pytest.mark.parametrize("model", ["sd15-cfg", "sdxl-cfg"])
def test_io_binding_gives_the_same_images(
    tiny_models: TinyModels, tmp_path: Path, model: str
) -> None:
    spec = load_registry(tiny_models.registry).get(model)
    spec = ModelSpec.model_validate(spec.model_dump() | {"backend": "onnxruntime", "strict": True})
    generator = load(spec, device="cpu", warmup=False, cache_dir=tmp_path)
    swapped = [
        module
        for module in (
            generator.pipe.text_encoder,
            getattr(generator.pipe, "text_encoder_2", None),
            generator.pipe.unet,
            generator.pipe.vae,
        )
        if module is not None
    ]
    assert all(
        isinstance(m, ExportedTextEncoder | ExportedUNet | ExportedVaeDecoder) for m in swapped
    )
    assert not any(module.runner.io_binding for module in swapped)  # CPU default: NumPy

    requests = [ImageRequest("a red circle", 1), ImageRequest("a blue square", 2, "gray")]
    expected = [np.asarray(image) for image in generator.generate(requests).images]
    for module in swapped:
        module.runner.io_binding = True  # what CUDA uses
    actual = [np.asarray(image) for image in generator.generate(requests).images]
    for want, got in zip(expected, actual, strict=True):
        np.testing.assert_array_equal(want, got)


def test_io_binding_writes_into_torchs_output_tensor(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    spec = load_registry(tiny_models.registry).get("sd15-nstep")
    spec = ModelSpec.model_validate(spec.model_dump() | {"backend": "onnxruntime", "strict": True})
    pipe = load(spec, device="cpu", warmup=False, cache_dir=tmp_path).pipe
    unet, tokens = pipe.unet, pipe.tokenizer.model_max_length
    session = unet.runner
    channels = unet.config.in_channels
    inputs = {
        "sample": torch.randn(3, channels, 8, 8),
        "timestep": torch.full((3,), 500.0),
        "encoder_hidden_states": torch.randn(3, tokens, unet.config.cross_attention_dim),
    }
    shapes = {"noise_pred": (3, unet.config.out_channels, 8, 8)}
    bound = session.run_bound(inputs, shapes)[0]
    assert bound.shape == shapes["noise_pred"]
    np.testing.assert_allclose(bound.numpy(), session.run_numpy(inputs)[0], rtol=0, atol=1e-6)
