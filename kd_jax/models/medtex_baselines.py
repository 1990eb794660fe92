"""MED-TEX's explanation baselines as students that explain themselves: a
mask over the input, learnt with the student, multiplies the image the
student classifies; the mask is the explanation (feature "mask").

`medtex_attention_student` (soft attention): a small full-resolution
attention branch (two 3×3 conv → BN → ReLU of `attention_width` channels,
then a 1×1 conv + sigmoid) gives A ∈ (0, 1) of shape (B, H, W, 1); the
`medtex_student` CNN classifies A ⊙ X.

`medtex_l2x_student` (L2X, Chen et al., "Learning to Explain", ICML 2018,
hard selection of image patches): a selector (two 3×3 conv → BN → ReLU at
full resolution, an average pool to the grid of `patch`×`patch` patches, a
1×1 conv) scores every patch; the mask keeps `num_patches` of them.
Training relaxes the top-K choice as L2X does: K independent Gumbel-softmax
draws over the P patches at temperature `tau` (the "dropout" rng), their
elementwise maximum a soft subset in [0, 1]^P; evaluation keeps exactly the
K best-scored patches (a {0, 1} mask). The patch mask is repeated to the
pixels and multiplies X; the student classifies the result. With the
defaults (8×8 patches, K = 16) the kept area is 1,024 pixels, MED-TEX's
top-K at k = 1 on a 224² image.

Both are ordinary models of the contract (`(logits, features)`, features the
student's plus "mask" (B, H, W, 1)), trained by any method ('supervised' on
labels, 'distill' from the teacher); `kd_jax.evaluate.lesion_iou` scores
"mask" as their explanation.
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.medtex import ConvBNReLU, MedTexStudent, explain_input
from kd_jax.models.registry import register

ModuleDef = Any

DEFAULT_INPUT = {"medtex_attention_student": (224, 224, 3),
                 "medtex_l2x_student": (224, 224, 3)}
RECIPES = {"medtex_attention_student": "MED-TEX (soft-attention baseline)",
           "medtex_l2x_student": "MED-TEX (L2X hard-selection baseline)"}


class _MaskedStudent(nn.Module):
  """Shared fields and the student half of both baselines."""
  num_classes: int = 5
  widths: Sequence[int] = (4, 8, 8, 9)
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  pool: Callable = nn.max_pool

  def _branch(self, x, width, train):
    layers = dict(conv=self.conv, norm=self.norm)
    x = ConvBNReLU(width, self.dtype, name="branch1", **layers)(x, train=train)
    return ConvBNReLU(width, self.dtype, name="branch2", **layers)(
        x, train=train)

  def _classify(self, mask, x, train):
    student = MedTexStudent(num_classes=self.num_classes, widths=self.widths,
                            dtype=self.dtype, conv=self.conv, norm=self.norm,
                            pool=self.pool, name="student")
    logits, features = student(explain_input(mask, x), train=train)
    return logits, dict(features, mask=mask)


@register("medtex_attention_student")
class AttentionStudent(_MaskedStudent):
  """Soft attention A = σ(f(X)) and the student on A ⊙ X (module doc)."""
  attention_width: int = 8

  @nn.compact
  def __call__(self, x, *, train: bool):
    h = self._branch(x.astype(self.dtype), self.attention_width, train)
    mask = nn.sigmoid(self.conv(1, (1, 1), dtype=self.dtype,
                                name="attention_head")(h))
    return self._classify(mask, x, train)


def relaxed_top_k(logits: jax.Array, k: int, tau: float,
                  rng: jax.Array) -> jax.Array:
  """L2X's continuous subset: the elementwise max over `k` Gumbel-softmax
  draws over the last axis of `logits`, (..., P) in [0, 1]."""
  u = jax.random.uniform(rng, (k,) + logits.shape, minval=1e-20, maxval=1.0)
  gumbel = -jnp.log(-jnp.log(u))
  return jax.nn.softmax((logits[None] + gumbel) / tau, axis=-1).max(0)


def hard_top_k(logits: jax.Array, k: int) -> jax.Array:
  """1 on the `k` largest entries of the last axis (ties: lower index)."""
  _, idx = jax.lax.top_k(logits, k)
  return jax.nn.one_hot(idx, logits.shape[-1], dtype=logits.dtype).sum(-2)


@register("medtex_l2x_student")
class L2XStudent(_MaskedStudent):
  """L2X patch selection and the student on the kept patches (module doc)."""
  patch: int = 8
  num_patches: int = 16
  tau: float = 0.5
  selector_width: int = 8

  @nn.compact
  def __call__(self, x, *, train: bool):
    b, h, w, _ = x.shape
    if h % self.patch or w % self.patch:
      raise ValueError(f"L2XStudent(patch={self.patch}) needs height and "
                       f"width divisible by it; got shape {tuple(x.shape)}")
    gh, gw = h // self.patch, w // self.patch
    if not 0 < self.num_patches <= gh * gw:
      raise ValueError(f"L2XStudent num_patches={self.num_patches}: choose "
                       f"1 to the {gh * gw} patches of the image")
    f = self._branch(x.astype(self.dtype), self.selector_width, train)
    f = nn.avg_pool(f, (self.patch, self.patch), (self.patch, self.patch))
    scores = self.conv(1, (1, 1), dtype=self.dtype, name="selector_head")(f)
    scores = scores.astype(jnp.float32).reshape(b, gh * gw)
    if train:
      keep = relaxed_top_k(scores, self.num_patches, self.tau,
                           self.make_rng("dropout"))
    else:
      keep = hard_top_k(scores, self.num_patches)
    mask = jnp.repeat(jnp.repeat(keep.reshape(b, gh, gw, 1), self.patch, 1),
                      self.patch, 2)
    return self._classify(mask, x, train)
