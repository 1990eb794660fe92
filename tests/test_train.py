"""The trainer: resume exactness, sharding invariance, config errors."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from kd_jax import checkpoint, data, train
from kd_jax.evaluate import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import default  # noqa: E402


def tiny_config(steps=6):
  c = default.get_config()
  c.batch_size = 4
  c.steps = steps
  c.stages.teacher.steps = steps
  c.log_every = 2
  c.eval_every = 3
  c.checkpoint_every = 2
  c.optimizer.warmup_steps = 2
  c.data.image_size = 16
  c.data.num_train = 12
  c.data.num_val = 4
  c.data.num_test = 4
  c.stages.teacher.model.width = 4
  c.stages.teacher.model.depth = 2
  c.stages.baseline.model.width = 2
  c.stages.baseline.model.depth = 2
  c.stages.distilled.model.width = 2
  c.stages.distilled.model.depth = 2
  c.stages.distilled.teacher.model.width = 4
  c.stages.distilled.teacher.model.depth = 2
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The teacher stage trained without interruption."""
  c = tiny_config()
  workdir = str(tmp_path_factory.mktemp("straight"))
  ds = data.build(c.data)
  _, state = train.train_stage(c, "teacher", workdir, ds)
  return c, ds, workdir, jax.device_get(state)


def test_stage_writes_checkpoints_and_event_files(trained):
  _, _, workdir, state = trained
  assert int(state.step) == 6
  stage = os.path.join(workdir, "teacher")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(stage))
  steps = sorted(int(s) for s in os.listdir(os.path.join(stage,
                                                         "checkpoints")))
  assert steps[-1] == 6 and len(steps) == 2  # max_to_keep=2
  hist = train.read_history(stage)
  assert hist["train/loss"][0] == [2, 4, 6]
  assert hist["val/mean_dice"][0] == [3, 6]
  assert all(np.isfinite(hist["train/loss"][1]))


def test_interrupted_run_resumes_to_identical_parameters(trained, tmp_path,
                                                         monkeypatch):
  c, ds, _, reference = trained
  real_save = checkpoint.save

  def save_then_sigterm(mngr, step, state, force=False):
    out = real_save(mngr, step, state, force=force)
    if step == 3:  # A real SIGTERM, as a scheduler would send; the loop
      # notices it after the next step and checkpoints that one.
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  monkeypatch.setattr(checkpoint, "save", save_then_sigterm)
  with pytest.raises(SystemExit, match="SIGTERM at step 4"):
    train.train_stage(c, "teacher", str(tmp_path), ds)
  monkeypatch.setattr(checkpoint, "save", real_save)
  ckpts = os.listdir(tmp_path / "teacher" / "checkpoints")
  assert "4" in ckpts and "6" not in ckpts
  _, resumed = train.train_stage(c, "teacher", str(tmp_path), ds)
  resumed = jax.device_get(resumed)
  assert int(resumed.step) == 6
  jax.tree.map(np.testing.assert_array_equal, reference.params,
               resumed.params)
  jax.tree.map(np.testing.assert_array_equal, reference.opt_state,
               resumed.opt_state)


def test_distill_stage_loads_the_teacher_and_learns(trained):
  c, ds, workdir, _ = trained
  frozen = checkpoint.load_model_variables(os.path.join(workdir, "teacher"))
  _, teacher_state = trained[2], trained[3]
  jax.tree.map(np.testing.assert_array_equal, frozen["params"],
               teacher_state.params["model"])
  c.stages.distilled.losses = dict(
      ce=dict(fn="cross_entropy"), kd=dict(fn="kd_kl", temperature=2.0),
      hint=dict(fn="hint_l1", student="bottleneck", teacher="bottleneck"),
      vid=dict(fn="vid", student="enc2", teacher="enc2"),
      at=dict(fn="attention_transfer", student="enc1", teacher="enc1",
              connector="none"))
  method, state = train.train_stage(c, "distilled", workdir, ds)
  assert int(state.step) == 6
  assert set(state.params) == {"student", "connectors"}
  conn = state.params["connectors"]
  assert set(conn) == {"hint", "vid"}  # "none" adds no parameters
  assert conn["hint"]["conv"]["kernel"].shape == (1, 1, 8, 16)
  assert conn["vid"]["vid_alpha"].shape == (8,)


_ONE_STEP = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from kd_jax import data, train
    from tests.test_train import tiny_config
    c = tiny_config()
    c.batch_size = 8
    ds = data.build(c.data)
    losses = []
    # The distilled stage alone: its objective holds the supervised terms
    # and the teacher's, so it checks the cross-device mean of both.
    for name in ("distilled",):
      method, _ = train.build_method(c, name, "", ds.num_classes,
                                     load_teacher=False)
      s = train.stage_config(c, name)
      tx = train.make_optimizer(s["optimizer"], s["steps"])
      batch = data.pipeline.train_batches(ds.train, batch_size=8, seed=0)[0]
      state = train.init_state(method, tx, jax.random.key(0),
                               batch["image"][:1])
      frozen = {{}}
      if name == "distilled":
        frozen = method.teacher.init(jax.random.key(5), batch["image"][:1],
                                     train=False)
      mesh = train.make_mesh()
      step = train.jit_train_step(train.make_train_step(method, tx), mesh)
      for _ in range(3):
        state, m = step(state, train.to_global(batch, mesh), frozen)
        losses.append(float(m["loss"]))
    print(jax.device_count(), *losses)
""")


def _run_devices(n):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _ONE_STEP.format(root=ROOT)],
                       env=env, capture_output=True, text=True, cwd=ROOT,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  values = out.stdout.split()
  assert int(values[0]) == n
  return np.asarray(values[1:], float)


def test_one_and_eight_devices_give_the_same_losses():
  one, eight = _run_devices(1), _run_devices(8)
  assert len(one) == 3
  np.testing.assert_allclose(one, eight, rtol=1e-5, atol=1e-5)


def test_eval_window_scores_the_sliding_window_predictions(trained):
  c, ds, workdir, state = trained
  method, _ = train.build_method(c, "teacher", workdir, ds.num_classes,
                                 load_teacher=False)
  heads = train.run_heads(c, ds)
  mesh = train.make_mesh()
  windowed = dict(eval_window=8)  # Windows of 8² on the 16² images.
  scores = train.evaluate(train.make_eval_step(method, heads, mesh, windowed),
                          state, ds.val, 4, mesh, heads)
  images = np.stack([ds.val[i]["image"] for i in range(len(ds.val))])
  labels = np.stack([ds.val[i]["label"] for i in range(len(ds.val))])
  logits = metrics.sliding_window(method.predict, 8)(
      state.params, state.batch_stats, images)
  want = metrics.segmentation_scores(metrics.confusion_matrix(
      np.argmax(logits, -1), labels, ds.num_classes))
  for k in ("mean_dice", "mean_iou_all", "pixel_accuracy"):
    np.testing.assert_allclose(scores[k], want[k], rtol=1e-6)
  assert train.eval_predict(method.predict, dict(eval_window=0)) == (
      method.predict)


@pytest.mark.parametrize("override,match", [
    (("stages.teacher.model.name", "unetx"), "unknown model 'unetx'"),
    (("stages.teacher.losses", {"dice": {"fn": "dicee"}}), "dicee"),
    (("stages.distilled.teacher.stage", "nowhere"), "earlier stage"),
    (("data.name", "mnist"), "data.name 'mnist'"),
    (("chekpoint_every", 5), r"unknown config keys \['chekpoint_every'\]"
     ".*'checkpoint_every'"),
    (("data.transfer_dtype", "int8"), r"data.transfer_dtype='int8'.*uint8"),
    (("data.workers", -2), r"data.workers=-2"),
    (("eval_window", -1), r"config.eval_window=-1: give 0"),
])
def test_bad_configs_fail_before_training(tmp_path, override, match):
  c = tiny_config()
  key, value = override
  node = c
  *path, last = key.split(".")
  for p in path:
    node = node[p]
  with c.unlocked():
    node[last] = value
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_uint8_batch_trains_as_the_float32_batch_of_its_quantised_image(
    tmp_path):
  """The step decodes a uint8 image (data.transfer_dtype="uint8") to
  q · float32(1/255): the same loss and update as the float32 batch of that
  quantised image, computed here in numpy."""
  c = tiny_config()
  ds = data.build(c.data)
  method, frozen = train.build_method(c, "baseline", str(tmp_path),
                                      ds.num_classes)
  tx = train.make_optimizers(method, train.stage_config(c, "baseline"))
  batch = data.pipeline.train_batches(ds.train, batch_size=4, seed=0)[0]
  u8 = data.pipeline.encode(batch, "uint8")
  f32 = dict(u8, image=u8["image"].astype(np.float32) * np.float32(1 / 255))
  assert u8["image"].nbytes * 4 == f32["image"].nbytes
  step = jax.jit(train.make_train_step(method, tx))
  state = train.init_state(method, tx, jax.random.key(0), f32["image"])
  (a, ma), (b, mb) = step(state, u8, frozen), step(state, f32, frozen)
  assert float(ma["loss"]) == float(mb["loss"])
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)


def test_feature_term_with_unknown_name_lists_the_choices(tmp_path):
  c = tiny_config()
  c.stages.distilled.losses = dict(
      hint=dict(fn="hint_l2", student="enc9", teacher="bottleneck"))
  with pytest.raises(ValueError, match="no feature 'enc9'.*bottleneck"):
    train.train_and_evaluate(c, str(tmp_path / "run"))


_STAGE_RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from kd_jax import data, train
    from tests.test_train import tiny_config
    c = tiny_config(steps={steps})
    c.checkpoint_every = 1
    train.train_stage(c, "teacher", {workdir!r}, data.build(c.data))
""")


@pytest.mark.slow
def test_kill_9_mid_stage_then_rerun_matches(trained, tmp_path):
  """A hard kill (no chance to checkpoint) loses at most the steps since the
  last checkpoint; the rerun ends where an uninterrupted run does."""
  import time
  c, ds, _, _ = trained
  steps = 40
  code = _STAGE_RUN.format(root=ROOT, steps=steps, workdir=str(tmp_path))
  ckpt_dir = tmp_path / "teacher" / "checkpoints"
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
  while proc.poll() is None:
    done = [s for s in os.listdir(ckpt_dir)] if ckpt_dir.exists() else []
    if any(s.isdigit() and int(s) >= 5 for s in done):
      proc.kill()  # SIGKILL
      break
    time.sleep(0.2)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
  straight = tmp_path / "straight"
  subprocess.run([sys.executable, "-c", _STAGE_RUN.format(
      root=ROOT, steps=steps, workdir=str(straight))], cwd=ROOT, check=True)
  a = checkpoint.load_model_variables(str(tmp_path / "teacher"))
  b = checkpoint.load_model_variables(str(straight / "teacher"))
  jax.tree.map(np.testing.assert_array_equal, a, b)
