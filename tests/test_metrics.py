"""Tests for kd_jax.evaluate.metrics against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.evaluate import metrics


# --------------------------------------------------------------------------
# confusion_matrix / segmentation_scores.

LABEL = np.array([[0, 0, 1, 1],
                  [0, 2, 2, 1]])
PRED = np.array([[0, 1, 1, 1],
                 [0, 2, 0, 0]])


def test_confusion_matrix_hand_computed():
  cm = np.asarray(metrics.confusion_matrix(PRED, LABEL, 4))
  # rows = ground truth, cols = prediction.
  expected = np.array([[2, 1, 0, 0],
                       [1, 2, 0, 0],
                       [1, 0, 1, 0],
                       [0, 0, 0, 0]])
  np.testing.assert_array_equal(cm, expected)
  assert cm.dtype == np.int32


def test_confusion_matrix_jit_mask_ignore_and_accumulate():
  fn = jax.jit(metrics.confusion_matrix, static_argnums=2)
  label = LABEL.copy()
  label[0, 0] = 255  # ignore index: not counted
  mask = np.ones_like(LABEL, bool)
  mask[1, 3] = False
  cm = np.asarray(fn(PRED, label, 4, mask))
  assert cm.sum() == 6
  assert cm[1, 0] == 0 and cm[0, 0] == 1
  # Summing per-batch matrices equals one matrix over the concatenation.
  both = fn(np.stack([PRED, PRED[::-1]]), np.stack([LABEL, LABEL[::-1]]), 4)
  np.testing.assert_array_equal(
      both, fn(PRED, LABEL, 4) + fn(PRED[::-1], LABEL[::-1], 4))
  weighted = metrics.confusion_matrix(PRED, LABEL, 4,
                                      np.full(LABEL.shape, 0.5, np.float32))
  assert weighted.dtype == jnp.float32
  np.testing.assert_allclose(weighted, 0.5 * np.asarray(
      metrics.confusion_matrix(PRED, LABEL, 4)))


def test_segmentation_scores_hand_computed_and_absent_class():
  cm = metrics.confusion_matrix(PRED, LABEL, 4)
  s = jax.jit(metrics.segmentation_scores)(cm)
  # class 0: tp 2, fp 2, fn 1; class 1: tp 2, fp 1, fn 1; class 2: tp 1,
  # fp 0, fn 1; class 3 absent from both -> NaN, excluded from the mean.
  dice = np.array([4 / 7, 4 / 6, 2 / 3, np.nan])
  iou = np.array([2 / 5, 2 / 4, 1 / 2, np.nan])
  np.testing.assert_allclose(s["dice"], dice, rtol=1e-6)
  np.testing.assert_allclose(s["iou"], iou, rtol=1e-6)
  np.testing.assert_allclose(s["mean_dice"], (4 / 6 + 2 / 3) / 2, rtol=1e-6)
  np.testing.assert_allclose(s["mean_iou"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(s["pixel_accuracy"], 5 / 8, rtol=1e-6)
  s_bg = metrics.segmentation_scores(cm, include_background=True)
  np.testing.assert_allclose(s_bg["mean_dice"], (4 / 7 + 4 / 6 + 2 / 3) / 3,
                             rtol=1e-6)


def test_segmentation_scores_one_sided_and_all_absent():
  # Class 1 only predicted (fp), class 2 only in ground truth (fn): Dice 0.
  cm = metrics.confusion_matrix(np.array([1, 0]), np.array([0, 2]), 3)
  s = metrics.segmentation_scores(cm)
  np.testing.assert_allclose(s["dice"][1:], [0.0, 0.0])
  assert float(s["mean_dice"]) == 0.0
  # Only background anywhere: foreground mean is NaN (nothing to score).
  cm = metrics.confusion_matrix(np.zeros(4, int), np.zeros(4, int), 3)
  s = metrics.segmentation_scores(cm)
  assert np.isnan(s["mean_dice"]) and np.isnan(s["mean_iou"])
  assert float(s["dice"][0]) == 1.0
  assert float(s["pixel_accuracy"]) == 1.0
