"""kd_jax.convert against timm and torchvision themselves, with random
weights (nothing is downloaded): the imported kd_jax models give the same
outputs to 1e-4.

Needs the `reference` extra (`pip install -e ".[reference]"`: torch, timm,
torchvision, safetensors); skipped without it. Inputs are small (32²–96²)
so the full-depth ViT-S/B and ResNet-18/50 run in seconds; ViT-L runs 2 of
its 24 blocks (its width, heads and MLP are the full model's).
"""
import functools
import importlib

import jax
import numpy as np
import pytest

from kd_jax import convert, models


def _import(name):
  # Not importorskip alone: a torchvision built for another torch fails on
  # import with a RuntimeError, not an ImportError.
  try:
    return importlib.import_module(name)
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"{name} is not usable here ({type(e).__name__}: "
                f"{str(e)[:80]})", allow_module_level=True)


torch = _import("torch")
timm = _import("timm")
torchvision = _import("torchvision")
safetensors_torch = _import("safetensors.torch")
from timm.layers import resample_abs_pos_embed  # noqa: E402


def randomised(module, seed=0):
  """`module` in eval mode with every norm, token, position embedding,
  LayerScale and BatchNorm statistic drawn at random (timm and torchvision
  start them at constants, which would hide a mix-up)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in module.state_dict().items():
      if not t.is_floating_point():
        continue
      leaf = name.rsplit(".", 1)[-1]
      if t.ndim == 1 and leaf in ("weight", "gamma", "running_var"):
        t.copy_(torch.rand(t.shape, generator=g) + 0.5)
      elif t.ndim == 1 or leaf in ("cls_token", "reg_token", "pos_embed"):
        t.copy_(torch.randn(t.shape, generator=g) * 0.5)
  return module.eval()


def state_of(module):
  return {k: v.detach().float().numpy() if v.is_floating_point()
          else v.numpy() for k, v in module.state_dict().items()}


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@functools.lru_cache(maxsize=None)
def _apply(model):
  return jax.jit(functools.partial(model.apply, train=False))


def compare_vit(ref, model, x, registers=0):
  """kd_jax's `model` imported from timm's `ref`, both run on `x` (NHWC)."""
  variables = convert.import_weights(state_of(ref), model)
  logits, feats = _apply(model)(variables, x)
  with torch.no_grad():
    tokens = ref.forward_features(nchw(x)).numpy()
    want_logits = ref.forward_head(torch.from_numpy(tokens)).numpy()
  np.testing.assert_allclose(feats["embedding"], tokens[:, 0], atol=1e-4)
  np.testing.assert_allclose(feats["tokens"], tokens[:, 1 + registers:],
                             atol=1e-4)
  if registers:
    np.testing.assert_allclose(feats["registers"], tokens[:, 1:1 + registers],
                               atol=1e-4)
  np.testing.assert_allclose(logits, want_logits, atol=1e-4)


def _x(side, seed=1):
  return np.random.default_rng(seed).normal(
      size=(2, side, side, 3)).astype(np.float32)


@pytest.mark.parametrize("timm_name,name,kw", [
    # timm's plain ViT-S/16 (no LayerScale: imported with γ = 1) with a head.
    ("vit_small_patch16_224", "vit_s16", dict(num_classes=10)),
    # ViT-B/16 with LayerScale, headless (UNI's and DINOv2's layout).
    ("vit_base_patch16_224", "vit_b16", dict(num_classes=0, init_values=1e-5)),
    # ViT-L/16 as UNI builds it, 2 of its blocks.
    ("vit_large_patch16_224", "vit_l16",
     dict(num_classes=0, init_values=1e-5, depth=2)),
])
def test_vit_variants_match_timm(timm_name, name, kw):
  kw = dict(kw)
  depth = kw.get("depth")
  ref = randomised(timm.create_model(timm_name, pretrained=False,
                                     img_size=32, **kw))
  extra = {"depth": depth} if depth else {}
  if "init_values" not in kw:
    extra["layerscale"] = 1e-5  # The default: filled with γ = 1.
  model = models.build(name, image_size=32, num_classes=kw["num_classes"],
                       **extra)
  compare_vit(ref, model, _x(32))


@pytest.fixture(scope="module")
def dinov2_reg4():
  # timm's DINOv2 with registers: no position row for [CLS], 4 registers,
  # LayerScale; 56² = a 4 × 4 grid of 14² patches.
  return randomised(timm.create_model(
      "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56,
      dynamic_img_size=True))


def test_dinov2_registers_layerscale_match_timm(dinov2_reg4):
  model = models.build("vit_s14", image_size=56, num_registers=4)
  compare_vit(dinov2_reg4, model, _x(56), registers=4)


@pytest.mark.parametrize("side", [42, 84])
def test_dinov2_other_input_size_matches_timm_dynamic_img_size(dinov2_reg4,
                                                               side):
  # 3 × 3 and 6 × 6 grids from the 4 × 4 one: kd_jax resamples at run time
  # as timm's dynamic_img_size does.
  model = models.build("vit_s14", image_size=56, num_registers=4)
  compare_vit(dinov2_reg4, model, _x(side, seed=side), registers=4)


@pytest.mark.parametrize("new", [32, 96])
def test_converted_to_another_grid_matches_timm_resampled(new):
  # A checkpoint learned at 64² (4 × 4) converted for `new`²: the same
  # function as timm's model built for `new`² loading the checkpoint with
  # its position embedding resampled by resample_abs_pos_embed.
  ref64 = randomised(timm.create_model(
      "vit_small_patch16_224", pretrained=False, img_size=64, depth=2,
      num_classes=0, init_values=1e-5))
  state = ref64.state_dict()
  ref = timm.create_model("vit_small_patch16_224", pretrained=False,
                          img_size=new, depth=2, num_classes=0,
                          init_values=1e-5).eval()
  state["pos_embed"] = resample_abs_pos_embed(
      state["pos_embed"], new_size=(new // 16, new // 16),
      num_prefix_tokens=1)
  ref.load_state_dict(state)
  model = models.build("vit_s16", image_size=new, depth=2)
  variables = convert.import_weights(state_of(ref64), model)
  assert variables["params"]["pos_embed"].shape == (1, 1 + (new // 16)**2,
                                                    384)
  _, feats = _apply(model)(variables, _x(new))
  with torch.no_grad():
    tokens = ref.forward_features(nchw(_x(new))).numpy()
  np.testing.assert_allclose(feats["embedding"], tokens[:, 0], atol=1e-4)
  np.testing.assert_allclose(feats["tokens"], tokens[:, 1:], atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnets_match_torchvision(name):
  # Both sides compute in float64 from the same float32 weights: in float32
  # ResNet-50's random-statistics activations (up to ~1e3 here) differ from
  # their float64 values by more than 1e-4 in torch alone.
  ref = randomised(getattr(torchvision.models, name)(weights=None)).double()
  x = _x(64)
  with torch.no_grad():
    body = torch.nn.Sequential(*list(ref.children())[:-1])
    pooled = body(nchw(x).double()).flatten(1).numpy()
    want = ref(nchw(x).double()).numpy()
  with jax.enable_x64(True):
    model = models.build(name, dtype=jax.numpy.float64)
    variables = jax.tree.map(lambda a: np.asarray(a, np.float64),
                             convert.import_weights(state_of(ref), model))
    logits, feats = jax.jit(functools.partial(model.apply, train=False))(
        variables, x.astype(np.float64))
  np.testing.assert_allclose(feats["embedding"], pooled, atol=1e-4)
  np.testing.assert_allclose(logits, want, atol=1e-4)


def test_files_torch_safetensors_and_training_checkpoints(tmp_path):
  ref = randomised(timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
      num_classes=0))
  want = state_of(ref)
  torch.save(ref.state_dict(), tmp_path / "a.pth")
  torch.save({"model": ref.state_dict(), "epoch": 3}, tmp_path / "b.pth")
  safetensors_torch.save_file(ref.state_dict(), str(tmp_path / "c.safetensors"))
  for f in ("a.pth", "b.pth", "c.safetensors"):
    got = convert.load_state_dict(str(tmp_path / f))
    assert sorted(got) == sorted(want)  # safetensors sorts its keys.
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # bfloat16 files come back as float32 (numpy has no bfloat16).
  safetensors_torch.save_file({k: v.bfloat16() for k, v in
                               ref.state_dict().items()},
                              str(tmp_path / "d.safetensors"))
  got = convert.load_state_dict(str(tmp_path / "d.safetensors"))
  assert got["cls_token"].dtype == np.float32
  np.testing.assert_allclose(got["cls_token"], want["cls_token"], rtol=1e-2)
  torch.save(ref, tmp_path / "whole.pth")
  with pytest.raises(ValueError, match=r"whole.pth is not a PyTorch state "
                     "dict torch.load can read"):
    convert.load_state_dict(str(tmp_path / "whole.pth"))
