"""`python -m kd_jax.evaluate`: metrics against numpy, figures, errors.

A tiny teacher and distilled student are trained once per session (the
baseline stage is left untrained) in a folder under pytest's base temp, which
tests/test_export.py shares: a second caller finds both stages finished.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from kd_jax import data, train
from kd_jax.evaluate import __main__ as evaluate_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests import test_train  # noqa: E402

TRAINED = ("teacher", "distilled")
_CONFIG_FILE = f"""
import sys
sys.path.insert(0, {ROOT!r})
from tests.test_evaluate_cli import tiny_config as get_config
"""


def tiny_config():
  c = test_train.tiny_config(steps=4)
  c.log_every = c.eval_every = c.checkpoint_every = 4
  return c


def trained_run(tmp_path_factory):
  """(config, datasets, workdir, config file, {stage: (method, state)})."""
  workdir = str(tmp_path_factory.getbasetemp() / "tiny_kd_run")
  c = tiny_config()
  ds = data.build(c.data)
  stages = {name: train.train_stage(c, name, workdir, ds) for name in TRAINED}
  config_file = os.path.join(workdir, "tiny_config.py")
  with open(config_file, "w") as f:
    f.write(_CONFIG_FILE)
  return c, ds, workdir, config_file, stages


def run_module(module, *args):
  """`python -m module args` in the repository root; the CompletedProcess."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        capture_output=True, text=True, check=False,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def predictions(method, state, images):
  return np.asarray(jax.jit(method.predict)(
      state.params, state.batch_stats, images).argmax(-1))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  c, ds, workdir, config_file, stages = trained_run(tmp_path_factory)
  out = run_module("kd_jax.evaluate", f"--config={config_file}",
                   f"--workdir={workdir}", "--split=val")
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(workdir, "eval_val", "metrics.json")) as f:
    report = json.load(f)
  return c, ds, workdir, stages, report, out.stdout


def _numpy_scores(pred, label, num_classes):
  """Dice / IoU per class (NaN when a class is in neither), foreground means,
  pixel accuracy, written directly from the definitions."""
  dice, iou = [], []
  for k in range(num_classes):
    p, g = pred == k, label == k
    inter, size = np.sum(p & g), np.sum(p) + np.sum(g)
    dice.append(2 * inter / size if size else np.nan)
    iou.append(inter / np.sum(p | g) if size else np.nan)
  dice, iou = np.array(dice), np.array(iou)
  mean = lambda x: np.mean(x[1:][~np.isnan(x[1:])])  # noqa: E731
  return dict(dice=dice, iou=iou, mean_dice=mean(dice), mean_iou=mean(iou),
              pixel_accuracy=np.mean(pred == label))


def _as_float(x):
  return np.nan if x is None else x


def test_metrics_equal_a_numpy_recomputation(evaluated):
  _, ds, _, stages, report, stdout = evaluated
  # The default is every stage with a checkpoint: the untrained baseline is
  # left out.
  assert list(report["stages"]) == list(TRAINED)
  assert report["split"] == "val" and report["num_images"] == len(ds.val)
  images = np.stack([ds.val[i]["image"] for i in range(len(ds.val))])
  labels = np.stack([ds.val[i]["label"] for i in range(len(ds.val))])
  for name, (method, state) in stages.items():
    want = _numpy_scores(predictions(method, state, images), labels,
                         ds.num_classes)
    got = report["stages"][name]
    for key in ("mean_dice", "mean_iou", "pixel_accuracy"):
      np.testing.assert_allclose(_as_float(got[key]), want[key], rtol=1e-6,
                                 err_msg=f"{name} {key}")
    for key in ("dice", "iou"):
      assert list(got[key]) == list(ds.class_names)
      np.testing.assert_allclose(
          [_as_float(v) for v in got[key].values()], want[key], rtol=1e-6,
          err_msg=f"{name} {key}")
    assert name in stdout


def test_figures_are_written(evaluated):
  _, _, workdir, _, report, _ = evaluated
  for name in ("segmentation.png", "explanations.png"):
    path = os.path.join(workdir, "eval_val", name)
    with open(path, "rb") as f:
      head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000
  # Liver covers the most foreground pixels of the synthetic slices.
  # Each model's default Grad-CAM map: the UNets' full-resolution decoder map.
  assert report["explanations"] == dict(
      class_index=5, class_name="liver",
      features={"teacher": "dec1", "distilled": "dec1"}, num_images=4)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(stages=["teacher", "studnet"]), ValueError,
     r"unknown stage\(s\) \['studnet'\].*'teacher', 'baseline', 'distilled'"),
    (dict(stages=["baseline"]), FileNotFoundError,
     "stage 'baseline' has no checkpoint"),
    (dict(split="train"), ValueError, "unknown split 'train'.*'test', 'val'"),
    (dict(cam_class="kidney"), ValueError,
     "cam_class 'kidney' is not a class name.*left_kidney"),
    (dict(cam_class=9), ValueError, "cam_class 9 is out of range"),
    (dict(cam_feature="dec9"), ValueError,
     "stage 'teacher'.*no feature 'dec9'.*--cam_feature=.*bottleneck"),
])
def test_errors_name_the_problem(evaluated, kwargs, error, match):
  c, _, workdir, _, _, _ = evaluated
  with pytest.raises(error, match=match):
    evaluate_cli.evaluate_checkpoints(c, workdir, **kwargs)


def test_empty_workdir_fails_with_a_hint(tmp_path):
  with pytest.raises(FileNotFoundError, match="no stage of .* has a "
                     "checkpoint.*kd_jax.main"):
    evaluate_cli.evaluate_checkpoints(tiny_config(), str(tmp_path))
