"""Shared test setup: a persistent XLA compilation cache for this suite.

Compiles dominate the suite's time on a 2-core CPU; the cache (JAX's own,
opt-in) makes a rerun's compiles cheap. Nothing else in the process changes.
"""
import os

import jax

if not jax.config.jax_compilation_cache_dir:
  _CACHE = os.environ.setdefault(
      "JAX_COMPILATION_CACHE_DIR",
      os.path.join(os.path.expanduser("~"), ".cache", "kd_jax", "xla"))
  jax.config.update("jax_compilation_cache_dir", _CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
