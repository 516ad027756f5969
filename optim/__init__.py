"""Optax transforms for optimizer studies: Newton–Schulz, Muon, QK-Clip, MuonClip, AdamW.

Model-agnostic: nothing here imports k2jax. (Built in the optim issue.)
"""
