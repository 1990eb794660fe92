"""kd_jax.native's direct 3×3 kernels against a numpy formula and XLA, and
where kd_jax.models.layers uses them."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import native
from kd_jax.models import layers

NHWC = ("NHWC", "HWIO", "NHWC")

needs_library = pytest.mark.skipif(
    native.library() is None,
    reason="kd_jax.native did not compile here (no C++ compiler?)")


def _numpy_conv(x, w):
  """Padding-1 3×3 convolution as nine shifted products, in float64."""
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, wd = x.shape[1:3]
  return sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + h, j:j + wd],
                       w[i, j].astype(np.float64))
             for i in range(3) for j in range(3))


def _numpy_kernel_grad(x, dy):
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, wd = x.shape[1:3]
  return np.stack([np.stack([
      np.einsum("nhwc,nhwo->co", xp[:, i:i + h, j:j + wd], dy) for j in
      range(3)]) for i in range(3)])


def _data(n, h, w, cin, cout, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, h, w, cin)).astype(np.float32),
          rng.normal(size=(3, 3, cin, cout)).astype(np.float32),
          rng.normal(size=(n, h, w, cout)).astype(np.float32))


PAD = ((0, 0), (1, 1), (1, 1), (0, 0))
# Widths below, at and past the kernels' pixel blocks (16 and 12), and one
# image or several.
SIZES = [(1, 1, 1), (2, 3, 5), (1, 4, 16), (3, 5, 17), (2, 7, 29)]


@needs_library
@pytest.mark.parametrize("cin,cout", [(8, 8), (8, 16), (16, 8), (16, 32),
                                      (32, 16), (32, 32), (24, 8), (64, 64),
                                      (16, 64), (64, 32)])
@pytest.mark.parametrize("n,h,w", SIZES)
def test_forward_and_kernel_gradient_match_numpy(n, h, w, cin, cout):
  x, k, dy = _data(n, h, w, cin, cout)
  y = native.conv3x3_forward(jnp.asarray(np.pad(x, PAD)), jnp.asarray(k))
  np.testing.assert_allclose(np.asarray(y), _numpy_conv(x, k), rtol=1e-5,
                             atol=1e-4)
  dw = native.conv3x3_kernel_grad(jnp.asarray(np.pad(x, PAD)),
                                  jnp.asarray(dy))
  np.testing.assert_allclose(np.asarray(dw), _numpy_kernel_grad(x, dy),
                             rtol=1e-5, atol=1e-3)


@needs_library
def test_unsupported_channels_are_refused_by_the_kernel():
  x, k, _ = _data(1, 4, 4, 8, 24)
  with pytest.raises(Exception, match="output channels 8, 16, 32 or 64"):
    jax.block_until_ready(native.conv3x3_forward(
        jnp.asarray(np.pad(x, PAD)), jnp.asarray(k)))


def _loss(conv):
  def loss(x, w, dy):
    return jnp.sum(conv(x, w) * dy)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _xla(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=NHWC,
                                      precision="highest")


def _kd_jax(x, w):
  return layers.conv_general_dilated(
      x, w, (1, 1), "SAME",
      dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, w.shape,
                                                       NHWC))


@pytest.fixture(scope="module")
def losses():
  return _loss(_kd_jax), _loss(_xla)


@needs_library
@pytest.mark.parametrize("shape", [(2, 16, 19, 8, 16), (3, 9, 20, 16, 8),
                                   (1, 11, 13, 32, 32), (2, 64, 64, 16, 16),
                                   (1, 32, 35, 64, 32), (1, 33, 32, 32, 64)])
def test_layers_convolution_and_gradients_match_xla(losses, shape):
  n, h, w, cin, cout = shape
  x, k, dy = (jnp.asarray(a) for a in _data(n, h, w, cin, cout, seed=1))
  ours, xla = losses
  (v1, (dx1, dw1)), (v2, (dx2, dw2)) = ours(x, k, dy), xla(x, k, dy)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  np.testing.assert_allclose(dx1, dx2, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dw1, dw2, rtol=1e-5, atol=1e-3)


def _custom_calls(fn, *args):
  return jax.jit(fn).lower(*args).as_text().count("kd_jax_conv3x3")


@needs_library
def test_layers_choose_the_kernels_only_where_they_apply():
  x = jnp.zeros((2, 8, 8, 16))
  grad = jax.value_and_grad(lambda x, w: jnp.sum(_kd_jax(x, w)),
                            argnums=(0, 1))
  # Forward; and in the gradient the forward, input and kernel gradients.
  assert _custom_calls(_kd_jax, x, jnp.zeros((3, 3, 16, 32))) == 1
  assert _custom_calls(grad, x, jnp.zeros((3, 3, 16, 32))) == 3
  for w in (jnp.zeros((3, 3, 16, 24)),   # no vector block for 24
            jnp.zeros((3, 3, 16, 64)),   # 64 channels: only from 32² up
            jnp.zeros((3, 3, 16, 128)),  # XLA as fast from 128 channels
            jnp.zeros((3, 3, 16, 16), jnp.bfloat16),
            jnp.zeros((5, 5, 16, 16))):
    assert _custom_calls(_kd_jax, x.astype(w.dtype), w) == 0, w.shape
  # 64 channels from 32² up, with 16-float vectors (AVX-512) only.
  assert _custom_calls(_kd_jax, jnp.zeros((1, 32, 32, 16)),
                       jnp.zeros((3, 3, 16, 64))) == (
                           native.vector_width() == 16)
  strided = layers.conv_general_dilated(
      x, jnp.zeros((3, 3, 16, 16)), (2, 2), "SAME",
      dimension_numbers=jax.lax.conv_dimension_numbers(
          x.shape, (3, 3, 16, 16), NHWC))
  assert strided.shape == (2, 4, 4, 16)
  assert _custom_calls(lambda x, w: layers.conv_general_dilated(
      x, w, (1, 1), "VALID", dimension_numbers=jax.lax.conv_dimension_numbers(
          x.shape, w.shape, NHWC)), x, jnp.zeros((3, 3, 16, 16))) == 0


def test_without_the_library_xla_convolves(monkeypatch, losses):
  monkeypatch.setattr(native, "library", lambda: None)
  x, k, dy = (jnp.asarray(a) for a in _data(2, 8, 8, 16, 16, seed=2))
  assert _custom_calls(_kd_jax, x, k) == 0
  (v1, _), (v2, _) = _loss(_kd_jax)(x, k, dy), losses[1](x, k, dy)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)


def test_a_failed_compile_warns_and_gives_none(monkeypatch, tmp_path):
  monkeypatch.setenv("KD_JAX_NATIVE_CACHE", str(tmp_path))
  monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
  with pytest.warns(RuntimeWarning, match="XLA's own convolutions"):
    assert native._load.__wrapped__() is None  # pylint: disable=protected-access
  assert list(tmp_path.iterdir()) == []  # no half-written library left


def test_kd_jax_native_0_turns_the_kernels_off(monkeypatch):
  monkeypatch.setenv("KD_JAX_NATIVE", "0")
  assert native._load.__wrapped__() is None  # pylint: disable=protected-access


@needs_library
def test_build_is_cached_by_source_and_machine(tmp_path):
  compiler = native._compiler()  # pylint: disable=protected-access
  first = native.build(compiler, tmp_path)
  mtime = first.stat().st_mtime_ns
  assert native.build(compiler, tmp_path) == first
  assert first.stat().st_mtime_ns == mtime  # not compiled again


@needs_library
def test_several_devices_use_xla():
  """With the batch sharded over 8 host devices the custom call (which has
  no sharding rule) is not used; the values are XLA's."""
  code = (
      "import jax, jax.numpy as jnp\n"
      "from kd_jax.models import layers\n"
      "x, w = jnp.ones((8, 8, 8, 16)), jnp.ones((3, 3, 16, 16))\n"
      "dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, "
      "('NHWC', 'HWIO', 'NHWC'))\n"
      "f = lambda x, w: layers.conv_general_dilated(x, w, (1, 1), 'SAME', "
      "dimension_numbers=dn)\n"
      "print(jax.device_count(), "
      "jax.jit(f).lower(x, w).as_text().count('kd_jax_conv3x3'))\n")
  out = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True,
      check=True, env={**os.environ,
                       "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert out.stdout.split() == ["8", "0"]


@needs_library
def test_kernel_gradient_is_the_same_every_time():
  """The images' partial sums are added in a fixed order, whichever thread
  computed them (resumed runs reproduce their parameters bit for bit)."""
  x, _, dy = _data(16, 16, 16, 16, 16, seed=3)
  xp, dy = jnp.asarray(np.pad(x, PAD)), jnp.asarray(dy)
  grad = jax.jit(native.conv3x3_kernel_grad)
  first = np.asarray(grad(xp, dy))
  for _ in range(20):
    np.testing.assert_array_equal(np.asarray(grad(xp, dy)), first)


_ISA_CHECK = """
import sys
import numpy as np
import jax.numpy as jnp
from kd_jax import native
native.FLAGS = tuple("-march=" + sys.argv[1] if f == "-march=native" else f
                     for f in native.FLAGS)
assert native.library() is not None
sys.path.insert(0, sys.argv[2])
import test_native as t
for cin, cout in ((8, 8), (16, 16), (32, 32), (16, 8), (8, 32), (64, 64)):
  x, k, dy = t._data(2, 5, 19, cin, cout)
  xp = jnp.asarray(np.pad(x, t.PAD))
  np.testing.assert_allclose(native.conv3x3_forward(xp, jnp.asarray(k)),
                             t._numpy_conv(x, k), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(native.conv3x3_kernel_grad(xp, jnp.asarray(dy)),
                             t._numpy_kernel_grad(x, dy), rtol=1e-5, atol=1e-3)
assert native.vector_width() == int(sys.argv[3])
print("ok")
"""


def _cpu_has(flag):
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      return flag in f.read().split()
  except OSError:
    return False


@needs_library
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 ISA levels")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
def test_other_vector_widths_compute_the_same(march, tmp_path):
  """The register blockings for 4-float (SSE) and 8-float (AVX2) vectors,
  compiled for those ISAs, against the numpy formula (the machine running
  the suite compiles only its own)."""
  if march == "x86-64-v3" and not _cpu_has("avx2"):
    pytest.skip("no AVX2 here")
  out = subprocess.run(
      [sys.executable, "-c", _ISA_CHECK, march, os.path.dirname(__file__),
       {"x86-64": "4", "x86-64-v3": "8"}[march]],
      capture_output=True, text=True, check=False,
      env={**os.environ, "KD_JAX_NATIVE_CACHE": str(tmp_path)})
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
