"""Logit distillation losses.

Layout: logits are (..., C), classes last: (B, C) for classification,
(B, H, W, C) for dense prediction. A "position" is an example or a pixel.
Student and teacher logits must have the same shape (resize the teacher's
map to the student's resolution in the method, not here).

Temperature convention (all KL-type losses here, unless a flag says
otherwise): both distributions are softened as p^tau = softmax(z / tau) and
the divergence is multiplied by tau^2 (Hinton et al. 2015), so gradient
magnitudes stay comparable across temperatures. tau must be > 0: a
temperature given in a term config is checked when `objective` is built;
called directly, these functions do not look at values (tau <= 0 gives
inf/NaN, as in optax).

Gradients flow into both arguments: freeze the teacher in the method (or
pass `jax.lax.stop_gradient(teacher_logits)`). The exception is `dml`, which
stops the gradient of each side's target itself.

`mask` (nonzero = valid) may have any prefix of the positions shape: (B,) to
drop examples, (B, H, W) to drop pixels. A mask that leaves no valid
position gives 0 with zero gradient (a batch with nothing to learn from
contributes nothing).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks


def _pair(student_logits, teacher_logits, min_classes=1):
  _checks.min_ndim("student_logits", student_logits, 1, "(..., C)")
  _checks.same_shape("student_logits", student_logits, "teacher_logits",
                     teacher_logits,
                     "both need layout (..., C) with the same classes; "
                     "resize the teacher's map to the student's resolution")
  if student_logits.shape[-1] < min_classes:
    raise ValueError(f"logits need at least {min_classes} classes on the "
                     f"last axis, got shape {student_logits.shape}.")
  return (_checks.as_float(student_logits, "student_logits"),
          _checks.as_float(teacher_logits, "teacher_logits"))


def _kl_rows(target_logp, logp):
  """KL(p || q) over the last axis, from log-probabilities."""
  return jnp.sum(jnp.exp(target_logp) * (target_logp - logp), axis=-1)


KD_REDUCTIONS = ("mean", "batchmean")


def kd_kl(student_logits, teacher_logits, *, temperature: float = 1.0,
          reduction: str = "mean", scale_by_tau_squared: bool = True,
          mask=None) -> jax.Array:
  """Hinton knowledge distillation: temperature-softened KL divergence.

  Formula, per position i, with p^tau = softmax(z / tau):
      kl_i = sum_c p^tau_T,ic (log p^tau_T,ic - log p^tau_S,ic)
      loss = s * reduce_i(kl_i),  s = tau^2 (or 1, scale_by_tau_squared=False)

  Reduction (`reduction`):
    "mean" (default): mean over positions — over examples for (B, C); for
      dense (B, H, W, C) outputs, mean over all B*H*W pixels (= mean over
      examples of the per-image pixel mean). With `mask`, mean over the valid
      positions.
    "batchmean": sum over classes and positions, divided by the batch size
      B = logits.shape[0] (1 for a single (C,) vector); with `mask`, the sum
      runs over valid positions and is still divided by B. For (B, C) this
      equals "mean"; for dense outputs it is H*W times larger.
  Temperature: tau^2 scaling by default (see module docstring).

  Peers:
    - mdistiller's `kd_loss` (KL summed over classes, mean over the batch,
      times tau^2) is the default, reduction="mean"; it is
      classification-only, where "mean" and "batchmean" agree.
    - torchdistill's `KDLoss` is `nn.KLDivLoss(reduction="batchmean")` on
      softmaxes over the class axis (dim 1 of NCHW), i.e. reduction=
      "batchmean": the sum over classes and pixels divided by the batch
      size. Used alone (alpha None or 0, or no targets) it returns that KL
      with no tau^2: scale_by_tau_squared=False. With alpha > 0 and targets
      it returns alpha * CE + beta * tau^2 * KL: keep the tau^2 and put beta
      in the term's weight and the CE in its own term.
    - The attention-transfer authors' `distillation` helper (KL summed and
      divided by the batch size, times tau^2) is reduction="batchmean",
      equal to the default on (B, C) logits.

  Reference: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural
  Network", 2015.

  Args:
    student_logits: (..., C).
    teacher_logits: (..., C), same shape.
    temperature: tau > 0.
    reduction: "mean" or "batchmean" (see above).
    scale_by_tau_squared: multiply by tau^2 (Hinton); False gives the bare
      KL of the softened distributions.
    mask: optional validity mask, shape a prefix of logits.shape[:-1].

  Returns:
    float32 scalar >= 0; 0 when the logits are equal.
  """
  _checks.one_of("kd_kl", "reduction", reduction, KD_REDUCTIONS)
  s, t = _pair(student_logits, teacher_logits)
  valid = _checks.valid_positions(s.shape[:-1], mask=mask, fn_name="kd_kl")
  kl = _kl_rows(jax.nn.log_softmax(t / temperature),
                jax.nn.log_softmax(s / temperature))
  if reduction == "mean":
    loss = _checks.masked_mean(kl, valid)
  else:
    batch = s.shape[0] if s.ndim > 1 else 1
    loss = jnp.sum(jnp.where(valid, kl, 0.0)) / batch
  return loss * temperature**2 if scale_by_tau_squared else loss


PIXELWISE_CONVENTIONS = ("kd_jax", "official")


def pixelwise_kd(student_logits, teacher_logits, *, convention: str = "kd_jax",
                 mask=None) -> jax.Array:
  """Pixel-wise distillation of Structured KD.

  Formula, for each image with W' x H' output pixels, q = softmax(z_i)
  (no temperature, tau = 1; the teacher's distribution is the target):
    convention="kd_jax" (default; the paper's eq. 1 read as a divergence):
      l_pi = 1 / (W' H') * sum_i KL(q^T_i || q^S_i)
      Reduction: mean over the pixels of each image, then mean over images,
      i.e. `kd_kl(temperature=1)`. 0 when the logits are equal.
    convention="official" (`CriterionPixelWise` of the authors' code):
      l_pi = 1 / (W' H') * sum_{b, i} -sum_c q^T_b,ic log q^S_b,ic
      Reduction: a soft cross-entropy summed over the batch (and any
      leading axes) and divided by W'H' only. Unmasked it is B times a
      per-image mean that includes the teacher's entropy: B * (kd_jax value
      + mean_i H(q^T_i)), the same student gradient as B * kd_jax, and its
      minimum is not 0. With
      several GPUs the official code takes this per GPU and averages the
      GPUs, so there B is the per-GPU batch.
  `mask` (e.g. labels != ignore_index; the official code has none) keeps the
  valid pixels only: kd_jax averages over them, official sums over them and
  still divides by W'H'.

  Reference: Liu et al., "Structured Knowledge Distillation for Semantic
  Segmentation", CVPR 2019; github.com/irfanICMLL/structure_knowledge_
  distillation, utils/criterion.py.

  Args:
    student_logits: (..., H, W, C) dense logits.
    teacher_logits: same shape.
    convention: "kd_jax" or "official" (see above).
    mask: optional validity mask, shape a prefix of (..., H, W).

  Returns:
    float32 scalar >= 0.
  """
  _checks.one_of("pixelwise_kd", "convention", convention,
                 PIXELWISE_CONVENTIONS)
  _checks.min_ndim("student_logits", student_logits, 3, "(..., H, W, C)")
  if convention == "kd_jax":
    return kd_kl(student_logits, teacher_logits, temperature=1.0, mask=mask)
  s, t = _pair(student_logits, teacher_logits)
  valid = _checks.valid_positions(s.shape[:-1], mask=mask,
                                  fn_name="pixelwise_kd")
  ce = -jnp.sum(jax.nn.softmax(t) * jax.nn.log_softmax(s), axis=-1)
  h, w = s.shape[-3:-1]
  return jnp.sum(jnp.where(valid, ce, 0.0)) / (h * w)


def soft_cross_entropy(student_logits, teacher_logits, *,
                       temperature: float = 1.0, mask=None) -> jax.Array:
  """Cross-entropy of the student against the teacher's soft distribution.

  Formula, per position: tau^2 * (-sum_c p^tau_T,c log p^tau_S,c).
  Equals kd_kl plus tau^2 times the teacher's entropy (same student
  gradient); its minimum, reached when the logits are equal, is
  tau^2 * H(p^tau_T). Reduction: mean over (valid) positions, as kd_kl.
  Temperature: tau^2 scaling.

  Reference: Hinton et al. 2015 (soft targets); used by MED-TEX.

  Returns:
    float32 scalar.
  """
  s, t = _pair(student_logits, teacher_logits)
  valid = _checks.valid_positions(s.shape[:-1], mask=mask,
                                  fn_name="soft_cross_entropy")
  p_t = jax.nn.softmax(t / temperature)
  ce = -jnp.sum(p_t * jax.nn.log_softmax(s / temperature), axis=-1)
  return _checks.masked_mean(ce, valid) * temperature**2


def dkd(student_logits, teacher_logits, labels, *, alpha: float = 1.0,
        beta: float = 8.0, temperature: float = 4.0,
        ignore_index: Optional[int] = None, mask=None) -> jax.Array:
  """Decoupled knowledge distillation: alpha * TCKD + beta * NCKD.

  Formula, per position with target class t and p^tau = softmax(z / tau):
      b = [p^tau_t, 1 - p^tau_t]                  (binary target/non-target)
      TCKD = KL(b_T || b_S)
      p^_c = softmax over the non-target logits z_c / tau, c != t
      NCKD = KL(p^_T || p^_S)
      loss = tau^2 * (alpha * TCKD + beta * NCKD)
  log(1 - p_t) is computed as a log-sum-exp over the non-target logits, so
  it stays finite when p_t -> 1.

  Reduction: mean over (valid) positions — examples, or pixels for dense
  logits; the official code sums over classes and divides by the batch
  size, which is the same for (B, C). Temperature: tau^2 on both parts, as
  in the official implementation. Defaults alpha=1, beta=8, tau=4 are the
  paper's CIFAR-100 settings.

  Two classes: the non-target distribution then has a single class and NCKD
  is undefined (constant 0), and TCKD alone is plain KD; a ValueError is
  raised — use `kd_kl` instead.

  Reference: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.

  Args:
    student_logits: (..., C), C >= 3.
    teacher_logits: same shape.
    labels: (...,) integer target classes.
    alpha: TCKD weight.
    beta: NCKD weight.
    temperature: tau > 0.
    ignore_index: label value to skip.
    mask: optional validity mask, shape a prefix of labels.shape.

  Returns:
    float32 scalar >= 0; 0 when the logits are equal.
  """
  _checks.min_ndim("student_logits", student_logits, 1, "(..., C)")
  if student_logits.shape[-1] < 3:
    raise ValueError(
        f"dkd needs at least 3 classes, got logits of shape "
        f"{student_logits.shape}: with 2 classes the non-target distribution "
        f"has one class, so NCKD is undefined and TCKD is plain KD. Use "
        f"kd_kl for binary problems.")
  s, t = _pair(student_logits, teacher_logits)
  _checks.check_labels(s, labels, "student_logits")
  valid = _checks.valid_positions(labels.shape, mask=mask, labels=labels,
                                  ignore_index=ignore_index, fn_name="dkd")
  target = jax.nn.one_hot(jnp.where(valid, labels, 0), s.shape[-1],
                          dtype=bool)

  def parts(z):
    z = z / temperature
    lse_all = jax.nn.logsumexp(z, axis=-1)
    lse_other = jax.nn.logsumexp(z, axis=-1, b=(~target).astype(z.dtype))
    log_pt = jnp.sum(jnp.where(target, z, 0.0), axis=-1) - lse_all
    log_binary = jnp.stack([log_pt, lse_other - lse_all], axis=-1)
    log_other = z - lse_other[..., None]  # Meaningless at the target class.
    return log_binary, log_other

  bin_s, other_s = parts(s)
  bin_t, other_t = parts(t)
  tckd = _kl_rows(bin_t, bin_s)
  nckd = jnp.sum(jnp.where(target, 0.0,
                           jnp.exp(other_t) * (other_t - other_s)), axis=-1)
  per_position = alpha * tckd + beta * nckd
  return _checks.masked_mean(per_position, valid) * temperature**2


def _pearson_rows(a, b, w, eps):
  """Pearson correlation of a[i] and b[i] over axis 0 for each column,
  with rows weighted by w (0/1); returns one value per column."""
  n = jnp.maximum(jnp.sum(w), 1.0)
  a = (a - jnp.sum(a * w[:, None], 0) / n) * w[:, None]
  b = (b - jnp.sum(b * w[:, None], 0) / n) * w[:, None]
  return jnp.sum(a * b, 0) / (_safe_norm(a) * _safe_norm(b) + eps)


def _safe_norm(x):
  """L2 norm over axis 0 with a zero (not NaN) gradient at x = 0, which
  happens for a constant column, e.g. a single valid instance."""
  sq = jnp.sum(x * x, 0)
  return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def dist(student_logits, teacher_logits, *, beta: float = 1.0,
         gamma: float = 1.0, temperature: float = 1.0,
         eps: float = 1e-8, mask=None) -> jax.Array:
  """DIST: inter- and intra-class Pearson-correlation relations.

  Formula, with Y = softmax(Z / tau) as an (N, C) matrix of N instances:
      rho(u, v) = <u - mean u, v - mean v> / (|u - mean u| |v - mean v| + eps)
      inter = 1 - (1/N) sum_i rho(Y_S[i, :], Y_T[i, :])   (per instance)
      intra = 1 - (1/C) sum_c rho(Y_S[:, c], Y_T[:, c])   (per class)
      loss = tau^2 * (beta * inter + gamma * intra)
  Instances are the examples for (B, C) logits. Dense form (B, H, W, C):
  every pixel of every image is an instance (N = B*H*W), as in the
  official segmentation code; with `mask`, only valid pixels are instances
  (also in the intra-class means).

  Reduction: per batch (the intra-class term correlates across the whole
  batch, so this is not a mean of per-example losses). Temperature: tau^2
  scaling, paper default tau=1, beta=gamma=1. Minimum 0 when the logits are
  equal (up to eps).

  Reference: Huang et al., "Knowledge Distillation from A Stronger
  Teacher", NeurIPS 2022.

  Returns:
    float32 scalar in [0, 4 * tau^2 * max(beta, gamma)].
  """
  s, t = _pair(student_logits, teacher_logits)
  valid = _checks.valid_positions(s.shape[:-1], mask=mask, fn_name="dist")
  c = s.shape[-1]
  ys = jax.nn.softmax(s / temperature).reshape(-1, c)
  yt = jax.nn.softmax(t / temperature).reshape(-1, c)
  w = valid.reshape(-1).astype(ys.dtype)
  ones = jnp.ones((c,), ys.dtype)
  inter_rows = _pearson_rows(ys.T, yt.T, ones, eps)
  inter = 1.0 - _checks.masked_mean(inter_rows, w > 0)
  intra = 1.0 - jnp.mean(_pearson_rows(ys, yt, w, eps))
  loss = temperature**2 * (beta * inter + gamma * intra)
  return jnp.where(jnp.any(valid), loss, 0.0)  # 0 when nothing is valid.


def cwd(student_logits, teacher_logits, *, temperature: float = 1.0
        ) -> jax.Array:
  """Channel-wise distillation: per-channel spatial softmax, then KL.

  Formula, for each image and channel c, with phi(y_c) = softmax over the
  H*W positions of y_c / tau:
      loss = tau^2 / (N * C) * sum_n sum_c sum_i
             phi(y_T,nc)_i * (log phi(y_T,nc)_i - log phi(y_S,nc)_i)
  Reduction: sum over the H*W positions, mean over channels and over the N
  images (leading dims). Temperature: tau^2 scaling, as in the paper's
  eq. and the official (mmrazor) implementation. Works on logit maps and on
  feature maps with the same channels. 0 when the inputs are equal.

  Reference: Shu et al., "Channel-wise Knowledge Distillation for Dense
  Prediction", ICCV 2021.

  Args:
    student_logits: (..., H, W, C) maps.
    teacher_logits: same shape.
    temperature: tau > 0.

  Returns:
    float32 scalar >= 0.
  """
  _checks.min_ndim("student_logits", student_logits, 3, "(..., H, W, C)")
  s, t = _pair(student_logits, teacher_logits)
  lead = s.shape[:-3]
  # (..., H, W, C) -> (..., C, H*W): a distribution over positions per channel.
  def spatial(z):
    z = jnp.moveaxis(z.reshape(lead + (-1, z.shape[-1])), -1, -2)
    return jax.nn.log_softmax(z / temperature, axis=-1)
  kl = _kl_rows(spatial(t), spatial(s))  # (..., C)
  return jnp.mean(kl) * temperature**2


def dml(student_logits, peer_logits, *, temperature: float = 1.0,
        mask=None) -> jax.Array:
  """Deep mutual learning: symmetric KL between two peers.

  Formula, per position (sg = stop_gradient):
      tau^2 * [ KL(sg(p_2) || p_1) + KL(sg(p_1) || p_2) ],  p = softmax(z/tau)
  Each peer is pulled toward the other's current prediction, which acts as
  a fixed target: the gradient w.r.t. z_1 comes only from the first KL and
  the gradient w.r.t. z_2 only from the second, exactly the two peer losses
  of the paper summed, so one call trains both peers.

  Reduction: mean over (valid) positions, as kd_kl. Temperature: tau^2
  scaling (the paper uses tau = 1). 0 when the logits are equal.

  Reference: Zhang et al., "Deep Mutual Learning", CVPR 2018.

  Args:
    student_logits: (..., C), peer 1.
    peer_logits: (..., C), peer 2.
    temperature: tau > 0.
    mask: optional validity mask, shape a prefix of logits.shape[:-1].

  Returns:
    float32 scalar >= 0.
  """
  z1, z2 = _pair(student_logits, peer_logits)
  valid = _checks.valid_positions(z1.shape[:-1], mask=mask, fn_name="dml")
  l1 = jax.nn.log_softmax(z1 / temperature)
  l2 = jax.nn.log_softmax(z2 / temperature)
  sg = jax.lax.stop_gradient
  kl = _kl_rows(sg(l2), l1) + _kl_rows(sg(l1), l2)
  return _checks.masked_mean(kl, valid) * temperature**2


def _ensemble(student, teachers):
  _checks.min_ndim("student_logits", student, 1, "(..., C)")
  if (jnp.ndim(teachers) != jnp.ndim(student) + 1
      or jnp.shape(teachers)[1:] != jnp.shape(student)):
    raise ValueError(
        f"teacher_logits must be a stack (E, *student_logits.shape) = "
        f"(E, {', '.join(map(str, jnp.shape(student)))}) of the E teachers' "
        f"outputs, got shape {jnp.shape(teachers)}; stack them with "
        f"jnp.stack(outputs).")


def ensemble_kd(student_logits, teacher_logits, *, temperature: float = 1.0,
                mask=None) -> jax.Array:
  """KD from an ensemble: KL to the teachers' averaged probabilities.

  Formula, per position, with E teachers:
      p_bar = (1/E) sum_e softmax(z_T,e / tau)        (probabilities, not
                                                       logits, are averaged)
      loss_i = tau^2 * KL(p_bar || softmax(z_S / tau))
  Reduction: mean over (valid) positions, as kd_kl. Temperature: tau^2.
  With one teacher this equals kd_kl. 0 when every teacher equals the
  student.

  Reference: Hinton et al. 2015 (ensemble soft targets).

  Args:
    student_logits: (..., C).
    teacher_logits: (E, ..., C) stack of the teachers' logits.
    temperature: tau > 0.
    mask: optional validity mask, shape a prefix of student_logits.shape[:-1].

  Returns:
    float32 scalar >= 0.
  """
  _ensemble(student_logits, teacher_logits)
  s = _checks.as_float(student_logits, "student_logits")
  t = _checks.as_float(teacher_logits, "teacher_logits")
  valid = _checks.valid_positions(s.shape[:-1], mask=mask,
                                  fn_name="ensemble_kd")
  # log of the mean probability, computed in log space for stability.
  log_pbar = (jax.nn.logsumexp(jax.nn.log_softmax(t / temperature), axis=0)
              - jnp.log(t.shape[0]))
  kl = _kl_rows(log_pbar, jax.nn.log_softmax(s / temperature))
  return _checks.masked_mean(kl, valid) * temperature**2


def ensemble_l2(student_outputs, teacher_outputs, *, mask=None) -> jax.Array:
  """Regression soft targets from an ensemble: squared error to the mean.

  Formula: mean over elements of (y_S - (1/E) sum_e y_T,e)^2, e.g. for
  coordinate heads (fovea, optic disc) distilled from a teacher ensemble.
  Reduction: mean over all elements of the (valid) examples; `mask` has a
  prefix shape of student_outputs.shape (e.g. (B,)). No temperature.

  Reference: ensemble soft targets (Hinton et al. 2015) applied to
  regression heads, as in multi-task fundus distillation with a teacher
  ensemble.

  Args:
    student_outputs: (B, ...) regression outputs.
    teacher_outputs: (E, B, ...) stack of the teachers' outputs.
    mask: optional validity mask, shape a prefix of student_outputs.shape.

  Returns:
    float32 scalar >= 0.
  """
  _ensemble(student_outputs, teacher_outputs)
  s = _checks.as_float(student_outputs, "student_outputs")
  t = jnp.mean(_checks.as_float(teacher_outputs, "teacher_outputs"), axis=0)
  valid = _checks.valid_positions(s.shape, mask=mask, fn_name="ensemble_l2")
  return _checks.masked_mean((s - t) ** 2, valid)
