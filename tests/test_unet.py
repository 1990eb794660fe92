import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models


def unet_param_count(in_ch, num_classes, width, depth):
  """Independent count: 3×3 convs without bias + BN (scale, bias), 2×2
  transposed convs with bias, 1×1 head with bias."""
  def block(cin, cout):
    return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout

  n, cin = 0, in_ch
  for i in range(depth):
    n += block(cin, width * 2**i)
    cin = width * 2**i
  n += block(cin, width * 2**depth)
  cin = width * 2**depth
  for i in reversed(range(depth)):
    ch = width * 2**i
    n += 4 * cin * ch + ch + block(2 * ch, ch)
    cin = ch
  return n + cin * num_classes + num_classes


@pytest.mark.parametrize("width,depth", [(4, 2), (8, 3), (32, 4)])
def test_param_count(width, depth):
  model = models.build("unet", num_classes=9, width=width, depth=depth)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), jnp.zeros((1, 64, 64, 1)))
  n = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  assert n == unet_param_count(1, 9, width, depth)


@pytest.fixture(scope="module")
def small():
  model = models.build("unet", num_classes=5, width=4, depth=2)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  return model, variables, x


def test_outputs_and_feature_names(small):
  model, variables, x = small
  logits, feats = model.apply(variables, x, train=False)
  assert logits.shape == (2, 16, 16, 5)
  assert set(feats) == {"enc1", "enc2", "bottleneck", "dec2", "dec1",
                        "embedding"}
  assert feats["enc1"].shape == (2, 16, 16, 4)
  assert feats["bottleneck"].shape == (2, 4, 4, 16)
  assert feats["dec1"].shape == (2, 16, 16, 4)
  np.testing.assert_allclose(feats["embedding"],
                             feats["bottleneck"].mean(axis=(1, 2)), rtol=1e-6)


def test_train_mode_updates_batch_stats_eval_does_not(small):
  model, variables, x = small
  (train_logits, _), upd = model.apply(variables, x, train=True,
                                       mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                         variables["batch_stats"], upd["batch_stats"])
  assert all(jax.tree.leaves(changed))
  eval_logits, _ = model.apply(variables, x, train=False)
  assert not np.allclose(train_logits, eval_logits)


def test_jit_and_bf16(small):
  model, variables, x = small
  ref = model.apply(variables, x, train=False)[0]
  jitted = jax.jit(functools.partial(model.apply, train=False))(variables, x)[0]
  np.testing.assert_allclose(ref, jitted, rtol=1e-4, atol=1e-5)
  bf16 = models.build("unet", num_classes=5, width=4, depth=2,
                      dtype=jnp.bfloat16)
  out = jax.jit(functools.partial(bf16.apply, train=False))(variables, x)[0]
  assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all())
  bf16_vars = bf16.init(jax.random.key(0), x, train=False)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16_vars))


def test_bad_input_size():
  model = models.build("unet", num_classes=2, width=4, depth=3)
  with pytest.raises(ValueError, match="divisible by 8"):
    model.init(jax.random.key(0), jnp.zeros((1, 20, 20, 1)), train=False)


def test_registry_errors():
  with pytest.raises(ValueError, match="unknown model 'unetz'.*unet"):
    models.build("unetz", num_classes=2)
  with pytest.raises(ValueError, match="accepted"):
    models.build("unet", num_classes=2, widht=3)
