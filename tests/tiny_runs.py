"""Tiny training runs shared by the tests of the step, the loop and the CLI; the notebook runner."""

import hashlib
import os

from k2jax import presets
from k2jax.metrics import read_jsonl

BASE = ["model.num_hidden_layers=2", "data.seq_len=32", "data.global_batch_size=8",
        "optimizer.qk_clip=true", "optimizer.lr=0.01", "optimizer.warmup_steps=2",
        "train.eval_every=1000", "train.eval_batches=2", "train.checkpoint_every=1000",
        "train.peak_flops=1e11"]


def tiny(*extra):
    """MuonClip on the tiny preset, 2 layers, 8 x 32 tokens per step."""
    return presets.load("tiny", [*BASE, *extra])


def losses(workdir, key="train/loss"):
    return [r[key] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if key in r]


def deterministic(rows):
    """metrics.jsonl rows without the wall-clock ``perf/*`` entries."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def snapshot(root) -> dict[str, str]:
    """{path: sha256 of its bytes, or "dir"} for everything under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def execute_notebook(name: str, **env: str):
    """Run ``notebooks/NAME`` headless from the repository root with environment variables
    ``env`` set (any cell error fails); returns (printed text, number of PNG outputs)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": ROOT}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    return text, sum("image/png" in o.get("data", {}) for o in outputs)
