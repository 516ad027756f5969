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
import importlib
import itertools
import math
import pkgutil
import random as random_lib
from collections.abc import Callable, Sequence
from typing import Any

from k2jax.config import ConfigError, suggest

Point = dict[str, str]  # dotted key -> override text
Axis = tuple[Point, ...]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def grid(key: str, values: Sequence[Any]) -> Axis:
    """One key over ``values``; crossed with every other axis."""
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
    return list(dict.fromkeys(k for axis in axes for point in axis for k in point))


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


def available() -> list[str]:
    """Names of the studies in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(name: str) -> Study:
    if name not in available():
        raise ConfigError(f"unknown study {name!r} (have {', '.join(available()) or 'none'})"
                          f"{suggest(name, available())}")
    return importlib.import_module(f"{__name__}.{name}").STUDY
