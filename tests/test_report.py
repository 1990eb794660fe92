"""The run report written at the end of `train.train_and_evaluate`.

The tiny run's stages are trained once per session (shared with the evaluate
and export tests); `train_and_evaluate` finds them finished, evaluates them
and writes the report, which is checked against numbers computed here.
"""
import json
import os
import re
import sys

import jax
import numpy as np
import pytest

from kd_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.test_evaluate_cli import _numpy_scores, predictions, trained_run  # noqa: E402,E501

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
  c, ds, workdir, _, stages = trained_run(tmp_path_factory)
  c = c.copy_and_resolve_references()
  c.stage_order = tuple(stages)  # The trained ones: nothing trains again.
  steps = {n: int(s.step) for n, (_, s) in stages.items()}
  train.train_and_evaluate(c, workdir)
  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  return ds, workdir, stages, steps, report, results


def test_nothing_retrained(reported):
  _, _, stages, steps, _, _ = reported
  for name, (_, state) in stages.items():
    assert int(state.step) == steps[name]


def test_scores_match_numpy_on_the_test_split(reported):
  ds, _, stages, _, report, results = reported
  images = np.stack([ds.test[i]["image"] for i in range(len(ds.test))])
  labels = np.stack([ds.test[i]["label"] for i in range(len(ds.test))])
  for name, (method, state) in stages.items():
    expected = _numpy_scores(predictions(method, state, images), labels,
                             ds.num_classes)
    row = results[name]
    np.testing.assert_allclose(row["mean_dice"], expected["mean_dice"],
                               rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(row["params"], sum(
        x.size for x in jax.tree.leaves(state.params[method.model_key])))
    # The table row shows the same mean Dice, to 3 decimals.
    line = next(l for l in report.splitlines() if l.startswith(f"| {name} |"))
    assert f"{row['mean_dice']:.3f}" in line


def _iou_row(line):
  return [float("nan") if v.strip() == "–" else float(v)
          for v in line.strip("| ").split(" | ")[1:]]


def test_both_miou_conventions_per_class_iou_and_pixel_accuracy(reported):
  ds, _, stages, _, report, results = reported
  images = np.stack([ds.test[i]["image"] for i in range(len(ds.test))])
  labels = np.stack([ds.test[i]["label"] for i in range(len(ds.test))])
  lines = report.splitlines()
  header = next(l for l in lines if l.startswith("| stage | method |"))
  assert "| mIoU (fg) | mIoU (all) | pixel acc. |" in header
  iou_at = lines.index(next(l for l in lines if l.startswith(
      "Per-class IoU")))
  assert lines[iou_at + 2] == "| stage | " + " | ".join(ds.class_names) + " |"
  for name, (method, state) in stages.items():
    pred = predictions(method, state, images)
    iou = np.array([np.sum((pred == c) & (labels == c))
                    / np.sum((pred == c) | (labels == c))
                    if np.any((pred == c) | (labels == c)) else np.nan
                    for c in range(ds.num_classes)])
    row = results[name]
    np.testing.assert_allclose(row["iou"], iou, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(row["mean_iou"], np.nanmean(iou[1:]),
                               rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(row["mean_iou_all"], np.nanmean(iou),
                               rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(row["pixel_accuracy"], np.mean(pred == labels),
                               rtol=1e-5, err_msg=name)
    main = next(l for l in lines[:iou_at] if l.startswith(f"| {name} |"))
    cells = main.split(" | ")
    assert cells[6:9] == [f"{row['mean_iou']:.3f}",
                          f"{row['mean_iou_all']:.3f}",
                          f"{row['pixel_accuracy']:.3f}"], main
    shown = next(l for l in lines[iou_at:] if l.startswith(f"| {name} |"))
    np.testing.assert_allclose(_iou_row(shown), iou, atol=5e-4,
                               err_msg=name)


def test_every_linked_figure_exists(reported):
  _, workdir, _, _, report, _ = reported
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
  assert {"predictions.png", "curves.png", "explanations.png"} <= set(links)
  for link in links:
    path = os.path.join(workdir, link)
    with open(path, "rb") as f:
      assert f.read(8) == PNG, link
    assert os.path.getsize(path) > 5000, link


def test_explanations_name_the_class_and_feature(reported):
  ds, _, _, _, report, _ = reported
  labels = np.stack([ds.test[i]["label"] for i in range(4)])
  counts = np.bincount(labels.ravel(), minlength=ds.num_classes)[1:]
  name = ds.class_names[int(np.argmax(counts)) + 1]
  assert f"What each stage looks at for {name}" in report
