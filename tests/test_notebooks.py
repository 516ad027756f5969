"""The analysis notebooks run headless on a tiny run."""

import os

from tiny_runs import tiny

from k2jax import loop


def test_loss_curves_notebook_executes(tmp_path):
    """notebooks/loss_curves.ipynb runs headless on a tiny run; any cell error fails."""
    import nbformat
    from nbclient import NotebookClient

    run = tmp_path / "tiny_run"
    loop.run(tiny("train.steps=6"), str(run), progress=False)
    nb = nbformat.read("notebooks/loss_curves.ipynb", as_version=4)
    os.environ["K2JAX_RUNS"] = str(run)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": os.getcwd()}}).execute()
    finally:
        del os.environ["K2JAX_RUNS"]
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "1 runs:" in text and "tiny_run" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2
