"""Tests for kd_jax.convert without torch: timm / DINOv2 / torchvision state
dicts made of numpy arrays, run through independent numpy forwards written
here from the formulas, against the imported kd_jax models.

(tests/test_convert_reference.py compares with timm and torchvision
themselves where they are installed.)
"""
import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import erf

from kd_jax import convert, methods, models, train

# --------------------------------------------------------------------------
# ViT: a timm-layout state dict and a numpy forward


def vit_state(rng, *, width=32, depth=2, patch=8, grid=4, registers=2,
              layout="timm_dinov2", layerscale=True, classes=0):
  """Random timm / DINOv2 ViT weights. `layout`: "timm_dinov2" (timm's
  no_embed_class: no position row for [CLS]), "timm" (rows for [CLS] and
  registers), "dinov2" (facebookresearch: a [CLS] row, `register_tokens`,
  `mask_token`)."""
  d, hid = width, 4 * width

  def w(*shape, scale=0.2):
    return (scale * rng.normal(size=shape)).astype(np.float32)

  prefix = {"timm_dinov2": 0, "timm": 1 + registers, "dinov2": 1}[layout]
  s = {"cls_token": w(1, 1, d, scale=1.0),
       "pos_embed": w(1, prefix + grid * grid, d, scale=1.0),
       "patch_embed.proj.weight": w(d, 3, patch, patch, scale=0.05),
       "patch_embed.proj.bias": w(d)}
  if registers:
    key = "register_tokens" if layout == "dinov2" else "reg_token"
    s[key] = w(1, registers, d, scale=1.0)
  if layout == "dinov2":
    s["mask_token"] = w(1, d)
  for i in range(depth):
    b = f"blocks.{i}."
    s.update({b + "norm1.weight": 1 + w(d), b + "norm1.bias": w(d),
              b + "attn.qkv.weight": w(3 * d, d), b + "attn.qkv.bias": w(3 * d),
              b + "attn.proj.weight": w(d, d), b + "attn.proj.bias": w(d)})
    if layerscale:
      s[b + "ls1.gamma"] = 1 + w(d)
    s.update({b + "norm2.weight": 1 + w(d), b + "norm2.bias": w(d),
              b + "mlp.fc1.weight": w(hid, d), b + "mlp.fc1.bias": w(hid),
              b + "mlp.fc2.weight": w(d, hid), b + "mlp.fc2.bias": w(d)})
    if layerscale:
      s[b + "ls2.gamma"] = 1 + w(d)
  s.update({"norm.weight": 1 + w(d), "norm.bias": w(d)})
  if classes:
    s.update({"head.weight": w(classes, d), "head.bias": w(classes)})
  return s


def cubic(x, a=-0.5):
  """Keys' cubic convolution kernel."""
  x = np.abs(x)
  return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                  np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a,
                           0.0))


def resize_matrix(n_in, n_out):
  """(n_out, n_in) weights of antialiased bicubic resampling (PIL's, and
  torch's antialias=True): pixel centres aligned, the kernel widened by the
  shrink factor, weights normalised over the input."""
  scale = n_in / n_out
  support = max(scale, 1.0)
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    centre = (i + 0.5) * scale - 0.5
    wts = cubic((np.arange(n_in) - centre) / support)
    m[i] = wts / wts.sum()
  return m


def layer_norm(x, w, b, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def np_vit(s, x, *, heads, layout):
  """timm's / DINOv2's ViT forward in float64: all tokens after the final
  norm, and the head's logits (None without one)."""
  s = {k: v.astype(np.float64) for k, v in s.items()}
  x = x.astype(np.float64)
  b, hgt, wid, c = x.shape
  d, _, p, _ = s["patch_embed.proj.weight"].shape
  gh, gw = hgt // p, wid // p
  # Patches flattened as torch's weight (D, C, p, p) is.
  patches = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 5, 2, 4)
  t = patches.reshape(b, gh * gw, c * p * p) @ s[
      "patch_embed.proj.weight"].reshape(d, -1).T + s["patch_embed.proj.bias"]
  reg = s.get("reg_token", s.get("register_tokens"))
  r = 0 if reg is None else reg.shape[1]
  prefix = {"timm_dinov2": 0, "timm": 1 + r, "dinov2": 1}[layout]
  pos = s["pos_embed"]
  g0 = math.isqrt(pos.shape[1] - prefix)
  grid = pos[0, prefix:].reshape(g0, g0, d)
  grid = np.einsum("ai,bj,ijd->abd", resize_matrix(g0, gh),
                   resize_matrix(g0, gw), grid).reshape(1, gh * gw, d)
  cls = np.broadcast_to(s["cls_token"], (b, 1, d))
  regs = [] if reg is None else [np.broadcast_to(reg, (b, r, d))]
  if layout == "timm_dinov2":  # Position rows on the patches alone.
    t = np.concatenate([cls, *regs, t + grid], axis=1)
  elif layout == "timm":  # Rows on [CLS], registers and patches.
    t = np.concatenate([cls, *regs, t], axis=1) + np.concatenate(
        [pos[:, :prefix], grid], axis=1)
  else:  # DINOv2: rows on [CLS] and patches; registers inserted after.
    t = np.concatenate([cls + pos[:, :1], t + grid], axis=1)
    t = np.concatenate([t[:, :1], *regs, t[:, 1:]], axis=1)
  hd = d // heads
  i = 0
  while f"blocks.{i}.norm1.weight" in s:
    pre = f"blocks.{i}."
    y = layer_norm(t, s[pre + "norm1.weight"], s[pre + "norm1.bias"])
    qkv = y @ s[pre + "attn.qkv.weight"].T + s[pre + "attn.qkv.bias"]
    q, k, v = qkv.reshape(b, -1, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = (att @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
    o = o @ s[pre + "attn.proj.weight"].T + s[pre + "attn.proj.bias"]
    t = t + s.get(pre + "ls1.gamma", 1.0) * o
    y = layer_norm(t, s[pre + "norm2.weight"], s[pre + "norm2.bias"])
    y = y @ s[pre + "mlp.fc1.weight"].T + s[pre + "mlp.fc1.bias"]
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))  # Exact GELU.
    y = y @ s[pre + "mlp.fc2.weight"].T + s[pre + "mlp.fc2.bias"]
    t = t + s.get(pre + "ls2.gamma", 1.0) * y
    i += 1
  t = layer_norm(t, s["norm.weight"], s["norm.bias"])
  logits = (t[:, 0] @ s["head.weight"].T + s["head.bias"]
            if "head.weight" in s else None)
  return t, logits


def tiny_vit(**kw):
  args = dict(width=32, depth=2, num_heads=2, patch=8, image_size=32,
              num_registers=2, num_classes=0)
  args.update(kw)
  return models.build("vit_tiny", **args)


@functools.lru_cache(maxsize=None)
def _apply(model):
  return jax.jit(functools.partial(model.apply, train=False))


# (layout, LayerScale in the checkpoint, classes, model image size, input).
VIT_CASES = {
    # timm's DINOv2 layout at the learned size.
    "timm_dinov2": ("timm_dinov2", True, 0, 32, 32),
    # timm's class-token embedding with register rows, no LayerScale, a head;
    # a 48² input resamples the 4×4 grid to 6×6 at run time.
    "timm_upsampled": ("timm", False, 3, 32, 48),
    # DINOv2's own layout converted for 24² (the 4×4 grid shrunk to 3×3 once,
    # antialiased) and run at that size.
    "dinov2_shrunk": ("dinov2", True, 0, 24, 24),
}


@pytest.mark.parametrize("case", sorted(VIT_CASES))
def test_imported_vit_matches_numpy_forward(case):
  layout, ls, classes, size, side = VIT_CASES[case]
  rng = np.random.default_rng(0)
  state = vit_state(rng, layout=layout, layerscale=ls, classes=classes)
  model = tiny_vit(image_size=size, num_classes=classes)
  variables = convert.import_weights(state, model)
  # The imported tree is exactly the model's own.
  abstract = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(
      lambda a: a.shape, abstract)
  x = rng.normal(size=(2, side, side, 3)).astype(np.float32)
  if size != 32:  # The converted grid is the model's; numpy resamples from 4.
    assert variables["params"]["pos_embed"].shape == (1, 1 + (size // 8)**2,
                                                      32)
  logits, feats = _apply(model)(variables, x)
  tokens, want_logits = np_vit(state, x, heads=2, layout=layout)
  np.testing.assert_allclose(feats["embedding"], tokens[:, 0], atol=1e-4)
  np.testing.assert_allclose(feats["registers"], tokens[:, 1:3], atol=1e-4)
  np.testing.assert_allclose(feats["tokens"], tokens[:, 3:], atol=1e-4)
  if classes:
    np.testing.assert_allclose(logits, want_logits, atol=1e-4)


def test_resize_matrix_is_the_models_resampling():
  # The numpy formula above against vit.resize_pos_embed, up and down.
  from kd_jax.models import vit
  pos = np.random.default_rng(1).normal(size=(1, 25, 3)).astype(np.float32)
  for g in ((3, 3), (8, 6)):
    want = np.einsum("ai,bj,ijd->abd", resize_matrix(5, g[0]),
                     resize_matrix(5, g[1]), pos.reshape(5, 5, 3))
    np.testing.assert_allclose(vit.resize_pos_embed(pos, g),
                               want.reshape(1, -1, 3), atol=1e-5)


@pytest.mark.parametrize("edit,model_kw,match", [
    # Another width: the first key in the checkpoint's order names it.
    (None, dict(width=64), r"checkpoint key 'cls_token' has shape "
     r"\(1, 1, 32\), the model needs \(1, 1, 64\)"),
    (None, dict(patch=16, image_size=64),
     r"'patch_embed.proj.weight' has shape \(32, 3, 8, 8\), the model needs "
     r"\(32, 3, 16, 16\)"),
    (None, dict(depth=3), r"lacks 'blocks.2.norm1.weight' \(and 11 more"),
    (None, dict(num_registers=0), r"'reg_token' \(and 0 more\) is not in "
     "the model"),
    (lambda s: s.update({"head.weight": np.zeros((5, 32), np.float32),
                         "head.bias": np.zeros(5, np.float32)}), {},
     r"'head.weight' .* set the model's num_classes"),
    (lambda s: s.update(pos_embed=np.zeros((1, 15, 32), np.float32)), {},
     r"'pos_embed' has 15 rows, which is not a square grid"),
])
def test_vit_checkpoint_that_does_not_fit_is_one_clear_error(edit, model_kw,
                                                             match):
  state = vit_state(np.random.default_rng(0))
  if edit:
    edit(state)
  with pytest.raises(ValueError, match=match) as e:
    convert.import_weights(state, tiny_vit(**model_kw), what="w.pth")
  assert "\n" not in str(e.value) and str(e.value).startswith("w.pth: ")


# --------------------------------------------------------------------------
# ResNet: a torchvision-layout state dict and a numpy forward


def resnet_state(rng, *, blocks=(1, 1, 1, 1), bottleneck=False, width=8,
                 classes=5):
  """Random torchvision ResNet weights and BatchNorm statistics."""
  s = {}

  def conv(key, cout, cin, k):
    s[key + ".weight"] = (rng.normal(size=(cout, cin, k, k)) /
                          np.sqrt(cin * k * k)).astype(np.float32)

  def bn(key, c):
    s.update({key + ".weight": rng.uniform(0.5, 1.5, c),
              key + ".bias": rng.normal(0, 0.1, c),
              key + ".running_mean": rng.normal(0, 0.1, c),
              key + ".running_var": rng.uniform(0.5, 1.5, c),
              key + ".num_batches_tracked": np.array(7)})

  conv("conv1", width, 3, 7)
  bn("bn1", width)
  cin = width
  exp = 4 if bottleneck else 1
  for i, n in enumerate(blocks):
    mid = width * 2**i
    for j in range(n):
      key = f"layer{i + 1}.{j}"
      if bottleneck:
        conv(key + ".conv1", mid, cin, 1)
        conv(key + ".conv2", mid, mid, 3)
        conv(key + ".conv3", mid * 4, mid, 1)
      else:
        conv(key + ".conv1", mid, cin, 3)
        conv(key + ".conv2", mid, mid, 3)
      for k in range(1, 4 if bottleneck else 3):
        bn(f"{key}.bn{k}", mid * 4 if k == 3 else mid)
      if j == 0 and (i > 0 or cin != mid * exp):
        conv(key + ".downsample.0", mid * exp, cin, 1)
        bn(key + ".downsample.1", mid * exp)
      cin = mid * exp
  s["fc.weight"] = rng.normal(0, 0.1, (classes, cin)).astype(np.float32)
  s["fc.bias"] = rng.normal(0, 0.1, classes).astype(np.float32)
  return {k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v
          for k, v in s.items()}


def np_conv(x, w, stride=1):
  """NHWC × torch (O, I, k, k) convolution, padding (k - 1) // 2."""
  k = w.shape[-1]
  pad = (k - 1) // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))
  return np.einsum("bhwcij,ocij->bhwo", win[:, ::stride, ::stride], w)


def np_resnet(s, x, bottleneck=False):
  """torchvision's ResNet forward in eval mode, float64: (logits, pooled)."""
  def bn(y, key):
    return ((y - s[key + ".running_mean"]) /
            np.sqrt(s[key + ".running_var"] + 1e-5) * s[key + ".weight"]
            + s[key + ".bias"])

  relu = functools.partial(np.maximum, 0)
  y = relu(bn(np_conv(x.astype(np.float64), s["conv1.weight"], 2), "bn1"))
  yp = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  win = np.lib.stride_tricks.sliding_window_view(yp, (3, 3), axis=(1, 2))
  y = win[:, ::2, ::2].max(axis=(-2, -1))
  for i in range(1, 5):
    j = 0
    while f"layer{i}.{j}.conv1.weight" in s:
      key = f"layer{i}.{j}"
      stride = 2 if i > 1 and j == 0 else 1
      convs = 3 if bottleneck else 2
      z = y
      for k in range(1, convs + 1):
        # v1.5: the bottleneck strides in its 3×3 conv (conv2).
        st = stride if k == (2 if bottleneck else 1) else 1
        z = bn(np_conv(z, s[f"{key}.conv{k}.weight"], st), f"{key}.bn{k}")
        z = relu(z) if k < convs else z
      if f"{key}.downsample.0.weight" in s:
        y = bn(np_conv(y, s[key + ".downsample.0.weight"], stride),
               key + ".downsample.1")
      y = relu(z + y)
      j += 1
  pooled = y.mean(axis=(1, 2))
  return pooled @ s["fc.weight"].T + s["fc.bias"], pooled


@pytest.mark.parametrize("name,bottleneck,blocks", [
    ("resnet18", False, (2, 2, 2, 2)), ("resnet50", True, (3, 4, 6, 3))])
def test_imported_resnet_matches_numpy_forward(name, bottleneck, blocks):
  rng = np.random.default_rng(0)
  state = resnet_state(rng, blocks=blocks, bottleneck=bottleneck)
  model = models.build(name, width=8, num_classes=5)
  variables = convert.import_weights(state, model)
  x = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  logits, feats = _apply(model)(variables, x)
  want_logits, want_pooled = np_resnet(state, x, bottleneck)
  np.testing.assert_allclose(feats["embedding"], want_pooled, atol=1e-4)
  np.testing.assert_allclose(logits, want_logits, atol=1e-4)


def test_resnet_checkpoint_of_another_depth_is_one_clear_error():
  state = resnet_state(np.random.default_rng(0), blocks=(2, 2, 2, 2))
  with pytest.raises(ValueError, match=r"r18.pth: checkpoint key "
                     r"'layer1.0.conv1.weight' has shape \(8, 8, 3, 3\), the "
                     r"model needs \(8, 8, 1, 1\)$"):
    convert.import_weights(state, models.build("resnet50", width=8,
                                               num_classes=5),
                           what="r18.pth")
  with pytest.raises(ValueError, match=r"'fc.weight' .* num_classes"):
    convert.import_weights(state, models.build("resnet18", width=8,
                                               num_classes=None))


# --------------------------------------------------------------------------
# Saved once, loaded as a distillation teacher


def test_converted_vit_is_a_distill_teacher(tmp_path):
  rng = np.random.default_rng(3)
  state = vit_state(rng, layout="timm_dinov2")
  weights = str(tmp_path / "vit.npz")
  np.savez(weights, **state)
  out = str(tmp_path / "teacher")
  teacher = dict(name="vit_tiny", width=32, depth=2, num_heads=2, patch=8,
                 image_size=32, num_registers=2)
  # The saved config sets num_classes (the model's 0, no head), so the
  # data's 4 classes below do not give the teacher a head it lacks.
  saved = dict(teacher, num_classes=0)
  assert convert.convert(weights, teacher, out) == saved
  assert json.load(open(os.path.join(out, "model.json")))["model"] == saved
  with pytest.raises(ValueError, match="already holds a checkpoint"):
    convert.convert(weights, teacher, out)

  config = ml_collections.ConfigDict(dict(
      stage_order=("distilled",), compute_dtype="float32", layers="flax"))
  # num_classes=4 for the data: the saved config keeps the teacher headless.
  ctx = train.build_context(config, "distilled", str(tmp_path / "run"),
                            num_classes=4)
  stage = dict(method="distill",
               model=dict(name="vit_tiny", width=16, depth=1, patch=8,
                          image_size=32),
               teacher=dict(model=saved, checkpoint=out),
               losses=[dict(fn="embedding_cosine", student="embedding",
                            teacher="embedding", connector="linear")])
  method_cls = methods.METHODS["distill"]
  method_cls.check(stage, ctx)
  method, frozen = method_cls.from_config(stage, ctx)
  x = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  method.init(jax.random.key(0), x)
  got = method.teacher_outputs(frozen, x, outputs=["features.embedding"])[
      "features"]["embedding"]
  tokens, _ = np_vit(state, x, heads=2, layout="timm_dinov2")
  np.testing.assert_allclose(got, tokens[:, 0], atol=1e-4)


def test_command_converts_and_refuses_bad_arguments(tmp_path):
  state = resnet_state(np.random.default_rng(0))
  weights = str(tmp_path / "r.npz")
  np.savez(weights, **state)
  cmd = [sys.executable, "-m", "kd_jax.convert", f"--weights={weights}",
         "--model=resnet18", "--model_args=width=8,num_classes=5,"
         "stage_sizes=(1,1,1,1)", f"--out={tmp_path / 'r'}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                        check=False)
  assert done.returncode == 0, done.stderr
  assert "teacher=dict(model={'name': 'resnet18'" in done.stdout
  saved = json.load(open(tmp_path / "r" / "model.json"))
  assert saved["model"]["stage_sizes"] == [1, 1, 1, 1]
  from kd_jax import checkpoint
  loaded = checkpoint.load_model_variables(str(tmp_path / "r"))
  np.testing.assert_array_equal(
      loaded["batch_stats"]["stem_bn"]["var"], state["bn1.running_var"])
  np.testing.assert_array_equal(loaded["params"]["head"]["kernel"],
                                state["fc.weight"].T)
  cmd[4] = "--model=resnet50"
  cmd[6] = f"--out={tmp_path / 'r50'}"
  done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                        check=False)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith(
      f"error: {weights} into resnet50: checkpoint key 'layer1.0.conv1.weight'")
