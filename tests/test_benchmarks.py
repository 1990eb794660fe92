"""The PyTorch twins of benchmarks/torch_models.py against kd_jax.

The benchmark's comparison is only fair if each twin is the same network:
the same parameter count, and, with kd_jax's weights copied in, the same
outputs and the same loss. Skipped when torch is not installed (it is the
`bench` extra).
"""
import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks"))
import distill_step  # noqa: E402  pylint: disable=wrong-import-position
import torch_models  # noqa: E402  pylint: disable=wrong-import-position

from kd_jax import losses, models  # noqa: E402  pylint: disable=g-import-not-at-top
from kd_jax.models import connectors  # noqa: E402  pylint: disable=g-import-not-at-top


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


def _eval_outputs(model, twin, variables, x):
  """Eval-mode (logits, features) of the kd_jax model and of its twin,
  after checking the twin holds as many parameters."""
  assert torch_models.count_params(twin) == sum(
      v.size for v in jax.tree.leaves(variables["params"]))
  logits, feats = jax.jit(functools.partial(model.apply, train=False))(
      variables, x)
  with torch.no_grad():
    t_logits, t_feats = twin(_nchw(x))
  return logits, feats, t_logits, t_feats


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
  logits, feats, t_logits, t_feats = _eval_outputs(model, twin, variables, x)
  # float32 sums in another order: 1e-5 relative on top of 1e-5 absolute.
  np.testing.assert_allclose(t_logits.permute(0, 2, 3, 1).numpy(), logits,
                             rtol=1e-5, atol=1e-5)
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


def _init_variables(model, x):
  """kd_jax's initial variables of `model` (init compiled at XLA backend
  level 0, as the benchmark does), with random BatchNorm scales, biases and
  running statistics and random conv biases, so that a mix-up of any of
  them shows; LayerScale's gammas too (at their 1e-5 start the residual
  branches they scale would barely show)."""
  init = jax.jit(functools.partial(model.init, train=False))
  key = jax.random.key(0)
  variables = init.lower(key, x).compile(
      compiler_options={"xla_backend_optimization_level": 0})(key, x)
  rng = np.random.default_rng(1)

  def draw(path, v):
    leaf = path[-1].key
    if leaf in ("scale", "var", "gamma"):
      return rng.uniform(0.5, 1.5, size=v.shape).astype(np.float32)
    if leaf in ("bias", "mean"):
      return rng.normal(scale=0.1, size=v.shape).astype(np.float32)
    return np.asarray(v)

  return jax.tree_util.tree_map_with_path(draw, variables)


def _assert_close(got_nchw, want_nhwc, rtol=1e-4):
  want = np.asarray(want_nhwc)
  got = got_nchw.permute(0, 2, 3, 1).numpy() if got_nchw.ndim == 4 else (
      got_nchw.numpy())
  # Relative to the map's scale: the 101-layer teacher's logits reach ~10.
  np.testing.assert_allclose(got, want, rtol=rtol,
                             atol=rtol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("name", ["pspnet_resnet101", "pspnet_resnet18"])
def test_pspnet_twin_matches_eval_outputs(name):
  """The benchmark pair's models at full size, 9 classes, 1 channel."""
  model = models.build(name, num_classes=9)
  x = np.random.default_rng(0).uniform(size=(2, 64, 64, 1)).astype(
      np.float32)
  variables = _init_variables(model, x)
  twin = _twin(name, dict(num_classes=9), variables, 1)
  assert torch_models.count_params(twin) == sum(
      v.size for v in jax.tree.leaves(variables["params"]))
  logits, feats = jax.jit(functools.partial(model.apply, train=False))(
      variables, x)
  with torch.no_grad():
    t_logits, t_feats = twin(_nchw(x), aux=True)
  _assert_close(t_logits, logits)
  for k in ("stem", "layer3", "layer4", "head", "embedding", "aux_logits"):
    _assert_close(t_feats[k], feats[k])
  # As PyTorch PSPNets do, the twin skips the auxiliary head in eval mode
  # (XLA drops it from kd_jax's step, where nothing reads it).
  with torch.no_grad():
    assert "aux_logits" not in twin(_nchw(x))[1]


def test_pspnet_twin_matches_train_outputs():
  """Train mode (batch statistics, aux head) with dropout 0: with dropout
  the masks are the frameworks' own random draws. The batch variance as
  PyTorch computes it (two passes): flax's one-pass E[x²] − E[x]² rounds
  differently, by up to 3e-4 on these logits."""
  kw = dict(num_classes=5, width=8, dropout=0.0)
  model = models.build("pspnet_resnet18", **kw).clone(
      norm=functools.partial(nn.BatchNorm, use_fast_variance=False))
  x = np.random.default_rng(0).uniform(size=(2, 64, 64, 1)).astype(
      np.float32)
  variables = _init_variables(model, x)
  twin = _twin("pspnet_resnet18", kw, variables, 1).train()
  (logits, feats), _ = jax.jit(functools.partial(
      model.apply, train=True, mutable=["batch_stats"]))(variables, x)
  with torch.no_grad():
    t_logits, t_feats = twin(_nchw(x))
  _assert_close(t_logits, logits, rtol=1e-4)
  _assert_close(t_feats["aux_logits"], feats["aux_logits"], rtol=1e-4)


@pytest.mark.parametrize("name", ["pspnet_resnet101", "pspnet_resnet50",
                                  "pspnet_resnet18"])
def test_pspnet_param_count_equal(name):
  model = models.build(name, num_classes=9)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), jnp.zeros((1, 64, 64, 1)))
  n_jax = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  assert torch_models.count_params(torch_models.build(name, 9)) == n_jax


def test_vit_efficientvit_pair_param_counts_equal():
  """The pair's models as the benchmark builds them (9 classes, 1 channel,
  64²); the twins on the meta device: counting needs no memory."""
  _, t_cfg, s_cfg = distill_step.pair_config("vit_efficientvit", 64)
  assert t_cfg["image_size"] == 64  # No position-embedding resize.
  for cfg in (t_cfg, s_cfg):
    kw = {k: v for k, v in cfg.items() if k != "name"}
    model = models.build(cfg["name"], num_classes=9, **kw)
    shapes = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.key(0), jnp.zeros((1, 64, 64, 1)))
    with torch.device("meta"):
      twin = torch_models.build(cfg["name"], 9, in_channels=1, **kw)
    assert torch_models.count_params(twin) == sum(
        x.size for x in jax.tree.leaves(shapes["params"])), cfg


@pytest.mark.parametrize("name,kw,keys", [
    ("vit_tiny", dict(num_classes=5, image_size=32),
     ("block0", "block1", "tokens", "patch_map")),
    # No head (logits = [CLS]) and registers between [CLS] and the patches.
    ("vit_tiny", dict(num_classes=0, image_size=32, num_registers=2),
     ("block1", "registers", "patch_map")),
    ("efficientvit_b0", dict(num_classes=5),
     ("stage0", "stage2", "stage3", "stage4")),
])
def test_vit_and_efficientvit_twins_match_eval_outputs(name, kw, keys):
  """Tiny sizes (32², batch 2, 1 channel), kd_jax's init with random norm
  statistics, biases and LayerScales: every variable is copied, and the
  logits, "embedding" and intermediate features agree."""
  model = models.build(name, **kw)
  x = np.random.default_rng(0).uniform(size=(2, 32, 32, 1)).astype(
      np.float32)
  variables = _init_variables(model, x)
  twin = _twin(name, kw, variables, 1)
  logits, feats, t_logits, t_feats = _eval_outputs(model, twin, variables, x)
  assert set(t_feats) == set(feats)
  _assert_close(t_logits, logits)
  for k in ("embedding",) + keys:
    _assert_close(t_feats[k], feats[k])


def test_embedding_cosine_and_linear_connector_match_kd_jax():
  """Value and input gradient of the pair's loss term; one teacher row is
  zero, so the zero-norm branch of the normalisation is compared too."""
  rng = np.random.default_rng(2)
  s = rng.normal(size=(4, 24)).astype(np.float32)
  t = rng.normal(size=(4, 16)).astype(np.float32)
  t[0] = 0.0
  conn = connectors.build_connector("linear", 16)
  params = conn.init(jax.random.key(3), jnp.asarray(s))
  params = jax.tree.map(lambda v: v + rng.normal(
      scale=0.1, size=v.shape).astype(np.float32), params)  # Nonzero bias.
  objective = losses.objective([dict(
      fn="embedding_cosine", student="embedding", teacher="embedding",
      connector="linear", weight=2.0)])

  def loss(s):
    out = conn.apply(params, s)
    return objective({"features": {"embedding_cosine": (out, t)}})[0]

  value, grad = jax.value_and_grad(loss)(jnp.asarray(s))
  twin = torch_models.LinearConnector(24, 16)
  torch_models.load_flax_variables(twin, params)
  t_s = torch.from_numpy(s).requires_grad_(True)
  t_value = 2.0 * torch_models.embedding_cosine(twin(t_s),
                                                torch.from_numpy(t))
  t_value.backward()
  np.testing.assert_allclose(float(t_value.detach()), float(value), rtol=1e-5)
  np.testing.assert_allclose(t_s.grad.numpy(), grad, rtol=1e-4, atol=1e-6)


def test_vit_efficientvit_student_only_is_refused():
  """The pair has no per-pixel student: --teacher_cache adds only the
  cached worker, and an explicit student-only worker stops the run before
  any worker starts."""
  args = distill_step.parse_args(["--pair=vit_efficientvit",
                                  "--teacher_cache"])
  configs = distill_step._jax_configs(args)  # pylint: disable=protected-access
  assert [flags for _, _, flags in configs] == ["", "mode=cached"]
  with pytest.raises(SystemExit, match="no student-only step"):
    distill_step.main(["--pair=vit_efficientvit", "--variant=1:mode=student"])


def test_layers_and_tree_workers():
  """--layers gives one kd_jax worker per value; a variant may run another
  checkout's kd_jax with its own environment; unknown options stop the run
  before any worker starts."""
  args = distill_step.parse_args([
      "--layers=cpu,flax", "--variant=1:tree=/tmp/kd_old KD_JAX_NATIVE=0"])
  assert distill_step._jax_configs(args) == [  # pylint: disable=protected-access
      ("kd_jax jit, 1 device, layers=cpu", 1, "layers=cpu"),
      ("kd_jax jit, 1 device, layers=flax", 1, "layers=flax"),
      ("kd_jax jit, 1 device, tree=/tmp/kd_old, KD_JAX_NATIVE=0", 1,
       "tree=/tmp/kd_old KD_JAX_NATIVE=0")]
  opts = distill_step.worker_options(
      "tree=/tmp/kd_old KD_JAX_NATIVE=0 mode=cached --xla_foo=1")
  assert opts == dict(mode="cached", layers="", tree="/tmp/kd_old",
                      env={"KD_JAX_NATIVE": "0"}, xla=["--xla_foo=1"])
  with pytest.raises(SystemExit, match="'patch=no_native'"):
    distill_step.main(["--variant=1:patch=no_native"])
  with pytest.raises(SystemExit, match="choose flax or cpu"):
    distill_step.main(["--layers=flax,native"])


def test_resnet_backbone_twin_matches_on_tiny_maps():
  """At 32² ResNet-18's last two stages are 2×2 and 1×1 maps: the twin
  (the PSPNet twins' backbone) gives the same features there too."""
  model, variables, x = _jax_variables(
      "resnet18", dict(num_classes=None, width=8), (2, 32, 32, 3))
  twin = torch_models.ResNet("resnet18", width=8)
  torch_models.load_flax_variables(twin, variables)
  assert torch_models.count_params(twin) == sum(
      v.size for v in jax.tree.leaves(variables["params"]))
  _, feats = jax.jit(functools.partial(model.apply, train=False))(
      variables, x)
  with torch.no_grad():
    t_feats = twin.eval()(_nchw(x))
  for key in ("layer3", "layer4"):
    assert feats[key].shape[1] <= 2
    np.testing.assert_allclose(t_feats[key].permute(0, 2, 3, 1).numpy(),
                               feats[key], rtol=1e-4, atol=1e-4)
