"""Tests for the recipe-specific models: SqueezeU-Net, TransUNet, MED-TEX.

Parameter counts use `jax.eval_shape` (nothing allocated); anything executed
runs a tiny preset on a tiny input, once per dtype, through module-scoped
jitted functions.
"""
import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models


def count_params(model, input_shape):
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), jnp.zeros(input_shape))
  return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def documented_patterns(module):
  """Regexes for the quoted names in a module docstring: `"enc{i}"` and
  `"enc1"` both match any `enc<digits>`."""
  pats = []
  for name in re.findall(r'"([A-Za-z0-9_.{}]+)"', module.__doc__):
    pat = re.escape(re.sub(r"\{[^}]*\}|\d+", "#", name)).replace("\\#", "#")
    pats.append(re.compile(pat.replace("#", r"\d+") + "$"))
  return pats


def assert_documented(model, features):
  pats = documented_patterns(sys.modules[type(model).__module__])
  undocumented = [k for k in features if not any(p.match(k) for p in pats)]
  assert not undocumented, f"features not in the docstring: {undocumented}"


def numpy_variables(model, x, seed=0):
  """Variables shaped by tracing `model.init`, filled by numpy.

  Compiling jax.random for many small multi-dimensional shapes is very slow
  with XLA:CPU (seconds per parameter with threefry), so executed tests fill
  the traced shapes directly: kernels ~ N(0, 1/fan_in), "scale"/"var" ones,
  "bias"/"mean" zeros, anything else N(0, 0.02²).
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), x)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ("bias", "mean"):
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      std = 1 / np.sqrt(fan_in)
    else:
      std = 0.02
    return jnp.asarray(rng.normal(0, std, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


class Runner:
  """Builds variables once and jits one function returning the eval
  forward, the train forward and the updated batch statistics."""

  def __init__(self, model, x):
    self.model, self.x = model, x
    self.variables = numpy_variables(model, x)

    def both(variables, x, rng):
      ev = model.apply(variables, x, train=False)
      tr, upd = model.apply(variables, x, train=True, mutable=["batch_stats"],
                            rngs={"dropout": rng})
      return ev, tr, upd

    self.out = jax.jit(both)(self.variables, x, jax.random.key(1))

  @property
  def eval(self):
    return self.out[0]

  @property
  def train(self):
    return self.out[1]


def check_common(runner, dtype):
  """Contract checks every executed model passes."""
  (logits, feats), (tlogits, tfeats), upd = runner.out
  assert_documented(runner.model, feats)
  assert set(tfeats) == set(feats)
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(runner.variables))
  assert logits.dtype == dtype
  for k, v in feats.items():
    assert v.dtype == dtype, k
    assert np.all(np.isfinite(np.asarray(v, np.float32))), k
  assert "embedding" in feats and feats["embedding"].ndim == 2
  # Eval is a pure function of the inputs; BatchNorm statistics change only
  # in train mode.
  if "batch_stats" in runner.variables:
    assert not np.allclose(np.asarray(logits, np.float32),
                           np.asarray(tlogits, np.float32))
    before = jax.tree.leaves(runner.variables["batch_stats"])
    after = jax.tree.leaves(upd["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


# --------------------------------------------------------------------------
# SqueezeU-Net


def squeeze_unet_param_count(in_ch, num_classes, width, depth, ratio=8):
  """Independent count from the documented layout: convs without bias, each
  followed by BN (scale, bias); the 1×1 head has a bias."""
  def conv_bn(cin, cout, k):
    return k * k * cin * cout + 2 * cout

  def fire(cin, cout, up=False):
    s, half = max(cout // ratio, 4), cout // 2
    return (conv_bn(cin, s, 1) + conv_bn(s, half, 2 if up else 1)
            + conv_bn(s, cout - half, 3))

  n = conv_bn(in_ch, width, 3) + fire(width, width)
  cin = width
  for i in range(1, depth + 1):  # enc2..enc{depth}, then the bottleneck
    ch = width * 2**i
    n += fire(cin, ch) + fire(ch, ch)
    cin = ch
  for i in reversed(range(depth)):
    ch = width * 2**i
    n += fire(cin, ch, up=True) + fire(2 * ch, ch)
    cin = ch
  return n + cin * num_classes + num_classes


def test_squeeze_unet_default_is_the_0p4m_student():
  model = models.build("squeeze_unet", num_classes=9)
  n = count_params(model, (1, 224, 224, 1))
  assert n == squeeze_unet_param_count(1, 9, 24, 4) == 382_737
  assert abs(n - 0.4e6) / 0.4e6 < 0.05
  assert models.default_input("squeeze_unet") == (1, 224, 224, 1)


@pytest.mark.parametrize("width,depth,in_ch", [(4, 2, 3), (8, 3, 1)])
def test_squeeze_unet_param_count_formula(width, depth, in_ch):
  model = models.build("squeeze_unet", num_classes=5, width=width,
                       depth=depth)
  assert count_params(model, (1, 32, 32, in_ch)) == squeeze_unet_param_count(
      in_ch, 5, width, depth)


@pytest.fixture(scope="module", params=[jnp.float32, jnp.bfloat16],
                ids=["f32", "bf16"])
def squeeze_run(request):
  model = models.build("squeeze_unet", num_classes=3, width=4, depth=2,
                       dropout_rate=0.5, dtype=request.param)
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 1))
  return Runner(model, x), request.param


def test_squeeze_unet_contract(squeeze_run):
  runner, dtype = squeeze_run
  check_common(runner, dtype)
  logits, feats = runner.eval
  assert logits.shape == (2, 16, 16, 3)
  want = {"enc1": (2, 16, 16, 4), "enc2": (2, 8, 8, 8),
          "bottleneck": (2, 4, 4, 16), "dec2": (2, 8, 8, 8),
          "dec1": (2, 16, 16, 4), "embedding": (2, 16)}
  assert {k: v.shape for k, v in feats.items()} == want
  np.testing.assert_allclose(
      np.asarray(feats["embedding"], np.float32),
      np.asarray(feats["bottleneck"], np.float32).mean(axis=(1, 2)),
      rtol=2e-2, atol=2e-2)
  # Dropout acts in train mode only: some bottleneck entries are zeroed.
  _, tfeats = runner.train
  assert np.mean(np.asarray(tfeats["bottleneck"]) == 0) > np.mean(
      np.asarray(feats["bottleneck"]) == 0)


def test_squeeze_unet_rejects_bad_input_size():
  model = models.build("squeeze_unet", width=4, depth=2)
  with pytest.raises(ValueError, match="divisible by 4"):
    jax.eval_shape(functools.partial(model.init, train=False),
                   jax.random.key(0), jnp.zeros((1, 18, 16, 1)))


# --------------------------------------------------------------------------
# TransUNet


def transunet_param_count(blocks, w, hidden, depth, mlp, grid, head_ch, dec,
                          num_classes):
  """Independent count from the paper / reference layout (StdConvs without
  bias, GroupNorm and BatchNorm scale + bias, Linear layers with bias)."""
  norm = lambda c: 2 * c
  n = 49 * 3 * w + norm(w)  # root
  cin = w
  for s, units in enumerate(blocks):
    out, mid = 4 * w * 2**s, w * 2**s
    for _ in range(units):
      n += (cin * mid + norm(mid) + 9 * mid * mid + norm(mid) + mid * out
            + norm(out))
      if cin != out:
        n += cin * out + norm(out)
      cin = out
  n += cin * hidden + hidden + grid * grid * hidden  # embeddings
  n += depth * (2 * norm(hidden) + 4 * (hidden * hidden + hidden)
                + hidden * mlp + mlp + mlp * hidden + hidden)
  n += norm(hidden)  # encoder norm
  n += 9 * hidden * head_ch + norm(head_ch)  # conv_more
  cin = head_ch
  for ch, skip in zip(dec, [8 * w, 4 * w, w, 0]):
    n += 9 * (cin + skip) * ch + norm(ch) + 9 * ch * ch + norm(ch)
    cin = ch
  return n + 9 * cin * num_classes + num_classes


def test_transunet_b16_matches_paper_count_and_names():
  model = models.build("transunet_b16", num_classes=9)
  x = jnp.zeros((1, 224, 224, 1))
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), x)
  n = sum(v.size for v in jax.tree.leaves(variables["params"]))
  assert n == transunet_param_count((3, 4, 9), 64, 768, 12, 3072, 14, 512,
                                    (256, 128, 64, 16), 9) == 105_277_081
  assert abs(n - 105.28e6) / 105.28e6 < 0.01  # The paper's 105.28 M.
  logits, feats = jax.eval_shape(
      functools.partial(model.apply, train=False), variables, x)
  assert logits.shape == (1, 224, 224, 9)
  assert feats["encoder.block11"].shape == (1, 196, 768)
  assert "encoder.block12" not in feats
  assert feats["bottleneck"].shape == (1, 14, 14, 768)
  assert feats["cnn.block3"].shape == (1, 14, 14, 1024)
  assert feats["decoder.block3"].shape == (1, 224, 224, 16)
  assert_documented(model, feats)


def test_transunet_tiny_count():
  model = models.build("transunet_tiny", num_classes=9)
  assert count_params(model, (1, 128, 128, 1)) == transunet_param_count(
      (1, 1, 1), 16, 128, 2, 256, 8, 64, (64, 32, 16, 8), 9)


@pytest.fixture(scope="module", params=[jnp.float32, jnp.bfloat16],
                ids=["f32", "bf16"])
def transunet_run(request):
  # 64² input: also exercises resizing the 8×8 position embedding to 4×4.
  model = models.build("transunet_tiny", num_classes=3, dtype=request.param)
  x = jax.random.normal(jax.random.key(2), (2, 64, 64, 1))
  return Runner(model, x), request.param


def test_transunet_contract(transunet_run):
  runner, dtype = transunet_run
  check_common(runner, dtype)
  logits, feats = runner.eval
  assert logits.shape == (2, 64, 64, 3)
  want = {
      "cnn.root": (2, 32, 32, 16), "cnn.block1": (2, 16, 16, 64),
      "cnn.block2": (2, 8, 8, 128), "cnn.block3": (2, 4, 4, 256),
      "encoder.block0": (2, 16, 128), "encoder.block1": (2, 16, 128),
      "encoder": (2, 16, 128), "bottleneck": (2, 4, 4, 128),
      "decoder.block0": (2, 8, 8, 64), "decoder.block1": (2, 16, 16, 32),
      "decoder.block2": (2, 32, 32, 16), "decoder.block3": (2, 64, 64, 8),
      "embedding": (2, 128),
  }
  assert {k: v.shape for k, v in feats.items()} == want
  np.testing.assert_array_equal(
      np.asarray(feats["bottleneck"]).reshape(2, 16, 128),
      np.asarray(feats["encoder"]))
  # The CNN trunk has no BatchNorm and no dropout: identical in both modes.
  _, tfeats = runner.train
  np.testing.assert_array_equal(np.asarray(feats["cnn.block3"]),
                                np.asarray(tfeats["cnn.block3"]))
  # Dropout (embeddings, MLP) acts only in train mode.
  assert not np.allclose(np.asarray(feats["encoder"], np.float32),
                         np.asarray(tfeats["encoder"], np.float32))


def test_transunet_count_does_not_depend_on_input_channels():
  model = models.build("transunet_tiny")
  assert count_params(model, (1, 64, 64, 1)) == count_params(
      model, (1, 64, 64, 3))


# --------------------------------------------------------------------------
# MED-TEX


def medtex_cnn_param_count(widths, kernel=3, in_ch=3, num_classes=5):
  n, cin = 0, in_ch
  for w in widths:
    n += kernel * kernel * cin * w + 2 * w  # conv without bias, BN
    cin = w
  return n + cin * num_classes + num_classes


def test_medtex_teacher_and_student_sizes():
  teacher = count_params(models.build("medtex_teacher"), (1, 224, 224, 3))
  student = count_params(models.build("medtex_student"), (1, 224, 224, 3))
  assert teacher == medtex_cnn_param_count((32, 64, 128, 256)) == 390_181
  assert student == medtex_cnn_param_count((4, 8, 8, 9)) == 1_728
  assert abs(teacher - 390e3) / 390e3 < 0.01  # paper: ≈ 390 k
  assert abs(student - 1.7e3) / 1.7e3 < 0.02  # paper: ≈ 1.7 k
  assert round(teacher / student) == 226  # paper: "226× smaller"


MEDTEX_CASES = {
    "teacher": lambda dtype: models.build("medtex_teacher", dtype=dtype),
    "student": lambda dtype: models.build("medtex_student", dtype=dtype),
    "explainer": lambda dtype: models.build("medtex_explainer", width=4,
                                            depth=2, dtype=dtype),
}


@pytest.fixture(scope="module",
                params=[(k, d) for k in MEDTEX_CASES
                        for d in (jnp.float32, jnp.bfloat16)],
                ids=lambda p: f"{p[0]}-{jnp.dtype(p[1]).name}")
def medtex_run(request):
  kind, dtype = request.param
  x = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
  return kind, Runner(MEDTEX_CASES[kind](dtype), x), dtype


def test_medtex_contract(medtex_run):
  kind, runner, dtype = medtex_run
  check_common(runner, dtype)
  out, feats = runner.eval
  shapes = {k: v.shape for k, v in feats.items()}
  if kind == "explainer":
    assert out.shape == (2, 32, 32, 1)
    assert shapes == {"enc1": (2, 32, 32, 4), "enc2": (2, 16, 16, 8),
                      "bottleneck": (2, 8, 8, 16), "dec2": (2, 16, 16, 8),
                      "dec1": (2, 32, 32, 4), "mask_logits": (2, 32, 32, 1),
                      "embedding": (2, 16)}
    m = np.asarray(out, np.float32)
    assert np.all((m >= 0) & (m <= 1))
    np.testing.assert_allclose(
        m, 1 / (1 + np.exp(-np.asarray(feats["mask_logits"], np.float32))),
        rtol=1e-2, atol=1e-2)
  else:
    w = (32, 64, 128, 256) if kind == "teacher" else (4, 8, 8, 9)
    assert out.shape == (2, 5)
    assert shapes == {"block1": (2, 16, 16, w[0]), "block2": (2, 8, 8, w[1]),
                      "block3": (2, 4, 4, w[2]), "block4": (2, 2, 2, w[3]),
                      "embedding": (2, w[3])}
    assert all(np.all(np.asarray(v) >= 0) for v in feats.values())  # ReLU


def test_medtex_explainer_per_channel_mask():
  model = models.build("medtex_explainer", width=4, depth=2, per_channel=True)
  x = jnp.zeros((1, 16, 16, 3))
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), x)
  mask, _ = jax.eval_shape(functools.partial(model.apply, train=False),
                           variables, x)
  assert mask.shape == (1, 16, 16, 3)
  with pytest.raises(ValueError, match="divisible by 4"):
    jax.eval_shape(functools.partial(model.init, train=False),
                   jax.random.key(0), jnp.zeros((1, 18, 16, 3)))
