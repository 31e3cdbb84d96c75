"""ONNX exports with their weights outside the graph, as SDXL's float32 exports (over 2 GiB) are.

The tiny SDXL model is exported twice: once as every model under 1 GiB is (weights inside each
`.onnx`), once with the size threshold at zero, which takes the same code path as a real SDXL
export does. Each component then has its weights in a file of its own, ONNX Runtime opens every
one from the shared artefact folder, and the outputs are those of the weights-inside exports.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from hypersd.backends import onnx_export, ort
from hypersd.pipeline import load
from hypersd.registry import ModelSpec, load_registry

if TYPE_CHECKING:
    from tiny_models import TinyModels

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

NAMES = ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]


def external_locations(path: Path) -> set[str]:
    """The external data files the initializers of the export `path` point to."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        entry.value
        for tensor in graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def test_sdxl_components_keep_their_weights_in_distinct_files_and_match_the_inline_export(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    spec = load_registry(tiny_models.registry).get("sdxl-cfg")
    eager = ModelSpec.model_validate(spec.model_dump() | {"backend": "eager"})
    pipe = load(eager, device="cpu", warmup=False).pipe
    inline, external = tmp_path / "inline", tmp_path / "external"
    inline.mkdir()
    external.mkdir()
    inline_parity = ort.build(pipe, inline)
    external_parity = ort.build(pipe, external, external_data_above=0)

    # Weights inside: one `.onnx` per component and nothing else.
    assert sorted(path.name for path in inline.iterdir()) == sorted(f"{n}.onnx" for n in NAMES)
    assert all(not external_locations(inline / f"{name}.onnx") for name in NAMES)
    # Weights outside: each component's in its own file beside it, no staging left behind.
    assert sorted(path.name for path in external.iterdir()) == sorted(
        f"{name}.onnx{suffix}" for name in NAMES for suffix in ("", ".data")
    )
    for name in NAMES:
        assert external_locations(external / f"{name}.onnx") == {f"{name}.onnx.data"}
        graph_size = (external / f"{name}.onnx").stat().st_size
        assert (external / f"{name}.onnx.data").stat().st_size > graph_size
    # Both builds checked each export against eager, through ONNX Runtime, from its folder.
    for parity in (*inline_parity, *external_parity):
        assert parity.max_rel < 1e-3, parity
    # And the two layouts run the same graph with the same weights: the same outputs.
    for component in onnx_export.components(pipe, batch_size=3):
        inputs = component.inputs
        expected = ort.Session(inline / f"{component.name}.onnx", pipe.device).run_numpy(inputs)
        actual = ort.Session(external / f"{component.name}.onnx", pipe.device).run_numpy(inputs)
        assert len(actual) == len(component.outputs)
        for want, got in zip(expected, actual, strict=True):
            np.testing.assert_array_equal(got, want)
