"""Tests for kd_jax.study: aggregation over seeds, volume scores, and a tiny
study end to end on a generated Synapse layout."""
import importlib.util
import json
import os

import numpy as np
import pytest

import synapse_fixture
from kd_jax import study
from kd_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLASSES = ("background", "a", "b")


def _scores(dice_a, dice_b, hd):
  return study.flat_scores(dict(
      mean_dice=(dice_a + dice_b) / 2, mean_iou=0.5, mean_hd95=hd,
      dice=[None, dice_a, dice_b], iou=[None, 0.4, 0.6],
      hd95=[None, hd, hd]), CLASSES)


def test_aggregate_matches_numpy_mean_and_sample_std():
  per_seed = {0: {"teacher": _scores(0.9, 0.7, 2.0),
                  "student": _scores(0.6, 0.4, 5.0)},
              1: {"teacher": _scores(0.8, 0.8, 3.0),
                  "student": _scores(0.5, 0.5, 6.0)},
              2: {"teacher": _scores(0.7, 0.9, 4.0)}}
  table = study.aggregate(per_seed)
  assert list(table) == ["teacher", "student"]
  t = table["teacher"]
  np.testing.assert_allclose(t["dice/a"]["mean"], np.mean([0.9, 0.8, 0.7]))
  np.testing.assert_allclose(t["dice/a"]["std"],
                             np.std([0.9, 0.8, 0.7], ddof=1))
  np.testing.assert_allclose(t["dice/a"]["std"], 0.1)
  np.testing.assert_allclose(t["mean_hd95"]["mean"], 3.0)
  assert t["mean_dice"]["n"] == 3
  np.testing.assert_allclose(t["mean_dice"]["std"], 0.0, atol=1e-12)
  s = table["student"]  # Two seeds only.
  assert s["mean_dice"]["n"] == 2
  np.testing.assert_allclose(s["mean_hd95"]["std"],
                             np.std([5.0, 6.0], ddof=1))
  lines = study.markdown_table(
      table, {"teacher": dict(model="t", params=1234567, gflops=1.5)},
      CLASSES)
  assert lines[0].count("|") == lines[2].count("|")
  assert "| teacher | t | 1,234,567 | 1.500 | 0.800 ± 0.000 | 0.800 ± 0.100" \
      in lines[2]
  assert "| student | – | – | – |" in lines[3]


def test_mean_std_leaves_out_missing_values():
  assert study.mean_std([]) == dict(mean=None, std=None, n=0)
  assert study.mean_std([0.3, None, float("nan")]) == dict(mean=0.3,
                                                           std=None, n=1)


def test_cached_evaluation_is_redone_for_another_step_or_window(tmp_path):
  path = str(tmp_path / "volume_eval.json")
  calls = []

  def compute():
    calls.append(1)
    return {"summary": {"mean_dice": float(len(calls))}}

  assert study._cached_eval(path, 5, compute)["summary"]["mean_dice"] == 1
  assert study._cached_eval(path, 5, compute)["summary"]["mean_dice"] == 1
  assert study._cached_eval(path, 5, compute, window=64)["eval_window"] == 64
  assert study._cached_eval(path, 6, compute, window=64)["step"] == 6
  assert len(calls) == 3
  # Whole-image scores carry no window key (head scores are read as is).
  assert "eval_window" not in study._cached_eval(path, 7, compute)
  assert len(calls) == 4
  # A file from before eval_window existed holds whole-image scores.
  with open(path, "w") as f:
    json.dump({"step": 6, "summary": {"mean_dice": 0.5}}, f)
  assert study._cached_eval(path, 6, compute)["summary"]["mean_dice"] == 0.5
  assert study._cached_eval(path, 6, compute, window=64)["summary"][
      "mean_dice"] == 5


def test_gap_closed():
  # The seed paper: 0.51 → 0.61 against a 0.78 teacher closes 37 %.
  np.testing.assert_allclose(study.gap_closed(0.78, 0.51, 0.61),
                             0.10 / 0.27)
  assert study.gap_closed(0.5, 0.6, 0.7) is None  # No gap.
  assert study.gap_closed(None, 0.6, 0.7) is None
  assert study.gap_closed(0.8, 0.6, 0.5) < 0  # Worse than alone.


def test_volume_iou_by_hand():
  label = np.array([[[0, 1, 1], [2, 2, 0]]])
  pred = np.array([[[1, 1, 0], [2, 0, 0]]])
  iou = study.volume_iou(pred, label, 4)
  assert np.isnan(iou[3])  # Absent from both: nothing to score.
  # Background: label {(0,0), (1,2)}, prediction {(0,2), (1,1), (1,2)}.
  np.testing.assert_allclose(iou[:3], [1 / 4, 1 / 3, 1 / 2])


def _volumes(rng, shapes):
  names, arrays = [], {}
  for i, shape in enumerate(shapes):
    label = np.zeros(shape, np.int32)
    label[:, 2:6, 3:7] = 1
    label[:, 6:9, 1:4] = 2
    arrays[f"v{i}"] = (rng.random(shape).astype(np.float32), label)
    names.append(f"v{i}")
  return sources.VolumeSource(names, lambda n: arrays[n], 3,
                              class_names=CLASSES), arrays


def test_evaluate_volumes_perfect_and_empty_predictions():
  vols, arrays = _volumes(np.random.default_rng(0), [(3, 12, 10), (2, 12, 12)])
  labels = iter([])

  def oracle(x):  # Returns the ground truth of the volume being evaluated.
    return next(labels)

  labels = iter([arrays["v0"][1][:2], arrays["v0"][1][2:],
                 arrays["v1"][1][:2]])
  out = study.evaluate_volumes(oracle, vols, 3, None, batch_size=2)
  s = out["summary"]
  assert s["mean_dice"] == 1.0 and s["mean_iou"] == 1.0
  assert s["mean_iou_all"] == 1.0 and s["pixel_accuracy"] == 1.0
  assert s["mean_hd95"] == 0.0
  assert [v["name"] for v in out["per_volume"]] == ["v0", "v1"]
  json.dumps(out)  # NaN became None.
  assert s["dice"][0] is None

  out = study.evaluate_volumes(lambda x: np.zeros(x.shape[:3], np.int32),
                               vols, 3, None, batch_size=2)
  s = out["summary"]
  assert s["mean_dice"] == 0.0 and s["mean_iou"] == 0.0
  # All background predicted: background IoU and pixel accuracy are each
  # volume's background fraction (numpy, averaged over the two volumes).
  fractions = [np.mean(arrays[f"v{i}"][1] == 0) for i in range(2)]
  np.testing.assert_allclose(s["pixel_accuracy"], np.mean(fractions))
  np.testing.assert_allclose(s["mean_iou_all"], np.mean(fractions) / 3)
  # A missed class scores the volume's diagonal (strict convention).
  np.testing.assert_allclose(
      out["per_volume"][0]["hd95"][1], np.sqrt(3**2 + 12**2 + 10**2))


def test_images_as_volumes_scores_each_image_as_a_one_slice_volume():
  # A 2-D source (DRIVE-like): each image is scored on its own; the
  # per-image IoU is numpy's |P∩G| / |P∪G| of that image.
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, (3, 8, 6)).astype(np.int32)
  images = rng.random((3, 8, 6, 2)).astype(np.float32)
  source = [dict(image=images[i], label=labels[i]) for i in range(3)]
  vols = sources.images_as_volumes(source, 3, class_names=CLASSES)
  assert len(vols) == 3 and vols.depths == [1, 1, 1]
  np.testing.assert_array_equal(vols[1]["image"], images[1][None])
  np.testing.assert_array_equal(vols.get_slice(2, 0)["label"], labels[2])
  preds = rng.integers(0, 3, (3, 8, 6)).astype(np.int32)
  calls, batches = iter(preds), []

  def predict(x):
    batches.append(len(x))
    return next(calls)[None]

  out = study.evaluate_volumes(predict, vols, 3, None, batch_size=4)
  assert batches == [1, 1, 1]  # No blank slices padded to the batch of 4.
  for i, v in enumerate(out["per_volume"]):
    for c in range(3):
      p, g = preds[i] == c, labels[i] == c
      np.testing.assert_allclose(v["iou"][c], (p & g).sum() / (p | g).sum())
    np.testing.assert_allclose(v["pixel_accuracy"],
                               np.mean(preds[i] == labels[i]))


def _distillo_config(arg):
  """configs/distillo.py's get_config(arg), loaded from its path as
  --config loads it (unlocked: the tiny study adds per-stage steps)."""
  spec = importlib.util.spec_from_file_location(
      "distillo_config", os.path.join(ROOT, "configs", "distillo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _tiny_study_config(root):
  c = _distillo_config("study,synapse")
  c.data.root = str(root)
  c.data.image_size = 32
  c.data.num_val_cases = 1
  c.batch_size = 4
  c.log_every = 1
  c.eval_every = 2
  c.checkpoint_every = 2
  c.optimizer.warmup_steps = 1
  tiny_teacher = dict(name="transunet_tiny", image_size=32, resnet_width=4,
                      hidden=16, depth=1, num_heads=2, mlp_dim=16,
                      head_channels=8, decoder_channels=(8, 8, 4, 4))
  tiny_student = dict(name="squeeze_unet", width=4)
  for name in c.stage_order:
    stage = c.stages[name]
    stage.steps = 3
    stage.model = tiny_teacher if name == "teacher" else tiny_student
  for name in ("kd", "latent"):
    c.stages[name].teacher.model = tiny_teacher
  c.stages.dml.peer = tiny_teacher
  c.study.seeds = (0, 1)
  c.study.num_figure_examples = 2
  return c


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resume(tmp_path):
  root = synapse_fixture.write(tmp_path / "synapse")
  workdir = str(tmp_path / "study")
  c = _tiny_study_config(root)
  result = study.run(c, workdir)
  stages = ["teacher", "student", "kd", "latent", "dml", "dml_peer"]
  assert list(result["table"]) == stages
  assert set(result["timings_s"]) == {f"seed{s}/{n}" for s in (0, 1)
                                      for n in stages[:-1]}
  for name in ("study.md", "study.json", "predictions.png",
               "explanations.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  with open(os.path.join(workdir, "study.json")) as f:
    saved = json.load(f)
  # The table is the mean and sample std of the per-seed scores.
  for stage in stages:
    values = [saved["per_seed"][str(s)][stage]["mean_dice"] for s in (0, 1)]
    row = saved["table"][stage]["mean_dice"]
    assert row["n"] == 2
    np.testing.assert_allclose(row["mean"], np.mean(values))
    np.testing.assert_allclose(row["std"], np.std(values, ddof=1))
  assert saved["models"]["dml_peer"]["params"] == saved["models"][
      "teacher"]["params"]
  assert saved["models"]["kd"]["params"] == saved["models"]["student"][
      "params"] < saved["models"]["teacher"]["params"]
  assert set(saved["gap_closed"]) == {"kd", "latent", "dml"}
  md = open(os.path.join(workdir, "study.md")).read()
  assert "| kd | squeeze_unet (width=4) |" in md
  assert "Dice liver" in md and "test volumes" in md
  assert "steps of batch 4 per stage: 3 (1.3 epochs);" in md  # 9 slices
  for s in (0, 1):
    assert os.path.exists(os.path.join(workdir, f"seed{s}", "kd",
                                       "volume_eval.json"))
  # A rerun reuses every stage and every evaluation.
  again = study.run(c, workdir)
  assert again["timings_s"] == {}
  assert again["table"] == json.loads(json.dumps(result["table"]))


def test_head_study_table_is_the_mean_and_sample_std_over_seeds(tmp_path):
  from configs import fundus_mtl
  from kd_jax import data as data_lib, study as study_lib, train as train_lib
  c = fundus_mtl.get_config("cpu,synthetic")
  c.data.num_train, c.data.num_val, c.data.num_test = 8, 4, 4
  ds = data_lib.build(c.data)
  heads = train_lib.run_heads(c, ds)
  kappas = [0.3, 0.5, 0.25]
  per_seed = {k: {"student": {"dr_grade/kappa": v, "fovea/mean_error_px":
                              None if k == 0 else 10.0 * k}}
              for k, v in enumerate(kappas)}
  c.study.columns = ("dr_grade/kappa", "fovea/mean_error_px")
  result = study_lib.write_heads_report(
      str(tmp_path), c, ds, heads, study_lib.aggregate(per_seed),
      {"student": dict(model="m", params=10, gflops=0.1)}, per_seed, {})
  kappa = result["table"]["student"]["dr_grade/kappa"]
  np.testing.assert_allclose([kappa["mean"], kappa["std"]],
                             [np.mean(kappas), np.std(kappas, ddof=1)])
  row = open(tmp_path / "study.md").read().splitlines()[-1]
  # A missing value (seed 0) is left out: errors 10 and 20.
  assert row == (f"| student | m | 10 | 0.100 | {np.mean(kappas):.3f} ± "
                 f"{np.std(kappas, ddof=1):.3f} | 15.0 ± 7.1 |")
  assert "dice" not in open(tmp_path / "study.md").read().lower()


def test_segmentation_study_table_is_the_mean_and_sample_std_over_seeds(
    tmp_path):
  # write_report alone (the end-to-end study is slow): the table rows and
  # the gap closed from made-up per-seed scores, against numpy.
  import dataclasses
  from configs import default
  from kd_jax import data as data_lib
  c = default.get_config()
  c.data.num_train, c.data.num_val, c.data.num_test = 4, 2, 2
  ds = data_lib.build(c.data)
  ds = dataclasses.replace(ds, volumes_split="val",
                           volumes=sources.images_as_volumes(
                               ds.val, ds.num_classes,
                               class_names=ds.class_names))
  names = ds.class_names
  rng = np.random.default_rng(3)
  per_seed = {}
  for seed in (0, 1, 2):
    per_seed[seed] = {}
    for stage, level in (("teacher", 0.8), ("student", 0.5), ("kd", 0.6)):
      dice = list(level + 0.05 * rng.random(len(names)))
      per_seed[seed][stage] = study.flat_scores(dict(
          mean_dice=float(np.mean(dice[1:])), mean_iou=level - 0.1,
          mean_iou_all=level, pixel_accuracy=0.9, mean_hd95=3.0,
          dice=[None] + dice[1:], iou=dice, hd95=[None] + [3.0] * (
              len(names) - 1)), names)
  table = study.aggregate(per_seed)
  mean = {k: np.mean([per_seed[s][k]["mean_dice"] for s in per_seed])
          for k in ("teacher", "student", "kd")}
  gaps = {"kd": study.gap_closed(mean["teacher"], mean["student"],
                                 mean["kd"])}
  info = {k: dict(model=k, params=1, gflops=0.5) for k in mean}
  result = study.write_report(str(tmp_path), c, ds, table, info, gaps,
                              per_seed, {}, {})
  values = [per_seed[s]["kd"]["mean_dice"] for s in per_seed]
  row = result["table"]["kd"]["mean_dice"]
  np.testing.assert_allclose([row["mean"], row["std"]],
                             [np.mean(values), np.std(values, ddof=1)])
  md = open(tmp_path / "study.md").read()
  assert (f"| kd | kd | 1 | 0.500 | {np.mean(values):.3f} ± "
          f"{np.std(values, ddof=1):.3f} |") in md
  iou = [per_seed[s]["kd"][f"iou/{names[-1]}"] for s in per_seed]
  assert (f" | {np.mean(iou):.3f} ± {np.std(iou, ddof=1):.3f} |\n"
          in md.split("IoU per class")[1].split("| kd |")[1])
  closed = (mean["kd"] - mean["student"]) / (mean["teacher"] - mean["student"])
  assert f"- kd: {100 * closed:.0f} % (" in md
  assert json.load(open(tmp_path / "study.json"))["seeds"] == [0, 1, 2]
