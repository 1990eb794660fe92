"""Tests for configs/distillo.py: arms, presets, Synapse variants."""
import glob
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

import synapse_fixture
from kd_jax import data, train
from kd_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "distillo.py")
ARMS = ("teacher", "student", "kd", "latent", "dml")


@pytest.fixture(scope="module")
def synapse_root(tmp_path_factory):
  return synapse_fixture.write(tmp_path_factory.mktemp("synapse"))


def _load(arg, *overrides):
  """The config exactly as `--config=configs/distillo.py:<arg> <overrides>`
  (kd_jax.main's flag: locked, overrides applied)."""
  argv = ["prog", f"--config={CONFIG}:{arg}" if arg else f"--config={CONFIG}",
          *overrides]
  fv = flags.FlagValues()
  # sys_argv: the override flags are found in these args, not sys.argv.
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_config_files_do_not_edit_sys_path():
  for path in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"),
                        recursive=True):
    with open(path) as f:
      assert "sys.path" not in f.read(), path


# Values stated here, not computed from the config module, so that a change
# of the recipe shows up as a failing test. Steps: epochs · train slices //
# batch (ACDC 1312 slices, Synapse 2211).
@pytest.mark.parametrize("arg,expected", [
    ("kd,cpu", dict(
        data="acdc", size=64, teacher="transunet_tiny", batch=16, epochs=12,
        steps=984, optimizer=("adamw", 2e-3), dtype="float32",
        stage_order=("teacher", "kd"))),
    ("kd", dict(
        data="acdc", size=64, teacher="transunet_tiny", batch=16, epochs=12,
        steps=984, optimizer=("adamw", 2e-3), dtype="float32",
        stage_order=("teacher", "kd"))),
    ("student,full", dict(
        data="acdc", size=224, teacher="transunet_b16", batch=24, epochs=40,
        steps=2186, optimizer=("sgd", 0.01), dtype="bfloat16",
        stage_order=("student",))),
    ("dml,synapse", dict(
        data="synapse", size=64, teacher="transunet_tiny", batch=16,
        epochs=12, steps=1658, optimizer=("adamw", 2e-3), dtype="float32",
        stage_order=("dml",))),
    ("study,synapse_full", dict(
        data="synapse", size=224, teacher="transunet_b16", batch=24,
        epochs=40, steps=3685, optimizer=("sgd", 0.01), dtype="bfloat16",
        stage_order=("teacher", "student", "kd", "latent", "dml"))),
])
def test_key_values(arg, expected):
  c = _load(arg)
  assert c.data.name == expected["data"]
  assert c.data.image_size == expected["size"]
  assert c.stages.teacher.model.to_dict() == dict(
      name=expected["teacher"], image_size=expected["size"])
  assert c.stages.dml.peer.name == expected["teacher"]
  assert c.stages.student.model.to_dict() == dict(name="squeeze_unet",
                                                  width=24)
  assert (c.batch_size, c.epochs, c.steps) == (
      expected["batch"], expected["epochs"], expected["steps"])
  assert (c.optimizer.name, c.optimizer.lr) == expected["optimizer"]
  assert c.optimizer.momentum == 0.9 and c.optimizer.weight_decay == 1e-4
  assert c.compute_dtype == expected["dtype"]
  assert tuple(c.stage_order) == expected["stage_order"]
  assert c.stages.kd.losses.kd.to_dict() == dict(fn="kd_kl", weight=1.0,
                                                  temperature=1.0)
  assert c.stages.latent.losses.latent.to_dict() == dict(
      fn="hint_l1", weight=1.0, student="bottleneck", teacher="bottleneck",
      connector="conv1x1")
  assert c.stages.kd.teacher.to_dict() == dict(
      model=dict(name=expected["teacher"], image_size=expected["size"]),
      stage="teacher", checkpoint="")


def test_study_section():
  c = _load("study,cpu")
  assert c.study.to_dict() == dict(
      seeds=(0, 1, 2), cam_class="left_ventricle", cam_feature="",
      num_figure_examples=4, explain_stages=("teacher", "student", "kd"),
      dataset="acdc", preset="cpu")
  assert _load("study,synapse").study.cam_class == "liver"
  assert "study" not in _load("kd,cpu")


@pytest.mark.parametrize("preset,dataset,size", [
    ("cpu", "acdc", 64), ("full", "acdc", 224), ("acdc_full", "acdc", 224),
    ("synapse", "synapse", 64), ("synapse_full", "synapse", 224),
])
def test_every_arm_takes_every_preset(preset, dataset, size):
  for arm in ARMS + ("study",):
    c = _load(f"{arm},{preset}")
    assert c.data.name == dataset and c.data.image_size == size, arm


def test_arms_share_every_hyper_parameter():
  configs = {arm: _load(f"{arm},cpu") for arm in ARMS}
  ref = configs["teacher"]
  for arm, c in configs.items():
    for key in ("seed", "batch_size", "steps", "epochs", "compute_dtype"):
      assert c[key] == ref[key], (arm, key)
    assert c.optimizer.to_dict() == ref.optimizer.to_dict()
    assert c.data.to_dict() == ref.data.to_dict()
    assert c.stages.to_dict() == ref.stages.to_dict()
    stage = c.stages[arm]
    # α·CE + β·Dice in every arm, and only the arm's extra term beside it.
    assert stage.losses.ce.to_dict() == dict(fn="cross_entropy", weight=0.5)
    assert stage.losses.dice.to_dict() == dict(fn="dice", weight=0.5)
  assert set(ref.stages.kd.losses) == {"ce", "dice", "kd"}
  assert ref.stages.dml.method == "mutual"
  assert configs["latent"].stage_order == ("teacher", "latent")
  assert configs["teacher"].stage_order == ("teacher",)


def test_steps_follow_epoch_and_batch_overrides():
  c = _load("kd,full", "--config.epochs=2", "--config.batch_size=8")
  assert c.steps == 2 * 1312 // 8


@pytest.mark.parametrize("arg", ["kd,cpu,teacher={}", "kd,teacher={}",
                                 "latent,full,teacher={}"])
def test_teacher_option_distils_from_a_checkpoint_folder(arg, tmp_path):
  c = _load(arg.format(tmp_path))
  arm = arg.split(",")[0]
  assert c.stage_order == (arm,)
  assert c.stages[arm].teacher.checkpoint == str(tmp_path)
  assert c.stages[arm].teacher.stage == ""
  assert c.data.image_size == (224 if "full" in arg else 64)


@pytest.mark.parametrize("arg,match", [
    (None, "arm in teacher, student, kd, latent, dml, study"),
    ("cpu", "arm in teacher, student, kd, latent, dml, study"),
    ("kd,gpu", "preset in cpu, full"),
    ("kd,cpu_synapse", "data in acdc, synapse"),
    ("kd,cpu,lr=3", "unknown option"),
    ("student,cpu,teacher=/x", "applies to the kd and latent arms"),
])
def test_bad_args_say_the_choices_in_one_line(arg, match):
  with pytest.raises(flags.IllegalFlagValueError) as e:
    _load(arg)
  # The config's own error is one line, the last of absl's message.
  last = str(e.value).strip().splitlines()[-1]
  assert last.startswith("ValueError: config arg") and match in last, last


@pytest.mark.parametrize("module,arm", [("main", "kd"), ("study", "study")])
def test_commands_load_the_config_from_the_repository_root(module, arm,
                                                           tmp_path):
  # As a user runs them: from the root, nothing added to sys.path. A missing
  # data root stops the run right after the config loaded.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run(
      [sys.executable, "-m", f"kd_jax.{module}",
       f"--config=configs/distillo.py:{arm},synapse",
       f"--config.data.root={tmp_path}/none", f"--workdir={tmp_path}/w"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert out.returncode == 1, out.stderr
  assert "error: data:" in out.stderr and "train_npz" in out.stderr, (
      out.stderr)


def test_synapse_arms_validate_on_the_synapse_layout(synapse_root, tmp_path):
  c = _load("study,synapse", f"--config.data.root={synapse_root}",
            "--config.data.num_val_cases=1")
  ds = data.build(c.data)
  assert ds.num_classes == 9 and ds.train[0]["image"].shape == (64, 64, 1)
  train.validate(c, str(tmp_path), ds)  # every stage: models, features


def test_synapse_full_validates_at_224(synapse_root, tmp_path):
  c = _load("study,synapse_full", f"--config.data.root={synapse_root}",
            "--config.data.num_val_cases=1")
  c.stage_order = ("teacher", "latent", "dml")  # the b16 wiring
  ds = data.build(c.data)
  assert ds.train[0]["image"].shape == (224, 224, 1)
  train.validate(c, str(tmp_path), ds)


def test_a_missing_teacher_folder_stops_before_training(synapse_root,
                                                        tmp_path):
  c = _load(f"kd,synapse,teacher={tmp_path}/none",
            f"--config.data.root={synapse_root}",
            "--config.data.num_val_cases=1")
  with pytest.raises(train.ConfigError, match="teacher.checkpoint"):
    train.validate(c, str(tmp_path), data.build(c.data))


ACDC = os.path.join(str(sources.resolve_data_dir()), "acdc")


@pytest.mark.skipif(not os.path.isdir(ACDC), reason=f"{ACDC} is absent")
def test_acdc_study_config_validates(tmp_path):
  c = _load("study,cpu", "--config.data.max_volumes=1")
  ds = data.build(c.data)
  assert ds.num_classes == 4 and len(ds.train) == 1312
  train.validate(c, str(tmp_path), ds)
