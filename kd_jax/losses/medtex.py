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
                     lam: float | Sequence[float] = 1.0,
                     temperature: float = 1.0
                     ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """MED-TEX student/explainer objective, the paper's eq. at any temperature.

  Formula: with X' = Theta * X the input masked by the explainer,
      L = CE_tau( p_T(X) || p_S(X') ) + sum_l lam_l * VID_l
      CE_tau = -sum_c p^tau_T,c log p^tau_S,c,   p^tau = softmax(z / tau)
  and VID_l = vid(mu_l, t_l, alpha_l), the Gaussian NLL of the l-th
  intermediate teacher feature given the student's regressed mean (see
  `vid`). The soft CE is NOT multiplied by tau^2: the paper writes the
  plain cross-entropy of the softened distributions, whereas Hinton's KD
  (and `soft_cross_entropy`) scale by tau^2 to keep gradient magnitudes
  fixed. At tau = 1 (the paper's setting) the two agree; at tau != 1 this
  equals `soft_cross_entropy(...) / tau^2`.

  Reduction: soft CE mean over examples; each VID term mean over its
  elements; the weighted VID terms are summed (not averaged) over layers.
  Temperature: softens both distributions, no tau^2 factor.

  Reference: Nguyen-Duc et al., MED-TEX, ISBI 2022 (see module docstring).

  Args:
    student_logits: (B, C) student logits on the explained input X'.
    teacher_logits: (B, C) teacher logits on the original input X.
    vid_terms: sequence of (mean, teacher_feature, alpha) triples, one per
      distilled layer; may be empty (MED-EX: the explainer without VID).
    lam: weight lambda of the VID terms (0.01 in the paper): one number for
      every layer, or a sequence with one weight per term.
    temperature: tau > 0 of the soft CE.

  Returns:
    (total, {"soft_ce": ..., "vid": unweighted VID sum, "total": total}),
    float32 scalars; use `jax.grad(..., has_aux=True)`.
  """
  if isinstance(vid_terms, tuple) and len(vid_terms) == 3 and all(
      hasattr(x, "shape") for x in vid_terms):
    raise ValueError("vid_terms must be a sequence of (mean, teacher_feature,"
                     " alpha) triples; wrap a single triple in a list.")
  weights = (list(lam) if isinstance(lam, (list, tuple))
             else [lam] * len(vid_terms))
  if len(weights) != len(vid_terms):
    raise ValueError(f"lam has {len(weights)} weights for {len(vid_terms)} "
                     "vid_terms; give one number or one per term.")
  # soft_cross_entropy scales by tau^2 (Hinton); the paper's term does not.
  soft_ce = logits.soft_cross_entropy(student_logits, teacher_logits,
                                      temperature=temperature
                                      ) / temperature**2
  vid_sum = jnp.zeros((), jnp.float32)
  weighted = jnp.zeros((), jnp.float32)
  for i, (term, w) in enumerate(zip(vid_terms, weights)):
    if len(term) != 3:
      raise ValueError(f"vid_terms[{i}] must be (mean, teacher_feature, "
                       f"alpha), got {len(term)} elements.")
    value = features.vid(*term)
    vid_sum = vid_sum + value
    weighted = weighted + w * value
  total = soft_ce + weighted
  return total, {"soft_ce": soft_ce, "vid": vid_sum, "total": total}
