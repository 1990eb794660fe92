"""Regression task losses (mse, l1, smooth_l1) against numpy references.

The references are float64 numpy, written here from the formulas; inputs are
rounded to the tested dtype first, so bfloat16 cases compare the loss's
float32 arithmetic with exact arithmetic on the same inputs. Where torch is
importable, the losses also match torch.nn.functional's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses import task

SHAPES = [(4, 2), (3, 5), (2, 3, 4)]
DTYPES = [jnp.float32, jnp.bfloat16]
DELTA = 0.3


def np_mse(p, t):
  return np.mean((p - t) ** 2)


def np_l1(p, t):
  return np.mean(np.abs(p - t))


def np_smooth_l1(p, t, delta=DELTA):
  a = np.abs(p - t)
  return np.mean(np.where(a < delta, 0.5 * a ** 2 / delta, a - 0.5 * delta))


CASES = {
    "mse": (task.mse, np_mse, {}),
    "l1": (task.l1, np_l1, {}),
    "smooth_l1": (task.smooth_l1, np_smooth_l1, {"delta": DELTA}),
}


def _inputs(shape, dtype, seed=0):
  """(predictions, targets) in dtype, and their float64 numpy values.

  Residuals span both smooth_l1 regimes (|d| below and above DELTA)."""
  rng = np.random.default_rng(seed)
  p = jnp.asarray(rng.uniform(0.0, 1.0, shape), dtype)
  t = jnp.asarray(rng.uniform(0.0, 1.0, shape), dtype)
  return p, t, np.asarray(p, np.float64), np.asarray(t, np.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_golden_value(name, shape, dtype):
  fn, ref, kw = CASES[name]
  p, t, p64, t64 = _inputs(shape, dtype)
  out = fn(p, t, **kw)
  assert out.shape == () and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref(p64, t64, **kw), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_example_mask_matches_kept_rows(name, shape):
  fn, ref, kw = CASES[name]
  p, t, p64, t64 = _inputs(shape, jnp.float32, seed=1)
  keep = np.arange(shape[0]) % 2 == 0  # rows 0, 2, ...
  for mask in (keep, keep.astype(np.int32), keep.astype(np.float32)):
    np.testing.assert_allclose(fn(p, t, mask=mask, **kw),
                               ref(p64[keep], t64[keep], **kw), rtol=1e-5)
  # A full-shape element mask averages over the kept elements only.
  elem = np.random.default_rng(2).random(shape) > 0.4
  np.testing.assert_allclose(fn(p, t, mask=elem, **kw),
                             ref(p64[elem], t64[elem], **kw), rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_masked_rows_have_exactly_zero_gradient(name):
  fn, ref, kw = CASES[name]
  p, t, p64, t64 = _inputs((4, 2), jnp.float32, seed=3)
  keep = np.array([True, False, True, False])
  # Garbage targets on the unlabelled rows: huge values, inf and NaN.
  garbage = np.asarray(t).copy()
  garbage[1] = 1e6
  garbage[3] = [np.inf, np.nan]
  value, (gp, gt) = jax.value_and_grad(
      lambda a, b: fn(a, b, mask=keep, **kw), argnums=(0, 1))(p, garbage)
  np.testing.assert_allclose(value, ref(p64[keep], t64[keep], **kw),
                             rtol=1e-5)
  gp, gt = np.asarray(gp), np.asarray(gt)
  assert np.all(gp[~keep] == 0.0) and np.all(gt[~keep] == 0.0)
  assert np.all(np.isfinite(gp)) and np.all(np.isfinite(gt))
  assert np.any(gp[keep] != 0.0)
  # The kept rows' gradient equals the gradient with the rows removed,
  # rescaled by the element counts of the two means (4 vs 8 elements).
  g_kept = jax.grad(lambda a: fn(a, t[keep], **kw))(p[keep])
  np.testing.assert_allclose(gp[keep], g_kept, rtol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_all_masked_is_zero_with_zero_gradient(name):
  fn, _, kw = CASES[name]
  p, t, _, _ = _inputs((3, 2), jnp.float32, seed=4)
  t = t.at[0].set(1e6)
  none = np.zeros(3, bool)
  value, grads = jax.value_and_grad(
      lambda a, b: fn(a, b, mask=none, **kw), argnums=(0, 1))(p, t)
  assert float(value) == 0.0
  for g in grads:
    assert np.all(np.asarray(g) == 0.0)
  jitted = jax.jit(lambda a, b, m: fn(a, b, mask=m, **kw))
  assert float(jitted(p, t, none)) == 0.0


def test_smooth_l1_regimes():
  rng = np.random.default_rng(5)
  t = rng.uniform(0.0, 1.0, (6, 2)).astype(np.float32)
  sign = np.where(rng.random((6, 2)) < 0.5, -1.0, 1.0).astype(np.float32)
  for delta in (1.0, 0.05):
    # All |d| < delta: quadratic regime, 0.5 / delta times the MSE.
    small = t + sign * rng.uniform(0.1, 0.9, (6, 2)).astype(np.float32) * delta
    np.testing.assert_allclose(
        task.smooth_l1(small, t, delta=delta),
        0.5 / delta * task.mse(small, t), rtol=1e-5)
    # All |d| > delta: linear regime, L1 shifted by delta / 2.
    large = t + sign * rng.uniform(1.5, 4.0, (6, 2)).astype(np.float32) * delta
    np.testing.assert_allclose(
        task.smooth_l1(large, t, delta=delta),
        task.l1(large, t) - 0.5 * delta, rtol=1e-5)
  # Continuous at |d| = delta (both pieces give delta / 2), slope <= 1.
  z = np.zeros((1, 1), np.float32)
  for d in (0.3 - 1e-6, 0.3, 0.3 + 1e-6):
    np.testing.assert_allclose(
        task.smooth_l1(z + d, z, delta=0.3), 0.15, atol=2e-6)
  g = jax.grad(lambda a: task.smooth_l1(a, z, delta=0.3))(z + 5.0)
  np.testing.assert_allclose(g, 1.0)


def test_jit_and_vmap_match_eager():
  p, t, _, _ = _inputs((4, 2), jnp.float32, seed=6)
  mask = np.array([1, 0, 1, 1])
  for name, (fn, _, kw) in CASES.items():
    eager = fn(p, t, mask=mask, **kw)
    jitted = jax.jit(lambda a, b, m, fn=fn, kw=kw: fn(a, b, mask=m, **kw))
    np.testing.assert_allclose(jitted(p, t, mask), eager, rtol=1e-6,
                               err_msg=name)
    per_row = jax.vmap(lambda a, b, fn=fn, kw=kw: fn(a[None], b[None],
                                                      **kw))(p, t)
    np.testing.assert_allclose(per_row.mean(), fn(p, t, **kw), rtol=1e-6,
                               err_msg=name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch(shape):
  torch = pytest.importorskip("torch")
  functional = torch.nn.functional
  p, t, p64, t64 = _inputs(shape, jnp.float32, seed=7)
  tp, tt = torch.from_numpy(p64), torch.from_numpy(t64)
  np.testing.assert_allclose(task.mse(p, t),
                             functional.mse_loss(tp, tt).item(), rtol=1e-5)
  np.testing.assert_allclose(task.l1(p, t),
                             functional.l1_loss(tp, tt).item(), rtol=1e-5)
  for delta in (1.0, DELTA, 0.05):
    np.testing.assert_allclose(
        task.smooth_l1(p, t, delta=delta),
        functional.smooth_l1_loss(tp, tt, beta=delta).item(), rtol=1e-5)
  keep = np.arange(shape[0]) != 1
  np.testing.assert_allclose(
      task.smooth_l1(p, t, delta=DELTA, mask=keep),
      functional.smooth_l1_loss(tp[keep], tt[keep], beta=DELTA).item(),
      rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_static_shape_errors(name):
  fn, _, kw = CASES[name]
  a = np.zeros((4, 2), np.float32)
  with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 3\)"):
    fn(a, np.zeros((4, 3), np.float32), **kw)
  with pytest.raises(ValueError, match="mask"):
    fn(a, a, mask=np.ones(3), **kw)
  with pytest.raises(ValueError, match="B, ..."):
    fn(np.float32(0.0), np.float32(1.0), **kw)
  with pytest.raises(ValueError, match="floating"):
    fn(a.astype(bool), a.astype(bool), **kw)
