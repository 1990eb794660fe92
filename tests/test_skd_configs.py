"""configs/skd/ablation.py: its arms, presets and wiring."""
import importlib.util
import os

import pytest

from kd_jax import data, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "skd", "ablation.py")
ARMS = ("teacher", "student", "pixel", "pixel_pair", "skd", "mimic", "at")


def _module():
  spec = importlib.util.spec_from_file_location("ablation", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _terms(c, stage):
  return {name: dict(term) for name, term in c.stages[stage].losses.items()}


def test_each_arm_adds_the_papers_term_to_the_one_before():
  c = _module().get_config("cpu,acdc")
  assert tuple(c.stage_order) == ARMS
  base = set(_terms(c, "student"))
  assert base == {"ce", "aux"}  # PSPNet students carry the aux head.
  assert set(_terms(c, "pixel")) == base | {"pixel"}
  assert set(_terms(c, "pixel_pair")) == base | {"pixel", "pair"}
  assert set(_terms(c, "skd")) == base | {"pixel", "pair", "holistic"}
  assert set(_terms(c, "mimic")) == base | {"mimic"}
  assert set(_terms(c, "at")) == base | {"at"}
  t = _terms(c, "skd")
  # λ_pixel 10, λ_pair 1, λ_holistic 0.1, the authors' conventions.
  assert (t["pixel"]["weight"], t["pair"]["weight"],
          t["holistic"]["weight"]) == (10.0, 1.0, 0.1)
  assert t["pixel"]["convention"] == t["pair"]["convention"] == "official"
  assert t["pair"]["scale"] == 0.5
  assert _terms(c, "teacher")["aux"] == dict(fn="cross_entropy", weight=0.4,
                                             output="aux_logits")
  assert c.stages.skd.method == "adversarial"
  assert c.stages.skd.critic.gp_weight == 10.0
  assert c.data.augment == "scale_crop"
  assert tuple(c.data.scale_range) == (0.5, 2.0)


def test_paper_preset_is_the_papers_setting():
  c = _module().get_config("paper,drive,student=espnet_c")
  assert (c.data.image_size, c.steps, c.batch_size) == (512, 40000, 8)
  assert (c.optimizer.name, c.optimizer.lr, c.optimizer.schedule,
          c.optimizer.power) == ("sgd", 0.01, "poly", 0.9)
  assert c.stages.skd.optimizers.critic.lr == 4e-4
  assert c.stages.student.model.name == "espnet_c"
  assert set(_terms(c, "student")) == {"ce"}  # ESPNet-C has no aux head.
  assert c.stages.teacher.model.name == "pspnet_resnet101"
  assert "width" not in c.stages.teacher.model
  assert c.compute_dtype == "bfloat16"


def test_cpu_drive_trains_on_crops_and_evaluates_on_crop_sized_windows():
  c = _module().get_config("cpu,drive")
  assert (c.data.image_size, c.data.crop_size, c.eval_window) == (512, 64, 64)
  acdc = _module().get_config("cpu,acdc")  # 64² slices, seen whole.
  assert (acdc.data.crop_size, acdc.eval_window) == (0, 0)
  assert _module().get_config("paper,drive").eval_window == 0  # 512² whole.
  try:
    ds = data.build(c.data)
  except FileNotFoundError:
    pytest.skip("DRIVE is not in the shared data folder")
  import numpy as np  # pylint: disable=import-outside-toplevel
  crop = ds.train_transforms[0]
  for i in range(3):
    view = crop.random_map(ds.train[i], np.random.default_rng(i))
    assert view["image"].shape == (64, 64, 3)
    assert view["label"].shape == view["fov"].shape == (64, 64)
  assert ds.val[0]["image"].shape == (512, 512, 3)
  # The crop is the scaled image's pixels: labels stay {0, 1}.
  assert set(np.unique(view["label"])) <= {0, 1}


@pytest.mark.parametrize("arg", ["gpu", "cpu,cityscapes", "cpu,student=x"])
def test_bad_args_name_the_choices(arg):
  with pytest.raises(ValueError, match="expected <preset>"):
    _module().get_config(arg)


# Each validation traces seven stages with a ResNet-101 teacher (about a
# minute on 2 cores): slow. The adversarial stage's wiring runs in CI in
# tests/test_adversarial.py.
@pytest.mark.slow
@pytest.mark.parametrize("student", ["pspnet_resnet18", "mobilenetv2_seg",
                                     "espnet_c"])
def test_every_arm_validates_on_acdc(tmp_path, student):
  c = _module().get_config(f"cpu,acdc,student={student}")
  c.data.max_train, c.data.max_volumes = 16, 1  # A quick look at ACDC.
  try:
    ds = data.build(c.data)
  except FileNotFoundError:
    pytest.skip("ACDC is not in the shared data folder")
  train.validate(c, str(tmp_path), ds)  # Raises ConfigError on any wiring.
  assert os.listdir(tmp_path) == []
