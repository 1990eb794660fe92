"""The PyTorch twins of benchmarks/torch_models.py against kd_jax.

The benchmark's comparison is only fair if each twin is the same network:
the same parameter count, and, with kd_jax's weights copied in, the same
outputs and the same loss. Skipped when torch is not installed (it is the
`bench` extra).
"""
import functools
import json
import os
import subprocess
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
import gpu  # noqa: E402  pylint: disable=wrong-import-position
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


# ----------------------------------------------------------------------------
# benchmarks/gpu.py: the prepared GPU benchmark, its smoke mode on the CPU.

ROW_FIELDS = ("name", "framework", "mode", "error", "step_ms", "step_ms_min",
              "step_ms_max", "images_per_s", "model_gflop_per_step", "mfu",
              "peak_device_mb", "peak_rss_mb", "compile_s", "device_kind",
              "platform", "params_teacher", "params_student", "first_loss")


def _smoke(tmp_path, pairs):
  """benchmarks/gpu.py --smoke over `pairs`, in its own process as on the
  device machine; its JSON report."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
       os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, gpu.__file__, "--smoke", "--budget=900",
                  f"--out={tmp_path}", f"--pairs={','.join(pairs)}"],
                 env=env, check=True, timeout=1200)
  with open(tmp_path / "gpu_bench.json", encoding="utf-8") as f:
    return json.load(f)


def _check_report(report, tmp_path, pairs):
  """Every pair, every arm and field; no MFU or device memory on the CPU;
  the loader and every arm measured; the table written."""
  assert [p["pair"] for p in report["pairs"]] == list(pairs)
  for p in report["pairs"]:
    assert p["status"] == "ok" and p["smoke"], p
    assert p["model_gflop_per_step"] == pytest.approx(
        p["teacher_forward_gflop"] + 3 * p["student_forward_gflop"])
    assert p["teacher_forward_gflop"] > 0 and p["student_forward_gflop"] > 0
    assert p["loader"]["images_per_s"] > 0
    assert p["loader"]["over_step"] > 0
    rows = p["rows"]
    assert [(r["framework"], r["mode"]) for r in rows] == [
        ("kd_jax", "distill"), ("pytorch", "eager"), ("pytorch", "compile")]
    for r in rows:
      assert set(ROW_FIELDS) <= set(r), set(ROW_FIELDS) - set(r)
      assert r["error"] is None, r
      assert r["images_per_s"] > 0 and r["step_ms"] > 0
      assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
      assert r["platform"] == "cpu" and r["mfu"] is None
      assert r["peak_device_mb"] is None and r["peak_rss_mb"] > 0
      assert r["model_gflop_per_step"] == p["model_gflop_per_step"]
      # The twins are the same networks (asserted by the run too).
      assert (r["params_teacher"], r["params_student"]) == (
          rows[0]["params_teacher"], rows[0]["params_student"])
    assert rows[1]["channels_last"] and rows[1]["counted_gflop_per_step"] > 0
  table = (tmp_path / "gpu_bench.md").read_text()
  for p in pairs:
    assert table.count(f"| {p} ") == 3  # One line per arm.
  assert "n/a" in table


# ~40 s of CI time; the suite's budget is spent elsewhere: run with -m slow.
@pytest.mark.slow
def test_gpu_smoke_one_pair(tmp_path):
  """The whole machinery on the cheapest pair (CI time: the three pairs
  take minutes on a 2-core CPU, see the slow test below)."""
  _check_report(_smoke(tmp_path, ["distillo_full"]), tmp_path,
                ["distillo_full"])


@pytest.mark.slow
def test_gpu_smoke_every_pair(tmp_path):
  pairs = [s[0] for s in gpu.SUITE]
  _check_report(_smoke(tmp_path, pairs), tmp_path, pairs)


def test_gpu_suite_sizes_and_caps():
  """The issue's sizes, bf16, one device, every arm; a worker's timeout
  within its pair's cap; smoke runs keep the pair's stand-in side."""
  assert {p: (size, batch) for p, size, batch in gpu.SUITE} == {
      "distillo_full": (224, 64), "pspnet_resnet18": (512, 16),
      "vit_l16_efficientvit_b1": (224, 64)}
  argv = gpu.pair_argv("pspnet_resnet18", 512, 16, 100.0, False, "x.json")
  args = distill_step.parse_args(argv)
  assert (args.size, args.batch, args.compute_dtype, args.devices,
          args.torch_modes, args.sequential) == (
              512, 16, "bfloat16", "1", "eager,compile", True)
  assert args.time_budget == 100 and args.worker_timeout == 60
  smoke = distill_step.parse_args(gpu.pair_argv("pspnet_resnet18", 512, 16,
                                                100.0, True, "x.json"))
  assert (smoke.size, smoke.batch, smoke.smoke) == (64, 2, True)
  for pair, _, _ in gpu.SUITE:  # Every GPU pair has smoke stand-ins.
    assert distill_step.parse_args([f"--pair={pair}", "--smoke"]).smoke


def test_distill_step_refuses_bad_gpu_options():
  with pytest.raises(SystemExit):  # No smoke models for this pair.
    distill_step.parse_args(["--pair=default", "--smoke"])
  with pytest.raises(SystemExit):  # Time limits need one worker at a time.
    distill_step.parse_args(["--worker_timeout=10"])
  with pytest.raises(SystemExit):
    distill_step.parse_args(["--torch_modes=eager,jit"])


def test_peaks_match_whole_device_names():
  """MFU only for a device in the table: L40S is not an L4, a v5p not a v5
  lite, and a CPU has none."""
  peak = distill_step.peak_flops
  assert peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert peak("NVIDIA H100 NVL", "bfloat16") == 835e12
  assert peak("NVIDIA H200", "bfloat16") == 989e12
  assert peak("NVIDIA A100-SXM4-80GB", "float32") == 156e12
  assert peak("NVIDIA L4", "bfloat16") == 121e12
  assert peak("NVIDIA L40S", "bfloat16") is None
  assert peak("TPU v5p", "bfloat16") is None
  assert peak("cpu", "bfloat16") is None


def test_gpu_table_reports_failed_and_unrun_arms():
  """A pair whose run died before any worker, and an arm that timed out,
  stay in the table with their reason; MFU and memory print as n/a."""
  ok = dict(name="kd_jax jit, 1 device", framework="kd_jax", error=None,
            step_ms=50.0, images_per_s=1280.0, mfu=0.41,
            peak_device_mb=2048.0, compile_s=30.0, device_kind="NVIDIA H100")
  slow = dict(ok, name="PyTorch torch.compile", framework="pytorch",
              error="worker killed at its time limit", step_ms=None)
  eager = dict(ok, name="PyTorch eager", framework="pytorch", step_ms=100.0,
               images_per_s=640.0, mfu=None, peak_device_mb=None)
  report = dict(smoke=False, budget_s=420, elapsed_s=400, pairs=[
      dict(pair="vit_l16_efficientvit_b1", size=224, batch=64, status="ok",
           seconds=150, rows=[ok, eager, slow], loader=dict(
               images_per_s=640.0), model_gflop_per_step=8000.0,
           teacher_forward_gflop=7700.0, student_forward_gflop=100.0,
           teacher=dict(name="vit_l16"), student=dict(name="efficientvit_b1")),
      dict(pair="pspnet_resnet18", size=512, batch=16, status="exit 1",
           seconds=3, rows=[])])
  table = gpu.markdown(report)
  lines = table.splitlines()
  assert "| 50.0 | 1280 | 2.00× | 41.0% | 2.0 | 30 | 640 | 0.50× |" in (
      lines[2])
  assert "| 100.0 | 640 | 1.00× | n/a | n/a |" in lines[3]
  assert "worker killed at its time limit" in lines[4]
  assert "pspnet_resnet18 512² ×16 | exit 1 |" in lines[5]
  assert "model 8000.0 GFLOP/step" in table
