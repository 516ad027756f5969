"""The analysis notebooks run headless on a tiny run."""

from tiny_runs import execute_notebook, tiny

from k2jax import loop


def test_loss_curves_notebook_executes(tmp_path):
    """notebooks/loss_curves.ipynb runs headless on a tiny run; any cell error fails."""
    run = tmp_path / "tiny_run"
    loop.run(tiny("train.steps=6"), str(run), progress=False)
    text, images = execute_notebook("loss_curves.ipynb", K2JAX_RUNS=str(run))
    assert "1 runs:" in text and "tiny_run" in text
    assert images >= 2
