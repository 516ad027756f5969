"""Test setup: an 8-device simulated CPU mesh, set before jax is imported anywhere."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The CLIs turn on JAX's persistent compilation cache (~/.cache/k2jax/xla by default);
# the ones the tests start as subprocesses use a throw-away directory instead. Set
# after jax's import, so this process itself compiles without the cache.
_xla_cache = tempfile.mkdtemp(prefix="k2jax-test-xla-")
atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _xla_cache)
