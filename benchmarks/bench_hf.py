"""Hugging Face checkpoint save / load: time and peak host memory against the model's size.

    python -m benchmarks.bench_hf [--preset ladder-d384] [--shard-mb 64] [k=v ...]

Saves a randomly initialised preset with ``k2jax.hf.save`` (several shards), then
loads it in a fresh process and reports that process's peak resident memory
(``VmHWM``; ``ru_maxrss`` would include the parent's, inherited across fork) next
to the checkpoint's size and to a baseline process that imports k2jax and loads
nothing. The target: peak − baseline ≈ the model's bytes (the device arrays, host
memory on CPU, plus one tensor in flight), whatever the number of shards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

_CHILD = """
import json, sys, time
from k2jax import hf
import jax
t0 = time.perf_counter()
if sys.argv[1] != "-":
    cfg, model = hf.load(sys.argv[1])
    jax.block_until_ready(jax.tree.leaves(model))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"s": time.perf_counter() - t0, "rss_mb": int(hwm.split()[1]) / 1024}))
"""


def _child(path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, path], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ladder-d384")
    ap.add_argument("--shard-mb", type=float, default=64)
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    from flax import nnx

    from k2jax import hf, params, presets
    from k2jax.model import Transformer

    cfg = presets.preset(args.preset, *args.overrides)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    total, _ = params.count(cfg)
    tmp = tempfile.mkdtemp()
    try:
        t0 = time.perf_counter()
        files = hf.save(model, cfg, os.path.join(tmp, "ckpt"),
                        max_shard_bytes=int(args.shard_mb * 2**20))
        save_s = time.perf_counter() - t0
        size_mb = sum(os.path.getsize(f) for f in files) / 2**20
        del model
        base, loaded = _child("-"), _child(os.path.join(tmp, "ckpt"))
    finally:
        shutil.rmtree(tmp)
    shards = sum(f.endswith(".safetensors") for f in files)
    print(f"{args.preset}: {total:,} params, checkpoint {size_mb:,.1f} MB in {shards} shards; "
          f"save {save_s:.2f} s; load {loaded['s']:.2f} s; peak RSS {loaded['rss_mb']:,.0f} MB "
          f"vs {base['rss_mb']:,.0f} MB baseline: +{loaded['rss_mb'] - base['rss_mb']:,.0f} MB "
          f"= {(loaded['rss_mb'] - base['rss_mb']) / size_mb:.2f}x the checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
