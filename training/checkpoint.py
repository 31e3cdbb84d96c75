"""Resumable checkpoints in safetensors + JSON only: no pickle, optimizer state included."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, folder: Path, name: str) -> None:
    meta = json.loads((folder / f"{name}.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in load_file(folder / f"{name}.safetensors").items():
        index, _, field = key.partition(".")
        state.setdefault(int(index), {})[field] = tensor
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class JsonState(Protocol):
    """State kept as JSON in ``state.json`` (e.g. ``training.loss_scaling.LossScaler``)."""

    def state_dict(self) -> dict[str, Any]:
        """The state, as JSON values."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state``, a ``state_dict()``."""
        ...


def save_checkpoint(
    folder: str | Path,
    *,
    step: int,
    config: dict[str, Any],
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    extra: dict[str, Any] | None = None,
    scalers: Mapping[str, JsonState] | None = None,
) -> Path:
    """Write every module and optimizer, the step and the resolved config; atomically.

    The checkpoint is written to a temporary folder and renamed, so a run killed
    while saving leaves the previous checkpoint intact.

    Args:
        folder: the checkpoint's folder (replaced).
        step: the optimisation steps done.
        config: the run's resolved config.
        modules: {file name: module} saved as safetensors.
        optimizers: {name: optimizer}, tensors as safetensors and the rest as JSON.
        extra: more JSON values for ``state.json``.
        scalers: {name: loss scaler} (``training.loss_scaling``), in ``state.json``.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, tmp / f"{name}.safetensors")
    for name, optimizer in (optimizers or {}).items():
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, tmp / f"optimizer-{name}.safetensors")
        (tmp / f"optimizer-{name}.json").write_text(json.dumps(meta))
    state = {"step": step, "config": config, **(extra or {})}
    if scalers:
        state["loss_scaling"] = {name: scaler.state_dict() for name, scaler in scalers.items()}
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_checkpoint(
    folder: str | Path,
    *,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    scalers: Mapping[str, JsonState] | None = None,
) -> dict[str, Any]:
    """Restore modules, optimizers and loss scalers in place; returns the saved state (step,
    config, extra).

    Args:
        folder: the checkpoint's folder.
        modules: {file name: module} to load into.
        optimizers: {name: optimizer} to load into.
        scalers: {name: loss scaler} to load into; one the checkpoint lacks (saved before
            loss scaling existed) keeps its fresh state.
    """
    folder = Path(folder)
    for name, module in modules.items():
        module.load_state_dict(load_file(folder / f"{name}.safetensors"))
    for name, optimizer in (optimizers or {}).items():
        _load_optimizer(optimizer, folder, f"optimizer-{name}")
    state = dict(json.loads((folder / "state.json").read_text()))
    saved = state.get("loss_scaling", {})
    for name, scaler in (scalers or {}).items():
        if name in saved:
            scaler.load_state_dict(saved[name])
    return state
