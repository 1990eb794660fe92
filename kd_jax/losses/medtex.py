"""MED-TEX objective: transfer to a student on the explained input.

Reference: Nguyen-Duc, Zhao, Cai, Phung, "MED-TEX: Transferring and
Explaining Knowledge with Less Data from Pretrained Medical Imaging Models",
ISBI 2022 (arXiv 2008.02593).
"""

from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp

from kd_jax.losses import features
from kd_jax.losses import logits


def medtex_objective(student_logits, teacher_logits,
                     vid_terms: Sequence[Tuple[jax.Array, jax.Array,
                                               jax.Array]], *,
                     lam: float = 1.0, temperature: float = 1.0
                     ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """MED-TEX student/explainer objective.

  Formula: with X' = Theta * X the input masked by the explainer,
      L = soft_CE( p_T(X) || p_S(X') ) + lam * sum_l VID_l
  soft_CE = tau^2 * (-sum_c p^tau_T,c log p^tau_S,c) (see
  `soft_cross_entropy`), and VID_l = vid(mu_l, t_l, alpha_l), the Gaussian
  NLL of the l-th intermediate teacher feature given the student's regressed
  mean (see `vid`).

  Reduction: soft CE mean over examples; each VID term mean over its
  elements; the VID terms are summed (not averaged) over layers.
  Temperature: tau^2 scaling of the soft CE (tau = 1 in the paper).

  Reference: Nguyen-Duc et al., MED-TEX, ISBI 2022 (see module docstring).

  Args:
    student_logits: (B, C) student logits on the explained input X'.
    teacher_logits: (B, C) teacher logits on the original input X.
    vid_terms: sequence of (mean, teacher_feature, alpha) triples, one per
      distilled layer; may be empty.
    lam: weight lambda of the VID sum.
    temperature: tau > 0 of the soft CE.

  Returns:
    (total, {"soft_ce": ..., "vid": unweighted VID sum, "total": total}),
    float32 scalars; use `jax.grad(..., has_aux=True)`.
  """
  if isinstance(vid_terms, tuple) and len(vid_terms) == 3 and all(
      hasattr(x, "shape") for x in vid_terms):
    raise ValueError("vid_terms must be a sequence of (mean, teacher_feature,"
                     " alpha) triples; wrap a single triple in a list.")
  soft_ce = logits.soft_cross_entropy(student_logits, teacher_logits,
                                      temperature=temperature)
  vid_sum = jnp.zeros((), jnp.float32)
  for i, term in enumerate(vid_terms):
    if len(term) != 3:
      raise ValueError(f"vid_terms[{i}] must be (mean, teacher_feature, "
                       f"alpha), got {len(term)} elements.")
    vid_sum = vid_sum + features.vid(*term)
  total = soft_ce + lam * vid_sum
  return total, {"soft_ce": soft_ce, "vid": vid_sum, "total": total}
