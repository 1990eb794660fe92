"""Tests for the CNN model zoo: ResNet, PSPNet, MobileNetV2, ESPNet,
multi-task models, the SAGAN critic, and models.summary.

Parameter counts use `jax.eval_shape` (nothing allocated or compiled).
Anything executed is a narrow preset on a 32² or 64² input, initialised by
numpy (see `numpy_init`); each preset compiles its eval forward in float32
and bfloat16 once, and five of them a train-mode forward, cached for all
tests.
"""
import dataclasses
import functools
import re
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models
from kd_jax.models import discriminator, mobilenetv2, pspnet, resnet
from kd_jax.models.summary import default_input, default_kwargs, recipes

MY_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101",
             "pspnet_resnet101", "pspnet_resnet50", "pspnet_resnet18",
             "resnet18_seg", "mobilenetv2", "mobilenetv2_seg", "espnet_c",
             "espnet", "multitask_resnet50", "multitask_resnet18",
             "multitask_mobilenetv2", "sagan_discriminator")


def init_shapes(model, input_shape):
  return jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0),
      jax.ShapeDtypeStruct(input_shape, jnp.float32))


def count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def n_params(model, input_shape=(1, 64, 64, 3)):
  return count(init_shapes(model, input_shape)["params"])


# --- parameter counts against published figures ---------------------------

@pytest.mark.parametrize("name,expected", [
    # torchvision's ImageNet models, 1000-class head.
    ("resnet18", 11_689_512), ("resnet34", 21_797_672),
    ("resnet50", 25_557_032), ("resnet101", 44_549_160),
    ("mobilenetv2", 3_504_872),
])
def test_imagenet_param_counts_exact(name, expected):
  assert n_params(models.build(name, num_classes=1000)) == expected


def test_mobilenetv2_half_width_matches_torchvision():
  # torchvision mobilenet_v2(width_mult=0.5): 1,968,680.
  assert n_params(models.build("mobilenetv2", width=0.5)) == 1_968_680


@pytest.mark.parametrize("name,kwargs,published,rel", [
    # Liu et al. 2019 (Structured KD), Table: PSPNet-ResNet101 70.43 M,
    # MobileNetV2 student 2.17 M (Cityscapes, 19 classes).
    ("pspnet_resnet101", dict(num_classes=19), 70.43e6, 0.001),
    ("mobilenetv2_seg", dict(num_classes=19), 2.17e6, 0.01),
    # Mehta et al. 2018: ESPNet 0.364 M on Cityscapes (20 classes).
    ("espnet", dict(num_classes=20), 0.364e6, 0.01),
])
def test_published_param_counts(name, kwargs, published, rel):
  got = n_params(models.build(name, **kwargs))
  assert abs(got - published) <= rel * published, got


def test_multitask_is_trunk_plus_heads():
  trunk = n_params(models.build("resnet50", num_classes=None))
  heads = 2048 * (5 + 3 + 2 + 2) + (5 + 3 + 2 + 2)
  assert n_params(models.build("multitask_resnet50")) == trunk + heads


def test_headless_resnet_returns_none_logits():
  model = models.build("resnet101", num_classes=None)
  logits, feats = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False),
      init_shapes(model, (1, 64, 64, 3)),
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert logits is None and feats["embedding"].shape == (1, 2048)


@pytest.mark.parametrize("output_stride,s3,s4", [(32, 16, 32), (16, 16, 16),
                                                 (8, 8, 8)])
def test_resnet_output_stride(output_stride, s3, s4):
  model = resnet.ResNet50(output_stride=output_stride, width=8)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  _, feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                            init_shapes(model, x.shape), x)
  assert feats["layer3"].shape == (1, 64 // s3, 64 // s3, 128)
  assert feats["layer4"].shape == (1, 64 // s4, 64 // s4, 256)


def test_params_float32_under_bf16():
  for name in ("resnet18", "mobilenetv2_seg", "espnet", "sagan_discriminator"):
    model = models.build(name, dtype=jnp.bfloat16)
    shape = default_input(name)[:1] + (64, 64) + default_input(name)[3:]
    dtypes = {x.dtype for x in jax.tree.leaves(init_shapes(model, shape))}
    assert dtypes == {jnp.dtype(jnp.float32)}, (name, dtypes)


def test_every_model_has_a_table_entry():
  # benchmarks/model_table.py builds each with these and traces it at its
  # default input; here only the declarations are checked (tracing the
  # 512² models takes ~20 s).
  for name in MY_MODELS:
    shape = default_input(name)
    assert len(shape) == 4 and shape[0] == 1, (name, shape)
    assert recipes(name), name
    models.build(name, **default_kwargs(name))


# --- helpers against independent numpy code --------------------------------

def test_adaptive_avg_pool_matches_torch_rule():
  x = np.random.default_rng(0).normal(size=(2, 7, 5, 3)).astype(np.float32)
  for bins in (1, 2, 3, 6):
    want = np.zeros((2, bins, bins, 3), np.float32)
    for i in range(bins):
      for j in range(bins):
        h0, h1 = int(np.floor(i * 7 / bins)), int(np.ceil((i + 1) * 7 / bins))
        w0, w1 = int(np.floor(j * 5 / bins)), int(np.ceil((j + 1) * 5 / bins))
        want[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    got = pspnet.adaptive_avg_pool(jnp.asarray(x), bins)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_make_divisible():
  assert [mobilenetv2.make_divisible(v) for v in (8, 6, 12, 4, 1280, 80)] == [
      8, 8, 16, 8, 1280, 80]
  assert mobilenetv2.make_divisible(0.35 * 32) == 16


def test_discriminator_input_resizes_image():
  img, probs = jnp.ones((2, 128, 96, 3)), jnp.ones((2, 16, 12, 5)) / 5
  x = discriminator.discriminator_input(img, probs)
  assert x.shape == (2, 16, 12, 8)
  np.testing.assert_allclose(x[..., :3], 1.0, rtol=1e-6)


def test_summary_counts_and_flops():

  class Tiny(nn.Module):

    @nn.compact
    def __call__(self, x, *, train):
      x = nn.Conv(4, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      return nn.Dense(10)(x.reshape(x.shape[0], -1)), {}

  s = models.summary(Tiny(), (1, 8, 8, 2))
  assert s["params"] == 3 * 3 * 2 * 4 + 2 * 4 + 8 * 8 * 4 * 10 + 10
  assert s["batch_stats"] == 2 * 4
  # XLA skips the taps that land on padding: 2 + 3·6 + 2 = 22 per axis.
  macs = 22 * 22 * 2 * 4 + 8 * 8 * 4 * 10
  assert 2 * macs <= s["flops"] <= 2 * macs * 1.1, s["flops"]


# --- executed presets -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  kwargs: Any
  input_shape: tuple
  logits: Any  # shape, or dict of shapes
  features: Any  # name → shape
  dropout: bool  # has dropout layers (train output depends on the rng)
  id: str = ""
  batch_norm: bool = True
  # Compile the train-mode forward too. Train mode is checked on one model
  # per normalisation/dropout code path (compiling it costs ~8 s each).
  train: bool = False


def _resnet_feats(w, exp, s3=4, s4=8, size=32):
  return {"stem": (2, size // 2, size // 2, w),
          "layer1": (2, size // 4, size // 4, w * exp),
          "layer2": (2, size // 8, size // 8, 2 * w * exp),
          "layer3": (2, size // s3, size // s3, 4 * w * exp),
          "layer4": (2, size // s4, size // s4, 8 * w * exp),
          "embedding": (2, 8 * w * exp)}


_R18 = _resnet_feats(8, 1, s3=16, s4=32)
_MB_CLS = {"stem": (2, 16, 16, 8), "stage1": (2, 16, 16, 8),
           "stage2": (2, 8, 8, 8), "stage3": (2, 4, 4, 8),
           "stage4": (2, 2, 2, 16), "stage5": (2, 2, 2, 24),
           "stage6": (2, 1, 1, 40), "stage7": (2, 1, 1, 80),
           "last": (2, 1, 1, 1280), "embedding": (2, 1280)}
_MB_SEG = {"stem": (2, 32, 32, 8), "stage1": (2, 32, 32, 8),
           "stage2": (2, 16, 16, 8), "stage3": (2, 8, 8, 8),
           "stage4": (2, 8, 8, 16), "stage5": (2, 8, 8, 24),
           "stage6": (2, 8, 8, 40), "stage7": (2, 8, 8, 80),
           "embedding": (2, 80), "head": (2, 8, 8, 16)}
_ESP = {"level1": (2, 32, 32, 19), "level2": (2, 16, 16, 131),
        "level3": (2, 8, 8, 256), "head": (2, 8, 8, 256)}
_MT_LOGITS = {"dr_grade": (2, 5), "dme_risk": (2, 3), "fovea": (2, 2),
              "optic_disc": (2, 2)}
_SEG = (2, 64, 64, 5)

PRESETS = [
    Preset("resnet18", dict(width=8, num_classes=10), (2, 32, 32, 3),
           (2, 10), _R18, False),
    Preset("resnet50", dict(width=8, num_classes=10, output_stride=8),
           (2, 32, 32, 3), (2, 10), _resnet_feats(8, 4, s3=8, s4=8), False,
           id="resnet50_os8"),
    Preset("pspnet_resnet18", dict(width=8, num_classes=5), (2, 64, 64, 3),
           _SEG, {**_resnet_feats(8, 1, s3=8, s4=8, size=64),
                  "stem": (2, 32, 32, 16), "head": (2, 8, 8, 16),
                  "aux_logits": _SEG}, True, train=True),
    Preset("resnet18_seg", dict(width=8, num_classes=5, head_channels=16),
           (2, 64, 64, 3), _SEG,
           {**_resnet_feats(8, 1, s3=8, s4=8, size=64),
            "head": (2, 8, 8, 16)}, True),
    Preset("mobilenetv2", dict(width=0.25, num_classes=10), (2, 32, 32, 3),
           (2, 10), _MB_CLS, True, train=True),
    Preset("mobilenetv2_seg", dict(width=0.25, num_classes=5,
                                   head_channels=16), (2, 64, 64, 3), _SEG,
           _MB_SEG, True),
    Preset("espnet_c", dict(num_classes=5, p=1, q=2), (2, 64, 64, 3), _SEG,
           _ESP, False),
    Preset("espnet", dict(num_classes=5, p=1, q=2), (2, 64, 64, 3), _SEG,
           {**_ESP, "decoder": (2, 32, 32, 5)}, False, train=True),
    Preset("multitask_resnet18", dict(width=0.125), (2, 32, 32, 3),
           _MT_LOGITS, _R18, True, train=True),
    Preset("multitask_mobilenetv2", dict(width=0.25), (2, 32, 32, 3),
           _MT_LOGITS, _MB_CLS, True),
    Preset("sagan_discriminator", dict(conv_dim=8), (2, 64, 64, 8), (2,),
           {"block1": (2, 32, 32, 8), "block2": (2, 16, 16, 16),
            "block3": (2, 8, 8, 32), "block4": (2, 4, 4, 64)}, False,
           batch_norm=False, train=True),
]


def numpy_init(shapes, seed=0):
  """Variables of the given shapes filled by numpy, not by `model.init`.

  Compiling a model's init on the CPU (threefry + truncated normal for every
  kernel) takes ~50 s even for a width-8 ResNet-18; the forward compiles in
  ~3 s. Kernels get N(0, 1/fan_in), BatchNorm its usual start (scale and
  running variance 1, bias and mean 0), and the remaining scalars and vectors
  (PReLU slopes, attention gammas) 0.25 so that every path is exercised.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    key = str(getattr(path[-1], "key", path[-1]))
    shape = leaf.shape
    if key.endswith(("var", "scale", "sigma")):
      value = np.ones(shape)
    elif key.endswith(("mean", "bias")):
      value = np.zeros(shape)
    elif len(shape) >= 2:
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    else:
      value = np.full(shape, 0.25)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


_EVAL, _TRAIN = {}, {}


def evaluate(p: Preset):
  """(variables, eval f32 output, its rerun, eval bf16 output), cached."""
  key = p.id or p.name
  if key not in _EVAL:
    model = models.build(p.name, **p.kwargs)
    model16 = models.build(p.name, dtype=jnp.bfloat16, **p.kwargs)
    x = jnp.asarray(np.random.default_rng(1).normal(size=p.input_shape),
                    jnp.float32)
    variables = numpy_init(init_shapes(model, p.input_shape))
    # Eval applies without `mutable`: any write to batch_stats would raise.
    eval32 = jax.jit(lambda v, x: model.apply(v, x, train=False))
    eval16 = jax.jit(lambda v, x: model16.apply(v, x, train=False))
    _EVAL[key] = (variables, x, eval32(variables, x), eval32(variables, x),
                  eval16(variables, x))
  return _EVAL[key]


def train(p: Preset):
  """Two train-mode outputs (different dropout rngs) and the new state."""
  key = p.id or p.name
  if key not in _TRAIN:
    model = models.build(p.name, **p.kwargs)
    variables, x = evaluate(p)[:2]

    @jax.jit
    def train_fn(v, x, rng):
      return model.apply(v, x, train=True, rngs={"dropout": rng},
                         mutable=["batch_stats"])

    (out_a, state), (out_b, _) = (train_fn(variables, x, jax.random.key(k))
                                  for k in (2, 3))
    _TRAIN[key] = out_a, out_b, state
  return _TRAIN[key]


def _ids(p):
  return p.id or p.name


@pytest.fixture(scope="module", params=PRESETS, ids=_ids)
def preset(request):
  return request.param


@pytest.fixture(scope="module", params=[p for p in PRESETS if p.train],
                ids=_ids)
def train_preset(request):
  return request.param


def _shapes(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


def test_output_and_feature_shapes(preset):
  out = evaluate(preset)[2]
  logits, feats = out
  if isinstance(preset.logits, dict):
    assert _shapes(logits) == preset.logits
  else:
    assert logits.shape == preset.logits
  assert _shapes(feats) == preset.features  # names and shapes
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(out))


def test_feature_names_are_documented(preset):
  doc = sys.modules[type(models.build(preset.name)).__module__].__doc__
  if preset.name.startswith("multitask"):  # documents its trunks' names
    doc += resnet.__doc__ + mobilenetv2.__doc__
  quoted = set(re.findall(r'"([a-z_0-9]+)"', doc))
  # `"layer1".."layer4"` documents layer2 and layer3 too.
  families = {re.sub(r"\d+$", "", q) for q in quoted if q[-1].isdigit()}
  for name in evaluate(preset)[2][1]:
    assert name in quoted or re.sub(r"\d+$", "", name) in families, name


def test_eval_is_deterministic(preset):
  _, _, first, again, _ = evaluate(preset)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_bf16_compute(preset):
  out32, out16 = evaluate(preset)[2], evaluate(preset)[4]
  for a in jax.tree.leaves(out16):
    assert a.dtype == jnp.bfloat16
  for a, b in zip(jax.tree.leaves(out32[0]), jax.tree.leaves(out16[0])):
    b = np.asarray(b, np.float32)
    scale = float(np.abs(a).max()) + 1e-3
    assert float(np.abs(a - b).max()) <= 0.1 * scale


def test_train_updates_state(train_preset):
  variables, _, eval_out, _, _ = evaluate(train_preset)
  out_a, _, state = train(train_preset)
  old = jax.tree.leaves(variables["batch_stats"])
  new = jax.tree.leaves(state["batch_stats"])
  assert old and any(not np.array_equal(a, b) for a, b in zip(old, new))
  if train_preset.batch_norm:  # train mode normalises with batch statistics
    assert any(not np.allclose(a, b) for a, b in zip(
        jax.tree.leaves(eval_out[0]), jax.tree.leaves(out_a[0])))


def test_dropout_only_where_declared(train_preset):
  (logits_a, _), (logits_b, _), _ = train(train_preset)
  differ = any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(logits_a), jax.tree.leaves(logits_b)))
  assert differ == train_preset.dropout


def test_registered_names():
  assert set(MY_MODELS) <= set(models.names())
