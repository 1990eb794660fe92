"""Tests for configs/distillo: arms, presets, Synapse variants."""
import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

import synapse_fixture
from kd_jax import data, train
from kd_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs.distillo import common  # noqa: E402

ARMS = common.ARMS


@pytest.fixture(scope="module")
def synapse_root(tmp_path_factory):
  return synapse_fixture.write(tmp_path_factory.mktemp("synapse"))


def _load(arm, arg):
  """The config exactly as `--config=configs/distillo/<arm>.py:<arg>`."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                  lock_config=True)
  path = os.path.join(ROOT, "configs", "distillo", f"{arm}.py")
  fv(["prog", f"--config={path}:{arg}" if arg else f"--config={path}"])
  return fv.config


@pytest.mark.parametrize("arg,dataset,size,teacher", [
    ("", "acdc", 64, "transunet_tiny"),
    ("cpu", "acdc", 64, "transunet_tiny"),
    ("full", "acdc", 224, "transunet_b16"),
    ("acdc_full", "acdc", 224, "transunet_b16"),
    ("synapse", "synapse", 64, "transunet_tiny"),
    ("synapse_full", "synapse", 224, "transunet_b16"),
])
def test_presets(arg, dataset, size, teacher):
  for arm in ARMS + ("study",):
    c = _load(arm, arg)
    assert c.data.name == dataset and c.data.image_size == size
    assert c.stages.teacher.model.name == teacher
    assert c.stages.dml.peer.name == teacher
    assert c.stages.student.model.name == "squeeze_unet"
  full = "full" in arg
  assert c.epochs == (40 if full else 12)
  assert c.steps == c.epochs * common.TRAIN_SLICES[dataset] // c.batch_size


def test_arms_share_every_hyper_parameter():
  configs = {arm: _load(arm, "cpu") for arm in ARMS}
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
  assert ref.stages.latent.losses.latent.fn == "hint_l1"
  assert ref.stages.dml.method == "mutual"
  assert configs["kd"].stage_order == ("teacher", "kd")
  assert configs["latent"].stage_order == ("teacher", "latent")
  assert configs["dml"].stage_order == ("dml",)


def test_steps_follow_epoch_and_batch_overrides():
  path = os.path.join(ROOT, "configs", "distillo", "kd.py")
  argv = ["prog", f"--config={path}:full", "--config.epochs=2",
          "--config.batch_size=8"]
  fv = flags.FlagValues()
  # sys_argv: the override flags are found in these args, not sys.argv.
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  assert fv.config.steps == 2 * 1312 // 8


def test_teacher_option_distils_from_a_checkpoint_folder(tmp_path):
  c = _load("kd", f"cpu,teacher={tmp_path}")
  assert c.stage_order == ("kd",)
  assert c.stages.kd.teacher.checkpoint == str(tmp_path)
  assert c.stages.kd.teacher.stage == ""


@pytest.mark.parametrize("arm,arg,match", [
    ("kd", "gpu", "expected"),
    ("kd", "cpu,lr=3", "unknown option"),
    ("student", "cpu,teacher=/x", "applies to the kd and latent arms"),
])
def test_bad_args(arm, arg, match):
  with pytest.raises(ValueError, match=match):
    common.get_config(arm, arg)


def _synapse_config(arm, arg, root):
  c = common.get_config(arm, arg)
  c.data.root = str(root)
  c.data.num_val_cases = 1
  return c


def test_synapse_arms_validate_on_the_synapse_layout(synapse_root, tmp_path):
  c = _synapse_config("study", "synapse", synapse_root)
  ds = data.build(c.data)
  assert ds.num_classes == 9 and ds.train[0]["image"].shape == (64, 64, 1)
  train.validate(c, str(tmp_path), ds)  # every stage: models, features


def test_synapse_full_validates_at_224(synapse_root, tmp_path):
  c = _synapse_config("study", "synapse_full", synapse_root)
  c.stage_order = ("teacher", "latent", "dml")  # the b16 wiring
  ds = data.build(c.data)
  assert ds.train[0]["image"].shape == (224, 224, 1)
  train.validate(c, str(tmp_path), ds)


def test_a_missing_teacher_folder_stops_before_training(synapse_root,
                                                        tmp_path):
  c = _synapse_config("kd", f"synapse,teacher={tmp_path}/none",
                      synapse_root)
  with pytest.raises(train.ConfigError, match="teacher.checkpoint"):
    train.validate(c, str(tmp_path), data.build(c.data))


ACDC = os.path.join(str(sources.resolve_data_dir()), "acdc")


@pytest.mark.skipif(not os.path.isdir(ACDC), reason=f"{ACDC} is absent")
def test_acdc_study_config_validates(tmp_path):
  c = common.get_config("study", "cpu")
  c.data.max_volumes = 1
  ds = data.build(c.data)
  assert ds.num_classes == 4 and len(ds.train) == common.TRAIN_SLICES["acdc"]
  train.validate(c, str(tmp_path), ds)
