"""Experiment configs: a typed dataclass of defaults, a YAML file over it, ``key=value`` over that.

The result is frozen and saved inside every checkpoint, so a run can always be
reproduced or resumed from what it wrote.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

ConfigT = TypeVar("ConfigT")


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML value or a command-line string to the field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), name)
    if origin in (tuple, list):
        items = value
        if isinstance(value, str):
            items = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        item_type = args[0] if args else str
        converted = [
            _coerce(v.strip() if isinstance(v, str) else v, item_type, name) for v in items
        ]
        return tuple(converted) if origin is tuple else converted
    if annotation is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected a boolean, got {value!r}")
    if annotation in (int, float, str, bool):
        try:
            return annotation(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name}: expected {annotation.__name__}, got {value!r}") from error
    return value


def load_config(
    config_type: type[ConfigT],
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
) -> ConfigT:
    """Build ``config_type`` from its defaults, a YAML file, then ``key=value`` overrides.

    Unknown keys raise ``ValueError`` listing the allowed ones.
    """
    if not dataclasses.is_dataclass(config_type):
        raise TypeError(f"{config_type!r} is not a dataclass")
    hints = typing.get_type_hints(config_type)
    allowed = sorted(hints)
    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
        values.update(loaded)
    for item in overrides:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        values[key.replace("-", "_")] = raw
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; allowed: {allowed}")
    coerced = {key: _coerce(value, hints[key], key) for key, value in values.items()}
    return config_type(**coerced)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (for checkpoints and logs)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
