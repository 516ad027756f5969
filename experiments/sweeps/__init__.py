"""Sweep studies: a base config, axes over dotted config keys, and an analysis.

A study is a small Python file in this package defining ``STUDY``; ``python -m
experiments.sweep NAME`` runs it. An axis is the list of points it takes, each
point a ``{dotted key: value}`` dict; the members are the product of the axes,
so three kinds of axis cover the usual designs:

    grid("optimizer.lr", [1e-3, 3e-3, 1e-2])          # 3 points, crossed with the rest
    zipped({"model.hidden_size": [64, 128],           # 2 points: the keys move together
            "train.steps": [200, 400]})
    random({"optimizer.lr": LogUniform(1e-3, 1e-1),   # 8 random points (fixed seed)
            "optimizer.weight_decay": [0.0, 0.1]}, n=8, seed=0)

Values are kept as the text of a ``key=value`` override, exactly what
``experiments.train`` is given, so a member is always a command one can run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import itertools
import json
import math
import os
import pkgutil
import random as random_lib
import re
from collections.abc import Callable, Sequence
from typing import Any

from experiments.train import load_config
from k2jax.config import ConfigError, suggest, to_dict

Point = dict[str, str]  # dotted key -> override text
Axis = tuple[Point, ...]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)  # repr: shortest exact


def grid(key: str, values: Sequence[Any]) -> Axis:
    """One key over ``values``; crossed with every other axis."""
    if not values:
        raise ConfigError(f"axis {key}: no values")
    return tuple({key: _text(v)} for v in values)


def zipped(columns: dict[str, Sequence[Any]]) -> Axis:
    """Several keys that move together: point i sets every key to its i-th value."""
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise ConfigError(f"zipped: keys have different numbers of values: "
                         f"{ {k: len(v) for k, v in columns.items()} }")
    n = lengths.pop()
    return tuple({k: _text(v[i]) for k, v in columns.items()} for i in range(n))


@dataclasses.dataclass(frozen=True)
class LogUniform:
    """A value drawn log-uniformly in [low, high] (learning rates, weight decays)."""

    low: float
    high: float

    def draw(self, rng: random_lib.Random) -> float:
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))


def random(space: dict[str, Sequence[Any] | LogUniform], n: int, seed: int = 0) -> Axis:
    """``n`` points, each key drawn independently: from a list uniformly, or from a
    :class:`LogUniform`. The seed fixes the points, so a re-run finds the same members."""
    if n < 1:
        raise ConfigError(f"random axis over {', '.join(space)}: n={n} must be >= 1")
    rng = random_lib.Random(seed)
    return tuple({k: _text(s.draw(rng) if isinstance(s, LogUniform) else rng.choice(list(s)))
                  for k, s in space.items()} for _ in range(n))


def parse_axis(text: str) -> Axis:
    """``--grid optimizer.lr=0.003,0.03`` -> a grid axis (values split at commas)."""
    key, sep, values = text.partition("=")
    if not sep or not key.strip() or not values.strip():
        raise ConfigError(f"--grid {text!r}: expected KEY=V1,V2,...")
    return grid(key.strip(), [v.strip() for v in values.split(",") if v.strip()])


def points(axes: Sequence[Axis]) -> list[Point]:
    """Every member's swept values: the product of the axes, in axis order."""
    return [dict(itertools.chain.from_iterable(p.items() for p in combo))
            for combo in itertools.product(*axes)]


def swept_keys(axes: Sequence[Axis]) -> list[str]:
    """The keys the axes set, in order; a key set by two axes is an error (the later
    would silently win)."""
    per_axis = [list(dict.fromkeys(k for point in axis for k in point)) for axis in axes]
    keys = [k for ks in per_axis for k in ks]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"{', '.join(twice)}: set by more than one axis")
    return keys


@dataclasses.dataclass(frozen=True)
class Study:
    """A named sweep. ``config`` is a preset or config file, ``base`` the overrides of
    every member, ``quick`` the fields ``--quick`` replaces (a minutes-long version),
    ``analyze(df, sweep_dir)`` writes the study's report from ``k2jax.sweeps.load``."""

    description: str
    config: str
    base: tuple[str, ...] = ()
    axes: tuple[Axis, ...] = ()
    quick: dict[str, Any] = dataclasses.field(default_factory=dict)
    analyze: Callable[[Any, str], None] | None = None

    def quick_version(self) -> Study:
        return dataclasses.replace(self, **self.quick)


@dataclasses.dataclass(frozen=True)
class Member:
    """One run of the sweep: its directory name, swept values and full override list."""

    name: str
    values: dict[str, str]
    overrides: tuple[str, ...]


def config_hash(config: str, overrides: list[str]) -> str:
    """10 hex digits of the resolved config (or, for one that does not resolve, of the
    command's text: that member fails, but keeps a stable name)."""
    try:
        text = json.dumps(to_dict(load_config(config, overrides)), sort_keys=True)
    except ConfigError:
        text = "\n".join(["unresolved", config, *overrides])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def readable(values: dict[str, str]) -> str:
    """``lr=0.003_name=adamw``: each swept key by its last part (whole where two share
    it), values with anything unsafe in a path replaced, each cut to 24 characters."""
    leaves = [k.rsplit(".", 1)[-1] for k in values]
    parts = []
    for key, leaf in zip(values, leaves):
        label = re.sub(r"[^A-Za-z0-9._+-]", "-", leaf if leaves.count(leaf) == 1 else key)
        parts.append(f"{label}={re.sub(r'[^A-Za-z0-9.+-]', '-', values[key])[:24]}")
    return "_".join(parts) or "run"


def plan(config: str, base: list[str], axes, known: dict[str, str] | None = None) -> list[Member]:
    """The members, in axis order; identical resolved configs are one member. ``known``
    maps the hashes of members already in the sweep directory to their names, so a
    value spelled differently (3e-3 for 0.003) still finds its finished member."""
    swept_keys(axes)
    members: dict[str, Member] = {}
    for values in points(axes):
        overrides = [*base, *(f"{k}={v}" for k, v in values.items())]
        digest = config_hash(config, overrides)
        name = (known or {}).get(digest, f"{readable(values)}-{digest}")
        members.setdefault(digest, Member(name, values, tuple(overrides)))
    return list(members.values())


def known_members(sweep_dir: str) -> dict[str, str]:
    """{config hash: member name} of the members with a status in ``sweep_dir``."""
    status = os.path.join(sweep_dir, "status")
    names = [n.removesuffix(".json") for n in os.listdir(status)] if os.path.isdir(status) else []
    return {n.rsplit("-", 1)[-1]: n for n in names}


def available() -> list[str]:
    """Names of the studies in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(name: str) -> Study:
    if name not in available():
        raise ConfigError(f"unknown study {name!r} (have {', '.join(available()) or 'none'})"
                          f"{suggest(name, available())}")
    return importlib.import_module(f"{__name__}.{name}").STUDY
