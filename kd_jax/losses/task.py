"""Task (supervised) losses: cross-entropy, soft Dice, focal.

Layout: `logits` is (..., C) with classes last — (B, C) for classification,
(B, H, W, C) for segmentation — and `labels` is integer (...,) =
logits.shape[:-1]. A "position" is one example (classification) or one pixel
(segmentation). `mask` (nonzero = valid) may have any prefix of the positions
shape: (B,) drops whole examples, (B, H, W) drops pixels. Positions whose
label equals `ignore_index` are dropped too.

All-ignored batches: when the mask/labels are concrete (eager calls) and no
position is valid, a ValueError is raised; inside `jit`/`grad`/`vmap` this
cannot be seen and the loss is 0 with zero gradient (a batch with nothing to
learn from contributes nothing).
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


@_checks.jit_loss()
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
    float32 scalar. 0 (zero gradient) when nothing is valid under a trace;
    ValueError when that is visible eagerly.
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


@_checks.jit_loss(non_negative_args=("smooth",))
def dice_loss(logits, labels, *, ignore_index: Optional[int] = None,
              smooth: float = 1e-5, mask=None) -> jax.Array:
  """Soft Dice loss on softmax probabilities, averaged over present classes.

  Formula, with p = softmax(z) and g = one_hot(y), sums over the valid
  positions of the whole batch:
      D_c = (2 sum_i p_ic g_ic + smooth) / (sum_i p_ic + sum_i g_ic + smooth)
      loss = 1 - (1/|P|) sum_{c in P} D_c
  P, the present classes, are those with at least one valid position whose
  label is c or whose argmax prediction is c. A class absent from both the
  ground truth and the (hard) prediction is skipped: its Dice is undefined
  (0/0 without `smooth`, or an arbitrary 1 with it) and would only dilute the
  average. Every valid position has an argmax, so P is never empty unless no
  position is valid (then the loss is 0 under a trace, ValueError eagerly).

  Reduction: per batch (all valid pixels of all examples pooled per class),
  then mean over present classes. No temperature. Background (class 0) is a
  class like the others. Minimum 0 when p is one-hot and equal to g.

  Reference: Milletari et al., "V-Net", 3DV 2016 (soft Dice); the per-class
  batch form follows the TransUNet / "Distillo, ergo sum" training loss.

  Args:
    logits: (..., C) float logits.
    labels: (...,) integer class ids.
    ignore_index: label value to skip.
    smooth: additive smoothing of numerator and denominator (> 0 keeps the
      gradient finite).
    mask: optional validity mask, shape a prefix of labels.shape.

  Returns:
    float32 scalar in [0, 1].
  """
  _checks.check_labels(logits, labels)
  _checks.non_negative("smooth", smooth)
  z = _checks.as_float(logits, "logits")
  num_classes = z.shape[-1]
  valid = _checks.valid_positions(labels.shape, mask=mask, labels=labels,
                                  ignore_index=ignore_index, fn_name="dice")
  v = valid[..., None].astype(z.dtype)
  p = jax.nn.softmax(z, axis=-1) * v
  g = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes,
                     dtype=z.dtype) * v
  hard = jax.nn.one_hot(jnp.argmax(z, axis=-1), num_classes,
                        dtype=z.dtype) * v
  axes = tuple(range(z.ndim - 1))
  inter = jnp.sum(p * g, axis=axes)
  denom = jnp.sum(p, axis=axes) + jnp.sum(g, axis=axes)
  dice = (2.0 * inter + smooth) / jnp.maximum(denom + smooth, 1e-12)
  present = (jnp.sum(g, axis=axes) + jnp.sum(hard, axis=axes)) > 0
  n_present = jnp.sum(present, dtype=z.dtype)
  mean_dice = jnp.sum(jnp.where(present, dice, 0.0)) / jnp.maximum(
      n_present, 1.0)
  return jnp.where(n_present > 0, 1.0 - mean_dice, 0.0)


@_checks.jit_loss(non_negative_args=("gamma",))
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
  _checks.non_negative("gamma", gamma)
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
