"""`python -m kd_jax.evaluate`: metrics against numpy, figures, errors.

A tiny teacher and distilled student are trained once per session (the
baseline stage is left untrained) in a folder under pytest's base temp, which
tests/test_export.py shares: a second caller finds both stages finished. So
is a tiny four-head run (classification and landmark heads), evaluated
in-process against its own report.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from kd_jax import data, tasks, train
from kd_jax.evaluate import __main__ as evaluate_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests import test_train  # noqa: E402
from tests.test_tasks import _fundus_config  # noqa: E402

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


# ----------------------------------------------------------------------------
# A run with four named heads (tests/test_tasks.py's fundus config): no
# segmentation anywhere, the scores of kd_jax.tasks instead.


def trained_heads_run(tmp_path_factory):
  """(config, workdir, its results.json) of a 2-step four-head run on
  generated fundus images, trained once per session (tests/test_export.py
  shares it)."""
  workdir = tmp_path_factory.getbasetemp() / "tiny_heads_run"
  c = _fundus_config()
  results = workdir / "results.json"
  if not results.exists():
    train.train_and_evaluate(c, str(workdir))
  return c, str(workdir), json.loads(results.read_text())


@pytest.fixture(scope="module")
def evaluated_heads(tmp_path_factory):
  c, workdir, results = trained_heads_run(tmp_path_factory)
  report = evaluate_cli.evaluate_checkpoints(c, workdir)
  with open(os.path.join(workdir, "eval_test", "metrics.json")) as f:
    saved = json.load(f)
  return c, workdir, results, report, saved


def test_multi_head_metrics_equal_the_run_report(evaluated_heads):
  _, _, results, report, saved = evaluated_heads
  # The returned report is what metrics.json holds.
  assert json.loads(json.dumps(report)) == saved
  assert saved["split"] == "test" and saved["num_images"] == 8
  assert list(saved["stages"]) == ["a"]
  got, want = saved["stages"]["a"], results["a"]["scores"]
  assert got["method"] == "supervised"
  assert got["model"]["name"] == "multitask_resnet18"
  assert set(got) == set(want) | {"method", "model"}
  for key, value in want.items():
    # null (NaN in metrics.json) reads back as NaN; NaN equals NaN here.
    np.testing.assert_allclose(np.asarray(got[key], float),
                               np.asarray(value, float), rtol=1e-6,
                               err_msg=key)
  assert np.sum(got["dr_grade/confusion"]) == 8
  assert isinstance(got["dme_risk/confusion"][0][0], int)
  assert saved["heads"]["dme_risk"] == dict(
      kind="classification", label="dme_risk", num_classes=3,
      class_names=list(data.synthetic.DME_RISKS))
  assert saved["heads"]["fovea"] == dict(kind="landmark", label="fovea",
                                         num_classes=None, class_names=None)
  # In the heads' order (config.heads, a ConfigDict: sorted names).
  assert saved["headline"] == [
      f"{h}/{k}" for h, kind in (("dme_risk", "classification"),
                                 ("dr_grade", "classification"),
                                 ("fovea", "landmark"),
                                 ("optic_disc", "landmark"))
      for k in tasks.HEADLINE[kind]]


def test_multi_head_evaluation_has_no_segmentation_output(evaluated_heads):
  _, workdir, _, _, saved = evaluated_heads
  # The workdir is pytest's path, which is not the command's to name.
  text = json.dumps({k: v for k, v in saved.items()
                     if k != "workdir"}).lower()
  for word in ("dice", "iou", "pixel_accuracy", "segmentation"):
    assert word not in text, word
  out_dir = os.path.join(workdir, "eval_test")
  assert sorted(os.listdir(out_dir)) == ["confusion.png", "metrics.json"]
  assert saved["figures"] == dict(confusion="confusion.png")
  with open(os.path.join(out_dir, "confusion.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_multi_head_table_shows_the_headline_scores(evaluated_heads):
  _, _, _, _, saved = evaluated_heads
  lines = evaluate_cli.table(saved)
  a = saved["stages"]["a"]
  at = lines.index("dr_grade (classification)")
  assert lines[at + 1].split() == ["stage", "accuracy", "macro_f1", "auc",
                                   "kappa"]
  assert lines[at + 2].split()[:2] == ["a",
                                       format(a["dr_grade/accuracy"], ".4f")]
  at = lines.index("fovea (landmark)")
  assert lines[at + 1].split() == ["stage", "mean_error_px",
                                   "median_error_px"]
  assert lines[at + 2].split() == [
      "a", format(a["fovea/mean_error_px"], ".4f"),
      format(a["fovea/median_error_px"], ".4f")]
  assert not any("Dice" in line for line in lines)


@pytest.mark.parametrize("kwargs", [dict(cam_class="1"),
                                    dict(cam_feature="layer4")])
def test_explanation_flags_need_a_segmentation_head(evaluated_heads, kwargs):
  c, workdir, _, _, _ = evaluated_heads
  with pytest.raises(ValueError, match=r"--cam_class and --cam_feature "
                     r"explain a segmentation map, but this run's heads are "
                     r"dme_risk \(classification\), dr_grade "
                     r"\(classification\), fovea \(landmark\), optic_disc "
                     r"\(landmark\); drop them$") as e:
    evaluate_cli.evaluate_checkpoints(c, workdir, **kwargs)
  assert "\n" not in str(e.value)
