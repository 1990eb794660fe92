"""Tests for kd_jax.models.connectors: shapes, numerics, dtypes and errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models import connectors as cn
from test_models_recipe import numpy_variables


def _init_apply(module, x, **kw):
  variables = module.init(jax.random.key(0), x, **kw)
  return variables, module.apply(variables, x, **kw)


def _out_shape(module, x_shape):
  """Output shape by tracing only (no compile, no run): fast on CPU."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  v = jax.eval_shape(module.init, jax.random.key(0), x)
  return jax.eval_shape(module.apply, v, x).shape


def test_conv1x1_matches_numpy_on_maps_and_tokens():
  rng = np.random.default_rng(0)
  for shape in [(2, 5, 6, 7), (2, 9, 7)]:
    x = rng.normal(size=shape).astype(np.float32)
    m = cn.Conv1x1(4)
    v = m.init(jax.random.key(0), x)
    y = m.apply(v, x)
    kernel = np.asarray(v["params"]["conv"]["kernel"]).reshape(7, 4)
    bias = np.asarray(v["params"]["conv"]["bias"])
    np.testing.assert_allclose(y, x @ kernel + bias, rtol=1e-5, atol=1e-5)


def test_conv1x1_bn_train_updates_stats_eval_does_not():
  x = jnp.arange(2 * 3 * 3 * 5, dtype=jnp.float32).reshape(2, 3, 3, 5)
  m = cn.Conv1x1(8, use_bn=True)
  v = m.init(jax.random.key(0), x)
  assert "bias" not in v["params"]["conv"]  # BN carries the bias.
  y_train, upd = m.apply(v, x, train=True, mutable=["batch_stats"])
  y_eval = m.apply(v, x, train=False)
  assert not np.allclose(y_train, y_eval)
  # Train mode normalises with batch statistics: per-channel mean ~ 0.
  np.testing.assert_allclose(np.mean(y_train, axis=(0, 1, 2)), 0, atol=1e-4)
  assert not np.allclose(upd["batch_stats"]["bn"]["mean"],
                         v["batch_stats"]["bn"]["mean"])


def test_linear_on_vectors_tokens_maps():
  for shape in [(3, 10), (3, 4, 10), (3, 2, 2, 10)]:
    assert _out_shape(cn.Linear(6), shape) == shape[:-1] + (6,)


@pytest.mark.parametrize("src,grid,want", [
    ((2, 7, 7, 40), (16, 16), (2, 16, 16, 24)),
    ((2, 7, 7, 40), 256, (2, 256, 24)),
    ((2, 49, 40), (4, 4), (2, 4, 4, 24)),
    ((2, 13, 40), 5, (2, 5, 24)),  # non-square source and target: rows
    ((1, 32, 32, 8), (2, 3), (1, 2, 3, 24)),  # downsampling, non-square grid
])
def test_attention_pool_shapes(src, grid, want):
  m = cn.AttentionPool(24, grid=grid, hidden=32, num_heads=4)
  assert _out_shape(m, src) == want


@pytest.mark.parametrize("kind", ["attention_pool", "resize_conv1x1"])
@pytest.mark.parametrize("src,grid,want", [
    # A ViT-L/16's 14×14 patch tokens at 224² onto an EfficientViT's 7×7
    # last map, and that map onto the ViT's grid (as a map and as tokens).
    ((2, 196, 40), (7, 7), (2, 7, 7, 24)),
    ((2, 14, 14, 40), (7, 7), (2, 7, 7, 24)),
    ((2, 7, 7, 40), (14, 14), (2, 14, 14, 24)),
    ((2, 7, 7, 40), 196, (2, 196, 24)),
])
def test_grid_connectors_on_mismatched_grids(kind, src, grid, want):
  kw = dict(hidden=32, num_heads=4) if kind == "attention_pool" else {}
  m = cn.build_connector(kind, 24, grid=grid, **kw)
  assert _out_shape(m, src) == want


def test_resize_conv1x1_is_bilinear_resize_then_matmul():
  from scipy import ndimage
  x = np.random.default_rng(0).normal(size=(2, 7, 7, 5)).astype(np.float32)
  m = cn.ResizeConv1x1(3, grid=(14, 14))
  v = m.init(jax.random.key(0), x)
  y = np.asarray(m.apply(v, x))
  # Upsampling by 2 with half-pixel centres and edges held: scipy's zoom
  # on the pixel grid (an independent implementation).
  up = ndimage.zoom(x, (1, 2, 2, 1), order=1, mode="nearest", grid_mode=True)
  kernel = np.asarray(v["params"]["conv"]["kernel"]).reshape(5, 3)
  bias = np.asarray(v["params"]["conv"]["bias"])
  np.testing.assert_allclose(y, up @ kernel + bias, rtol=1e-4, atol=1e-4)


def test_attention_pool_params_do_not_depend_on_source_size():
  m = cn.AttentionPool(24, grid=(4, 4), hidden=32, num_heads=4)
  small = numpy_variables(m, jnp.ones((1, 3, 3, 8)))
  big = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((1, 12, 12, 8)))
  shapes = lambda v: jax.tree.map(jnp.shape, v)
  assert shapes(small) == shapes(big)
  # The same parameters run on any source size.
  y = jax.jit(m.apply)(small, jnp.ones((1, 12, 12, 8)))
  assert y.shape == (1, 4, 4, 24)


def test_sincos_aligns_grids_of_different_size():
  """Each 4×4 target cell's embedding is closest to a source cell under it."""
  src = np.asarray(cn.sincos_2d((8, 8), 64))
  tgt = np.asarray(cn.sincos_2d((4, 4), 64))
  nearest = np.argmax(tgt @ src.T, axis=1)
  for t, s in enumerate(nearest):
    ti, tj = divmod(t, 4)
    si, sj = divmod(int(s), 8)
    assert si // 2 == ti and sj // 2 == tj


def test_attention_pool_bf16_compute_float32_params():
  m = cn.AttentionPool(16, grid=(2, 2), hidden=16, num_heads=2,
                       dtype=jnp.bfloat16)
  x = jnp.ones((2, 4, 4, 8), jnp.bfloat16)
  v = numpy_variables(m, x)
  y = jax.jit(m.apply)(v, x)
  assert y.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))


def test_identity_passes_through_and_checks_width():
  x = jnp.ones((2, 3, 4))
  _, y = _init_apply(cn.Identity(4), x)
  np.testing.assert_array_equal(y, x)
  with pytest.raises(ValueError, match="width 4 but the teacher's is 5"):
    _init_apply(cn.Identity(5), x)


def test_build_connector_kinds_and_errors():
  assert cn.connector_kinds() == ["attention_pool", "conv1x1", "identity",
                                  "linear", "resize_conv1x1"]
  assert isinstance(cn.build_connector("conv1x1", 8, use_bn=True), cn.Conv1x1)
  assert isinstance(cn.build_connector("linear", 8), cn.Linear)
  assert isinstance(cn.build_connector("identity", 8), cn.Identity)
  ap = cn.build_connector("attention_pool", 8, grid=(2, 2), hidden=16,
                          num_heads=2)
  assert ap.grid == (2, 2)
  with pytest.raises(ValueError, match="unknown connector 'conv3x3'.*conv1x1"):
    cn.build_connector("conv3x3", 8)
  with pytest.raises(ValueError, match="unknown arguments \\['grid'\\]"):
    cn.build_connector("conv1x1", 8, grid=(2, 2))
  with pytest.raises(ValueError, match="needs grid"):
    cn.build_connector("attention_pool", 8)


def test_shape_errors_are_clear():
  with pytest.raises(ValueError, match="NHWC map .* or NLD tokens"):
    _init_apply(cn.Conv1x1(4), jnp.ones((2, 8)))
  with pytest.raises(ValueError, match="NHWC map .* or NLD tokens"):
    _out_shape(cn.AttentionPool(4, grid=(2, 2), hidden=8, num_heads=2), (2, 8))
  with pytest.raises(ValueError, match="grid must be"):
    _out_shape(cn.AttentionPool(4, grid=(2, 0), hidden=8, num_heads=2),
               (2, 3, 3, 8))
  with pytest.raises(ValueError, match="divisible by 4 and by num_heads"):
    _out_shape(cn.AttentionPool(4, grid=(2, 2), hidden=12, num_heads=8),
               (2, 3, 3, 8))
