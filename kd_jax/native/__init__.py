"""kd_jax's own CPU kernels (`conv3x3.cc`), compiled on first use.

XLA:CPU runs a 3×3 convolution with 8-64 output channels on a wide image
far below the machine's speed: most of its time goes into Eigen's packing of
image patches, not into multiply-adds. `conv3x3.cc` computes those
convolutions directly, as XLA FFI custom calls on XLA's own thread pool
(`kd_jax.models.layers` decides where; with both gradients 2-3× faster
than XLA's at 64², benchmarks/README.md).

The source is compiled with the system's C++ compiler (`$CXX`, else `c++`
or `g++`) for this machine's CPU (`-march=native`) the first time a model
needs it, into `~/.cache/kd_jax/native` (`$KD_JAX_NATIVE_CACHE`), keyed by
the source, the compiler, the jaxlib headers and the CPU. Without a
compiler, or with `KD_JAX_NATIVE=0`, `library()` returns None and every
convolution is XLA's own; a failed compile warns once and does the same.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax

SOURCE = Path(__file__).with_name("conv3x3.cc")
HANDLERS = {"kd_jax_conv3x3_forward": "KdConv3x3Forward",
            "kd_jax_conv3x3_kernel": "KdConv3x3Kernel"}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def enabled() -> bool:
  """False when the user set KD_JAX_NATIVE=0 (XLA's convolutions only)."""
  return os.environ.get("KD_JAX_NATIVE", "1") != "0"


def _compiler():
  for name in (os.environ.get("CXX"), "c++", "g++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line
  except OSError:
    pass
  return platform.processor()


def _cache_dir() -> Path:
  return Path(os.environ.get("KD_JAX_NATIVE_CACHE")
              or Path.home() / ".cache" / "kd_jax" / "native")


def build(compiler: str, out_dir: Path) -> Path:
  """Compiles conv3x3.cc into `out_dir` (if not there already) and returns
  the shared library's path; raises CalledProcessError with the
  compiler's message when it fails."""
  include = jax.ffi.include_dir()
  version = subprocess.run([compiler, "--version"], capture_output=True,
                           text=True, check=False).stdout
  key = hashlib.sha256("\0".join(
      [SOURCE.read_text(), compiler, version, include, " ".join(FLAGS),
       platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
  path = out_dir / f"conv3x3-{key}.so"
  if path.exists():
    return path
  out_dir.mkdir(parents=True, exist_ok=True)
  # Compiled beside the target and renamed: a concurrent process never
  # loads a half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  try:
    subprocess.run([compiler, *FLAGS, "-I", include, str(SOURCE), "-o", tmp],
                   capture_output=True, text=True, check=True)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


_LOCK = threading.Lock()


def library():
  """The loaded library with its FFI targets registered for the CPU, or None
  (disabled, no compiler, or the compile failed: XLA's convolutions)."""
  with _LOCK:  # Threads tracing at once compile and register it once.
    return _load()


@functools.lru_cache(maxsize=None)
def _load():
  if not enabled():
    return None
  compiler = _compiler()
  if compiler is None:
    return None
  try:
    path = build(compiler, _cache_dir())
  # AttributeError: a jax without jax.ffi (older than the kernels need).
  except (OSError, subprocess.CalledProcessError, AttributeError) as e:
    detail = getattr(e, "stderr", "") or str(e)
    warnings.warn(f"kd_jax.native: compiling {SOURCE.name} with {compiler} "
                  f"failed, so XLA's own convolutions are used (slower on "
                  f"CPU); set KD_JAX_NATIVE=0 to skip the attempt.\n"
                  f"{detail[-2000:]}", RuntimeWarning, stacklevel=2)
    return None
  lib = ctypes.cdll.LoadLibrary(str(path))
  for target, symbol in HANDLERS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform="cpu")
  return lib


def vector_width() -> int:
  """Floats per vector register the kernels were compiled for (16 with
  AVX-512, 8 with AVX, 4 otherwise); 0 without the library."""
  lib = library()
  return lib.KdConv3x3VectorWidth() if lib is not None else 0


def _require():
  if library() is None:
    raise RuntimeError(
        "kd_jax.native's kernels are not available (KD_JAX_NATIVE=0, no C++ "
        "compiler, or the compile failed: see the warning); use "
        "jax.lax.conv_general_dilated or kd_jax.models.layers.Conv instead")


def conv3x3_forward(xp, w):
  """y[n,h,x,o] = Σ_{i,j,c} xp[n,h+i,x+j,c]·w[i,j,c,o] for an input `xp`
  padded by one on each side (NHWC, float32) and a 3×3 HWIO kernel with 8,
  16, 32 or 64 output channels and a multiple of 8 input channels. Needs
  `library()` (the targets registered); CPU only."""
  _require()
  n, hp, wp, _ = xp.shape
  out = jax.ShapeDtypeStruct((n, hp - 2, wp - 2, w.shape[3]), xp.dtype)
  return jax.ffi.ffi_call("kd_jax_conv3x3_forward", out,
                          vmap_method="sequential")(xp, w)


def conv3x3_kernel_grad(xp, dy):
  """dw[i,j,c,o] = Σ_{n,h,x} xp[n,h+i,x+j,c]·dy[n,h,x,o]: the kernel
  gradient of `conv3x3_forward`."""
  _require()
  out = jax.ShapeDtypeStruct((3, 3, xp.shape[3], dy.shape[3]), xp.dtype)
  return jax.ffi.ffi_call("kd_jax_conv3x3_kernel", out,
                          vmap_method="sequential")(xp, dy)
