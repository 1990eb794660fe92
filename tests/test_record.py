"""Run records (kd_jax.record): a rerun under another config stops before
anything trains, naming what changed, unless --restart / --allow_config_change
says what to do; an identical rerun reuses."""
import hashlib
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

import kd_jax
from kd_jax import data, record, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.test_train import tiny_config  # noqa: E402


def _teacher_only(steps=4):
  c = tiny_config(steps)
  c.stage_order = ("teacher",)
  return c


def tree_digest(root) -> dict:
  """{relative path: sha256 of its bytes, or "dir"} of everything under
  `root`: equal digests mean nothing was written, moved or removed."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(d, name), root)] = "dir"
    for name in files:
      p = os.path.join(d, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir whose teacher stage trained 4 steps under `_teacher_only()`."""
  c = _teacher_only()
  workdir = tmp_path_factory.mktemp("trained") / "run"
  ds = data.build(c.data)
  _, state = train.train_stage(c, "teacher", str(workdir), ds)
  return str(workdir), ds, jax.device_get(state)


@pytest.fixture
def workdir(trained, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(trained[0], copy)
  return str(copy)


def _record(workdir, stage="teacher"):
  with open(os.path.join(workdir, stage, record.RECORD_FILE)) as f:
    return json.load(f)


def test_the_record_holds_the_stage_settings_and_the_version(workdir):
  rec = _record(workdir)
  c = _teacher_only()
  assert rec["kd_jax_version"] == kd_jax.__version__
  assert rec["history"] == []
  flat = rec["config"]
  assert flat["optimizer.lr"] == c.optimizer.lr
  assert flat["model.width"] == 4 and flat["steps"] == 4
  assert flat["losses.dice.fn"] == "dice" and flat["batch_size"] == 4
  assert flat["data.num_train"] == 12 and flat["seed"] == 0
  # How a run is watched is not part of its result.
  assert not {"log_every", "eval_every", "checkpoint_every", "on_nonfinite",
              "max_skipped_steps"} & set(flat)
  assert flat == record.defining(c, "teacher")


def test_a_distill_stage_records_its_teacher_stage():
  c = tiny_config()
  flat = record.defining(c, "distilled")
  assert flat["teacher/optimizer.lr"] == c.optimizer.lr
  assert flat["teacher/model.width"] == 4 and flat["model.width"] == 2
  c.stages.teacher.optimizer = {"lr": 0.5}
  changed = record.differences(flat, record.defining(c, "distilled"))
  assert changed == {"teacher/optimizer.lr": (c.optimizer.lr, 0.5)}
  assert not any("/" in k for k in record.defining(c, "baseline"))


def test_loader_options_are_recorded_only_where_they_change_the_result():
  c = tiny_config()
  before = record.defining(c, "teacher")  # As a record of before they were.
  assert not any(k in before for k in ("data.workers",
                                       "data.transfer_dtype"))
  c.data.workers = 4  # The same batches.
  assert record.defining(c, "teacher") == before
  c.data.transfer_dtype = "uint8"  # Quantised images.
  assert record.differences(before, record.defining(c, "teacher")) == {
      "data.transfer_dtype": ("<unset>", "uint8")}


def test_differences_and_their_line():
  old = {"a": 1, "b": [1, 2], "c": "x"}
  new = {"a": 1, "b": [1, 3], "d": 0.5}
  diff = record.differences(old, new)
  assert diff == {"b": ([1, 2], [1, 3]), "c": ("x", "<unset>"),
                  "d": ("<unset>", 0.5)}
  assert record.describe(diff) == ('b [1, 2] → [1, 3], c "x" → <unset>, '
                                   "d <unset> → 0.5")


@pytest.mark.parametrize("schedule,warmup,after,ok", [
    ("plateau", 2, 8, True),   # The schedule never reads the total steps.
    ("plateau", 4, 8, False),  # A warm-up cut at the old end would differ.
    ("plateau", 2, 3, False),  # Fewer steps: the state is past the end.
    ("cosine", 2, 8, False),   # The decay is spread over the steps.
    ("poly", 2, 8, False),
])
def test_only_steps_raised_under_plateau_continue(schedule, warmup, after, ok):
  c = _teacher_only()
  c.optimizer.schedule = schedule
  c.optimizer.warmup_steps = warmup
  old = record.defining(c, "teacher")
  c.stages.teacher.steps = after
  new = record.defining(c, "teacher")
  assert record.continues(record.differences(old, new), old, new) is ok


@pytest.mark.parametrize("schedule,same", [("cosine", False),
                                            ("poly", False),
                                            ("plateau", True)])
def test_which_schedules_read_the_total_steps(schedule, same):
  """The reason behind `continues`: under cosine and poly the first steps of
  a 4-step and an 8-step stage already take other updates; under plateau
  they are the same updates."""
  c = _teacher_only()
  c.optimizer.schedule, c.optimizer.warmup_steps = schedule, 1
  params = {"w": np.ones(3, np.float32)}
  grads = {"w": np.array([0.5, -1.0, 2.0], np.float32)}
  ends = []
  for total in (4, 8):
    tx = train.make_optimizer(c.optimizer, total)
    p, state = params, tx.init(params)
    for _ in range(3):
      updates, state = tx.update(grads, state, p, value=np.float32(1.0))
      p = jax.tree.map(lambda a, u: a + u, p, updates)
    ends.append(np.asarray(p["w"]))
  assert np.array_equal(ends[0], ends[1]) is same


@pytest.mark.parametrize("override,keys", [
    (lambda c: setattr(c.optimizer, "lr", 1e-4), ["optimizer.lr"]),
    (lambda c: setattr(c, "batch_size", 2), ["batch_size"]),
    (lambda c: setattr(c.data, "seed", 3), ["data.seed"]),
    (lambda c: setattr(c.stages.teacher.losses.dice, "weight", 0.0),
     ["losses.dice.weight"]),
    (lambda c: setattr(c.stages.teacher, "steps", 6), ["steps"]),
])
def test_a_changed_config_refuses_and_leaves_the_workdir(workdir, override,
                                                         keys):
  c = _teacher_only()
  override(c)
  before = tree_digest(workdir)
  with pytest.raises(train.ConfigError) as e:
    train.train_and_evaluate(c, workdir)
  msg = str(e.value)
  assert "\n" not in msg and "stage 'teacher': " in msg
  for k in keys:
    assert f"{k} " in msg and " → " in msg
  assert "--restart" in msg and "--allow_config_change" in msg
  assert "new --workdir" in msg
  assert tree_digest(workdir) == before


def test_changed_width_names_old_and_new(workdir):
  c = _teacher_only()
  c.stages.teacher.model.width = 8
  with pytest.raises(train.ConfigError,
                     match=r"\(stage 'teacher': model\.width 4 → 8\): "):
    record.resolve(c, workdir, dry_run=True)


def test_settings_that_do_not_change_the_result_never_refuse(workdir):
  c = _teacher_only()
  c.log_every, c.eval_every, c.checkpoint_every = 1, 1, 1
  c.on_nonfinite, c.max_skipped_steps = "skip", 3
  c.data.workers = 2  # The same batches, read by worker processes.
  before = tree_digest(workdir)
  record.resolve(c, workdir)
  assert tree_digest(workdir) == before


def test_an_identical_rerun_reuses_the_finished_stage(trained, workdir):
  c = _teacher_only()
  before = tree_digest(os.path.join(workdir, "teacher", "checkpoints"))
  record.resolve(c, workdir)
  _, state = train.train_stage(c, "teacher", workdir, trained[1])
  assert int(state.step) == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               trained[2].params)
  assert tree_digest(os.path.join(workdir, "teacher", "checkpoints")) == before
  assert _record(workdir)["history"] == []


def test_train_stage_alone_refuses_another_config(trained, workdir):
  c = _teacher_only()
  c.optimizer.weight_decay = 0.0
  before = tree_digest(workdir)
  with pytest.raises(train.ConfigError,
                     match="optimizer.weight_decay 0.0001 → 0.0"):
    train.train_stage(c, "teacher", workdir, trained[1])
  assert tree_digest(workdir) == before


def test_allow_config_change_continues_and_is_recorded(trained, workdir):
  c = _teacher_only()
  c.optimizer.lr = 1e-4
  checkpoints = tree_digest(os.path.join(workdir, "teacher", "checkpoints"))
  record.resolve(c, workdir, allow_config_change=True)
  rec = _record(workdir)
  assert rec["config"]["optimizer.lr"] == 1e-4
  [change] = rec["history"]
  assert change["action"] == "allow_config_change"
  assert change["changed"] == {"optimizer.lr": [3e-3, 1e-4]}
  # Finished under the old lr, reused as it is under the new record.
  _, state = train.train_stage(c, "teacher", workdir, trained[1])
  assert int(state.step) == 4
  assert tree_digest(os.path.join(workdir, "teacher",
                                  "checkpoints")) == checkpoints
  record.resolve(c, workdir, dry_run=True)  # Now the record agrees.


def test_restart_sets_the_checkpoints_aside_and_trains_anew(trained,
                                                           workdir):
  c = _teacher_only()
  c.optimizer.lr = 1e-4
  old = tree_digest(os.path.join(workdir, "teacher"))
  record.resolve(c, workdir, restart=True)
  stage = os.path.join(workdir, "teacher")
  [aside] = os.listdir(os.path.join(stage, record.SET_ASIDE))
  moved = os.path.join(stage, record.SET_ASIDE, aside)
  assert tree_digest(moved) == old  # Every earlier file, unchanged.
  rec = _record(workdir)
  assert rec["history"][0]["action"] == "restart"
  assert rec["history"][0]["set_aside"] == moved
  assert not os.path.exists(os.path.join(stage, "checkpoints"))
  _, state = train.train_stage(c, "teacher", workdir, trained[1])
  assert int(state.step) == 4
  differs = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.device_get(state.params), trained[2].params)
  assert any(jax.tree.leaves(differs))  # Trained anew at the new lr.


def test_a_damaged_record_is_one_line_naming_the_file(workdir):
  path = os.path.join(workdir, "teacher", record.RECORD_FILE)
  with open(path, "w") as f:
    f.write("{not json")
  with pytest.raises(train.ConfigError, match=f"{path} does not read"):
    record.resolve(_teacher_only(), workdir, dry_run=True)
