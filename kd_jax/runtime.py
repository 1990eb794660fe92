"""Process-wide JAX settings for kd_jax's commands and tests."""
import ctypes
import ctypes.util
import os

# XLA:CPU options kd_jax sets unless XLA_FLAGS already names them.
# - No YNNPACK library fusions (jaxlib 0.10's CPU default for convolutions,
#   dots and reductions): without them the default pair's distill step ran
#   1.1-1.5x faster on the 2-core VM (benchmarks/README.md, "Latest"); later jaxlibs have had wrong results reported
#   from them. Only the CPU reads these flags.
CPU_XLA_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def xla_flags(current: str) -> str:
  """`current` (an XLA_FLAGS value) with CPU_XLA_FLAGS added, keeping every
  flag the user set, theirs winning where both name one."""
  named = {f.lstrip("-").split("=")[0] for f in current.split()}
  extra = [f"--{k}={v}" for k, v in CPU_XLA_FLAGS.items() if k not in named]
  return " ".join([current] * bool(current.strip()) + extra)


# glibc mallopt() parameters and the values kd_jax sets.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOPT = {
    # Serve buffers up to 32 MiB (glibc's maximum) from the heap, not from
    # fresh mmap()s ...
    M_MMAP_THRESHOLD: 32 << 20,
    # ... and keep freed memory instead of handing it back to the OS.
    M_TRIM_THRESHOLD: 2**31 - 1,
    M_TOP_PAD: 64 << 20,
}


def retain_freed_memory() -> bool:
  """Makes glibc's malloc reuse freed memory for XLA:CPU's buffers.

  XLA:CPU allocates every intermediate of a step anew; with glibc's defaults
  the large ones are fresh pages from the OS each time, and the page faults
  cost more than the arithmetic: an elementwise op on a 32 MiB array took
  34 ms, 6 ms with freed memory kept (2-core VM, 2026-11-23; the default
  distill step 1.1-1.2x faster, benchmarks/README.md). The price: the
  process keeps its peak heap until it exits, like PyTorch's caching
  allocators. Returns False where the C library has no mallopt (not glibc).
  """
  return set_malloc(MALLOPT)


def set_malloc(params: dict) -> bool:
  """glibc `mallopt(param, value)` for each item; False without mallopt."""
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
  except (OSError, AttributeError, TypeError):
    return False
  return all(mallopt(k, v) == 1 for k, v in params.items())


def configure():
  """Faster compiles and steps; call once at program start, before the first
  computation (XLA reads its flags when the backend starts).

  - jax 0.10's default partitionable threefry compiles parameter init ~3×
    slower on CPU (91 s vs 35 s for the default teacher, measured
    2026-11-23); kd_jax initialises replicated, so it buys nothing here.
  - A persistent compilation cache turns a rerun's ~10 s compiles into
    ~0.6 s (STACK.md). JAX_COMPILATION_CACHE_DIR chooses another folder.
  - CPU_XLA_FLAGS (XLA_FLAGS naming one of them keeps the user's value).
  - retain_freed_memory() (glibc only).
  Subprocesses inherit all but the last through the environment.
  """
  import jax  # pylint: disable=import-outside-toplevel  (keeps this module light)

  jax.config.update("jax_threefry_partitionable", False)
  os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "false")
  os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))
  retain_freed_memory()
  if not jax.config.jax_compilation_cache_dir:
    cache = os.path.join(os.path.expanduser("~"), ".cache", "kd_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
