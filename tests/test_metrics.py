"""Tests for kd_jax.evaluate.metrics against hand-computed values."""

import os

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
  # Background included: classes 0, 1, 2 (3 is absent).
  np.testing.assert_allclose(s["mean_iou_all"], (2 / 5 + 2 / 4 + 1 / 2) / 3,
                             rtol=1e-6)


def np_iou_scores(pred, label, num_classes):
  """Per-class IoU from set sizes, and its means over the classes that
  occur (in prediction or ground truth): foreground only and all."""
  iou = np.full(num_classes, np.nan)
  for c in range(num_classes):
    union = np.sum((pred == c) | (label == c))
    if union:
      iou[c] = np.sum((pred == c) & (label == c)) / union
  return iou, np.nanmean(iou[1:]), np.nanmean(iou)


@pytest.mark.parametrize("num_classes,shape,seed", [
    (2, (3, 8, 8), 0), (4, (2, 7, 5), 1), (5, (4, 6, 9), 2), (19, (2, 16, 16),
                                                            3)])
def test_both_miou_conventions_match_sklearn_and_numpy(num_classes, shape,
                                                       seed):
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.RandomState(seed)
  label = rng.randint(0, num_classes, shape)
  # A prediction right on ~half the pixels, so IoUs are far from 0 and 1;
  # beyond two classes the last never occurs, so the NaN-skipping means
  # are exercised.
  pred = np.where(rng.rand(*shape) < 0.5, label,
                  rng.randint(0, num_classes, shape))
  if num_classes > 2:
    label[label == num_classes - 1] = 0
    pred[pred == num_classes - 1] = 0
  s = metrics.segmentation_scores(
      metrics.confusion_matrix(pred, label, num_classes))
  iou, fg, everything = np_iou_scores(pred, label, num_classes)
  np.testing.assert_allclose(s["iou"], iou, rtol=1e-6)
  np.testing.assert_allclose(s["mean_iou"], fg, rtol=1e-6)
  np.testing.assert_allclose(s["mean_iou_all"], everything, rtol=1e-6)
  y, p = label.ravel(), pred.ravel()
  present = np.union1d(y, p)
  np.testing.assert_allclose(
      s["mean_iou_all"], sklearn_metrics.jaccard_score(y, p, average="macro"),
      rtol=1e-6)
  np.testing.assert_allclose(
      s["mean_iou"], sklearn_metrics.jaccard_score(
          y, p, labels=present[present > 0], average="macro"), rtol=1e-6)
  np.testing.assert_allclose(
      np.asarray(s["iou"])[present],
      sklearn_metrics.jaccard_score(y, p, labels=present, average=None),
      rtol=1e-6)
  np.testing.assert_allclose(s["pixel_accuracy"],
                             sklearn_metrics.accuracy_score(y, p), rtol=1e-6)
  if num_classes == 2:
    # One foreground class: its IoU is the foreground mIoU; the background's
    # IoU is what separates the two conventions.
    assert float(s["mean_iou"]) == pytest.approx(iou[1])
    assert float(s["mean_iou_all"]) == pytest.approx((iou[0] + iou[1]) / 2)


def test_miou_all_skips_ignored_labels_as_sklearn_on_the_kept_pixels():
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.RandomState(5)
  label = rng.randint(0, 3, (2, 6, 6))
  pred = rng.randint(0, 3, (2, 6, 6))
  label[:, :2] = 255  # Ignore index: left out of every score.
  s = metrics.segmentation_scores(metrics.confusion_matrix(pred, label, 3))
  keep = label != 255
  np.testing.assert_allclose(
      s["mean_iou_all"],
      sklearn_metrics.jaccard_score(label[keep], pred[keep], average="macro"),
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
  assert float(s["mean_iou_all"]) == 1.0  # The background is scored.
  assert float(s["dice"][0]) == 1.0
  assert float(s["pixel_accuracy"]) == 1.0


# --------------------------------------------------------------------------
# HD95 against a brute-force reference.


def _brute_surface(mask):
  """Voxels of `mask` with a face neighbour outside it or off the array."""
  padded = np.pad(mask, 1, constant_values=False)
  inner = np.ones_like(mask, bool)
  for axis in range(mask.ndim):
    for shift in (-1, 1):
      sl = [slice(1, -1)] * mask.ndim
      sl[axis] = slice(1 + shift, padded.shape[axis] - 1 + shift)
      inner &= padded[tuple(sl)]
  return mask & ~inner


def _brute_hd95(a, b, spacing, pooled=True):
  pa = np.argwhere(_brute_surface(a)) * np.asarray(spacing)
  pb = np.argwhere(_brute_surface(b)) * np.asarray(spacing)
  d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
  d_ab, d_ba = d.min(1), d.min(0)
  if pooled:
    return np.percentile(np.concatenate([d_ab, d_ba]), 95)
  return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


@pytest.mark.parametrize("seed", range(4))
def test_hd95_matches_brute_force_on_random_volumes(seed):
  rng = np.random.default_rng(seed)
  shape = (5, 9, 8)
  # Smooth random blobs so surfaces are not trivial.
  a = np.zeros(shape, bool)
  b = np.zeros(shape, bool)
  a[1:4, 2:7, 1:6] = rng.random((3, 5, 5)) > 0.2
  b[0:5, 3:9, 2:8] = rng.random((5, 6, 6)) > 0.3
  spacing = (2.5, 0.7, 1.1)
  for pooled in (True, False):
    np.testing.assert_allclose(metrics.hd95(a, b, spacing, pooled),
                               _brute_hd95(a, b, spacing, pooled), rtol=1e-6)


def test_hd95_hand_computed_with_spacing():
  a = np.zeros((1, 5), bool)
  b = np.zeros((1, 5), bool)
  a[0, 0] = b[0, 3] = True
  assert metrics.hd95(a, b, spacing=(1.0, 2.0)) == pytest.approx(6.0)
  assert metrics.hd95(a, a) == 0.0
  with pytest.raises(ValueError, match="non-empty"):
    metrics.hd95(a, np.zeros_like(a))


def test_volume_scores_empty_mask_conventions():
  empty = np.zeros((2, 4, 4), bool)
  full = np.zeros((2, 4, 4), bool)
  full[0, 1:3, 1:3] = True
  diag = np.sqrt(2 ** 2 * 9 + 4 ** 2 + 4 ** 2)  # spacing (3, 1, 1)
  spacing = (3.0, 1.0, 1.0)
  f = metrics.binary_volume_scores
  assert f(full, full, spacing) == (1.0, 0.0)
  assert all(np.isnan(f(empty, empty, spacing)))
  assert f(full, empty, spacing) == pytest.approx((0.0, diag))
  assert f(empty, full, spacing) == pytest.approx((0.0, diag))
  # TransUNet's calculate_metric_percase, quirks included.
  assert f(full, empty, convention="transunet") == (1.0, 0.0)
  assert f(empty, full, convention="transunet") == (0.0, 0.0)
  assert f(empty, empty, convention="transunet") == (0.0, 0.0)
  with pytest.raises(ValueError, match="convention"):
    f(full, full, convention="medpy")


def test_volume_scores_and_summary():
  label = np.zeros((3, 6, 6), np.int32)
  label[:, 1:4, 1:4] = 1
  pred = label.copy()
  pred[0, 1, 1] = 0  # class 1 slightly wrong; class 2 absent; class 3 missed
  label[2, 5, 5] = 3
  r = metrics.volume_scores(pred, label, 4)
  assert np.isnan(r["dice"][0]) and np.isnan(r["dice"][2])
  np.testing.assert_allclose(r["dice"][1], 2 * 26 / (26 + 27))
  assert r["dice"][3] == 0.0 and r["hd95"][3] > 8
  np.testing.assert_allclose(r["mean_dice"], (2 * 26 / 53 + 0) / 2)
  s = metrics.summarize_volumes([r, metrics.volume_scores(label, label, 4)])
  np.testing.assert_allclose(s["dice"][1], (2 * 26 / 53 + 1) / 2)
  np.testing.assert_allclose(s["dice"][3], 0.5)
  assert np.isnan(s["dice"][2])


def test_evaluate_volume_slice_by_slice_with_resize():
  label = np.zeros((5, 12, 10), np.int32)
  label[:, 2:10, 3:8] = 1
  label[1:4, 4:8, 4:7] = 2
  volume = label.astype(np.float32) / 2.0
  calls = []

  def predict_fn(x):
    calls.append(x.shape)
    return np.rint(x[..., 0] * 2).astype(np.int32)

  r = metrics.evaluate_volume(predict_fn, volume, label, 3, batch_size=2)
  np.testing.assert_allclose(r["dice"][1:], [1.0, 1.0])
  np.testing.assert_allclose(r["hd95"][1:], [0.0, 0.0])
  assert calls == [(2, 12, 10, 1)] * 3  # fixed batch: the last one is padded
  calls.clear()
  r = metrics.evaluate_volume(predict_fn, volume, label, 3,
                              input_size=(24, 20), batch_size=8)
  assert calls == [(8, 24, 20, 1)] and r["pred"].shape == label.shape
  assert r["mean_dice"] > 0.9


# --------------------------------------------------------------------------
# sliding_window.


@pytest.mark.parametrize("size,window", [(512, 64), (100, 32), (65, 64),
                                         (64, 64), (20, 32), (7, 3)])
def test_window_starts_cover_the_axis_at_the_official_stride(size, window):
  starts = metrics.window_starts(size, window)
  if window >= size:
    assert starts == [0]
    return
  stride = -(-2 * window // 3)  # ceil(window · 2/3)
  assert starts[0] == 0 and starts[-1] == size - window
  # Every step but the last (moved back to the border) is the stride, and
  # the windows cover every pixel.
  assert all(b - a == stride for a, b in zip(starts[:-2], starts[1:-1]))
  assert 0 < starts[-1] - starts[-2] <= stride
  covered = np.zeros(size, bool)
  for a in starts:
    covered[a:a + window] = True
  assert covered.all()


def _pixelwise(params, batch_stats, images):
  del batch_stats
  return images @ params  # A 1×1 convolution: no context.


def _contextual(params, batch_stats, images):
  del batch_stats
  # Each pixel minus its input's mean (global pooling's context).
  return (images - images.mean(axis=(1, 2), keepdims=True)) @ params


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("shape,window", [((2, 40, 70, 3), 32),
                                          ((1, 24, 24, 2), 10)])
def test_sliding_window_of_a_pixelwise_model_is_the_whole_image(shape,
                                                                window):
  rng = np.random.default_rng(0)
  images = rng.normal(size=shape).astype(np.float32)
  params = rng.normal(size=(shape[-1], 4)).astype(np.float32)
  out = jax.jit(metrics.sliding_window(_pixelwise, window))(params, None,
                                                            images)
  assert out.shape == shape[:3] + (4,)
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(out)),
                             _softmax(images @ params), rtol=1e-5, atol=1e-6)


def test_sliding_window_averages_window_probabilities_as_numpy():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 30, 45, 3)).astype(np.float32)
  params = rng.normal(size=(3, 5)).astype(np.float32)
  window, stride = 16, 11  # ceil(16 · 2/3) = 11
  total = np.zeros((2, 30, 45, 5))
  count = np.zeros((30, 45))
  rows = list(range(0, 30 - window, stride)) + [30 - window]
  cols = list(range(0, 45 - window, stride)) + [45 - window]
  for y in rows:
    for x in cols:
      crop = images[:, y:y + window, x:x + window]
      crop = crop - crop.mean(axis=(1, 2), keepdims=True)
      total[:, y:y + window, x:x + window] += _softmax(crop @ params)
      count[y:y + window, x:x + window] += 1
  expected = total / count[:, :, None]
  out = metrics.sliding_window(_contextual, window)(params, None, images)
  np.testing.assert_allclose(np.exp(np.asarray(out)), expected, rtol=1e-5,
                             atol=1e-6)
  # Windows differ from the whole image where the model has context.
  whole = _softmax(_contextual(params, None, images))
  assert np.abs(whole - expected).max() > 1e-2


def test_sliding_window_no_larger_than_the_image_is_the_whole_image():
  rng = np.random.default_rng(2)
  images = rng.normal(size=(1, 12, 12, 2)).astype(np.float32)
  params = rng.normal(size=(2, 3)).astype(np.float32)
  out = metrics.sliding_window(_contextual, 12)(params, None, images)
  np.testing.assert_allclose(np.exp(np.asarray(out)),
                             _softmax(_contextual(params, None, images)),
                             rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Classification and landmarks.


def test_classification_metrics_hand_computed():
  assert metrics.accuracy([0, 1, 1, 2], [0, 1, 2, 2]) == 0.75
  f1 = metrics.f1_scores([0, 1, 1, 2], [0, 1, 2, 2], 4)
  np.testing.assert_allclose(f1, [1.0, 2 / 3, 2 / 3, np.nan])
  assert metrics.macro_f1([0, 1, 1, 2], [0, 1, 2, 2], 4) == pytest.approx(7 / 9)
  kappa = metrics.quadratic_weighted_kappa([0, 2, 2, 1], [0, 1, 2, 2], 3)
  assert kappa == pytest.approx(7 / 11)
  assert metrics.quadratic_weighted_kappa([0, 1, 2], [0, 1, 2], 3) == 1.0
  assert np.isnan(metrics.quadratic_weighted_kappa([1, 1], [1, 1], 3))


def test_roc_auc_binary_ties_and_one_vs_rest():
  assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
  assert metrics.roc_auc([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == 0.75
  two_col = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
  assert metrics.roc_auc(two_col, [0, 0, 1, 1]) == 0.75
  assert np.isnan(metrics.roc_auc([0.2, 0.3], [1, 1]))
  # One-vs-rest macro: class 0 perfectly ranked (1.0), class 1 (0.5 by
  # ties), class 2 never occurs (NaN, skipped).
  scores = np.array([[0.9, 0.5, 0.0], [0.8, 0.5, 0.1], [0.1, 0.5, 0.2],
                     [0.2, 0.5, 0.3]])
  assert metrics.roc_auc(scores, [0, 0, 1, 1]) == pytest.approx(0.75)


def test_classification_scores_fidelity_and_landmarks():
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
  s = metrics.classification_scores(logits, [0, 1, 1, 1])
  assert s["accuracy"] == 0.75 and s["auc"] == 1.0
  assert s["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
  fid = metrics.fidelity([0, 1, 1, 0], [0, 1, 0, 0], 2)
  assert fid["fidelity_accuracy"] == 0.75
  assert fid["fidelity_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
  err = metrics.landmark_error([[0, 0], [3, 4]], [[0, 1], [0, 0]])
  assert err == pytest.approx(3.0)
  assert metrics.landmark_error([[3, 4]], [[0, 0]], scale=2) == 10.0
  with pytest.raises(ValueError, match="matching"):
    metrics.landmark_error([[0, 0]], [[0, 0, 0]])


# --------------------------------------------------------------------------
# classification_scores against independent references (and scikit-learn
# where it is installed), landmark_scores against hand-made points.


def _ref_confusion(pred, label, k):
  cm = np.zeros((k, k), int)
  for p, t in zip(pred, label):
    cm[t, p] += 1
  return cm


def _ref_quadratic_kappa(pred, label, k):
  """Textbook quadratic weighted kappa: 1 - sum W O / sum W E, with O the
  observed count matrix, E the outer product of the two histograms / N and
  W_ij = (i - j)^2 / (k - 1)^2."""
  observed = np.zeros((k, k))
  for p, t in zip(pred, label):
    observed[t, p] += 1
  hist_true = np.array([np.sum(label == i) for i in range(k)], float)
  hist_pred = np.array([np.sum(pred == i) for i in range(k)], float)
  expected = np.outer(hist_true, hist_pred) / len(label)
  weights = np.array([[(i - j) ** 2 / (k - 1) ** 2 for j in range(k)]
                      for i in range(k)])
  return 1.0 - (weights * observed).sum() / (weights * expected).sum()


def _ref_auc_pairs(score, positive):
  """AUC by counting all (positive, negative) pairs; ties count 1/2."""
  pos, neg = score[positive], score[~positive]
  wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
  return wins / (len(pos) * len(neg))


def _ref_macro_f1(pred, label, k):
  f1 = []
  for c in range(k):
    tp = np.sum((pred == c) & (label == c))
    fp = np.sum((pred == c) & (label != c))
    fn = np.sum((pred != c) & (label == c))
    if tp + fp + fn:
      f1.append(2 * tp / (2 * tp + fp + fn))
  return np.mean(f1)


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _random_head(seed, n, k):
  rng = np.random.default_rng(seed)
  # Multiples of 1/4, exact in float: rows equal up to a shift tie exactly
  # in softmax, whichever code computes it. Every class occurs in label.
  logits = rng.integers(-6, 7, (n, k)) / 4.0
  label = rng.integers(0, k, n)
  label[:k] = np.arange(k)
  return logits, label


@pytest.mark.parametrize("seed,n,k", [(0, 40, 2), (1, 50, 3), (2, 60, 5)])
def test_classification_scores_match_independent_references(seed, n, k):
  logits, label = _random_head(seed, n, k)
  pred = logits.argmax(-1)
  probs = _softmax(logits)
  s = metrics.classification_scores(logits, label)
  assert set(s) == {"accuracy", "macro_f1", "auc", "kappa", "confusion"}
  assert s["accuracy"] == pytest.approx(np.mean(pred == label))
  assert s["macro_f1"] == pytest.approx(_ref_macro_f1(pred, label, k))
  assert s["kappa"] == pytest.approx(_ref_quadratic_kappa(pred, label, k))
  if k == 2:
    auc = _ref_auc_pairs(probs[:, 1], label == 1)
  else:
    auc = np.mean([_ref_auc_pairs(probs[:, c], label == c)
                   for c in range(k)])
  assert s["auc"] == pytest.approx(auc)
  confusion = s["confusion"]
  assert isinstance(confusion, list)
  np.testing.assert_array_equal(confusion, _ref_confusion(pred, label, k))
  assert np.sum(confusion) == n
  s_ord = metrics.classification_scores(logits, label, ordinal=True)
  assert s_ord["mae"] == pytest.approx(np.mean(np.abs(pred - label)))
  assert {key: s_ord[key] for key in s} == s


def test_classification_scores_confusion_hand_computed_and_json():
  import json  # pylint: disable=import-outside-toplevel
  # argmax predictions 0, 2, 2, 1 against labels 0, 1, 2, 2 (K = 4: class 3
  # never occurs, its row and column stay 0).
  logits = np.eye(4)[[0, 2, 2, 1]] * 3.0
  s = metrics.classification_scores(logits, [0, 1, 2, 2])
  assert s["confusion"] == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0],
                            [0, 0, 0, 0]]
  assert s["accuracy"] == 0.5
  json.dumps(s)
  assert metrics.classification_scores(logits, [0, 1, 2, 2],
                                       num_classes=5)["confusion"][4] == [0] * 5


@pytest.mark.parametrize("seed,n,k", [(3, 40, 2), (4, 50, 3), (5, 80, 5)])
def test_classification_scores_match_sklearn(seed, n, k):
  skm = pytest.importorskip("sklearn.metrics")
  logits, label = _random_head(seed, n, k)
  pred = logits.argmax(-1)
  probs = _softmax(logits)
  s = metrics.classification_scores(logits, label, ordinal=True)
  assert s["kappa"] == pytest.approx(
      skm.cohen_kappa_score(label, pred, weights="quadratic"))
  assert s["macro_f1"] == pytest.approx(
      skm.f1_score(label, pred, average="macro"))
  if k == 2:
    auc = skm.roc_auc_score(label, probs[:, 1])
  else:
    auc = skm.roc_auc_score(label, probs, multi_class="ovr", average="macro")
  assert s["auc"] == pytest.approx(auc)
  np.testing.assert_array_equal(
      s["confusion"], skm.confusion_matrix(label, pred, labels=range(k)))
  assert s["mae"] == pytest.approx(skm.mean_absolute_error(label, pred))


def _uv(xy, hw):
  """Pixel (x, y) of an image of (H, W) to image units (u, v)."""
  xy, hw = np.asarray(xy, np.float64), np.asarray(hw, np.float64)
  return (xy + 0.5) / hw[..., ::-1]


def test_landmark_scores_hand_made_points():
  # Original sizes: IDRiD-like 4288 x 2848 and a smaller 2000 x 1000 image.
  hw = np.array([[2848, 4288], [2848, 4288], [1000, 2000], [1000, 2000],
                 [2848, 4288]], np.float64)
  true_xy = np.array([[1000, 1500], [3000, 200], [10, 20], [1500, 900],
                      [2000, 1400]], np.float64)
  # Offsets are 3-4-5 triangles scaled: errors 5, 45, 150, 250, 500 px.
  offsets = np.array([[3, 4], [-27, 36], [90, 120], [-150, -200],
                      [300, -400]], np.float64)
  errors = np.array([5.0, 45.0, 150.0, 250.0, 500.0])
  pred_uv, true_uv = _uv(true_xy + offsets, hw), _uv(true_xy, hw)
  s = metrics.landmark_scores(pred_uv, true_uv, hw)
  assert set(s) == {"mean_error_px", "median_error_px", "within_50px",
                    "within_100px", "within_200px"}
  assert s["mean_error_px"] == pytest.approx(errors.mean())
  assert s["median_error_px"] == pytest.approx(150.0)
  assert s["within_50px"] == pytest.approx(2 / 5)
  assert s["within_100px"] == pytest.approx(2 / 5)
  assert s["within_200px"] == pytest.approx(3 / 5)
  one = metrics.landmark_scores(pred_uv[:1], true_uv[:1], hw[0],
                                radii=(4.5, 5.5, 12.5))
  assert one["mean_error_px"] == pytest.approx(5.0)
  assert (one["within_4.5px"], one["within_5.5px"],
          one["within_12.5px"]) == (0.0, 1.0, 1.0)


def test_landmark_scores_random_against_numpy_and_errors():
  rng = np.random.default_rng(7)
  hw = rng.uniform(500, 4000, (30, 2))
  pred_uv, true_uv = rng.random((30, 2)), rng.random((30, 2))
  err = np.hypot((pred_uv[:, 0] - true_uv[:, 0]) * hw[:, 1],
                 (pred_uv[:, 1] - true_uv[:, 1]) * hw[:, 0])
  radii = (300.0, 1000.0)
  s = metrics.landmark_scores(pred_uv, true_uv, hw, radii=radii)
  assert s["mean_error_px"] == pytest.approx(err.mean())
  assert s["median_error_px"] == pytest.approx(np.median(err))
  for r in radii:
    assert s[f"within_{r:g}px"] == pytest.approx(np.mean(err <= r))
  empty = metrics.landmark_scores(np.zeros((0, 2)), np.zeros((0, 2)),
                                  np.zeros((0, 2)))
  assert all(np.isnan(v) for v in empty.values())
  with pytest.raises(ValueError, match="matching"):
    metrics.landmark_scores(pred_uv, true_uv[:3], hw)
  with pytest.raises(ValueError, match="orig_hw"):
    metrics.landmark_scores(pred_uv, true_uv, hw[:3])


# --------------------------------------------------------------------------
# A real ACDC validation volume (skipped where ../shared/data is absent).

_DATA = os.path.join(os.environ.get(
    "KD_JAX_DATA", os.path.join(os.path.dirname(__file__), "..", "..",
                                "shared", "data")), "acdc", "val_volumes.npz")


def _label_oracle(label, size):
  """A predict_fn that returns the ground truth of the slices it is fed, in
  order, at the model's input size (nearest): a perfect 2D model whose only
  error is the resolution it works at."""
  from kd_jax.data import transforms  # pylint: disable=import-outside-toplevel
  slices = iter(list(label))

  def predict(x):
    out = []
    for _ in range(x.shape[0]):
      s = next(slices, None)
      out.append(np.zeros(size, np.int32) if s is None else
                 transforms.resize_image(s, size, order=0).astype(np.int32))
    return np.stack(out)

  return predict


@pytest.mark.skipif(not os.path.exists(_DATA), reason=f"no {_DATA}")
@pytest.mark.parametrize("input_size", [None, (64, 64)])
def test_evaluate_volume_on_real_acdc(input_size):
  from kd_jax.data import sources  # pylint: disable=import-outside-toplevel
  vol = sources.acdc_volumes(os.path.dirname(os.path.dirname(_DATA)),
                             max_volumes=1)[0]
  label = vol["label"]
  size = input_size or label.shape[1:]
  spacing = (10.0, 1.5, 1.5)  # ACDC-like mm (z, y, x): anisotropic on purpose
  scores = metrics.evaluate_volume(_label_oracle(label, size), vol["image"],
                                   label, 4, input_size=input_size,
                                   spacing=spacing, batch_size=4)
  pred = scores["pred"]
  assert pred.shape == label.shape
  for c in (1, 2, 3):  # RV, myocardium, LV are all in this volume
    p, g = pred == c, label == c
    assert g.any()
    dice = 2 * np.sum(p & g) / (np.sum(p) + np.sum(g))
    np.testing.assert_allclose(scores["dice"][c], dice, rtol=1e-6)
    np.testing.assert_allclose(scores["hd95"][c],
                               _brute_hd95(p, g, spacing), rtol=1e-6)
  if input_size is None:  # The oracle at full size is exact.
    np.testing.assert_array_equal(pred, label)
    np.testing.assert_allclose(scores["dice"][1:], 1.0)
    np.testing.assert_allclose(scores["hd95"][1:], 0.0)
  else:  # 64² loses detail of the thin myocardium, but not its shape.
    assert 0.6 < scores["dice"][2] < 1 and scores["mean_dice"] > 0.75
    assert 0 < scores["mean_hd95"] < 10 * 1.5
