"""Process-wide JAX settings for kd_jax's commands and tests."""
import os

import jax

# XLA:CPU options kd_jax sets unless XLA_FLAGS already names them.
# - No YNNPACK library fusions (jaxlib 0.10's CPU default for convolutions,
#   dots and reductions): without them the default pair's distill step ran
#   1.1-1.5x faster on the 2-core VM (benchmarks/README.md, "XLA:CPU
#   without YNNPACK fusions"); later jaxlibs have had wrong results reported
#   from them. Only the CPU reads these flags.
CPU_XLA_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def xla_flags(current: str) -> str:
  """`current` (an XLA_FLAGS value) with CPU_XLA_FLAGS added, keeping every
  flag the user set, theirs winning where both name one."""
  named = {f.lstrip("-").split("=")[0] for f in current.split()}
  extra = [f"--{k}={v}" for k, v in CPU_XLA_FLAGS.items() if k not in named]
  return " ".join([current] * bool(current.strip()) + extra)


def configure():
  """Faster compiles and steps; call once at program start, before the first
  computation (XLA reads its flags when the backend starts).

  - jax 0.10's default partitionable threefry compiles parameter init ~3×
    slower on CPU (91 s vs 35 s for the default teacher, measured
    2026-11-23); kd_jax initialises replicated, so it buys nothing here.
  - A persistent compilation cache turns a rerun's ~10 s compiles into
    ~0.6 s (STACK.md). JAX_COMPILATION_CACHE_DIR chooses another folder.
  - CPU_XLA_FLAGS (XLA_FLAGS naming one of them keeps the user's value).
  Subprocesses inherit all of them through the environment.
  """
  jax.config.update("jax_threefry_partitionable", False)
  os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "false")
  os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))
  if not jax.config.jax_compilation_cache_dir:
    cache = os.path.join(os.path.expanduser("~"), ".cache", "kd_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
