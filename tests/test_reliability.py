"""Failures that must not pass silently: divergence, two runs on one workdir,
a damaged newest checkpoint, and a console buried in library logs."""
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kd_jax import checkpoint, data, main, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.test_train import tiny_config  # noqa: E402


# ----------------------------------------------------------------------------
# Divergence.


@pytest.mark.parametrize("key,value,match", [
    ("on_nonfinite", "ignore", r"on_nonfinite='ignore'.*'stop', 'skip'"),
    ("max_skipped_steps", -1, "max_skipped_steps=-1"),
    ("max_skipped_steps", 2.5, "max_skipped_steps=2.5"),
    ("max_skipped_steps", True, "max_skipped_steps=True"),
])
def test_bad_nonfinite_settings_are_config_errors(key, value, match):
  c = tiny_config()
  # The config's own field is typed (int, str): a value of another type
  # can only reach the check from a config file that writes it.
  if key in c:
    del c[key]
  c[key] = value
  assert key in train.CONFIG_KEYS
  with pytest.raises(train.ConfigError, match=match):
    train.nonfinite_policy(c)


def test_defaults_stop_on_nonfinite():
  assert train.nonfinite_policy(tiny_config()) == (
      "stop", train.DEFAULT_MAX_SKIPPED_STEPS)


def _metrics(loss, skipped=None):
  m = {"loss": jnp.float32(loss), "grad_norm": jnp.float32(1.0),
       "ce": jnp.float32(loss), "dice": jnp.float32(0.5)}
  if skipped is not None:
    m["skipped"] = jnp.float32(skipped)
  return m


def test_step_metrics_name_the_first_nonfinite_step_and_terms():
  w = train._StepMetrics("teacher", "stop", 0, lambda: 4)
  for step, loss in [(5, 1.0), (6, np.nan), (7, np.inf)]:
    w.add(step, _metrics(loss))
  with pytest.raises(train.TrainingDiverged) as e:
    w.check()
  msg = str(e.value)
  assert "'teacher' diverged at step 6: non-finite ce, loss;" in msg
  assert "newest checkpoint (step 4)" in msg and "\n" not in msg


def test_step_metrics_skip_up_to_the_limit_and_average_the_rest():
  w = train._StepMetrics("s", "skip", 1, lambda: None)
  w.add(1, _metrics(2.0, 0))
  w.add(2, _metrics(np.nan, 1))
  w.add(3, _metrics(4.0, 0))
  assert w.means() == {"loss": 3.0, "grad_norm": 1.0, "ce": 3.0,
                       "dice": 0.5, "skipped": 1.0}
  w.add(4, _metrics(np.nan, 1))
  with pytest.raises(train.TrainingDiverged,
                     match="skipped 2 steps .* more than max_skipped_steps=1 "
                     r"\(the last at step 4: non-finite ce, loss\); no "
                     "checkpoint was saved"):
    w.check()


def _poison_step(monkeypatch, at_step):
  """Makes the batch of train step `at_step` (1-based) all NaN: a loss and
  gradient that are not finite, as a corrupt input or an overflow gives."""
  real = train.make_train_step

  def make(method, tx, **kw):
    step_fn = real(method, tx, **kw)

    def poisoned(state, batch, frozen):
      image = jnp.where(state.step == at_step - 1, jnp.nan, batch["image"])
      return step_fn(state, dict(batch, image=image), frozen)
    return poisoned
  monkeypatch.setattr(train, "make_train_step", make)


def _all_finite(tree):
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree))


def test_divergence_stops_before_the_checkpoint_and_names_step_and_terms(
    tmp_path, monkeypatch):
  c = tiny_config()
  # Only the save at step 4 looks at the metrics before the stop.
  c.log_every = c.eval_every = 6
  _poison_step(monkeypatch, 3)
  with pytest.raises(train.TrainingDiverged) as e:
    train.train_stage(c, "teacher", str(tmp_path), data.build(c.data))
  msg = str(e.value)
  assert msg.startswith("stage 'teacher' diverged at step 3: non-finite ")
  assert "loss" in msg and "grad_norm" in msg and "ce" in msg
  assert "newest checkpoint (step 2)" in msg and "\n" not in msg
  ckpts = tmp_path / "teacher" / "checkpoints"
  assert sorted(int(s) for s in os.listdir(ckpts)) == [1, 2]
  assert _all_finite(checkpoint.load_model_variables(str(ckpts)))
  assert not (tmp_path / "teacher" / "lock").exists()


def test_skip_leaves_the_state_and_finishes_the_stage(tmp_path, monkeypatch):
  c = tiny_config()
  c.on_nonfinite, c.max_skipped_steps = "skip", 1
  _poison_step(monkeypatch, 3)
  _, state = train.train_stage(c, "teacher", str(tmp_path), data.build(c.data))
  assert int(state.step) == 6 and _all_finite(jax.device_get(state))
  hist = train.read_history(str(tmp_path / "teacher"))
  assert hist["train/skipped"] == ([2, 4, 6], [0.0, 1.0, 0.0])
  assert all(np.isfinite(hist["train/loss"][1]))


def test_main_turns_divergence_into_an_error_exit(monkeypatch):
  def diverge(config, workdir, *, restart, allow_config_change):
    raise train.TrainingDiverged("stage 'teacher' diverged at step 3")
  monkeypatch.setattr(train, "train_and_evaluate", diverge)
  monkeypatch.setattr(main, "quiet_console", lambda: None)
  monkeypatch.setattr(main, "FLAGS", types.SimpleNamespace(
      config=None, workdir="w", restart=False, allow_config_change=False,
      allow_cpu=False))
  with pytest.raises(SystemExit) as e:
    main.main(["kd_jax.main"])
  assert e.value.code == "error: stage 'teacher' diverged at step 3"


# ----------------------------------------------------------------------------
# Workdir lock.

_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from kd_jax import train
    with train.stage_lock({stage!r}):
      print("locked", flush=True)
      time.sleep(120)
""")


def test_second_run_on_a_workdir_refuses_until_the_first_is_gone(
    tmp_path, caplog):
  workdir = tmp_path / "run"
  stage = workdir / "teacher"
  holder = subprocess.Popen(
      [sys.executable, "-c", _HOLD_LOCK.format(root=ROOT, stage=str(stage))],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    owner = json.loads((stage / "lock").read_text())
    assert owner["pid"] == holder.pid
    assert owner["host"] == socket.gethostname()
    before = sorted(os.listdir(workdir))
    c = tiny_config()
    with pytest.raises(train.WorkdirLocked) as e:
      train.train_and_evaluate(c, str(workdir))
    assert str(e.value).startswith(
        f"workdir {workdir} is in use by pid {holder.pid} on ")
    assert sorted(os.listdir(workdir)) == before  # Nothing else written.
  finally:
    holder.kill()  # SIGKILL: no chance to remove its lock.
    holder.wait()
  assert (stage / "lock").exists()
  with caplog.at_level(logging.WARNING):
    with train.stage_lock(str(stage)):
      assert json.loads((stage / "lock").read_text())["pid"] == os.getpid()
  stale = [r.getMessage() for r in caplog.records if "stale lock" in
           r.getMessage()]
  assert len(stale) == 1 and f"pid {holder.pid}" in stale[0]
  assert not (stage / "lock").exists()


def test_lock_is_released_on_errors_and_nests(tmp_path):
  stage = tmp_path / "s"
  with pytest.raises(RuntimeError):
    with train.stage_lock(str(stage)):
      with train.stage_lock(str(stage)):  # train_stage inside the run's
        pass
      assert (stage / "lock").exists()
      raise RuntimeError
  assert not (stage / "lock").exists()


def test_a_reused_pid_does_not_hold_a_lock(tmp_path):
  """A lock left by a killed process whose pid now belongs to another
  process (here: this one's parent) is stale: the start times differ."""
  stage = tmp_path / "s"
  stage.mkdir()
  (stage / "lock").write_text(json.dumps(
      {"pid": os.getppid(), "host": socket.gethostname(), "start": -1}))
  with train.stage_lock(str(stage)):
    assert json.loads((stage / "lock").read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------
# Checkpoint fallback.


def _small_checkpoints(directory):
  mngr = checkpoint.manager(str(directory), save_every=1)
  for step in (1, 2):
    # Large enough that its data is a file of its own, not inlined.
    checkpoint.save(mngr, step, {"w": jnp.arange(4096.0) + step})
  mngr.wait_until_finished()
  mngr.close()


def _largest_data_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "default")
           for f in fs if os.sep + "d" + os.sep in os.path.join(d, f)]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["data", "metadata", "manifest"])
def test_a_damaged_newest_checkpoint_is_set_aside(tmp_path, caplog, damage):
  _small_checkpoints(tmp_path)
  step_dir = tmp_path / "2"
  path = {"data": lambda: _largest_data_file(step_dir),
          "metadata": lambda: step_dir / "default" / "_METADATA",
          "manifest": lambda: step_dir / "default" / "manifest.ocdbt"}[damage]()
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 3)
  mngr = checkpoint.manager(str(tmp_path), save_every=1)
  with caplog.at_level(logging.WARNING):
    state = checkpoint.restore(
        mngr, {"w": jax.ShapeDtypeStruct((4096,), jnp.float32)})
  mngr.close()
  np.testing.assert_array_equal(state["w"], np.arange(4096.0) + 1)
  assert sorted(os.listdir(tmp_path)) == ["1", checkpoint.SET_ASIDE]
  assert os.listdir(tmp_path / checkpoint.SET_ASIDE) == ["2"]
  lines = [r.getMessage() for r in caplog.records if "set_aside" in
           r.getMessage()]
  assert len(lines) == 1 and "does not restore" in lines[0]


def test_a_checkpoint_of_another_model_is_refused_not_set_aside(tmp_path):
  _small_checkpoints(tmp_path)
  mngr = checkpoint.manager(str(tmp_path), save_every=1)
  with pytest.raises(checkpoint.IncompatibleCheckpoint,
                     match="other shapes .* new --workdir"):
    checkpoint.restore(mngr,
                       {"w": jax.ShapeDtypeStruct((4095,), jnp.float32)})
  mngr.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_resume_after_a_truncated_newest_checkpoint_matches_the_previous(
    tmp_path):
  """A trained stage whose newest checkpoint (6) is cut short resumes from
  4, to the parameters a resume from 4 gives with 6 simply absent."""
  c = tiny_config()
  ds = data.build(c.data)
  train.train_stage(c, "teacher", str(tmp_path / "trained"), ds)
  damaged, direct = tmp_path / "damaged", tmp_path / "direct"
  shutil.copytree(tmp_path / "trained", damaged)
  shutil.copytree(tmp_path / "trained", direct)
  shutil.rmtree(direct / "teacher" / "checkpoints" / "6")
  path = _largest_data_file(damaged / "teacher" / "checkpoints" / "6")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  states = [jax.device_get(train.train_stage(c, "teacher", str(w), ds)[1])
            for w in (damaged, direct)]
  assert [int(s.step) for s in states] == [6, 6]
  jax.tree.map(np.testing.assert_array_equal, states[0].params,
               states[1].params)
  jax.tree.map(np.testing.assert_array_equal, states[0].opt_state,
               states[1].opt_state)
  assert os.listdir(damaged / "teacher" / "checkpoints" /
                    checkpoint.SET_ASIDE) == ["6"]


# ----------------------------------------------------------------------------
# kill -9 at random steps.

_KILLABLE_STAGE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from kd_jax import data, train
    from tests.test_train import tiny_config
    c = tiny_config(steps={steps})
    c.checkpoint_every = 1  # Every step may be the one killed after.
    c.log_every, c.eval_every = 10, {steps}
    train.train_stage(c, "teacher", {workdir!r}, data.build(c.data))
""")


def _latest_checkpoint(directory):
  """Every array of the newest checkpoint in `directory`, as numpy, by
  path."""
  steps = max(int(s) for s in os.listdir(directory) if s.isdigit())
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(str(directory), str(steps), "default"))
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return steps, {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


@pytest.mark.slow
def test_kill_9_at_20_random_steps_ends_as_an_uninterrupted_run(tmp_path):
  """SIGKILL (no chance to save or unlock) at 20 random moments, each
  relaunch resuming from the newest checkpoint (or one cut short by the
  kill); the last run ends with every saved array equal to a straight
  run's. The launches share a compilation cache, so after the first they
  cost the imports only."""
  steps = 100
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

  def launch(workdir):
    with open(tmp_path / "stderr.txt", "a") as log:  # The child has a copy.
      return subprocess.Popen(
          [sys.executable, "-c", _KILLABLE_STAGE.format(
              root=ROOT, steps=steps, workdir=str(workdir))],
          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)

  def newest(directory):
    return max([0] + ([int(s) for s in os.listdir(directory) if s.isdigit()]
                      if directory.exists() else []))

  rng = np.random.default_rng(0)
  ckpts = tmp_path / "killed" / "teacher" / "checkpoints"
  for target in sorted(rng.choice(np.arange(3, 75), 20, replace=False)):
    resumed_from = newest(ckpts)
    proc = launch(tmp_path / "killed")
    # At or past the target, and at least one step past where it resumed.
    while proc.poll() is None and newest(ckpts) < max(target,
                                                      resumed_from + 1):
      time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.1))  # Anywhere in the step (or its save).
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, (
        "the run ended before the kill: "
        + (tmp_path / "stderr.txt").read_text()[-2000:])
  for workdir in ("killed", "straight"):
    assert launch(tmp_path / workdir).wait() == 0
  final, straight = (_latest_checkpoint(tmp_path / w / "teacher" /
                                        "checkpoints")
                     for w in ("killed", "straight"))
  assert final[0] == straight[0] == steps
  assert final[1].keys() == straight[1].keys() and len(final[1]) > 10
  for path, value in straight[1].items():
    np.testing.assert_array_equal(final[1][path], value, err_msg=path)


# ----------------------------------------------------------------------------
# Console.


def _read_all(fd) -> str:
  """What a pseudo-terminal's other end has received so far."""
  import select
  out = b""
  while select.select([fd], [], [], 0.1)[0]:
    out += os.read(fd, 65536)
  return out.decode()


def test_progress_bar_on_a_terminal_and_nothing_elsewhere():
  import io
  import pty
  master, replica = pty.openpty()
  with os.fdopen(replica, "w") as tty:
    bar = train._ProgressBar("stage 1/2 teacher", 40, tty)
    bar.draw(1)
    time.sleep(0.25)  # Redrawn at most every 0.2 s.
    bar.draw(10)
    bar.draw(11)  # At once after 10: not redrawn.
    bar.clear()
    bar.draw(40)  # The last step always, and after a clear at once.
    text = _read_all(master)
  os.close(master)
  draws = text.split("\r\x1b[K")
  assert draws[0] == "" and draws[1] == (
      "stage 1/2 teacher [" + "." * 30 + "] 1/40")
  assert draws[2].startswith("stage 1/2 teacher [" + "#" * 7 + "." * 23 +
                             "] 10/40 ") and " steps/s ETA " in draws[2]
  assert draws[3] == ""  # The clear before a log line.
  assert draws[4].startswith("stage 1/2 teacher [" + "#" * 30 + "] 40/40 ")
  assert len(draws) == 5
  pipe = io.StringIO()
  plain = train._ProgressBar("stage 1/2 teacher", 40, pipe)
  for step in (1, 40):
    plain.draw(step)
  plain.clear()
  assert pipe.getvalue() == ""


def test_a_stage_on_a_terminal_draws_its_bar(tmp_path, monkeypatch):
  import pty
  master, replica = pty.openpty()
  tty = os.fdopen(replica, "w")
  monkeypatch.setattr(sys, "stderr", tty)
  c = tiny_config()
  train.train_stage(c, "teacher", str(tmp_path), data.build(c.data))
  text = _read_all(master)
  tty.close()
  os.close(master)
  assert "stage 1/3 teacher [" + "#" * 30 + "] 6/6" in text
  assert text.endswith("\r\x1b[K")  # Cleared when the stage ends.

_TINY = ["batch_size=4", "steps=4", "stages.teacher.steps=4", "log_every=2",
         "eval_every=4", "checkpoint_every=2", "optimizer.warmup_steps=2",
         "data.image_size=16", "data.num_train=8", "data.num_val=4",
         "data.num_test=4", "stages.teacher.model.width=4",
         "stages.teacher.model.depth=2", "stages.baseline.model.width=2",
         "stages.baseline.model.depth=2", "stages.distilled.model.width=2",
         "stages.distilled.model.depth=2",
         "stages.distilled.teacher.model.width=4",
         "stages.distilled.teacher.model.depth=2"]


def test_default_run_prints_a_short_readable_console(tmp_path):
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "kd_jax.main",
       f"--config={os.path.join(ROOT, 'configs', 'default.py')}",
       f"--workdir={workdir}"] + [f"--config.{o}" for o in _TINY],
      capture_output=True, text=True, cwd=ROOT, check=False)
  lines = (out.stdout + out.stderr).splitlines()
  assert out.returncode == 0, "\n".join(lines[-30:])
  assert len(lines) <= 40, "\n".join(lines)
  assert not [l for l in lines if "orbax" in l.lower() or "Traceback" in l]
  assert "\r" not in out.stdout + out.stderr  # No bar into a pipe.
  text = "\n".join(lines)
  assert "stage 1/3 teacher step 2/4 loss=" in text
  assert "steps/s ETA" in text and "stage 3/3 distilled step 4/4" in text
  assert lines[-1].endswith(f"report written to {workdir}/report.md")
  assert not any(os.path.exists(workdir / s / "lock")
                 for s in ("teacher", "baseline", "distilled"))
