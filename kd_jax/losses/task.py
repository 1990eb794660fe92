"""Task (supervised) losses: cross-entropy, soft Dice, focal; and for
regression heads (e.g. fovea / optic-disc (u, v) coordinates) mse, l1 and
smooth_l1.

Layout: `logits` is (..., C) with classes last — (B, C) for classification,
(B, H, W, C) for segmentation — and `labels` is integer (...,) =
logits.shape[:-1]. A "position" is one example (classification) or one pixel
(segmentation). `mask` (nonzero = valid) may have any prefix of the positions
shape: (B,) drops whole examples, (B, H, W) drops pixels. Positions whose
label equals `ignore_index` are dropped too.

The regression losses take float `predictions` and `targets` of one shape
(B, ...) instead, average over every element of the valid examples, and take
a `mask` whose shape is a prefix of predictions.shape (typically (B,), a
per-example "labelled" flag). A masked example contributes exactly zero to
the value and to the gradient, whatever its target holds.

A mask (or ignore_index) that leaves no valid position gives 0 with zero
gradient: a batch with nothing to learn from contributes nothing. Values are
never inspected (the losses stay pure functions that jit, grad and vmap
trace as they are); shapes, dtypes and options are checked statically.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks


def _class_weights(class_weights, num_classes: int) -> jax.Array:
  w = jnp.asarray(class_weights, jnp.float32)
  if w.shape != (num_classes,):
    raise ValueError(f"class_weights has shape {w.shape}; it must be "
                     f"({num_classes},), one weight per class of the logits.")
  return w


def cross_entropy(logits, labels, *, ignore_index: Optional[int] = None,
                  class_weights=None, mask=None) -> jax.Array:
  """Softmax cross-entropy with integer labels.

  Formula, per position i with label y_i and class weight w (1 if none):
      ce_i = -log softmax(z_i)[y_i]
      loss = sum_i v_i w[y_i] ce_i / sum_i v_i w[y_i]
  where v_i = 1 for valid positions (mask nonzero and y_i != ignore_index).

  Reduction: mean over valid positions (examples, or pixels of all examples
  of the batch) — a weighted mean when `class_weights` is given, normalised
  by the total weight of the valid positions (PyTorch's convention), so the
  scale does not depend on the weights. No temperature.

  Reference: the standard multinomial log-loss; class weights and
  ignore_index follow PyTorch's nn.CrossEntropyLoss conventions.

  Args:
    logits: (..., C) float logits.
    labels: (...,) integer class ids; values at ignored positions may be out
      of range (e.g. 255).
    ignore_index: label value to skip.
    class_weights: optional (C,) per-class weights.
    mask: optional validity mask, shape a prefix of labels.shape.

  Returns:
    float32 scalar; 0 (zero gradient) when no position is valid.
  """
  _checks.check_labels(logits, labels)
  z = _checks.as_float(logits, "logits")
  valid = _checks.valid_positions(labels.shape, mask=mask, labels=labels,
                                  ignore_index=ignore_index,
                                  fn_name="cross_entropy")
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(z, axis=-1)
  # The label's log-probability by a one-hot select, not take_along_axis:
  # the same value and gradient, without a gather whose gradient is a
  # scatter-add (slow on XLA CPU for per-pixel labels).
  hot = safe[..., None] == jnp.arange(z.shape[-1], dtype=safe.dtype)
  nll = -jnp.sum(jnp.where(hot, logp, 0.0), axis=-1)
  if class_weights is None:
    return _checks.masked_mean(nll, valid)
  w = _class_weights(class_weights, z.shape[-1])[safe].astype(z.dtype)
  w = jnp.where(valid, w, 0.0)
  return jnp.sum(w * nll) / jnp.where(jnp.sum(w) > 0, jnp.sum(w), 1.0)


DICE_AVERAGES = ("present", "all")


def dice_loss(logits, labels, *, ignore_index: Optional[int] = None,
              smooth: float = 1e-5, squared_denominator: bool = False,
              average: str = "present", include_background: bool = True,
              batch: bool = True, mask=None) -> jax.Array:
  """Soft Dice loss on softmax probabilities, averaged over classes.

  Formula, with p = softmax(z), g = one_hot(y), and sums over the valid
  positions of a group (the whole batch, or one example with batch=False):
      D_c = (2 sum_i p_ic g_ic + smooth) / (sum_i p_ic + sum_i g_ic + smooth)
  or, with squared_denominator=True,
      D_c = (2 sum_i p_ic g_ic + smooth) / (sum_i p_ic^2 + sum_i g_ic^2
                                             + smooth)
  and loss = 1 - (mean of D_c over the counted (group, class) pairs).

  Which classes count (`average`, `include_background`):
    "present" (default): a class counts in a group when at least one valid
      position there has it as label or as argmax prediction. A class absent
      from both is skipped: its Dice is undefined (0/0 without `smooth`, or
      an arbitrary value near 0 or 1 with it) and would only shift the
      average. Every valid position has an argmax, so some class counts
      unless nothing is valid.
    "all": every class counts in every group with a valid position, absent
      ones included: their D_c = smooth / (sum_i p_ic + smooth) (squared: of
      p^2) is near 1 only once the class's summed probability there is far
      below `smooth`, so they push their probabilities toward 0.
    include_background=False drops class 0 before either rule (then a group
      whose labels and predictions are all background has nothing to count
      and the loss is 0).

  Default form: batch=True (per-class sums over all valid pixels of all
  examples), linear denominator, classes averaged over the present ones,
  background included; `smooth` is added to numerator and denominator.

  Peers:
    - TransUNet's `DiceLoss` (utils.py of the official repository, called
      with softmax=True) sums over the whole batch per class, squares p and
      g in the denominator and averages over every class, background and
      absent classes included, with smooth = 1e-5 on both sides:
      squared_denominator=True, average="all" (with the defaults batch=True,
      include_background=True). Its optional per-class `weight` is not
      offered, and it has no ignore_index or mask.
    - MONAI's `DiceLoss` (softmax=True, to_onehot_y=True) defaults to
      include_background=True, squared_pred=False, batch=False (a Dice per
      example and class, then the mean over both) and smooth_nr = smooth_dr
      = 1e-5: batch=False, average="all". Its squared_pred is
      squared_denominator, its include_background and batch are the flags
      of the same names. Different smooth_nr and smooth_dr, jaccard and
      class weights are not offered; with batch=False an example with no
      valid position is left out of the mean here.

  Reduction: as above, per group then the mean over the counted
  (group, class) pairs; 0 with zero gradient when nothing is valid. No
  temperature. Minimum 0 when p is one-hot and equal to g (up to smooth).

  Reference: Milletari et al., "V-Net", 3DV 2016 (soft Dice, squared
  denominator); Chen et al., "TransUNet", 2021 (official code as above).

  Args:
    logits: (..., C) float logits; (B, ..., C) with batch=False.
    labels: (...,) integer class ids.
    ignore_index: label value to skip.
    smooth: additive smoothing of numerator and denominator, >= 0 (> 0
      keeps the loss and gradient finite for empty classes).
    squared_denominator: sum p^2 + g^2 instead of p + g in the denominator.
    average: "present" or "all" (see above).
    include_background: count class 0.
    batch: pool each class over the whole batch (True) or compute a Dice per
      example (False).
    mask: optional validity mask, shape a prefix of labels.shape.

  Returns:
    float32 scalar in [0, 1].
  """
  _checks.one_of("dice_loss", "average", average, DICE_AVERAGES)
  _checks.check_labels(logits, labels)
  if not batch:
    _checks.min_ndim("logits", logits, 2, "(B, ..., C) with batch=False")
  z = _checks.as_float(logits, "logits")
  num_classes = z.shape[-1]
  if not include_background and num_classes < 2:
    raise ValueError(f"dice_loss: include_background=False needs at least "
                     f"2 classes, got logits of shape {z.shape}.")
  valid = _checks.valid_positions(labels.shape, mask=mask, labels=labels,
                                  ignore_index=ignore_index, fn_name="dice")
  v = valid[..., None].astype(z.dtype)
  p = jax.nn.softmax(z, axis=-1) * v
  g = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes,
                     dtype=z.dtype) * v
  hard = jax.nn.one_hot(jnp.argmax(z, axis=-1), num_classes,
                        dtype=z.dtype) * v
  if not include_background:
    p, g, hard = p[..., 1:], g[..., 1:], hard[..., 1:]
  # Sum over the positions of a group: every axis but the classes, and the
  # batch axis too unless the Dice is per example.
  axes = tuple(range(0 if batch else 1, z.ndim - 1))
  inter = jnp.sum(p * g, axis=axes)
  if squared_denominator:
    denom = jnp.sum(p * p, axis=axes) + jnp.sum(g * g, axis=axes)
  else:
    denom = jnp.sum(p, axis=axes) + jnp.sum(g, axis=axes)
  dice = (2.0 * inter + smooth) / jnp.maximum(denom + smooth, 1e-12)
  if average == "present":
    counted = (jnp.sum(g, axis=axes) + jnp.sum(hard, axis=axes)) > 0
  else:
    counted = jnp.broadcast_to(jnp.sum(v, axis=axes) > 0, dice.shape)
  n_counted = jnp.sum(counted, dtype=z.dtype)
  mean_dice = jnp.sum(jnp.where(counted, dice, 0.0)) / jnp.maximum(
      n_counted, 1.0)
  return jnp.where(n_counted > 0, 1.0 - mean_dice, 0.0)


def focal_loss(logits, labels, *, gamma: float = 2.0,
               ignore_index: Optional[int] = None, class_weights=None,
               mask=None) -> jax.Array:
  """Softmax focal loss (Lin et al., "Focal Loss for Dense Object
  Detection", ICCV 2017), multi-class form.

  Formula, per position i with p_t = softmax(z_i)[y_i]:
      fl_i = -w[y_i] (1 - p_t)^gamma log p_t
      loss = sum_i v_i fl_i / sum_i v_i
  `class_weights` plays the role of the paper's alpha_t. gamma = 0 and no
  weights gives `cross_entropy`.

  Reduction: mean over valid positions (examples or pixels), normalised by
  the number of valid positions (not by the weights, unlike cross_entropy,
  matching the paper's normalisation). No temperature.

  Reference: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.

  Args:
    logits: (..., C) float logits.
    labels: (...,) integer class ids.
    gamma: focusing parameter >= 0.
    ignore_index: label value to skip.
    class_weights: optional (C,) alpha weights.
    mask: optional validity mask, shape a prefix of labels.shape.

  Returns:
    float32 scalar.
  """
  _checks.check_labels(logits, labels)
  z = _checks.as_float(logits, "logits")
  valid = _checks.valid_positions(labels.shape, mask=mask, labels=labels,
                                  ignore_index=ignore_index, fn_name="focal")
  safe = jnp.where(valid, labels, 0)
  logp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), safe[..., None],
                             axis=-1)[..., 0]
  # 1 - p_t via expm1 (accurate when p_t is near 1), floored so that the
  # derivative of x^gamma stays finite for 0 < gamma < 1.
  one_minus = jnp.maximum(-jnp.expm1(logp), 1e-30)
  fl = -jnp.power(one_minus, gamma) * logp
  if class_weights is not None:
    fl = fl * _class_weights(class_weights, z.shape[-1])[safe].astype(z.dtype)
  return _checks.masked_mean(fl, valid)


# --------------------------------------------------------------------------
# Regression (coordinate heads).


def _regression_residual(predictions, targets, mask,
                         fn_name: str) -> tuple[jax.Array, jax.Array]:
  """(residual, valid): predictions - targets as float32 (or wider), set to
  0 at masked elements before any nonlinearity so that a masked target,
  however large, reaches neither the value nor the gradient."""
  if jnp.shape(predictions) != jnp.shape(targets):
    raise ValueError(
        f"{fn_name}: predictions has shape {jnp.shape(predictions)} but "
        f"targets has shape {jnp.shape(targets)}; they must be equal (one "
        f"target per predicted value).")
  _checks.min_ndim("predictions", predictions, 1, "(B, ...)")
  p = _checks.as_float(predictions, "predictions")
  t = _checks.as_float(targets, "targets")
  valid = _checks.valid_positions(p.shape, mask=mask, fn_name=fn_name)
  return jnp.where(valid, p - t, 0.0), valid


def mse(predictions, targets, *, mask=None) -> jax.Array:
  """Mean squared error.

  Formula, per element e of the valid examples, with d_e = pred_e - target_e:
      loss = sum_e v_e d_e^2 / sum_e v_e

  Reduction: mean over all elements of the valid examples (a (B, 2) head
  with k valid examples averages 2k squared errors); 0 with zero gradient
  when no example is valid. No temperature.

  Reference: the standard L2 regression loss; equal to PyTorch's
  nn.MSELoss (reduction="mean") on the valid examples.

  Args:
    predictions: (B, ...) float predictions, e.g. (B, 2) (u, v).
    targets: float targets of the same shape; values at masked examples are
      never used.
    mask: optional validity mask (nonzero = valid), shape a prefix of
      predictions.shape, e.g. (B,).

  Returns:
    float32 scalar >= 0 (float64 for float64 inputs).
  """
  d, valid = _regression_residual(predictions, targets, mask, "mse")
  return _checks.masked_mean(d * d, valid)


def l1(predictions, targets, *, mask=None) -> jax.Array:
  """Mean absolute error.

  Formula, per element e of the valid examples, with d_e = pred_e - target_e:
      loss = sum_e v_e |d_e| / sum_e v_e

  Reduction: mean over all elements of the valid examples; 0 with zero
  gradient when no example is valid. No temperature. At d = 0 exactly the
  gradient is jnp.abs's subgradient 1 (PyTorch's is 0); masked elements
  always get 0.

  Reference: the standard L1 regression loss; equal to PyTorch's
  nn.L1Loss (reduction="mean") on the valid examples.

  Args:
    predictions: (B, ...) float predictions, e.g. (B, 2) (u, v).
    targets: float targets of the same shape; values at masked examples are
      never used.
    mask: optional validity mask (nonzero = valid), shape a prefix of
      predictions.shape, e.g. (B,).

  Returns:
    float32 scalar >= 0 (float64 for float64 inputs).
  """
  d, valid = _regression_residual(predictions, targets, mask, "l1")
  return _checks.masked_mean(jnp.abs(d), valid)


def smooth_l1(predictions, targets, *, delta: float = 1.0,
              mask=None) -> jax.Array:
  """Smooth L1 loss: quadratic near zero, linear beyond `delta`.

  Formula, per element e of the valid examples, with d_e = pred_e - target_e:
      s_e = 0.5 d_e^2 / delta     if |d_e| < delta
            |d_e| - 0.5 delta     otherwise
      loss = sum_e v_e s_e / sum_e v_e
  Both pieces and their slopes meet at |d| = delta. This is PyTorch's
  nn.SmoothL1Loss with beta = delta; it is the Huber loss (optax.huber_loss)
  divided by delta, so its slope saturates at 1 whatever delta is. For
  (u, v) in [0, 1], a delta well below 1 (e.g. 0.01-0.05 of the image) makes
  the loss quadratic only for near-hits.

  Reduction: mean over all elements of the valid examples; 0 with zero
  gradient when no example is valid. No temperature.

  Reference: Girshick, "Fast R-CNN", ICCV 2015 (smooth L1, delta = 1);
  PyTorch's nn.SmoothL1Loss (beta) for general delta.

  Args:
    predictions: (B, ...) float predictions, e.g. (B, 2) (u, v).
    targets: float targets of the same shape; values at masked examples are
      never used.
    delta: transition point, > 0 (checked by `objective`, not here).
    mask: optional validity mask (nonzero = valid), shape a prefix of
      predictions.shape, e.g. (B,).

  Returns:
    float32 scalar >= 0 (float64 for float64 inputs).
  """
  d, valid = _regression_residual(predictions, targets, mask, "smooth_l1")
  a = jnp.abs(d)
  s = jnp.where(a < delta, 0.5 * d * d / delta, a - 0.5 * delta)
  return _checks.masked_mean(s, valid)
