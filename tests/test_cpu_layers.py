"""kd_jax.cpu_layers: each form equals the flax layer it stands in for."""
import dataclasses
import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import cpu_layers, models


def _normal(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _grads(module, variables, x, dy, **kw):
  """Output and the gradients of Σ y·dy w.r.t. the params and x."""

  def f(params, x):
    y = module.apply({**variables, "params": params}, x, **kw)
    if isinstance(y, tuple):  # (y, updated variables) with mutable=...
      y = y[0]
    return jnp.sum(y * dy), y

  (_, y), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      variables["params"], x)
  return y, g


def _close(a, b, rtol=2e-5, atol=2e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol,
                               atol=atol)


def _assert_layer_matches_flax(ours, theirs, x):
  """Same variable shapes; output and gradients equal to float32 rounding.
  Returns flax's variables."""
  v = theirs.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == \
      jax.tree.map(jnp.shape, v)
  y1, g1 = _grads(ours, v, x, 1.0)
  y2, g2 = _grads(theirs, v, x, 1.0)
  assert y1.shape == y2.shape
  _close(y1, y2, rtol=1e-5, atol=1e-5)
  _close(g1, g2, rtol=1e-4, atol=1e-4)
  return v


# --- BatchNorm ----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (2, 16, 16, 8), (3, 7)])
@pytest.mark.parametrize("scale_bias", [(True, True), (False, True),
                                        (True, False)])
def test_batchnorm_train_matches_flax(shape, scale_bias):
  kw = dict(use_running_average=False, momentum=0.9, use_scale=scale_bias[0],
            use_bias=scale_bias[1])
  ours, theirs = cpu_layers.BatchNorm(**kw), nn.BatchNorm(**kw)
  x = _normal(shape, 0) * 2.0 + 0.5
  v = theirs.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == \
      jax.tree.map(jnp.shape, v)
  v = {**v, "params": jax.tree.map(lambda p: p + _normal(p.shape, 5) * 0.1,
                                   v["params"])}
  dy = _normal(shape, 2)
  y1, g1 = _grads(ours, v, x, dy, mutable=["batch_stats"])
  y2, g2 = _grads(theirs, v, x, dy, mutable=["batch_stats"])
  _close(y1, y2)
  _close(g1, g2, rtol=1e-4, atol=1e-5)
  _, s1 = ours.apply(v, x, mutable=["batch_stats"])
  _, s2 = theirs.apply(v, x, mutable=["batch_stats"])
  _close(s1, s2)
  kw["use_running_average"] = True
  _close(cpu_layers.BatchNorm(**kw).apply(s1 | {"params": v["params"]}, x),
         nn.BatchNorm(**kw).apply(s2 | {"params": v["params"]}, x))


def test_batchnorm_numpy_formula():
  """y = (x − mean)/sqrt(var + ε)·γ + β with the biased variance, and the
  closed-form gradients against central finite differences in float64."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 4, 3)).astype(np.float32)
  gamma, beta = np.float32([1.5, -0.5, 2.0]), np.float32([0.1, 0.2, -0.3])
  y, mean, var = cpu_layers.normalize_train(jnp.asarray(x), gamma, beta, 1e-5)
  m, v = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).var(0)
  np.testing.assert_allclose(mean, m, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(var, v, rtol=1e-5)
  np.testing.assert_allclose(y, (x - m) / np.sqrt(v + 1e-5) * gamma + beta,
                             rtol=1e-5, atol=1e-5)
  w = rng.normal(size=x.shape)

  def loss64(xx):
    mm, vv = xx.reshape(-1, 3).mean(0), xx.reshape(-1, 3).var(0)
    return np.sum(((xx - mm) / np.sqrt(vv + 1e-5) * gamma + beta) * w)

  dx = jax.grad(lambda xx: jnp.sum(cpu_layers.normalize_train(
      xx, gamma, beta, 1e-5)[0] * w))(jnp.asarray(x))
  x64, eps, fd = x.astype(np.float64), 1e-6, np.zeros(x.shape)
  for idx in np.ndindex(x.shape):
    hi, lo = x64.copy(), x64.copy()
    hi[idx] += eps
    lo[idx] -= eps
    fd[idx] = (loss64(hi) - loss64(lo)) / (2 * eps)
  np.testing.assert_allclose(dx, fd, rtol=1e-3, atol=1e-4)


def test_batchnorm_constant_channel_has_finite_gradients():
  x = jnp.ones((2, 3, 3, 2)).at[..., 1].set(_normal((2, 3, 3), 0))
  v = cpu_layers.BatchNorm(use_running_average=False).init(jax.random.key(0),
                                                           x)
  _, g = _grads(cpu_layers.BatchNorm(use_running_average=False), v, x,
                _normal(x.shape, 1), mutable=["batch_stats"])
  assert all(np.isfinite(np.asarray(t)).all() for t in jax.tree.leaves(g))


# --- Conv ---------------------------------------------------------------------

def _primitives(f, *args):
  return {e.primitive.name for e in jax.make_jaxpr(f)(*args).jaxpr.eqns}


@pytest.mark.parametrize("cin,cout,kernel,padding", [
    (8, 4, (1, 1), "SAME"), (3, 5, (1, 1), "VALID"),
    (2, 3, (1, 1), ((1, 0), (2, 1))),
    (4, 6, (3, 3), "SAME"), (1, 8, (3, 3), "SAME"),  # XLA's convolution
])
@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_matches_flax(cin, cout, kernel, padding, use_bias):
  x = _normal((2, 9, 7, cin), 0)
  kw = dict(features=cout, kernel_size=kernel, padding=padding,
            use_bias=use_bias)
  ours = cpu_layers.Conv(**kw)
  v = _assert_layer_matches_flax(ours, nn.Conv(**kw), x)
  rewritten = kernel == (1, 1)
  prims = _primitives(lambda x: ours.apply(v, x), x)
  assert ("conv_general_dilated" in prims) != rewritten, prims


def test_conv_1x1_numpy_formula():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
  k = rng.normal(size=(1, 1, 3, 2)).astype(np.float32)
  y = cpu_layers.conv_general_dilated(
      x, k, (1, 1), ((1, 0), (0, 2)),
      dimension_numbers=jax.lax.conv_dimension_numbers(
          x.shape, k.shape, ("NHWC", "HWIO", "NHWC")))
  xp = np.pad(x, ((0, 0), (1, 0), (0, 2), (0, 0)))
  np.testing.assert_allclose(y, np.einsum("bhwc,co->bhwo", xp, k[0, 0]),
                             rtol=1e-5, atol=1e-5)


# --- ConvTranspose ------------------------------------------------------------

@pytest.mark.parametrize("kernel,strides,padding", [
    ((2, 2), (2, 2), "SAME"), ((3, 3), (2, 2), "SAME"),
    ((3, 3), (2, 2), "VALID"), ((4, 3), (2, 3), ((1, 2), (0, 1))),
    ((3, 3), (1, 1), "SAME"),
])
@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_transpose_matches_flax(kernel, strides, padding, use_bias):
  x = _normal((2, 5, 6, 3), 0)
  kw = dict(features=4, kernel_size=kernel, strides=strides, padding=padding,
            use_bias=use_bias)
  _assert_layer_matches_flax(cpu_layers.ConvTranspose(**kw),
                             nn.ConvTranspose(**kw), x)


def test_conv_transpose_has_no_dilated_convolution():
  x = _normal((1, 4, 4, 3), 0)
  m = cpu_layers.ConvTranspose(2, (3, 3), strides=(2, 2))
  v = m.init(jax.random.key(0), x)
  text = str(jax.make_jaxpr(jax.grad(
      lambda p: jnp.sum(m.apply({"params": p}, x))))(v["params"]))
  assert "lhs_dilation=(2, 2)" not in text


# --- apply --------------------------------------------------------------------

CASES = [("unet", dict(num_classes=3, width=4, depth=2), (2, 16, 16, 1)),
         ("squeeze_unet", dict(num_classes=3, width=4, depth=2),
          (2, 16, 16, 1)),
         ("transunet_tiny", dict(num_classes=3, image_size=32,
                                 dropout_rate=0.0), (2, 32, 32, 1))]


@pytest.mark.parametrize("name,kw,shape", CASES)
def test_apply_keeps_variables_and_outputs(name, kw, shape):
  model = models.build(name, **kw)
  cpu = cpu_layers.apply(model, backend="cpu")
  fields = {f.name for f in dataclasses.fields(model)}
  swapped = {k for k in fields if getattr(cpu, k) is not getattr(model, k)}
  assert swapped and swapped <= {"conv", "norm", "conv_transpose",
                                 "std_conv"}
  x = _normal(shape, 0)
  v = model.init(jax.random.key(1), x, train=False)
  v2 = cpu.init(jax.random.key(1), x, train=False)
  for a, b in zip(jax.tree_util.tree_leaves_with_path(v),
                  jax.tree_util.tree_leaves_with_path(v2), strict=True):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])  # Same init, same names.
  (y1, _), _ = model.apply(v, x, train=True, mutable=["batch_stats"])
  (y2, _), _ = cpu.apply(v, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)


def test_apply_only_on_a_cpu_backend_and_only_flax_defaults():
  model = models.build("unet", num_classes=3, width=4, depth=2)
  assert cpu_layers.apply(model, backend="gpu") is model
  assert cpu_layers.apply(model, backend="tpu") is model
  mine = model.clone(norm=functools.partial(nn.BatchNorm, axis_name="d"))
  out = cpu_layers.apply(mine, backend="cpu")
  assert out.norm is mine.norm and out.conv is not mine.conv
  only = cpu_layers.apply(model, forms=("norm",), backend="cpu")
  assert only.norm is cpu_layers.BatchNorm and only.conv is model.conv
  assert only.pool is model.pool  # flax's max-pool: no CPU form
  with pytest.raises(ValueError, match="unknown CPU forms"):
    cpu_layers.apply(model, forms=("winograd",), backend="cpu")


def test_models_do_not_import_cpu_code():
  root = os.path.join(os.path.dirname(__file__), "..", "kd_jax", "models")
  for name in os.listdir(root):
    if name.endswith(".py"):
      with open(os.path.join(root, name)) as f:
        text = f.read()
      assert "cpu_layers" not in text and "kd_jax.native" not in text, name


# --- no side effects on import ------------------------------------------------

_PROBE = """
import ctypes, os, sys
calls = []
real = ctypes.CDLL
class Spy(real):
  def __getattr__(self, name):
    calls.append(name)
    return real.__getattr__(self, name)
ctypes.CDLL = Spy
os.environ["XLA_FLAGS"] = "--xla_dump_to=/nonexistent_probe"
before = dict(os.environ)
import jax
threefry = jax.config.jax_threefry_partitionable
cache = jax.config.jax_compilation_cache_dir
import kd_jax, kd_jax.main, kd_jax.train, kd_jax.export, kd_jax.study
import kd_jax.evaluate.__main__
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
assert jax.config.jax_threefry_partitionable == threefry
assert jax.config.jax_compilation_cache_dir == cache
assert "mallopt" not in calls, calls
print("untouched", threefry)
"""


def test_importing_kd_jax_changes_no_process_state():
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "XLA_"))}
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env,
                       capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "untouched True" in out.stdout  # jax's default threefry, kept


def test_config_layers_choose_the_forms():
  from kd_jax import train  # pylint: disable=import-outside-toplevel
  cfg = dict(name="unet", width=4, depth=2)
  flax_model = train._build_model(cfg, 3, jnp.float32, "flax")  # pylint: disable=protected-access
  cpu_model = train._build_model(cfg, 3, jnp.float32, "cpu")  # pylint: disable=protected-access
  assert flax_model.norm is nn.BatchNorm and flax_model.conv is nn.Conv
  assert cpu_model.norm is cpu_layers.BatchNorm
  assert cpu_model.conv_transpose is cpu_layers.ConvTranspose
  assert train.LAYERS == ("flax", "cpu")
