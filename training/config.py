"""Experiment configs: a typed dataclass of defaults, a YAML file over it, ``key=value`` over that.

pydantic checks and converts the merged values against the dataclass's annotations, so a
wrong value (a ``Literal`` choice misspelt, a word where a number belongs) fails as the config
loads, before any model does. The result is frozen and saved inside every checkpoint, so a run
can always be reproduced or resumed from what it wrote.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import pydantic
import yaml
from pydantic_core import ErrorDetails

ConfigT = TypeVar("ConfigT")


def load_config(
    config_type: type[ConfigT],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> ConfigT:
    """Build ``config_type`` from its defaults, a YAML file, then ``key=value`` overrides.

    Unknown keys and values of the wrong type raise ``ValueError`` naming the key and what
    it allows.
    """
    hints = typing.get_type_hints(config_type)
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
    shaped = {
        key: _from_string(value, hints[key]) if isinstance(value, str) and key in hints else value
        for key, value in values.items()
    }
    return validate_config(config_type, shaped)


def validate_config(config_type: type[ConfigT], values: Mapping[str, Any]) -> ConfigT:
    """``config_type`` (a dataclass) from ``values`` over its defaults, checked by pydantic.

    Raises ``ValueError`` for keys that are not fields (listing the fields) and for values
    pydantic cannot convert to their field's type (naming the field and what it allows).
    """
    if not dataclasses.is_dataclass(config_type):
        raise TypeError(f"{config_type!r} is not a dataclass")
    allowed = sorted(field.name for field in dataclasses.fields(config_type))
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; allowed: {allowed}")
    try:
        return pydantic.TypeAdapter(config_type).validate_python(dict(values))
    except pydantic.ValidationError as error:
        raise ValueError("; ".join(_describe(e) for e in error.errors())) from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (for checkpoints and logs)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _from_string(raw: str, annotation: Any) -> Any:
    """A string value in the form its field's type takes; pydantic converts the rest.

    Every command-line value is a string, and so are YAML ones such as ``init_from: none``:
    ``none`` / ``null`` is None for an optional field, ``[a,b]`` or ``a,b`` a list for a
    tuple or list field, and a ``Literal`` choice is picked by its spelling (``800`` is the
    int 800 of ``Literal[999, 800]``, which pydantic does not parse from a string).
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in ("none", "null"):
            return None
        others = [arg for arg in args if arg is not type(None)]
        return _from_string(raw, others[0]) if len(others) == 1 else raw
    if origin in (tuple, list):
        items = [item.strip() for item in raw.strip("[]").split(",")]
        return [_from_string(item, args[0] if args else Any) for item in items if item]
    if origin is Literal:
        return next((choice for choice in args if str(choice) == raw), raw)
    return raw


def _describe(error: ErrorDetails) -> str:
    """One validation error as ``field: what it allows, got what it was given``."""
    field = ".".join(str(part) for part in error["loc"])
    message = error["msg"]
    if not field:
        return message
    return f"{field}: {message[0].lower()}{message[1:]}, got {error['input']!r}"
