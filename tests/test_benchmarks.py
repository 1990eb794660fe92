"""The PyTorch twins of benchmarks/torch_models.py against kd_jax.

The benchmark's comparison is only fair if each twin is the same network:
the same parameter count, and, with kd_jax's weights copied in, the same
outputs and the same loss. Skipped when torch is not installed (it is the
`bench` extra).
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks"))
import torch_models  # noqa: E402  pylint: disable=wrong-import-position

from kd_jax import losses, models  # noqa: E402  pylint: disable=g-import-not-at-top


def _jax_variables(name, kw, shape):
  """Random variables of the shapes `model.init` gives (numpy draws: no
  initialiser to compile), with positive running variances."""
  model = models.build(name, **kw)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=shape).astype(np.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), x)

  def draw(path, s):
    v = rng.normal(scale=0.3, size=s.shape).astype(np.float32)
    return np.abs(v) + 0.5 if path[-1].key == "var" else v

  return model, jax.tree_util.tree_map_with_path(draw, shapes), x


def _twin(name, kw, variables, in_channels):
  kw = dict(kw)
  twin = torch_models.build(name, kw.pop("num_classes"),
                            in_channels=in_channels, **kw)
  torch_models.load_flax_variables(twin, variables)
  return twin.eval()


def _nchw(x):
  return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("width,depth", [(2, 2), (16, 3), (4, 3)])
def test_unet_param_count_equal(width, depth):
  model = models.build("unet", num_classes=9, width=width, depth=depth)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  n_jax = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  n_torch = torch_models.count_params(
      torch_models.UNet(9, width=width, depth=depth, in_channels=1))
  assert n_torch == n_jax


@pytest.mark.parametrize("name,kw,shape", [
    ("unet", dict(num_classes=5, width=2, depth=2), (2, 16, 16, 1)),
    ("squeeze_unet", dict(num_classes=5, width=8, depth=2), (2, 16, 16, 1)),
    # 32² against the preset's 128²: the position embedding is resized too.
    ("transunet_tiny", dict(num_classes=5), (1, 32, 32, 1)),
])
def test_twin_matches_outputs(name, kw, shape):
  model, variables, x = _jax_variables(name, kw, shape)
  twin = _twin(name, kw, variables, shape[-1])  # Copies every variable.
  assert torch_models.count_params(twin) == sum(
      v.size for v in jax.tree.leaves(variables["params"]))
  logits, feats = jax.jit(functools.partial(model.apply, train=False))(
      variables, x)
  with torch.no_grad():
    t_logits, t_feats = twin(_nchw(x))
  np.testing.assert_allclose(t_logits.permute(0, 2, 3, 1).numpy(), logits,
                             atol=1e-5)
  assert set(t_feats) == set(feats)
  np.testing.assert_allclose(t_feats["embedding"].numpy(),
                             feats["embedding"], atol=1e-5)


def test_transunet_tiny_param_count_equal():
  model = models.build("transunet_tiny", num_classes=9)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), jnp.zeros((1, 128, 128, 1)))
  n_jax = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  assert torch_models.count_params(
      torch_models.build("transunet_tiny", 9)) == n_jax


def test_load_rejects_a_mismatched_twin():
  _, variables, _ = _jax_variables(
      "unet", dict(num_classes=5, width=2, depth=2), (1, 16, 16, 1))
  with pytest.raises(ValueError, match="does not fit"):
    torch_models.load_flax_variables(
        torch_models.UNet(5, width=4, depth=2), variables)


def test_distill_loss_matches_objective():
  terms = [dict(fn="cross_entropy"), dict(fn="dice"),
           dict(fn="kd_kl", temperature=4.0)]
  rng = np.random.default_rng(0)
  s = rng.normal(size=(2, 8, 8, 9)).astype(np.float32) * 3
  t = rng.normal(size=(2, 8, 8, 9)).astype(np.float32) * 3
  y = rng.integers(0, 5, size=(2, 8, 8)).astype(np.int32)
  total, metrics = losses.objective(terms)(
      dict(logits=jnp.asarray(s), teacher_logits=jnp.asarray(t),
           labels=jnp.asarray(y)))
  t_total, t_metrics = torch_models.distill_loss(
      _nchw(s), _nchw(t), torch.from_numpy(y).long(), temperature=4.0)
  for k in ("cross_entropy", "dice", "kd_kl"):
    np.testing.assert_allclose(float(t_metrics[k]), float(metrics[k]),
                               rtol=1e-5)
  np.testing.assert_allclose(float(t_total), float(total), rtol=1e-5)


def test_cwd_twin_matches_kd_jax():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(2, 6, 5, 9)).astype(np.float32) * 2
  t = rng.normal(size=(2, 6, 5, 9)).astype(np.float32) * 2
  y = rng.integers(0, 9, size=(2, 6, 5)).astype(np.int32)
  terms = [dict(fn="cross_entropy"), dict(fn="dice"),
           dict(fn="cwd", weight=3.0, temperature=4.0)]
  total, metrics = losses.objective(terms)(
      dict(logits=jnp.asarray(s), teacher_logits=jnp.asarray(t),
           labels=jnp.asarray(y)))
  t_total, t_metrics = torch_models.distill_loss(
      _nchw(s), _nchw(t), torch.from_numpy(y).long(), temperature=4.0,
      kd="cwd", kd_weight=3.0)
  np.testing.assert_allclose(float(t_metrics["cwd"]), float(metrics["cwd"]),
                             rtol=1e-5)
  np.testing.assert_allclose(float(t_total), float(total), rtol=1e-5)
