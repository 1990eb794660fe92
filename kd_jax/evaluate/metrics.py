"""Evaluation metrics for segmentation, classification and landmarks.

Segmentation (overlap, jittable): `confusion_matrix` accumulates a (C, C)
matrix — rows are ground truth, columns prediction — that is summed over
batches; `segmentation_scores` turns it into Dice, IoU and pixel accuracy.

Conventions (tested in tests/test_metrics.py):

* Mean Dice / mean IoU average the foreground classes 1..C-1 (the TransUNet
  and Synapse convention); `include_background=True` averages all classes.
* A class absent from both the prediction and the ground truth has Dice and
  IoU = NaN (0/0: nothing to score), and NaN classes are left out of the
  means. If every averaged class is NaN the mean is NaN. A class present in
  only one of the two scores 0.
* Labels outside [0, num_classes) (e.g. an ignore index 255) are not counted.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any


# --------------------------------------------------------------------------
# Segmentation overlap.


def confusion_matrix(pred: Array, label: Array, num_classes: int,
                     mask: Array | None = None) -> jax.Array:
  """(C, C) confusion matrix, rows = ground truth, columns = prediction.

  Args:
    pred: integer class ids, any shape (e.g. (N, H, W)).
    label: integer class ids, same shape. Pixels whose label (or
      prediction) is outside [0, num_classes) are ignored.
    num_classes: C (static under jit).
    mask: optional array broadcastable to `label`; pixels where it is 0/False
      are ignored. A floating-point mask weights pixels and gives a float32
      matrix; otherwise the result is int32.

  Returns:
    int32 (or float32 for a float mask) (C, C) counts. Sum the matrices of
    several batches to evaluate a whole set. int32 holds up to 2**31 pixels
    per cell; convert to np.int64 before summing beyond that.
  """
  label = jnp.asarray(label).astype(jnp.int32)
  pred = jnp.asarray(pred).astype(jnp.int32)
  valid = ((label >= 0) & (label < num_classes)
           & (pred >= 0) & (pred < num_classes))
  if mask is None:
    weights = valid.astype(jnp.int32)
  else:
    mask = jnp.broadcast_to(jnp.asarray(mask), label.shape)
    dtype = (jnp.float32 if jnp.issubdtype(mask.dtype, jnp.floating)
             else jnp.int32)
    weights = jnp.where(valid, mask.astype(dtype), 0).astype(dtype)
  index = jnp.where(valid, label * num_classes + pred, 0).reshape(-1)
  counts = jnp.zeros(num_classes * num_classes, weights.dtype)
  counts = counts.at[index].add(weights.reshape(-1))
  return counts.reshape(num_classes, num_classes)


def segmentation_scores(confusion: Array,
                        include_background: bool = False) -> dict[str, Array]:
  """Dice, IoU and pixel accuracy from a (C, C) confusion matrix.

  Returns a dict with per-class "dice" and "iou" (C,) float32 arrays (NaN for
  a class absent from prediction and ground truth), "mean_dice" and
  "mean_iou" (NaN-skipping mean over classes 1..C-1, or 0..C-1 with
  `include_background`), and "pixel_accuracy" (trace / total).
  Works on numpy or jax arrays, under jit too.
  """
  c = jnp.asarray(confusion, jnp.float32)
  tp = jnp.diag(c)
  fp = c.sum(axis=0) - tp
  fn = c.sum(axis=1) - tp
  union = tp + fp + fn
  safe = jnp.where(union > 0, union, 1.0)
  dice = jnp.where(union > 0, 2 * tp / (safe + tp), jnp.nan)
  iou = jnp.where(union > 0, tp / safe, jnp.nan)
  start = 0 if include_background else 1
  total = c.sum()
  return {
      "dice": dice,
      "iou": iou,
      "mean_dice": _nanmean(dice[start:]),
      "mean_iou": _nanmean(iou[start:]),
      "pixel_accuracy": jnp.where(total > 0, tp.sum() / jnp.maximum(total, 1),
                                  jnp.nan),
  }


def _nanmean(x: jax.Array) -> jax.Array:
  """Mean over non-NaN entries; NaN when there are none (no warning)."""
  ok = ~jnp.isnan(x)
  n = ok.sum()
  return jnp.where(n > 0, jnp.where(ok, x, 0).sum() / jnp.maximum(n, 1),
                   jnp.nan)
