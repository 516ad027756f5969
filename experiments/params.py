"""Total and active parameter counts: ``python -m experiments.params [PRESET ...] [--set k=v ...]``.

Counts follow transformers' ``DeepseekV3ForCausalLM`` (k2jax/params.py); the
model is built abstractly, so Kimi K2's 1T parameters count in seconds.
"""

from __future__ import annotations

import argparse
import sys

from k2jax import params, presets
from k2jax.config import ConfigError


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Total and active parameter counts of presets.")
    ap.add_argument("presets", nargs="*", default=list(presets.PRESETS))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides applied to every preset")
    args = ap.parse_args(argv)
    try:
        cfgs = {name: presets.preset(name, *args.set) for name in args.presets}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{'preset':<14}{'total':>20}{'active':>20}")
    for name, cfg in cfgs.items():
        total, active = params.count(cfg)
        print(f"{name:<14}{total:>20,}{active:>20,}")


if __name__ == "__main__":
    main()
