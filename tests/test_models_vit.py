"""Tests for the transformer models: DINOv2-style ViT and EfficientViT.

Large models are only traced (`jax.eval_shape`); executed tests run `vit_tiny`
and EfficientViT-B0 on 32²–64² inputs through module-scoped jitted functions.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models
from kd_jax.models import efficientvit, vit
from test_models_recipe import Runner, assert_documented, check_common
from test_models_recipe import count_params

# --------------------------------------------------------------------------
# ViT


def vit_param_count(width, depth, patch=16, grid=14, registers=0,
                    num_classes=0):
  """Independent count: patch conv, [CLS], position embedding ([CLS] +
  patches), registers, blocks (2 LayerNorms, q/k/v/out with bias, 2
  LayerScales, MLP 4× with bias), final LayerNorm, optional head."""
  d = width
  block = 2 * 2 * d + 4 * (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (
      4 * d * d + d)
  n = patch * patch * 3 * d + d + d + (1 + grid * grid) * d + registers * d
  n += depth * block + 2 * d
  if num_classes:
    n += d * num_classes + num_classes
  return n


@pytest.mark.parametrize("name,width,depth,classes,published", [
    ("vit_l16", 1024, 24, 0, 304e6),  # DINOv2 ViT-L: 304 M, no head
    ("vit_b16", 768, 12, 1000, 86e6),  # ViT-B/16 with its ImageNet head
    ("vit_s16", 384, 12, 1000, 22e6),  # ViT-S/16 (DeiT-S) with its head
])
def test_vit_param_counts(name, width, depth, classes, published):
  n = count_params(models.build(name, num_classes=classes), (1, 224, 224, 3))
  assert n == vit_param_count(width, depth, num_classes=classes)
  assert abs(n - published) / published < 0.01


@pytest.mark.parametrize("name,width,depth,published", [
    ("vit_s14", 384, 12, 22e6),  # DINOv2 ViT-S/14 (21 M + 518² positions)
    ("vit_l14", 1024, 24, 304e6),  # DINOv2 ViT-L/14
])
def test_dinov2_presets_param_counts(name, width, depth, published):
  # Patch 14, position embedding for 518² (37 × 37 patches).
  model = models.build(name)
  assert (model.patch, model.image_size) == (14, 518)
  n = count_params(model, (1, 518, 518, 3))
  assert n == vit_param_count(width, depth, patch=14, grid=37)
  assert abs(n - published) / published < 0.02


def test_vit_registers_and_names_at_224():
  model = models.build("vit_s16", num_registers=4)
  x = jnp.zeros((1, 224, 224, 3))
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), x)
  assert sum(v.size for v in jax.tree.leaves(variables)) == vit_param_count(
      384, 12, registers=4)
  logits, feats = jax.eval_shape(functools.partial(model.apply, train=False),
                                 variables, x)
  assert logits.shape == (1, 384)  # No head: logits are the embedding.
  assert feats["block11"].shape == (1, 1 + 4 + 196, 384)
  assert "block12" not in feats
  assert feats["tokens"].shape == (1, 196, 384)
  assert feats["patch_map"].shape == (1, 14, 14, 384)
  assert feats["registers"].shape == (1, 4, 384)
  assert_documented(model, feats)


def test_resize_pos_embed():
  pos = jnp.arange(16 * 3, dtype=jnp.float32).reshape(1, 16, 3)
  assert vit.resize_pos_embed(pos, (4, 4)) is pos
  const = jnp.full((1, 16, 3), 0.5)
  out = vit.resize_pos_embed(const, (6, 2))
  assert out.shape == (1, 12, 3)
  np.testing.assert_allclose(out, 0.5, atol=1e-6)
  with pytest.raises(ValueError, match="not square"):
    vit.resize_pos_embed(jnp.zeros((1, 12, 3)), (4, 4))


@pytest.fixture(scope="module", params=[jnp.float32, jnp.bfloat16],
                ids=["f32", "bf16"])
def vit_run(request):
  # 32² input to a model learned at 64²: the 4×4 position grid is resized.
  model = models.build("vit_tiny", num_classes=5, num_registers=2,
                       dtype=request.param)
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  return Runner(model, x), request.param


def test_vit_contract(vit_run):
  runner, dtype = vit_run
  check_common(runner, dtype)
  logits, feats = runner.eval
  assert logits.shape == (2, 5)
  want = {"block0": (2, 7, 64), "block1": (2, 7, 64), "tokens": (2, 4, 64),
          "patch_map": (2, 2, 2, 64), "registers": (2, 2, 64),
          "embedding": (2, 64)}
  assert {k: v.shape for k, v in feats.items()} == want
  np.testing.assert_array_equal(
      np.asarray(feats["patch_map"]).reshape(2, 4, 64),
      np.asarray(feats["tokens"]))
  # No dropout and no BatchNorm: train and eval are the same function.
  for a, b in zip(jax.tree.leaves(runner.eval), jax.tree.leaves(runner.train)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vit_rejects_bad_input_and_arguments():
  model = models.build("vit_tiny")
  with pytest.raises(ValueError, match="divisible by 16"):
    jax.eval_shape(functools.partial(model.init, train=False),
                   jax.random.key(0), jnp.zeros((1, 40, 32, 3)))
  with pytest.raises(ValueError, match="accepted: .*num_registers"):
    models.build("vit_b16", registers=4)


# --------------------------------------------------------------------------
# EfficientViT


def efficientvit_param_count(widths, depths, head_dim, head_widths,
                             num_classes, expand=4):
  """Independent count from the paper's layout (see the module docstring)."""
  def mbconv(cin, cout, fewer):
    mid = cin * expand
    extra = mid if fewer else 2 * mid  # bias, or BN scale + bias
    return cin * mid + extra + 9 * mid + extra + mid * cout + 2 * cout

  def lite_mla(c):
    total = (c // head_dim) * head_dim
    return (c * 3 * total + 25 * 3 * total + 3 * total * head_dim
            + 2 * total * c + 2 * c)

  w0 = widths[0]
  n = 27 * w0 + 2 * w0 + depths[0] * (9 * w0 + 2 * w0 + w0 * w0 + 2 * w0)
  cin = w0
  for s in (1, 2):
    for _ in range(depths[s]):
      n += mbconv(cin, widths[s], False)
      cin = widths[s]
  for s in (3, 4):
    n += mbconv(cin, widths[s], True)
    cin = widths[s]
    n += depths[s] * (lite_mla(cin) + mbconv(cin, cin, True))
  h0, h1 = head_widths
  n += cin * h0 + 2 * h0 + h0 * h1 + 2 * h1 + h1 * num_classes + num_classes
  return n


@pytest.mark.parametrize("name,widths,depths,head,published", [
    ("efficientvit_b0", (8, 16, 32, 64, 128), (1, 2, 2, 2, 2), (1024, 1280),
     3.4e6),
    ("efficientvit_b1", (16, 32, 64, 128, 256), (1, 2, 3, 3, 4), (1536, 1600),
     9.1e6),
])
def test_efficientvit_param_counts(name, widths, depths, head, published):
  n = count_params(models.build(name), (1, 224, 224, 3))
  assert n == efficientvit_param_count(widths, depths, 16, head, 1000)
  assert abs(n - published) / published < 0.01


def test_relu_linear_attention_matches_quadratic_numpy():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 10, 3, 4)).astype(np.float32)
             for _ in range(3))
  out = np.asarray(efficientvit.relu_linear_attention(q, k, v))
  rq, rk = np.maximum(q, 0), np.maximum(k, 0)
  want = np.zeros_like(v)
  for b in range(2):
    for h in range(3):
      att = rq[b, :, h] @ rk[b, :, h].T  # (N, N) similarities
      want[b, :, h] = (att @ v[b, :, h]) / (att.sum(axis=1, keepdims=True)
                                            + 1e-15)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module", params=[jnp.float32, jnp.bfloat16],
                ids=["f32", "bf16"])
def effvit_run(request):
  # The full B0 in float32; bf16 runs the same modules one block per stage
  # (compiling is most of the cost on a CPU).
  depths = (1, 2, 2, 2, 2) if request.param == jnp.float32 else (1,) * 5
  model = models.build("efficientvit_b0", num_classes=4, depths=depths,
                       dtype=request.param)
  x = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
  return Runner(model, x), request.param


def test_efficientvit_contract(effvit_run):
  runner, dtype = effvit_run
  check_common(runner, dtype)
  logits, feats = runner.eval
  assert logits.shape == (2, 4)
  want = {"stage0": (2, 32, 32, 8), "stage1": (2, 16, 16, 16),
          "stage2": (2, 8, 8, 32), "stage3": (2, 4, 4, 64),
          "stage4": (2, 2, 2, 128), "embedding": (2, 1280)}
  assert {k: v.shape for k, v in feats.items()} == want


def test_efficientvit_rejects_bad_input():
  model = models.build("efficientvit_b0")
  with pytest.raises(ValueError, match="divisible by 32"):
    jax.eval_shape(functools.partial(model.init, train=False),
                   jax.random.key(0), jnp.zeros((1, 48, 64, 3)))
