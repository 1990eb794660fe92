"""kd_jax.models.layers against the flax layers they replace and numpy."""
import re
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models import layers

SHAPES = [(2, 5, 6, 3), (3, 7, 4), (6, 5)]


def _inputs(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(1.5, 2.0, shape).astype(np.float32)
  dy = rng.normal(size=shape).astype(np.float32)
  c = shape[-1]
  params = {"scale": np.linspace(0.5, 1.5, c, dtype=np.float32),
            "bias": np.linspace(-1.0, 1.0, c, dtype=np.float32)}
  return jnp.asarray(x, dtype), jnp.asarray(dy, dtype), params


def _train_grads(cls, x, dy, params, *, through_stats=False, jit=True):
  """Gradients (params, x) of Σ y·dy [+ Σ mean² + Σ var] in training mode,
  y, and the updated batch statistics."""
  bn = cls(use_running_average=False, momentum=0.9, epsilon=1e-3)
  stats = bn.init(jax.random.key(0), x)["batch_stats"]

  def loss(p, x):
    y, new = bn.apply({"params": p, "batch_stats": stats}, x,
                      mutable=["batch_stats"])
    total = jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))
    if through_stats:
      new_stats = new["batch_stats"]
      total += jnp.sum(new_stats["mean"] ** 2) + jnp.sum(new_stats["var"])
    return total, (y, new["batch_stats"])

  fn = jax.grad(loss, argnums=(0, 1), has_aux=True)
  return (jax.jit(fn) if jit else fn)(params, x)


def _assert_tree_close(a, b, rtol, atol):
  jax.tree.map(lambda p, q: np.testing.assert_allclose(
      np.asarray(p, np.float32), np.asarray(q, np.float32), rtol=rtol,
      atol=atol), a, b)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("through_stats", [False, True])
def test_batchnorm_train_matches_flax(shape, through_stats):
  x, dy, params = _inputs(shape, jnp.float32)
  mine = _train_grads(layers.BatchNorm, x, dy, params,
                      through_stats=through_stats)
  ref = _train_grads(nn.BatchNorm, x, dy, params, through_stats=through_stats)
  _assert_tree_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_batchnorm_bfloat16_matches_flax():
  x, dy, params = _inputs((4, 6, 6, 8), jnp.bfloat16)
  (g, gx), (y, stats) = _train_grads(layers.BatchNorm, x, dy, params)
  (rg, rgx), (ry, rstats) = _train_grads(nn.BatchNorm, x, dy, params)
  assert y.dtype == ry.dtype == jnp.float32  # bf16 input, f32 params.
  assert gx.dtype == jnp.bfloat16
  _assert_tree_close((g, y, stats), (rg, ry, rstats), rtol=2e-2, atol=2e-2)
  _assert_tree_close(gx, rgx, rtol=5e-2, atol=5e-2)


def test_batchnorm_dtype_output():
  x, _, _ = _inputs((2, 4, 4, 3), jnp.float32)
  bn = layers.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
  y, _ = bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16


def test_batchnorm_jit_equals_no_jit():
  x, dy, params = _inputs((2, 5, 6, 3), jnp.float32)
  jitted = _train_grads(layers.BatchNorm, x, dy, params, through_stats=True)
  eager = _train_grads(layers.BatchNorm, x, dy, params, through_stats=True,
                       jit=False)
  _assert_tree_close(jitted, eager, rtol=1e-6, atol=1e-6)


def test_batchnorm_numpy_formula():
  """Output and running averages against the formula, in numpy float64."""
  x, _, params = _inputs((3, 4, 5, 2), jnp.float32)
  bn = layers.BatchNorm(use_running_average=False, momentum=0.9,
                        epsilon=1e-3)
  old = {"mean": jnp.array([0.5, -1.0]), "var": jnp.array([2.0, 0.25])}
  y, new = bn.apply({"params": params, "batch_stats": old}, x,
                    mutable=["batch_stats"])
  xn = np.asarray(x, np.float64).reshape(-1, 2)
  mean, var = xn.mean(0), xn.var(0)
  want = ((np.asarray(x, np.float64) - mean) / np.sqrt(var + 1e-3)
          * params["scale"] + params["bias"])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["mean"],
                             0.9 * np.asarray(old["mean"]) + 0.1 * mean,
                             rtol=1e-6)
  np.testing.assert_allclose(new["batch_stats"]["var"],
                             0.9 * np.asarray(old["var"]) + 0.1 * var,
                             rtol=1e-5)
  # Evaluation uses the running averages.
  y_eval = bn.clone(use_running_average=True).apply(
      {"params": params, "batch_stats": new["batch_stats"]}, x)
  r_mean = np.asarray(new["batch_stats"]["mean"], np.float64)
  r_var = np.asarray(new["batch_stats"]["var"], np.float64)
  np.testing.assert_allclose(
      y_eval, (np.asarray(x, np.float64) - r_mean) / np.sqrt(r_var + 1e-3)
      * params["scale"] + params["bias"], rtol=1e-5, atol=1e-5)


def test_batchnorm_constant_channel():
  """A constant channel has variance 0 (E[x²] − E[x]² may round below 0 and
  is clipped): finite gradients, equal to flax's."""
  x, dy, params = _inputs((4, 3, 3, 2), jnp.float32)
  x = x.at[..., 1].set(3.7)
  mine = _train_grads(layers.BatchNorm, x, dy, params, through_stats=True)
  ref = _train_grads(nn.BatchNorm, x, dy, params, through_stats=True)
  assert all(np.isfinite(v).all() for v in jax.tree.leaves(mine))
  _assert_tree_close(mine, ref, rtol=1e-4, atol=1e-4)


def test_batchnorm_variables_and_names_match_flax():
  """Same variable tree (auto-named BatchNorm_i), shapes and initial values,
  so a checkpoint of either restores into the other."""

  def block(cls):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = cls(use_running_average=True)(x)
        return cls(use_running_average=True, name="bn")(x)
    return Block()

  x = jnp.ones((2, 3, 3, 4))
  mine = block(layers.BatchNorm).init(jax.random.key(0), x)
  ref = block(nn.BatchNorm).init(jax.random.key(0), x)
  assert jax.tree.structure(mine) == jax.tree.structure(ref)
  assert set(mine["params"]) == {"BatchNorm_0", "bn"}
  _assert_tree_close(mine, ref, rtol=0, atol=0)
  # Evaluation with flax's variables gives flax's output.
  xs = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
  stats = {"BatchNorm_0": {"mean": jnp.full(4, 0.3), "var": jnp.full(4, 2.0)},
           "bn": {"mean": jnp.full(4, -0.1), "var": jnp.full(4, 0.5)}}
  v = {"params": ref["params"], "batch_stats": stats}
  np.testing.assert_allclose(block(layers.BatchNorm).apply(v, xs),
                             block(nn.BatchNorm).apply(v, xs), rtol=1e-6)


def test_channel_sums_both_branches():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(300, 7)), jnp.float32)
  want = np.asarray(x, np.float64).sum(0)
  for fn in (layers.channel_sums, layers._sum_matmul, layers._sum_reduce):  # pylint: disable=protected-access
    np.testing.assert_allclose(jax.jit(fn)(x), want, rtol=1e-5, atol=1e-5)


def test_channel_sums_is_a_dot_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("the matmul branch is the CPU one")
  hlo = jax.jit(layers.channel_sums).lower(
      jnp.ones((64, 8))).compile().as_text()
  assert " dot(" in hlo and " reduce(" not in hlo, hlo


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 5, 7, 2)])
def test_max_pool_2x2_matches_flax(shape):
  x = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)
  dy = jnp.asarray(np.random.default_rng(4).normal(
      size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])), jnp.float32)

  def grads(pool):
    return jax.jit(jax.value_and_grad(lambda x: jnp.sum(pool(x) * dy)))(x)

  mine = grads(layers.max_pool_2x2)
  ref = grads(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)))
  np.testing.assert_allclose(layers.max_pool_2x2(x),
                             nn.max_pool(x, (2, 2), strides=(2, 2)))
  # Random normal values: no ties, so the gradients agree exactly.
  _assert_tree_close(mine, ref, rtol=1e-6, atol=0)


def test_max_pool_2x2_ties_share_the_gradient():
  x = jnp.asarray([[1.0, 1.0], [0.0, 1.0]]).reshape(1, 2, 2, 1)
  g = jax.grad(lambda x: jnp.sum(layers.max_pool_2x2(x)))(x)
  np.testing.assert_allclose(g[0, ..., 0], [[1 / 3, 1 / 3], [0, 1 / 3]],
                             rtol=1e-6)


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 9, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool
    ((2, 8, 8, 3), (3, 3), (2, 2), "SAME"),  # transunet's
    ((1, 7, 10, 2), (3, 3), (2, 2), "VALID"),
    ((1, 6, 7, 2), (2, 3), (1, 2), ((0, 1), (2, 0))),
])
def test_max_pool_matches_flax(shape, window, strides, padding):
  x = jnp.asarray(np.random.default_rng(13).normal(size=shape), jnp.float32)
  ref_pool = partial(nn.max_pool, window_shape=window, strides=strides,
                     padding=padding)
  want = ref_pool(x)
  np.testing.assert_array_equal(
      layers.max_pool(x, window, strides, padding), want)
  dy = jnp.asarray(np.random.default_rng(14).normal(size=want.shape),
                   jnp.float32)

  def grads(pool):
    return jax.jit(jax.value_and_grad(lambda x: jnp.sum(pool(x) * dy)))(x)

  # No ties in normal draws: the same gradient, up to the order in which
  # overlapping windows add into one input.
  _assert_tree_close(grads(partial(layers.max_pool, window=window,
                                   strides=strides, padding=padding)),
                     grads(ref_pool), rtol=1e-6, atol=1e-6)


def test_max_pool_ties_share_the_gradient():
  """A 3×3 stride-2 pool (padding 1) over a 3×3 input whose maximum 2 is
  tied at three places in the top-left window: dx = Σ over windows of
  dy·[x = window max] / (number of tied places in the window)."""
  x = np.array([[2, 2, 0], [2, 1, 0], [0, 0, 3]], np.float32)
  xj = jnp.asarray(x).reshape(1, 3, 3, 1)
  dy = np.array([[1.0, 10.0], [100.0, 1000.0]], np.float32)
  g = jax.grad(lambda x: jnp.sum(layers.max_pool(
      x, (3, 3), (2, 2), ((1, 1), (1, 1))) * dy.reshape(1, 2, 2, 1)))(xj)
  want = np.zeros((5, 5))  # The padded input.
  xp = np.pad(x, 1, constant_values=-np.inf)
  for o in range(2):
    for q in range(2):
      win = xp[2 * o:2 * o + 3, 2 * q:2 * q + 3]
      hit = win == win.max()
      want[2 * o:2 * o + 3, 2 * q:2 * q + 3] += dy[o, q] * hit / hit.sum()
  np.testing.assert_allclose(g[0, ..., 0], want[1:4, 1:4], rtol=1e-6)
  assert abs(float(g.sum()) - dy.sum()) < 1e-3  # Every dy is passed on.


# (input channels, kernel, strides, padding, groups): matmuls on CPU (one
# input channel or 1×1, stride 1), depthwise tap sums (groups = channels),
# batched einsums (grouped 1×1), then cases left to XLA's convolution.
CONV_CASES = [
    (1, (3, 3), 1, "SAME", 1),
    (1, (5, 3), 1, "VALID", 1),
    (1, (3, 3), 1, ((2, 0), (1, 1)), 1),
    (6, (1, 1), 1, "SAME", 1),
    (6, (3, 3), 1, "SAME", 6),
    (6, (3, 3), 2, "SAME", 6),
    (6, (5, 5), 1, "SAME", 6),
    (6, (3, 3), 2, ((0, 2), (1, 0)), 6),
    (6, (3, 2), 3, "VALID", 6),
    (6, (1, 1), 1, "SAME", 3),
    (1, (3, 3), 2, "SAME", 1),
    (4, (3, 3), 1, "SAME", 1),
    (4, (3, 3), 1, "SAME", 2),
    (6, (3, 3), 1, ((-1, 1), (1, 1)), 6),
    (1, (3, 3), 1, ((-1, 1), (1, 1)), 1),
]


def _assert_conv_matches_flax(x, tol, **kw):
  """layers.Conv(**kw) against nn.Conv(**kw): the same initial variables,
  then values and gradients (input and variables) within `tol`."""
  mine, ref = layers.Conv(**kw), nn.Conv(**kw)
  variables = ref.init(jax.random.key(0), x)
  # Same variables, shapes and initial values.
  _assert_tree_close(mine.init(jax.random.key(0), x), variables, 0, 0)
  variables = jax.tree.map(  # A non-zero bias, so its gradient path counts.
      lambda v: v + 0.1, variables)

  def value_and_grads(module):
    def loss(v, x):
      return jnp.sum(jnp.sin(module.apply(v, x)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)

  _assert_tree_close(value_and_grads(mine), value_and_grads(ref),
                     rtol=tol, atol=tol)


@pytest.mark.parametrize("cin,kernel,strides,padding,groups", CONV_CASES)
@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_matches_flax(cin, kernel, strides, padding, groups, use_bias):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 9, 10, cin)), jnp.float32)
  _assert_conv_matches_flax(
      x, 1e-5, features=cin if groups == cin > 1 else 6, kernel_size=kernel,
      strides=strides, padding=padding, feature_group_count=groups,
      use_bias=use_bias)


# (input channels, output channels, padding, height, width): 3×3 stride-1
# convolutions that keep the width, computed over column pairs on CPU.
PAIRED_CASES = [
    (4, 6, "SAME", 5, 32),
    (16, 16, "SAME", 3, 34),
    (3, 5, ((1, 1), (0, 2)), 4, 32),
    (8, 8, ((0, 0), (2, 0)), 6, 32),
]


@pytest.fixture
def without_native(monkeypatch):
  """The pairs are the form for these shapes where kd_jax.native's kernels
  did not compile (and for channel counts they do not take)."""
  monkeypatch.setattr(layers, "_native_form", lambda *_: None)


@pytest.mark.parametrize("cin,cout,padding,h,w", PAIRED_CASES)
def test_paired_conv_matches_flax(without_native, cin, cout, padding, h, w):  # pylint: disable=redefined-outer-name,unused-argument
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(2, h, w, cin)), jnp.float32)
  # 16 channels × 9 taps summed in another order: 1e-4.
  _assert_conv_matches_flax(x, 1e-4, features=cout, kernel_size=(3, 3),
                            padding=padding)


def test_pair_kernel_formula():
  """k2[i, b, s·C + c, t·O + o] = k[i, 2b + s − t, c, o], 0 outside."""
  rng = np.random.default_rng(12)
  k = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
  got = np.asarray(layers._pair_kernel(jnp.asarray(k)))  # pylint: disable=protected-access
  assert got.shape == (3, 2, 4, 8)
  want = np.zeros((3, 2, 2, 2, 2, 4), np.float32)
  for b in range(2):
    for s in range(2):
      for t in range(2):
        if 0 <= 2 * b + s - t < 3:
          want[:, b, s, :, t] = k[:, 2 * b + s - t]
  np.testing.assert_array_equal(got, want.reshape(3, 2, 4, 8))


@pytest.mark.parametrize("w,pads", [(6, ((1, 1), (1, 1))),
                                    (8, ((0, 2), (2, 0)))])
def test_paired_conv_numpy_formula(w, pads):
  """The CPU branch itself against y[b, i, j, o] = Σ_{u,v,c}
  x_pad[b, i + u, j + v, c]·k[u, v, c, o], at widths the rule skips."""
  rng = np.random.default_rng(13)
  x = rng.normal(size=(2, 5, w, 3)).astype(np.float32)
  k = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
  got = layers._paired_conv(jnp.asarray(x), jnp.asarray(k), pads, None, None)  # pylint: disable=protected-access
  xp = np.pad(x.astype(np.float64), ((0, 0), *pads, (0, 0)))
  ho = xp.shape[1] - 2
  want = np.zeros((2, ho, w, 2))
  for u in range(3):
    for v in range(3):
      want += np.einsum("bhwc,co->bhwo", xp[:, u:u + ho, v:v + w], k[u, v])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_few_channel_convs_are_paired_on_cpu(without_native):  # pylint: disable=redefined-outer-name,unused-argument
  """XLA compiles the pairs' convolution (half the width, twice the
  channels) in the forward and both gradients (at most 8 channels on one
  side) or in the forward only (16 → 16); 32 input channels or a narrow
  input keep XLA's own."""
  if jax.default_backend() != "cpu":
    pytest.skip("the pairs are the CPU form")

  def convs(cin, w, cout=8):
    module = layers.Conv(cout, (3, 3))
    x = jnp.ones((2, 8, w, cin))
    v = module.init(jax.random.key(0), x)
    grad = jax.grad(lambda v, x: jnp.sum(module.apply(v, x) ** 2),
                    argnums=(0, 1))
    text = jax.jit(grad).lower(v, x).compile().as_text()
    return [line for line in text.splitlines() if " convolution(" in line]

  def out_channels(line):
    return line.split("=")[1].split("]")[0].split(",")[-1]

  # 8 → 8 channels over pairs: 16 → 16 in the forward convolution and in
  # those of both gradients (input and kernel).
  paired = convs(8, 32)
  assert len(paired) == 3 and all(
      out_channels(line) == "16" for line in paired), paired
  for cin, w in ((32, 32), (8, 16)):
    assert all(out_channels(line) != "16" for line in convs(cin, w))
  # 16 → 16: the forward over pairs (32 → 32), the gradients XLA's own.
  hybrid = convs(16, 32, cout=16)
  assert sorted(out_channels(line) for line in hybrid) == ["16", "16", "32"]


def test_conv_one_channel_numpy_formula():
  """y[b, i, j, o] = Σ_{u,v} x_pad[b, i + u, j + v]·k[u, v, 0, o] + bias[o]."""
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2, 5, 4, 1)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 1, 2)).astype(np.float32)
  bias = np.array([0.5, -1.0], np.float32)
  y = layers.Conv(2, (3, 3)).apply(
      {"params": {"kernel": kernel, "bias": bias}}, jnp.asarray(x))
  xp = np.pad(x[..., 0].astype(np.float64), ((0, 0), (1, 1), (1, 1)))
  want = np.zeros((2, 5, 4, 2))
  for u in range(3):
    for v in range(3):
      want += xp[:, u:u + 5, v:v + 4, None] * kernel[u, v, 0]
  np.testing.assert_allclose(y, want + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cin,k,strides,side", [
    (1, 3, 1, 6), (5, 1, 1, 6), (5, 3, 1, 2), (5, 3, 2, 4), (5, 1, 2, 3)])
def test_conv_as_matmul_equals_xla_convolution(cin, k, strides, side):
  """The CPU branch itself (what other platforms skip) against lax."""
  rng = np.random.default_rng(7)
  dn = ("NHWC", "HWIO", "NHWC")
  x = jnp.asarray(rng.normal(size=(2, side, side + 1, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, 3)), jnp.float32)
  pads = ((k // 2, k // 2),) * 2
  want = jax.lax.conv_general_dilated(x, w, (strides,) * 2, pads,
                                      dimension_numbers=dn)
  got = layers._conv_as_matmul(x, w, (strides,) * 2, pads, None, None)  # pylint: disable=protected-access
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# (input side, kernel, strides, padding): outputs of at most 2×2, computed
# as a matmul over the taps on CPU.
TINY_CASES = [
    (2, (3, 3), 1, "SAME"),
    (1, (3, 3), 1, "SAME"),
    (4, (3, 3), 2, "SAME"),
    (3, (3, 3), 2, ((1, 1), (1, 1))),
    (2, (3, 3), 2, "SAME"),
    (4, (1, 1), 2, "SAME"),
    (4, (3, 3), 1, "VALID"),
    (2, (3, 2), 1, ((2, 0), (0, 1))),
]


@pytest.mark.parametrize("side,kernel,strides,padding", TINY_CASES)
def test_tiny_output_conv_matches_flax(side, kernel, strides, padding):
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.normal(size=(3, side, side, 24)), jnp.float32)
  # 24 channels × up to 9 taps summed in another order: 1e-4.
  _assert_conv_matches_flax(x, 1e-4, features=16, kernel_size=kernel,
                            strides=strides, padding=padding)


def test_conv_one_channel_1x1_and_tiny_are_dots_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("the matmul form is the CPU one")

  def hlo(cin, k, side):
    module = layers.Conv(4, (k, k))
    x = jnp.ones((2, side, side, cin))
    v = module.init(jax.random.key(0), x)
    grad = jax.grad(lambda v, x: jnp.sum(module.apply(v, x)), argnums=(0, 1))
    return jax.jit(grad).lower(v, x).compile().as_text()

  for cin, k, side in ((1, 3, 8), (3, 1, 8), (3, 3, 2)):
    text = hlo(cin, k, side)
    assert " dot(" in text and " convolution(" not in text, text
  assert " convolution(" in hlo(3, 3, 3)  # Not a case it rewrites.


@pytest.mark.parametrize("cin,groups,width", [(1, 1, 4), (4, 4, 4),
                                              (4, 1, 32)])
def test_conv_bfloat16_dtype(cin, groups, width):
  x = jnp.asarray(np.random.default_rng(9).normal(size=(1, 4, width, cin)),
                  jnp.bfloat16)
  kw = dict(features=cin if groups > 1 else 3, kernel_size=(3, 3),
            feature_group_count=groups, dtype=jnp.bfloat16)
  module = layers.Conv(**kw)
  v = module.init(jax.random.key(0), x)
  y = module.apply(v, x)
  assert y.dtype == jnp.bfloat16 and v["params"]["kernel"].dtype == jnp.float32
  ref = nn.Conv(**kw).apply(v, x)
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)
  g = jax.grad(lambda v: jnp.sum(module.apply(v, x).astype(jnp.float32)))(v)
  assert g["params"]["kernel"].dtype == jnp.float32


def test_depthwise_and_grouped_have_no_convolution_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("the rewrites are the CPU ones")
  for features, kernel, strides, groups in ((8, 3, 2, 8), (8, 1, 1, 4)):
    module = layers.Conv(features, (kernel, kernel), strides=strides,
                         feature_group_count=groups)
    x = jnp.ones((2, 8, 8, 8))
    v = module.init(jax.random.key(0), x)
    grad = jax.grad(lambda v, x: jnp.sum(module.apply(v, x)), argnums=(0, 1))
    text = jax.jit(grad).lower(v, x).compile().as_text()
    assert " convolution(" not in text, text


def test_depthwise_conv_numpy_formula():
  """y[b, o, p, c] = Σ_{u,v} x_pad[b, s·o + u, s·p + v, c] · k[u, v, 0, c]
  and its kernel gradient Σ_{b,o,p} x_pad[b, s·o + u, s·p + v, c] · dy."""
  rng = np.random.default_rng(8)
  x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
  k = rng.normal(size=(3, 3, 1, 3)).astype(np.float32)
  pads, s = ((1, 1), (0, 2)), 2
  y, vjp = jax.vjp(lambda x, k: layers.depthwise_conv(x, k, (s, s), pads),
                   jnp.asarray(x), jnp.asarray(k))
  xp = np.pad(x.astype(np.float64), ((0, 0), *pads, (0, 0)))
  ho, wo = (7 + 2 - 3) // s + 1, (6 + 2 - 3) // s + 1
  want = np.zeros((2, ho, wo, 3))
  for u in range(3):
    for v in range(3):
      want += (xp[:, u:u + s * (ho - 1) + 1:s, v:v + s * (wo - 1) + 1:s]
               * k[u, v, 0])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  dy = rng.normal(size=want.shape).astype(np.float32)
  _, dk = vjp(jnp.asarray(dy))
  want_dk = np.zeros((3, 3, 1, 3))
  for u in range(3):
    for v in range(3):
      view = xp[:, u:u + s * (ho - 1) + 1:s, v:v + s * (wo - 1) + 1:s]
      want_dk[u, v, 0] = np.sum(view * dy, axis=(0, 1, 2))
  np.testing.assert_allclose(dk, want_dk, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,strides,padding", [
    (2, 2, "SAME"), (3, 2, "SAME"), (2, 2, "VALID"), (3, 2, "VALID"),
    (4, 2, "SAME"), (3, 3, "SAME"), (1, 2, "SAME"), (3, 1, "SAME"),
    (3, 2, ((1, 2), (0, 1))), (5, 3, "VALID"),
])
@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_transpose_matches_flax(kernel, strides, padding, use_bias):
  x = jnp.asarray(np.random.default_rng(10).normal(size=(2, 5, 6, 3)),
                  jnp.float32)
  kw = dict(features=4, kernel_size=(kernel, kernel),
            strides=(strides, strides), padding=padding, use_bias=use_bias)
  mine, ref = layers.ConvTranspose(**kw), nn.ConvTranspose(**kw)
  variables = ref.init(jax.random.key(0), x)
  _assert_tree_close(mine.init(jax.random.key(0), x), variables, 0, 0)
  variables = jax.tree.map(lambda v: v + 0.1, variables)

  def value_and_grads(module):
    def loss(v, x):
      return jnp.sum(jnp.sin(module.apply(v, x)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)

  got, want = value_and_grads(mine), value_and_grads(ref)
  _assert_tree_close(got, want, rtol=1e-5, atol=1e-4)


def test_conv_transpose_numpy_formula():
  """Stride-2 3×3 'SAME' (lax pads the 2-dilated input by (2, 1)):
  y[o] = Σ_t x_dilated_padded[o + t]·k[t], no kernel flip."""
  rng = np.random.default_rng(11)
  x = rng.normal(size=(1, 3, 4, 2)).astype(np.float32)
  k = rng.normal(size=(3, 3, 2, 5)).astype(np.float32)
  y = layers.conv_transpose(jnp.asarray(x), jnp.asarray(k), (2, 2), "SAME")
  xd = np.zeros((1, 5, 7, 2))
  xd[:, ::2, ::2] = x
  xd = np.pad(xd, ((0, 0), (2, 1), (2, 1), (0, 0)))
  want = np.zeros((1, 6, 8, 5))
  for u in range(3):
    for v in range(3):
      want += np.einsum("bhwc,co->bhwo", xd[:, u:u + 6, v:v + 8], k[u, v])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_conv_transpose_has_no_dilated_convolution():
  x = jnp.ones((2, 8, 8, 4))
  module = layers.ConvTranspose(3, (3, 3), strides=(2, 2))
  v = module.init(jax.random.key(0), x)
  grad = jax.grad(lambda v, x: jnp.sum(module.apply(v, x)), argnums=(0, 1))
  text = jax.jit(grad).lower(v, x).as_text()
  dilations = re.findall(r"lhs_dilate = \[(\d+), (\d+)\]", text)
  assert dilations and set(dilations) == {("1", "1")}, text


@pytest.mark.parametrize("shape,features",
                         [((2, 4, 6, 3), 5), ((1, 8, 8, 16), 8)])
def test_conv_transpose_2x2_formula(shape, features):
  """UNet's upsampling: 2×2 stride 2, against flax and the pixel formula."""
  x = jax.random.normal(jax.random.key(3), shape)
  ours = layers.ConvTranspose(features, (2, 2), strides=(2, 2))
  flax_t = nn.ConvTranspose(features, (2, 2), strides=(2, 2))
  params = ours.init(jax.random.key(4), x)
  params_t = flax_t.init(jax.random.key(4), x)
  # Same names, shapes and initial values: checkpoints carry over.
  jax.tree.map(np.testing.assert_array_equal, params, params_t)
  params = jax.tree.map(
      lambda p: p + jax.random.normal(jax.random.key(5), p.shape), params)
  y = ours.apply(params, x)
  np.testing.assert_allclose(y, flax_t.apply(params, x), rtol=1e-5, atol=1e-5)
  # Independent formula: out[2i + a, 2j + b] = x[i, j] · kernel[1 - a, 1 - b].
  k, b = np.asarray(params["params"]["kernel"]), np.asarray(
      params["params"]["bias"])
  xs = np.asarray(x)
  want = np.zeros(y.shape, np.float32)
  for a in range(2):
    for c in range(2):
      want[:, a::2, c::2] = xs @ k[1 - a, 1 - c] + b
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)

  def loss(p, module):
    return jnp.sum(jnp.sin(module.apply(p, x)))

  g = jax.grad(loss)(params, ours)
  g_t = jax.grad(loss)(params, flax_t)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4,
                                                       atol=1e-4), g, g_t)
