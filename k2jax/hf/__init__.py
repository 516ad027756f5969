"""Hugging Face DeepseekV3 / Kimi-K2 checkpoints in and out.

    cfg, model = hf.load("path/to/Kimi-K2-Base")      # config.json + *.safetensors
    hf.save(model, cfg, "path/to/out")                # loadable by transformers

The format is transformers' ``DeepseekV3ForCausalLM`` checkpoint (also Kimi K2's
and DeepSeek-V3's published weights). One concern per module, each importing only
the ones listed before it:

- config.py: config.json <-> :class:`ModelConfig`, and :class:`HFError`;
- files.py: the safetensors format, read through memory maps and written;
- fp8.py: the fp8 block-quantized weights DeepSeek-V3 / Kimi K2 publish, dequantised;
- mapping.py: which tensor fills which k2jax variable, and the layout transforms;
- checkpoint.py: directories of shards: :func:`check`, :func:`load`, :func:`save`.
"""

from k2jax.hf.checkpoint import check, load, save
from k2jax.hf.config import TRAINING_FIELDS, HFError, config_from_hf, config_to_hf
from k2jax.hf.files import TensorInfo, read_header, read_tensor, write_safetensors
from k2jax.hf.mapping import Spec, tensor_specs

__all__ = ["HFError", "Spec", "TRAINING_FIELDS", "TensorInfo", "check", "config_from_hf",
           "config_to_hf", "load", "read_header", "read_tensor", "save", "tensor_specs",
           "write_safetensors"]
