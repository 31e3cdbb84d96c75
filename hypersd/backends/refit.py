"""Refitting an engine's weights for another set of LoRAs, always from the base weights.

An engine built from an ONNX export names its weights after the export's initializers, and those
are not always the torch parameters' names: the exporter folds a `Linear`'s weight into a
transposed `MatMul` constant with a generated name (`onnx::MatMul_1234`). `refit_map` recovers
which parameter each initializer holds by value, from the module the export was traced from;
`refit_weights` then gives every initializer's new value from another model's parameters with
the same names: the base model with the new LoRAs fused at their scales.

Taking the new values from the base model (and never unfusing one LoRA to fuse another into the
engine's current weights) is what keeps a LoRA change exact: fusing is not invertible in floating
point, and refitting over a LoRA leaves a blend of both.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

# The refit map of an artefact's components: {component: {initializer: [[parameter, transposed]]}}.
REFIT_MAP_FILE = "refit_map.json"
# One initializer's sources: (parameter name, whether the initializer is its transpose).
RefitMap = dict[str, list[tuple[str, bool]]]


def base_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` under the plain model's parameter names.

    A model with fused LoRAs keeps peft's layers: each wrapped layer holds its (fused) weight as
    `<layer>.base_layer.weight`, beside its `lora_*` tensors, which the merged layer no longer
    reads (so no export holds them). Named the plain way, an entry with LoRAs and one without
    (or with LoRAs over other layers) refit each other's engines.

    Args:
        state: A component's state dict.
    """
    return {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in state.items()
        if ".lora_" not in name
    }


def _fingerprint(array: np.ndarray) -> tuple[tuple[int, ...], str]:
    contiguous = np.ascontiguousarray(array, dtype=np.float32)
    return contiguous.shape, hashlib.sha256(contiguous.tobytes()).hexdigest()


def refit_map(onnx_path: Path, module: torch.nn.Module) -> RefitMap:
    """Which of `module`'s parameters (and buffers) each float initializer of an export holds.

    An initializer equal to several parameters (a fresh model's norm weights are all ones) lists
    them all; `refit_weights` checks that they still agree. Initializers equal to no parameter
    are constants of the graph (shapes, folded scalars), which no LoRA changes.

    Args:
        onnx_path: The exported component (`onnx_export.export_onnx`).
        module: The module it was exported from, with the weights it was exported with.
    """
    import onnx
    from onnx import numpy_helper

    index: dict[tuple[tuple[int, ...], str], list[tuple[str, bool]]] = defaultdict(list)
    for name, tensor in base_names(module.state_dict()).items():
        if not tensor.is_floating_point():
            continue
        array = tensor.detach().float().cpu().numpy()
        index[_fingerprint(array)].append((name, False))
        if array.ndim == 2:  # `Linear` weights are exported as transposed `MatMul` constants
            index[_fingerprint(array.T)].append((name, True))
    graph = onnx.load(str(onnx_path)).graph
    mapping: RefitMap = {}
    for initializer in graph.initializer:
        array = numpy_helper.to_array(initializer)
        if array.dtype == np.float32 and (sources := index.get(_fingerprint(array))):
            mapping[initializer.name] = sources
    return mapping


def refit_weights(mapping: RefitMap, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every mapped initializer's value in another model with the same parameter names.

    Args:
        mapping: `refit_map` of the export.
        state: The state dict of the same component of the new model (the base weights with the
            new LoRAs fused), float32.

    Raises:
        ValueError: if an initializer's sources no longer agree (two parameters that were equal
            in the exported model differ now), naming them: the engine shares one weight for
            both and cannot be refitted; or if the new model lacks a parameter. Rebuild then.
    """
    state = base_names(state)
    weights = {}
    for initializer, sources in mapping.items():
        values = []
        for name, transposed in sources:
            if name not in state:
                raise ValueError(f"the new model has no parameter {name}; rebuild the engine")
            array = state[name].detach().float().cpu().numpy()
            values.append(np.ascontiguousarray(array.T if transposed else array))
        if any(not np.array_equal(values[0], value) for value in values[1:]):
            names = ", ".join(name for name, _ in sources)
            raise ValueError(
                f"initializer {initializer} held equal weights ({names}) that differ in the new "
                "model; rebuild the engine instead of refitting it"
            )
        weights[initializer] = values[0]
    return weights
