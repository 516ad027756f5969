"""k2jax: optimizer scaling studies on Kimi-K2-style mixture-of-experts transformers."""

__version__ = "0.1.0"
