"""Feature distillation losses.

Inputs are the already-projected arrays: connectors (1x1 conv, linear,
attention pooling) live in `kd_jax.models.connectors` and are applied by the
method before these losses. Layouts: NHWC maps (B, H, W, C), NLD tokens
(B, L, D), or pooled vectors (B, D). Losses that compare relations between
examples or positions (AT, pair-wise, SP, PKT, RKD) accept different
channel counts for student and teacher; the others need equal shapes.

No temperature anywhere in this module.
"""

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks


def _same(student_feature, teacher_feature):
  _checks.same_shape("student_feature", student_feature, "teacher_feature",
                     teacher_feature)
  return (_checks.as_float(student_feature, "student_feature"),
          _checks.as_float(teacher_feature, "teacher_feature"))


def hint_l1(student_feature, teacher_feature) -> jax.Array:
  """FitNets hint with an L1 distance: mean |f_S - f_T|.

  Formula: (1/n) sum_k |f_S,k - f_T,k| over all n elements.
  Reduction: mean over elements (batch, positions and channels). The
  student feature is the connector's output (the paper's regressor).
  Used as latent matching in "Distillo, ergo sum". 0 when equal.

  Reference: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015
  (L2 form; L1 is the robust variant).

  Returns:
    float32 scalar >= 0.
  """
  s, t = _same(student_feature, teacher_feature)
  return jnp.mean(jnp.abs(s - t))


def hint_l2(student_feature, teacher_feature) -> jax.Array:
  """FitNets hint: mean squared error (f_S - f_T)^2.

  Formula: (1/n) sum_k (f_S,k - f_T,k)^2 over all n elements (the paper's
  1/2 ||.||^2 up to the constant and the mean). Reduction: mean over
  elements. Also the dense L2 feature-map matching loss. 0 when equal.

  Reference: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

  Returns:
    float32 scalar >= 0.
  """
  s, t = _same(student_feature, teacher_feature)
  return jnp.mean((s - t) ** 2)
