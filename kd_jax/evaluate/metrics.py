"""Evaluation metrics for segmentation, classification and landmarks.

Segmentation overlap (jittable): `confusion_matrix` accumulates a (C, C)
matrix — rows are ground truth, columns prediction — that is summed over
batches; `segmentation_scores` turns it into Dice, IoU and pixel accuracy.

Conventions (tested in tests/test_metrics.py):

* Two mean IoUs, both always given: `mean_iou` averages the foreground
  classes 1..C-1 (the TransUNet and Synapse convention, as `mean_dice`);
  `mean_iou_all` averages every class, background included (the mIoU of
  Structured KD and of the PASCAL VOC / Cityscapes benchmarks).
* A class absent from both the prediction and the ground truth has Dice and
  IoU = NaN (0/0: nothing to score), and NaN classes are left out of the
  means. If every averaged class is NaN the mean is NaN. A class present in
  only one of the two scores 0.
* Labels outside [0, num_classes) (e.g. an ignore index 255) are not counted.

Volumes (numpy/scipy): `hd95`, `volume_scores` (per-class Dice and HD95 of a
3D volume, with the empty-mask conventions described before
`binary_volume_scores`), `predict_volume` / `evaluate_volume` (a 2D model run
slice by slice over a volume) and `summarize_volumes`. `sliding_window`
runs a model on overlapping crop-sized windows of an image (jittable).

Classification (numpy): `accuracy`, `f1_scores` / `macro_f1`, `roc_auc`
(binary and one-vs-rest macro), `quadratic_weighted_kappa`, `fidelity`
(student-vs-teacher agreement, MED-TEX), `classification_scores`.
`classification_scores` also returns the confusion matrix.
Landmarks: `landmark_error` (mean Euclidean distance in pixels),
`landmark_scores` ((u, v) predictions scored in original-image pixels: mean,
median and the fraction within a few radii).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage, stats

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


def segmentation_scores(confusion: Array) -> dict[str, Array]:
  """Dice, IoU and pixel accuracy from a (C, C) confusion matrix.

  Per class c, from true positives TP_c, false positives FP_c and false
  negatives FN_c of the matrix summed over the whole set:
      IoU_c = TP_c / (TP_c + FP_c + FN_c),  Dice_c = 2 TP_c / (2 TP_c + FP_c
      + FN_c), NaN when the class is absent from prediction and ground truth.
  Returns a dict with
    "dice", "iou": (C,) float32 per class, background (class 0) included;
    "mean_dice", "mean_iou": NaN-skipping means over the foreground classes
      1..C-1 (TransUNet / Synapse);
    "mean_iou_all": NaN-skipping mean over all classes 0..C-1 (Structured
      KD's mIoU; scikit-learn's `jaccard_score(average="macro")` over the
      classes present);
    "pixel_accuracy": trace / total (all classes).
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
  total = c.sum()
  return {
      "dice": dice,
      "iou": iou,
      "mean_dice": _nanmean(dice[1:]),
      "mean_iou": _nanmean(iou[1:]),
      "mean_iou_all": _nanmean(iou),
      "pixel_accuracy": jnp.where(total > 0, tp.sum() / jnp.maximum(total, 1),
                                  jnp.nan),
  }


def _nanmean(x: jax.Array) -> jax.Array:
  """Mean over non-NaN entries; NaN when there are none (no warning)."""
  ok = ~jnp.isnan(x)
  n = ok.sum()
  return jnp.where(n > 0, jnp.where(ok, x, 0).sum() / jnp.maximum(n, 1),
                   jnp.nan)


# --------------------------------------------------------------------------
# Volume-wise Dice and HD95 (numpy / scipy, per 3D volume).
#
# HD95 follows medpy's `hd95`, which TransUNet and its successors call:
# surface voxels are the mask minus its binary erosion (6-connectivity in 3D,
# 4 in 2D; voxels on the array border count as surface), surface-to-surface
# distances come from `scipy.ndimage.distance_transform_edt` with the voxel
# spacing, and HD95 is the 95th percentile (linear interpolation) of the
# pooled distances of both directions. MONAI instead takes the larger of the
# two directed 95th percentiles: `hd95(..., pooled=False)`.
#
# Empty masks, per class and volume ("strict", the default):
#   both empty        -> dice NaN, hd95 NaN (nothing to score; left out of
#                        every mean, like the NaN classes above);
#   only one empty    -> dice 0, hd95 = the volume's diagonal in physical
#                        units (the largest distance possible inside it), so
#                        a missed or hallucinated organ is penalised instead
#                        of silently skipped.
# "transunet" reproduces TransUNet's `calculate_metric_percase` exactly:
#   both non-empty -> (dice, hd95); prediction non-empty and ground truth
#   empty -> (1, 0); prediction empty -> (0, 0), whatever the ground truth.
# Use it only to compare with numbers published under that protocol.

CONVENTIONS = ("strict", "transunet")


def _surface(mask: np.ndarray) -> np.ndarray:
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndimage.binary_erosion(mask, structure=structure,
                                        border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray,
                      spacing=None) -> tuple[np.ndarray, np.ndarray]:
  """Distances from each surface voxel of `a` to the surface of `b`, and back.

  Both masks must be non-empty. `spacing` is the voxel size per axis
  (default 1). The arrays are cropped to the joint bounding box first, which
  leaves surface-to-surface distances unchanged and saves time.
  """
  a = np.asarray(a, bool)
  b = np.asarray(b, bool)
  spacing = _spacing(spacing, a.ndim)
  box = tuple(slice(lo, hi + 1) for lo, hi in zip(
      *(lambda idx: (idx.min(axis=1), idx.max(axis=1)))(
          np.array(np.nonzero(a | b)))))
  # Keep a one-voxel frame where the box does not touch the array border so
  # the erosion sees the true neighbourhood.
  box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n))
              for s, n in zip(box, a.shape))
  a, b = a[box], b[box]
  sa, sb = _surface(a), _surface(b)
  dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
  dist_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
  return dist_to_b[sa], dist_to_a[sb]


def hd95(pred: np.ndarray, label: np.ndarray, spacing=None,
         pooled: bool = True) -> float:
  """95th-percentile symmetric Hausdorff distance between two non-empty masks.

  `pooled=True` (medpy/TransUNet): percentile of both directions' distances
  together; `pooled=False` (MONAI): max of the two directed percentiles.
  """
  if not np.any(pred) or not np.any(label):
    raise ValueError("hd95 needs two non-empty masks; see volume_scores for "
                     "the empty-mask conventions")
  d_ab, d_ba = surface_distances(pred, label, spacing)
  if pooled:
    return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))
  return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
  if spacing is None:
    return (1.0,) * ndim
  spacing = tuple(float(s) for s in np.broadcast_to(spacing, (ndim,)))
  return spacing


def binary_volume_scores(pred: np.ndarray, label: np.ndarray, spacing=None,
                         convention: str = "strict",
                         pooled: bool = True) -> tuple[float, float]:
  """(dice, hd95) of one binary prediction against one binary ground truth,
  with the empty-mask `convention` described in this module."""
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {CONVENTIONS}, got "
                     f"{convention!r}")
  pred = np.asarray(pred, bool)
  label = np.asarray(label, bool)
  p, g = pred.any(), label.any()
  if p and g:
    inter = np.logical_and(pred, label).sum()
    dice = 2.0 * inter / (pred.sum() + label.sum())
    return float(dice), hd95(pred, label, spacing, pooled)
  if convention == "transunet":
    return (1.0, 0.0) if p else (0.0, 0.0)
  if not p and not g:
    return float("nan"), float("nan")
  extent = np.asarray(pred.shape) * np.asarray(_spacing(spacing, pred.ndim))
  return 0.0, float(np.sqrt((extent ** 2).sum()))


def volume_scores(pred: np.ndarray, label: np.ndarray, num_classes: int,
                  spacing=None, convention: str = "strict",
                  pooled: bool = True) -> dict[str, np.ndarray]:
  """Per-class Dice and HD95 of one labelled volume (e.g. (D, H, W)).

  Returns {"dice": (C,), "hd95": (C,), "mean_dice", "mean_hd95"}: entry c is
  class c; background (entry 0) is NaN; the means skip NaN over classes
  1..C-1. `spacing` is the voxel size per axis, e.g. (z, y, x) in mm.
  """
  pred = np.asarray(pred)
  label = np.asarray(label)
  if pred.shape != label.shape:
    raise ValueError(f"prediction shape {pred.shape} != label shape "
                     f"{label.shape}")
  dice = np.full(num_classes, np.nan)
  dist = np.full(num_classes, np.nan)
  for c in range(1, num_classes):
    dice[c], dist[c] = binary_volume_scores(pred == c, label == c, spacing,
                                            convention, pooled)
  return {"dice": dice, "hd95": dist,
          "mean_dice": _np_nanmean(dice[1:]),
          "mean_hd95": _np_nanmean(dist[1:])}


def _np_nanmean(x, axis=None):
  x = np.asarray(x, np.float64)
  n = (~np.isnan(x)).sum(axis=axis)
  total = np.where(np.isnan(x), 0.0, x).sum(axis=axis)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def summarize_volumes(results: Sequence[dict]) -> dict[str, np.ndarray]:
  """Averages `volume_scores` results over volumes (the TransUNet table).

  Per class: NaN-skipping mean over volumes; then "mean_dice"/"mean_hd95" =
  NaN-skipping mean of those over classes 1..C-1.
  """
  if not results:
    raise ValueError("summarize_volumes got no volumes")
  dice = _np_nanmean(np.stack([r["dice"] for r in results]), axis=0)
  dist = _np_nanmean(np.stack([r["hd95"] for r in results]), axis=0)
  return {"dice": dice, "hd95": dist, "mean_dice": _np_nanmean(dice[1:]),
          "mean_hd95": _np_nanmean(dist[1:])}


def predict_volume(predict_fn: Callable[[np.ndarray], Array],
                   volume: np.ndarray, input_size: Sequence[int] | None = None,
                   batch_size: int = 16) -> np.ndarray:
  """Segments a volume slice by slice with a 2D model.

  Args:
    predict_fn: maps float32 slices (B, h, w, C) to integer labels (B, h, w),
      e.g. `lambda x: jnp.argmax(model.apply(v, x, train=False)[0], -1)`
      under jit. It is always called with exactly `batch_size` slices (the
      last batch is padded) so a jitted function compiles once.
    volume: (D, H, W) or (D, H, W, C) float image, already normalised.
    input_size: (h, w) the model expects; slices are resized to it
      (bilinear) and predictions back to (H, W) (nearest). None: no resize.
    batch_size: slices per call.

  Returns:
    int32 (D, H, W) labels.
  """
  volume = np.asarray(volume, np.float32)
  if volume.ndim == 3:
    volume = volume[..., None]
  depth, h, w = volume.shape[:3]
  size = tuple(input_size) if input_size is not None else (h, w)
  slices = np.stack([_resize(s, size, 1) for s in volume])
  out = np.zeros((depth, h, w), np.int32)
  for start in range(0, depth, batch_size):
    chunk = slices[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate(
          [chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    labels = np.asarray(predict_fn(chunk))[:n].astype(np.int32)
    for i, lab in enumerate(labels):
      out[start + i] = _resize(lab, (h, w), 0)
  return out


def _resize(a: np.ndarray, size, order: int) -> np.ndarray:
  # Local import keeps the data layer optional for jit-only metric users.
  from kd_jax.data.transforms import resize_image
  return resize_image(a, size, order)


def evaluate_volume(predict_fn: Callable[[np.ndarray], Array],
                    volume: np.ndarray, label: np.ndarray, num_classes: int,
                    input_size: Sequence[int] | None = None, spacing=None,
                    batch_size: int = 16, convention: str = "strict",
                    pooled: bool = True) -> dict[str, np.ndarray]:
  """`predict_volume` then `volume_scores`: per-class Dice/HD95 of a volume.

  The result also holds the prediction under "pred".
  """
  pred = predict_volume(predict_fn, volume, input_size, batch_size)
  scores = volume_scores(pred, label, num_classes, spacing, convention,
                         pooled)
  scores["pred"] = pred
  return scores


# --------------------------------------------------------------------------
# Sliding-window inference (jittable).

# Neighbouring windows share a third of a window, as in the evaluation of
# the Structured KD / PSPNet code (`predict_sliding`).
WINDOW_OVERLAP = 1 / 3


def window_starts(size: int, window: int) -> list[int]:
  """Start offsets of windows of `window` pixels covering `size` pixels at a
  stride of ceil(window · (1 − WINDOW_OVERLAP)), the last one moved back to
  end at the border (so every window lies inside); [0] when the window
  covers the whole size."""
  if window >= size:
    return [0]
  stride = int(np.ceil(window * (1 - WINDOW_OVERLAP)))
  count = int(np.ceil((size - window) / stride)) + 1
  return [min(i * stride, size - window) for i in range(count)]


def sliding_window(predict: Callable[..., Array], window: int
                   ) -> Callable[..., Array]:
  """`predict(params, batch_stats, images) -> (B, H, W, K) logits` run on
  `window`² windows of the images (`window_starts` in each axis) instead of
  the whole images, for a model trained on crops of that size: a model
  with global context (PSPNet's pyramid pooling) sees at test time what it
  saw in training. The windows' softmax probabilities are averaged where
  they overlap; the result is their log (as logits: argmax and softmax are
  the average's). All B · n windows go through the model in one call, so
  it compiles once per image shape. An axis shorter than the window is
  taken whole."""

  def windowed(params, batch_stats, images):
    b, h, w = images.shape[:3]
    th, tw = min(window, h), min(window, w)
    corners = [(y, x) for y in window_starts(h, th)
               for x in window_starts(w, tw)]
    crops = jnp.concatenate([images[:, y:y + th, x:x + tw]
                             for y, x in corners])
    probs = jax.nn.softmax(
        predict(params, batch_stats, crops).astype(jnp.float32), -1)
    probs = probs.reshape((len(corners), b) + probs.shape[1:])
    total = jnp.zeros((b, h, w, probs.shape[-1]), jnp.float32)
    count = np.zeros((h, w), np.float32)
    for i, (y, x) in enumerate(corners):
      total = total.at[:, y:y + th, x:x + tw].add(probs[i])
      count[y:y + th, x:x + tw] += 1
    return jnp.log(total / count[:, :, None])

  return windowed


# --------------------------------------------------------------------------
# Classification (numpy).


def accuracy(pred: Array, label: Array) -> float:
  """Fraction of predictions equal to the label."""
  pred, label = np.asarray(pred).reshape(-1), np.asarray(label).reshape(-1)
  if pred.size == 0:
    return float("nan")
  return float((pred == label).mean())


def f1_scores(pred: Array, label: Array, num_classes: int) -> np.ndarray:
  """Per-class F1 = 2TP / (2TP + FP + FN); NaN for a class absent from both
  predictions and labels."""
  cm = np.asarray(confusion_matrix(pred, label, num_classes), np.float64)
  tp = np.diag(cm)
  denom = 2 * tp + (cm.sum(0) - tp) + (cm.sum(1) - tp)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)


def macro_f1(pred: Array, label: Array, num_classes: int) -> float:
  """Unweighted mean of `f1_scores` over the classes that occur in the labels
  or predictions (as scikit-learn's `f1_score(average="macro")`)."""
  return float(_np_nanmean(f1_scores(pred, label, num_classes)))


def _binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
  """Mann–Whitney AUC with average ranks for ties; NaN without both classes."""
  n_pos = int(positive.sum())
  n_neg = positive.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = stats.rankdata(scores)  # average ranks, 1-based
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2)
               / (n_pos * n_neg))


def roc_auc(scores: Array, label: Array) -> float:
  """Area under the ROC curve.

  Binary: `scores` (N,) for the positive class, or (N, 2) whose column 1 is
  used; `label` in {0, 1}. Multi-class: `scores` (N, K) (probabilities or
  logits) and the one-vs-rest AUC averaged over classes (macro); a class with
  no positive or no negative example is NaN and left out of the mean.
  """
  scores = np.asarray(scores, np.float64)
  label = np.asarray(label).reshape(-1)
  if scores.ndim == 2 and scores.shape[1] == 2:
    scores = scores[:, 1]
  if scores.ndim == 1:
    return _binary_auc(scores, label == 1)
  per_class = [_binary_auc(scores[:, k], label == k)
               for k in range(scores.shape[1])]
  return float(_np_nanmean(per_class))


def quadratic_weighted_kappa(pred: Array, label: Array,
                             num_classes: int) -> float:
  """Cohen's kappa with quadratic weights w_ij = (i - j)^2 / (C - 1)^2.

  kappa = 1 - sum(w * O) / sum(w * E), O the observed confusion matrix and
  E the outer product of its marginals / N. NaN when E has no weight (every
  label and prediction is the same single class).
  """
  cm = np.asarray(confusion_matrix(pred, label, num_classes), np.float64)
  n = cm.sum()
  i, j = np.indices(cm.shape)
  w = (i - j) ** 2 / max(num_classes - 1, 1) ** 2
  expected = np.outer(cm.sum(1), cm.sum(0)) / max(n, 1)
  denom = (w * expected).sum()
  if denom == 0:
    return float("nan")
  return float(1.0 - (w * cm).sum() / denom)


def fidelity(student_pred: Array, teacher_pred: Array,
             num_classes: int) -> dict[str, float]:
  """Post-hoc fidelity (MED-TEX): how well the student reproduces the
  teacher, with the teacher's predictions as the ground truth.

  In MED-TEX the student sees the explainer-masked input X' = Θ ⊙ X and the
  teacher the full input X (post-hoc accuracy / F1 of the paper). Formula,
  over N examples with t_i the teacher's and s_i the student's class:
      fidelity_accuracy    = (1/N) Σ_i [s_i = t_i]
      fidelity_f1          = mean over classes present in s or t of
                             2TP_c / (2TP_c + FP_c + FN_c)    (`macro_f1`)
      fidelity_f1_positive = 2TP / (2TP + FP + FN) of class 1 alone, for
                             binary tasks (num_classes == 2) only: the
                             positive-class F1 (NaN when neither predicts 1)
  Returns those floats (without "fidelity_f1_positive" when num_classes > 2).
  """
  out = {"fidelity_accuracy": accuracy(student_pred, teacher_pred),
         "fidelity_f1": macro_f1(student_pred, teacher_pred, num_classes)}
  if num_classes == 2:
    out["fidelity_f1_positive"] = float(
        f1_scores(student_pred, teacher_pred, 2)[1])
  return out


def classification_scores(logits: Array, label: Array,
                          num_classes: int | None = None,
                          ordinal: bool = False) -> dict[str, Any]:
  """Scores of a classification head from (N, K) logits or scores.

  Returns {"accuracy", "macro_f1", "auc" (one-vs-rest macro on the softmax;
  binary: the AUC of class 1), "kappa" (quadratic weighted), "confusion"}:
  the floats as Python floats and "confusion" the (K, K) int confusion
  matrix as nested lists (rows = true class, columns = argmax prediction;
  labels outside [0, K) are not counted), so the dict serialises to JSON.
  "kappa" is always there (older callers read it) but only means something
  for ordered grades; `ordinal=True` (pass the target's `Target.ordinal`)
  adds "mae", the mean absolute grade error |argmax - label|.
  """
  logits = np.asarray(logits, np.float64)
  label = np.asarray(label).reshape(-1)
  k = num_classes or logits.shape[-1]
  pred = logits.argmax(-1).reshape(-1)
  shifted = logits - logits.max(-1, keepdims=True)
  probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
  cm = np.asarray(confusion_matrix(pred, label, k))
  scores = {"accuracy": accuracy(pred, label),
            "macro_f1": macro_f1(pred, label, k),
            "auc": roc_auc(probs, label),
            "kappa": quadratic_weighted_kappa(pred, label, k),
            "confusion": cm.astype(int).tolist()}
  if ordinal:
    scores["mae"] = (float(np.abs(pred - label).mean()) if label.size
                     else float("nan"))
  return scores


# --------------------------------------------------------------------------
# Landmarks.


def landmark_error(pred_xy: Array, true_xy: Array, scale: float = 1.0) -> float:
  """Mean Euclidean distance between predicted and true (x, y) points, in
  pixels (times `scale`, e.g. to report in original-image pixels)."""
  pred_xy = np.asarray(pred_xy, np.float64)
  true_xy = np.asarray(true_xy, np.float64)
  if pred_xy.shape != true_xy.shape or pred_xy.shape[-1] != 2:
    raise ValueError(f"landmark_error needs matching (..., 2) arrays, got "
                     f"{pred_xy.shape} and {true_xy.shape}")
  return float(np.linalg.norm(pred_xy - true_xy, axis=-1).mean() * scale)


# Default success radii, in original pixels. IDRiD's fundus photographs are
# 4288 x 2848 px with an optic disc roughly 400 px across, so 200 px is
# about one disc radius (the usual "found it" criterion for the OD and the
# fovea), and 50 / 100 px separate good localisers, whose mean errors are
# tens of pixels at that resolution.
LANDMARK_RADII_PX = (50.0, 100.0, 200.0)


def landmark_scores(pred_uv: Array, true_uv: Array, orig_hw: Array,
                    radii: Sequence[float] = LANDMARK_RADII_PX
                    ) -> dict[str, float]:
  """Landmark errors in original-image pixels.

  Args:
    pred_uv: (N, 2) predicted (u, v) in image units, u = (x + 0.5) / W (see
      kd_jax.data.targets).
    true_uv: (N, 2) true (u, v), same units.
    orig_hw: (N, 2) per-example (H, W) of the original image, or one (2,)
      pair for all.
    radii: success radii in original pixels.

  Returns:
    {"mean_error_px", "median_error_px", "within_<r>px" for each r (the
    fraction of examples with error <= r; r printed with %g, e.g.
    "within_50px")}; all NaN when N = 0.
  """
  from kd_jax.data.targets import landmark_error_px  # pylint: disable=import-outside-toplevel
  pred_uv = np.asarray(pred_uv, np.float64)
  true_uv = np.asarray(true_uv, np.float64)
  orig_hw = np.asarray(orig_hw, np.float64)
  if (pred_uv.shape != true_uv.shape or pred_uv.ndim != 2
      or pred_uv.shape[-1] != 2):
    raise ValueError(f"landmark_scores needs matching (N, 2) (u, v) arrays, "
                     f"got {pred_uv.shape} and {true_uv.shape}")
  if orig_hw.shape not in ((2,), pred_uv.shape):
    raise ValueError(f"orig_hw must be (N, 2) = {pred_uv.shape} or (2,) "
                     f"(H, W), got {orig_hw.shape}")
  err = landmark_error_px(pred_uv, true_uv, orig_hw)
  empty = err.size == 0
  nan = float("nan")
  scores = {"mean_error_px": nan if empty else float(err.mean()),
            "median_error_px": nan if empty else float(np.median(err))}
  for r in radii:
    scores[f"within_{float(r):g}px"] = (nan if empty
                                        else float((err <= r).mean()))
  return scores
