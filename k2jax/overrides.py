"""Dotted ``key=value`` overrides of a config: how the command line and sweeps change one field.

``apply(cfg, ["optimizer.lr=1e-2", "model.rope_scaling.factor=8"])`` parses each
value as its field's type, applies them all, then validates once, so
``data.source=text data.paths=a.txt`` works in either order. An unknown key
suggests the closest valid one.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Literal

from k2jax import config
from k2jax.config import ConfigError


def apply(cfg, overrides: typing.Iterable[str]):
    """``cfg`` with dotted ``key=value`` overrides applied, e.g. ``rope_scaling.factor=8``.

    A nested dataclass that is None is created with its defaults before its field is set.
    """
    overrides = list(overrides)
    if not overrides:
        return cfg
    values = config.to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        _set(type(cfg), values, key.strip().split("."), text, prefix="")
    return config.from_dict(type(cfg), values)


def _set(cls, values: dict, path: list[str], text: str, prefix: str) -> None:
    head, rest = path[0], path[1:]
    types_ = config.field_types(cls)
    if head not in types_:
        raise config.unknown_key(cls, head, prefix)
    if not rest:
        values[head] = _parse(types_[head], text, prefix + head)
        return
    inner, _ = config.unwrap_optional(types_[head])
    if not dataclasses.is_dataclass(inner):
        raise ConfigError(f"{prefix}{head} has no sub-keys (got '{'.'.join(path)}')")
    if values.get(head) is None:
        values[head] = config.to_dict(inner())
    elif dataclasses.is_dataclass(values[head]):
        values[head] = config.to_dict(values[head])
    _set(inner, values[head], rest, text, prefix=f"{prefix}{head}.")


def _parse(tp, text: str, key: str):
    """Parse the text of an override value as field type ``tp``."""
    inner, optional = config.unwrap_optional(tp)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    if typing.get_origin(inner) is Literal:
        return text  # the config checks its choices (and names a renamed spelling)
    try:
        if inner is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if inner is int:
            return int(text)
        if inner is float:
            return float(text)
        if inner is str:
            return text
        if typing.get_origin(inner) is tuple:
            return tuple(v.strip() for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected {getattr(inner, '__name__', inner)}") from None
    if dataclasses.is_dataclass(inner):
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            values = None
        if not isinstance(values, dict):
            first = dataclasses.fields(inner)[0].name
            raise ConfigError(f"{key}={text!r}: expected a JSON object of its fields, or one "
                              f"field at a time ({key}.{first}=...)")
        return config.from_dict(inner, values, prefix=key + ".")
    raise ConfigError(f"{key}: cannot parse {text!r} as {inner}")
