"""Runnable studies (loss spikes vs AdamW, ablation sweeps, scaling ladders)."""
