"""Golden values and invariants for every loss in kd_jax.losses.

Each case pairs a loss with an independent float64 numpy implementation
written here from the papers' formulas, and the generic tests check, for
every case: the golden value (rtol 1e-5 in float32), the same value under
jax.jit, vmap over a stacked leading axis, finite gradients, finite float32
results from bfloat16 inputs, zero (or the known minimum) when student ==
teacher, tau^2 scaling where a temperature is taken, and a ValueError for
mismatched shapes. Edge cases live in test_losses_edge.py, the objective in
test_losses_objective.py.
"""

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses

CLS = (6, 5)           # (B, C) classification logits
DENSE = (2, 4, 4, 5)   # (B, H, W, C) dense logits / NHWC maps
# Teacher shapes with other channels, for relation losses. Few distinct
# shapes keep the eager per-op compilations shared between cases.
CLS_T, DENSE_T = (6, 3), (2, 4, 4, 3)
RTOL, ATOL = 1e-5, 1e-6


# --------------------------------------------------------------------------
# Independent numpy references (float64).

def np_softmax(z, axis=-1):
  z = z - z.max(axis, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis, keepdims=True)


def np_kl(p, q):
  return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def np_valid(shape, mask=None, labels=None, ignore_index=None):
  valid = np.ones(shape, bool)
  if mask is not None:
    m = np.asarray(mask) != 0
    valid &= np.broadcast_to(m.reshape(m.shape + (1,) * (len(shape) - m.ndim)),
                             shape)
  if ignore_index is not None:
    valid &= labels != ignore_index
  return valid


def ref_cross_entropy(z, y, ignore_index=None, class_weights=None,
                      mask=None):
  c = z.shape[-1]
  valid = np_valid(y.shape, mask, y, ignore_index).ravel()
  logp = np.log(np_softmax(z.reshape(-1, c)))
  num = den = 0.0
  for i, label in enumerate(y.ravel()):
    if valid[i]:
      w = 1.0 if class_weights is None else class_weights[label]
      num -= w * logp[i, label]
      den += w
  return num / den


def ref_dice(z, y, ignore_index=None, smooth=1e-5, squared_denominator=False,
             average="present", include_background=True, batch=True,
             mask=None):
  c = z.shape[-1]
  valid = np_valid(y.shape, mask, y, ignore_index)
  # Groups of positions: the whole batch, or one example each.
  groups = [slice(None)] if batch else [slice(b, b + 1)
                                        for b in range(z.shape[0])]
  scores = []
  for group in groups:
    keep = valid[group].ravel()
    if not keep.any():
      continue
    p = np_softmax(z[group].reshape(-1, c))[keep]
    lab = y[group].ravel()[keep]
    pred = p.argmax(-1)
    for k in range(0 if include_background else 1, c):
      g = (lab == k).astype(float)
      if average == "present" and not (g.sum() > 0 or (pred == k).any()):
        continue
      q = p[:, k]
      den = (q @ q + g @ g) if squared_denominator else (q.sum() + g.sum())
      scores.append((2 * np.sum(q * g) + smooth) / (den + smooth))
  return 1.0 - np.mean(scores) if scores else 0.0


def ref_dice_transunet(z, y, squared_denominator, average, smooth=1e-5):
  """TransUNet's DiceLoss as its utils.py computes it, on NHWC arrays:
  for every class, sums over the whole batch, squared denominator, then the
  plain mean over the classes."""
  assert squared_denominator and average == "all"  # The flags that ask it.
  c = z.shape[-1]
  score = np_softmax(z)
  total = 0.0
  for i in range(c):
    s, t = score[..., i], (y == i).astype(float)
    total += 1 - (2 * np.sum(s * t) + smooth) / (
        np.sum(s * s) + np.sum(t * t) + smooth)
  return total / c


def ref_dice_monai(z, y, batch, average, smooth=1e-5):
  """MONAI's DiceLoss defaults (softmax, one-hot labels, batch=False): a
  Dice per example and class over the spatial axes, then the mean."""
  assert not batch and average == "all"  # The flags that ask for it.
  c = z.shape[-1]
  p = np_softmax(z)
  g = np.eye(c)[y]
  axes = tuple(range(1, z.ndim - 1))
  inter = np.sum(p * g, axis=axes)
  den = np.sum(p, axis=axes) + np.sum(g, axis=axes)
  return np.mean(1 - (2 * inter + smooth) / (den + smooth))


def ref_focal(z, y, gamma=2.0, ignore_index=None, class_weights=None,
              mask=None):
  c = z.shape[-1]
  valid = np_valid(y.shape, mask, y, ignore_index).ravel()
  p = np_softmax(z.reshape(-1, c))
  total = 0.0
  for i, label in enumerate(y.ravel()):
    if valid[i]:
      w = 1.0 if class_weights is None else class_weights[label]
      pt = p[i, label]
      total -= w * (1 - pt) ** gamma * np.log(pt)
  return total / valid.sum()


def ref_kd_kl(s, t, temperature=1.0, reduction="mean",
              scale_by_tau_squared=True, mask=None):
  kl = np_kl(np_softmax(t / temperature), np_softmax(s / temperature))
  valid = np_valid(kl.shape, mask)
  if reduction == "mean":
    value = kl[valid].mean()
  else:  # Sum over classes and positions, divided by the batch size.
    value = kl[valid].sum() / s.shape[0]
  return value * (temperature**2 if scale_by_tau_squared else 1.0)


def ref_kd_torchdistill(s, t, temperature, reduction, scale_by_tau_squared):
  """torchdistill's KDLoss alone (no targets): nn.KLDivLoss(batchmean) of
  the softened NCHW distributions, i.e. the elementwise t * (log t - log s)
  summed over every element and divided by the batch size; no tau^2."""
  assert reduction == "batchmean" and not scale_by_tau_squared
  nchw = lambda x: np.moveaxis(x, -1, 1)
  log_s = np.log(np_softmax(nchw(s) / temperature, axis=1))
  q = np_softmax(nchw(t) / temperature, axis=1)
  return np.sum(q * (np.log(q) - log_s)) / s.shape[0]


def ref_soft_ce(s, t, temperature=1.0, mask=None):
  ce = -np.sum(np_softmax(t / temperature)
               * np.log(np_softmax(s / temperature)), -1)
  return ce[np_valid(ce.shape, mask)].mean() * temperature**2


def ref_dkd(s, t, y, alpha=1.0, beta=8.0, temperature=4.0,
            ignore_index=None, mask=None):
  c = s.shape[-1]
  valid = np_valid(y.shape, mask, y, ignore_index).ravel()
  s, t, y = s.reshape(-1, c), t.reshape(-1, c), y.ravel()
  vals = []
  for i in range(len(y)):
    if not valid[i]:
      continue
    ps, pt = np_softmax(s[i] / temperature), np_softmax(t[i] / temperature)
    bs = np.array([ps[y[i]], 1 - ps[y[i]]])
    bt = np.array([pt[y[i]], 1 - pt[y[i]]])
    ns = np_softmax(np.delete(s[i], y[i]) / temperature)
    nt = np_softmax(np.delete(t[i], y[i]) / temperature)
    vals.append(alpha * np_kl(bt, bs) + beta * np_kl(nt, ns))
  return np.mean(vals) * temperature**2


def np_pearson(a, b, eps=1e-8):
  a, b = a - a.mean(), b - b.mean()
  return np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b) + eps)


def ref_dist(s, t, beta=1.0, gamma=1.0, temperature=1.0, eps=1e-8,
             mask=None):
  c = s.shape[-1]
  valid = np_valid(s.shape[:-1], mask).ravel()
  ys = np_softmax(s / temperature).reshape(-1, c)[valid]
  yt = np_softmax(t / temperature).reshape(-1, c)[valid]
  inter = 1 - np.mean([np_pearson(a, b, eps) for a, b in zip(ys, yt)])
  intra = 1 - np.mean([np_pearson(ys[:, k], yt[:, k], eps)
                       for k in range(c)])
  return temperature**2 * (beta * inter + gamma * intra)


def ref_cwd(s, t, temperature=1.0):
  n, _, _, c = s.shape
  total = 0.0
  for i in range(n):
    for k in range(c):
      total += np_kl(np_softmax(t[i, ..., k].ravel() / temperature),
                     np_softmax(s[i, ..., k].ravel() / temperature))
  return total / (n * c) * temperature**2


def ref_dml(a, b, temperature=1.0, mask=None):
  pa, pb = np_softmax(a / temperature), np_softmax(b / temperature)
  kl = np_kl(pb, pa) + np_kl(pa, pb)
  return kl[np_valid(kl.shape, mask)].mean() * temperature**2


def ref_ensemble_kd(s, t, temperature=1.0, mask=None):
  pbar = np.mean([np_softmax(te / temperature) for te in t], axis=0)
  kl = np_kl(pbar, np_softmax(s / temperature))
  return kl[np_valid(kl.shape, mask)].mean() * temperature**2


def ref_regression(kind):
  def ref(p, t, mask=None, delta=1.0):
    d = np.abs(p - t)
    per = {"mse": d**2, "l1": d,
           "smooth_l1": np.where(d < delta, 0.5 * d**2 / delta,
                                 d - 0.5 * delta)}[kind]
    return per[np_valid(per.shape, mask)].mean()
  return ref


def ref_ensemble_l2(s, t, mask=None):
  d = (s - t.mean(0)) ** 2
  return d[np_valid(d.shape, mask)].mean()


def ref_at(s, t, p=2.0, form="code", eps=1e-12):
  def att(f):
    a = np.mean(np.abs(f) ** p, axis=-1).reshape(f.shape[0], -1)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), eps)
  if form == "code":
    return np.mean((att(s) - att(t)) ** 2)
  return np.mean(np.linalg.norm(att(s) - att(t), axis=1))


def ref_at_paper(s, t, form="paper"):
  """Eq. (2) of Zagoruyko & Komodakis with p = 2 and beta / 2 = 1: Q is the
  channel *sum* of squares (the paper's F), the loss the L2 norm of the
  difference of the normalised maps, here averaged over the examples."""
  assert form == "paper"
  def q(f):
    a = np.sum(f ** 2, axis=-1).reshape(f.shape[0], -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)
  return np.mean([np.linalg.norm(a - b) for a, b in zip(q(s), q(t))])


def ref_vid(mu, t, alpha, eps=1e-5):
  var = np.log1p(np.exp(alpha)) + eps
  return np.mean(0.5 * ((t - mu) ** 2 / var + np.log(var)))


def np_unit(x, eps):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def ref_pairwise(s, t, pool_size=1):
  def sim(f):
    b, h, w, c = f.shape
    k = pool_size
    nodes = np.zeros((b, h // k, w // k, c))
    for i in range(h // k):
      for j in range(w // k):
        nodes[:, i, j] = f[:, i * k:(i + 1) * k, j * k:(j + 1) * k].max((1, 2))
    v = np_unit(nodes.reshape(b, -1, c), 1e-8)
    return np.einsum("bic,bjc->bij", v, v)
  return np.mean((sim(s) - sim(t)) ** 2)


def ref_sp(s, t):
  def gram(f):
    f = f.reshape(f.shape[0], -1)
    return np_unit(f @ f.T, 1e-12)
  return np.sum((gram(t) - gram(s)) ** 2) / s.shape[0] ** 2


def ref_pkt(s, t, eps=1e-7):
  def cond(f):
    f = np_unit(f.reshape(f.shape[0], -1), eps)
    k = (f @ f.T + 1) / 2
    return k / k.sum(1, keepdims=True)
  ps, pt = cond(s), cond(t)
  return np.mean(pt * np.log((pt + eps) / (ps + eps)))


def np_huber(x, delta=1.0):
  a = np.abs(x)
  return np.where(a <= delta, 0.5 * x**2, delta * (a - 0.5 * delta))


def ref_rkd_distance(s, t, delta=1.0):
  def psi(f):
    f = f.reshape(f.shape[0], -1)
    b = len(f)
    d = np.array([[np.linalg.norm(f[i] - f[j]) for j in range(b)]
                  for i in range(b)])
    return d / (d.sum() / (b * (b - 1)))
  return np.mean(np_huber(psi(s) - psi(t), delta))


def ref_rkd_angle(s, t, delta=1.0):
  def psi(f):
    f = f.reshape(f.shape[0], -1)
    b = len(f)
    def e(i, j):  # Unit vector from x_j to x_i.
      v = f[i] - f[j]
      n = np.linalg.norm(v)
      return v / n if n > 0 else v
    return np.array([[[e(i, j) @ e(k, j) for k in range(b)]
                      for j in range(b)] for i in range(b)])
  return np.mean(np_huber(psi(s) - psi(t), delta))


def np_pool(x):
  return x.mean(axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x


def ref_embedding_cosine(s, t):
  s, t = np_pool(s), np_pool(t)
  return np.mean(1 - np.sum(np_unit(s, 1e-8) * np_unit(t, 1e-8), -1))


def ref_embedding_l2(s, t, normalize=False):
  s, t = np_pool(s), np_pool(t)
  if normalize:
    s, t = np_unit(s, 1e-8), np_unit(t, 1e-8)
  return np.mean(np.sum((s - t) ** 2, -1))


def ref_feature_map_cosine(s, t):
  return np.mean(1 - np.sum(np_unit(s, 1e-8) * np_unit(t, 1e-8), -1))


# --------------------------------------------------------------------------
# Cases.

class Case(NamedTuple):
  id: str
  fn: Callable[..., Any]
  make: Callable[[np.random.RandomState], tuple]  # -> positional arrays
  kwargs: dict
  ref: Callable[..., float]
  # Arguments with the student equal to the teacher, and the loss there.
  equal: Optional[Callable[[tuple], tuple]] = None
  minimum: Callable[[tuple, dict], float] = lambda args, kw: 0.0
  # Arguments whose shapes do not fit (must raise ValueError).
  bad: Optional[Callable[[tuple], tuple]] = None


def _randn(rng, shape, scale=2.0):
  return (scale * rng.randn(*shape)).astype(np.float32)


def logits_pair(shape):
  return lambda rng: (_randn(rng, shape), _randn(rng, shape))


def logits_labels(shape, ignore=False):
  def make(rng):
    y = rng.randint(0, shape[-1], shape[:-1]).astype(np.int32)
    if ignore:
      y.ravel()[::3] = 255
    return (_randn(rng, shape), y)
  return make


def with_labels(shape):
  def make(rng):
    s, t = logits_pair(shape)(rng)
    return (s, t, rng.randint(0, shape[-1], shape[:-1]).astype(np.int32))
  return make


def ensemble(shape, e=3):
  return lambda rng: (_randn(rng, shape), _randn(rng, (e,) + shape))


def pixel_mask(shape):
  m = np.ones(shape[:-1], bool)
  m.ravel()[1::4] = False
  return m


def example_mask(shape):
  m = np.ones(shape[:1], bool)
  m[0] = False
  return m


swap01 = lambda a: (a[0], a[0]) + tuple(a[2:])
other_classes = lambda a: (a[0], a[1][..., :-1]) + tuple(a[2:])
other_spatial = lambda a: (a[0], a[1][:, :-1]) + tuple(a[2:])
other_batch = lambda a: (a[0], a[1][:-1]) + tuple(a[2:])


def _entropy_min(args, kw):
  tau = kw.get("temperature", 1.0)
  p = np_softmax(args[1].astype(np.float64) / tau)
  return float(np.mean(-np.sum(p * np.log(p), -1)) * tau**2)


def _vid_min(args, kw):
  var = np.log1p(np.exp(args[2].astype(np.float64))) + kw.get("eps", 1e-5)
  return float(np.mean(0.5 * np.log(var)))


def feature_pair(s_shape, t_shape=None):
  return lambda rng: (_randn(rng, s_shape, 1.0),
                      _randn(rng, t_shape or s_shape, 1.0))


L = losses
CASES = [
    # Task losses.
    Case("cross_entropy/cls", L.cross_entropy, logits_labels(CLS), {},
         ref_cross_entropy, bad=lambda a: (a[0], a[1][:-1])),
    Case("cross_entropy/dense_ignore_weights", L.cross_entropy,
         logits_labels(DENSE, ignore=True),
         dict(ignore_index=255,
              class_weights=np.array([1., 2., .5, 1., 3.], np.float32)),
         ref_cross_entropy, bad=lambda a: (a[0], a[1][..., :-1])),
    Case("cross_entropy/dense_mask", L.cross_entropy, logits_labels(DENSE),
         dict(mask=pixel_mask(DENSE)), ref_cross_entropy),
    Case("dice/cls", L.dice_loss, logits_labels(CLS), {}, ref_dice),
    Case("dice/dense_ignore", L.dice_loss, logits_labels(DENSE, ignore=True),
         dict(ignore_index=255), ref_dice,
         bad=lambda a: (a[0], a[1][:, :-1])),
    Case("dice/dense_transunet", L.dice_loss, logits_labels(DENSE),
         dict(squared_denominator=True, average="all"), ref_dice_transunet),
    Case("dice/dense_monai", L.dice_loss, logits_labels(DENSE),
         dict(batch=False, average="all"), ref_dice_monai),
    Case("dice/dense_options_mask", L.dice_loss, logits_labels(DENSE),
         dict(squared_denominator=True, include_background=False,
              batch=False, smooth=1e-3, mask=pixel_mask(DENSE)), ref_dice),
    Case("focal/dense", L.focal_loss, logits_labels(DENSE),
         dict(gamma=2.0, mask=example_mask(DENSE)), ref_focal),
    Case("focal/cls_weights", L.focal_loss, logits_labels(CLS),
         dict(gamma=1.5,
              class_weights=np.array([.25, 1., 1., 2., .5], np.float32)),
         ref_focal),
    # Logit distillation.
    Case("kd_kl/cls", L.kd_kl, logits_pair(CLS), dict(temperature=4.0),
         ref_kd_kl, swap01, bad=other_classes),
    Case("kd_kl/dense", L.kd_kl, logits_pair(DENSE), {}, ref_kd_kl, swap01,
         bad=other_spatial),
    Case("kd_kl/dense_mask", L.kd_kl, logits_pair(DENSE),
         dict(temperature=2.0, mask=pixel_mask(DENSE)), ref_kd_kl, swap01),
    Case("kd_kl/dense_torchdistill", L.kd_kl, logits_pair(DENSE),
         # tau^2 != H*W, so that ignoring both flags cannot pass.
         dict(temperature=3.0, reduction="batchmean",
              scale_by_tau_squared=False), ref_kd_torchdistill, swap01),
    Case("kd_kl/dense_batchmean_mask", L.kd_kl, logits_pair(DENSE),
         dict(temperature=2.0, reduction="batchmean",
              mask=pixel_mask(DENSE)), ref_kd_kl, swap01),
    Case("pixelwise_kd/dense", L.pixelwise_kd, logits_pair(DENSE), {},
         ref_kd_kl, swap01, bad=other_spatial),
    Case("pixelwise_kd/masked", L.pixelwise_kd, logits_pair(DENSE),
         dict(mask=pixel_mask(DENSE)), ref_kd_kl, swap01),
    Case("soft_cross_entropy/cls", L.soft_cross_entropy, logits_pair(CLS),
         dict(temperature=2.0), ref_soft_ce, swap01, _entropy_min,
         bad=other_classes),
    Case("dkd/cls", L.dkd, with_labels(CLS),
         dict(alpha=1.0, beta=8.0, temperature=4.0), ref_dkd, swap01,
         bad=other_classes),
    Case("dkd/dense_mask", L.dkd, with_labels(DENSE),
         dict(alpha=0.5, beta=2.0, temperature=1.0, mask=pixel_mask(DENSE)),
         ref_dkd, swap01, bad=lambda a: (a[0], a[1], a[2][:-1])),
    Case("dist/cls", L.dist, logits_pair(CLS),
         dict(beta=1.0, gamma=2.0, temperature=1.0), ref_dist, swap01,
         bad=other_classes),
    Case("dist/dense_mask_tau", L.dist, logits_pair(DENSE),
         dict(beta=2.0, gamma=1.0, temperature=3.0, mask=pixel_mask(DENSE)),
         ref_dist, swap01),
    Case("cwd/dense", L.cwd, logits_pair(DENSE), dict(temperature=4.0),
         ref_cwd, swap01, bad=other_spatial),
    Case("cwd/dense_tau1", L.cwd, logits_pair(DENSE), {}, ref_cwd, swap01),
    Case("dml/cls", L.dml, logits_pair(CLS), dict(temperature=3.0), ref_dml,
         swap01, bad=other_classes),
    Case("dml/dense_mask", L.dml, logits_pair(DENSE),
         dict(mask=example_mask(DENSE)), ref_dml, swap01),
    Case("ensemble_kd/cls", L.ensemble_kd, ensemble(CLS),
         dict(temperature=2.0), ref_ensemble_kd,
         lambda a: (a[0], np.stack([a[0]] * 3)), bad=other_classes),
    Case("ensemble_kd/dense_mask", L.ensemble_kd, ensemble(DENSE),
         dict(mask=pixel_mask(DENSE)), ref_ensemble_kd,
         lambda a: (a[0], np.stack([a[0]] * 3))),
    Case("mse/coords", L.mse, feature_pair((6, 2)),
         dict(mask=example_mask((6, 2))), ref_regression("mse"), swap01,
         bad=lambda a: (a[0], a[1][:, :1])),
    Case("l1/coords", L.l1, feature_pair((6, 2)), {}, ref_regression("l1"),
         swap01, bad=lambda a: (a[0], a[1][:, :1])),
    Case("smooth_l1/coords", L.smooth_l1, feature_pair((6, 2)),
         dict(delta=0.5, mask=example_mask((6, 2))),
         ref_regression("smooth_l1"), swap01,
         bad=lambda a: (a[0], a[1][:, :1])),
    Case("ensemble_l2/coords", L.ensemble_l2, ensemble((6, 2)),
         dict(mask=example_mask((6, 2))), ref_ensemble_l2,
         lambda a: (a[0], np.stack([a[0]] * 3)), bad=lambda a: (a[0], a[1][0])),
    # Feature distillation.
    Case("hint_l1/nhwc", L.hint_l1, feature_pair(DENSE), {},
         lambda s, t: np.mean(np.abs(s - t)), swap01, bad=other_classes),
    Case("hint_l2/tokens", L.hint_l2, feature_pair((2, 16, 5)), {},
         lambda s, t: np.mean((s - t) ** 2), swap01, bad=other_classes),
    Case("cwd_features/nhwc", L.REGISTRY["cwd_features"].fn,
         feature_pair(DENSE), dict(temperature=2.0), ref_cwd, swap01),
    Case("attention_transfer/p2", L.attention_transfer,
         feature_pair(DENSE, DENSE_T), {}, ref_at, swap01,
         bad=other_spatial),
    Case("attention_transfer/paper", L.attention_transfer,
         feature_pair(DENSE, DENSE_T), dict(form="paper"), ref_at_paper,
         swap01),
    Case("attention_transfer/paper_p3", L.attention_transfer,
         feature_pair(DENSE, DENSE_T), dict(form="paper", p=3.0), ref_at,
         swap01),
    Case("attention_transfer/p1", L.attention_transfer,
         feature_pair(DENSE, DENSE_T), dict(p=1.0), ref_at,
         swap01),
    Case("vid/nhwc", L.vid,
         lambda rng: (_randn(rng, DENSE, 1.0), _randn(rng, DENSE, 1.0),
                      _randn(rng, DENSE[-1:], 1.0)),
         {}, ref_vid, lambda a: (a[1], a[1], a[2]), _vid_min,
         bad=lambda a: (a[0], a[1], a[2][:-1])),
    Case("pairwise_similarity/pool1", L.pairwise_similarity,
         feature_pair(DENSE, DENSE_T), {}, ref_pairwise, swap01,
         bad=other_spatial),
    Case("pairwise_similarity/pool2", L.pairwise_similarity,
         feature_pair(DENSE, DENSE_T), dict(pool_size=2),
         ref_pairwise, swap01),
    Case("similarity_preserving/nhwc", L.similarity_preserving,
         feature_pair(DENSE, (2, 2, 2, 5)), {}, ref_sp, swap01,
         bad=other_batch),
    Case("pkt/vec", L.pkt, feature_pair(CLS, CLS_T), {}, ref_pkt, swap01,
         bad=other_batch),
    Case("rkd_distance/vec", L.rkd_distance, feature_pair(CLS, CLS_T),
         {}, ref_rkd_distance, swap01, bad=other_batch),
    Case("rkd_angle/vec", L.rkd_angle, feature_pair(CLS, CLS_T), {},
         ref_rkd_angle, swap01, bad=other_batch),
    Case("embedding_cosine/vec", L.embedding_cosine, feature_pair(CLS),
         {}, ref_embedding_cosine, swap01, bad=other_classes),
    Case("embedding_cosine/pooled_tokens", L.embedding_cosine,
         feature_pair((2, 16, 5)), {}, ref_embedding_cosine, swap01),
    Case("embedding_l2/vec", L.embedding_l2, feature_pair(CLS), {},
         ref_embedding_l2, swap01, bad=other_classes),
    Case("embedding_l2/normalized_nhwc", L.embedding_l2, feature_pair(DENSE),
         dict(normalize=True), ref_embedding_l2, swap01),
    Case("feature_map_cosine/nhwc", L.feature_map_cosine,
         feature_pair(DENSE), {}, ref_feature_map_cosine, swap01,
         bad=other_classes),
    # Adversarial pieces.
    Case("wgan_critic", L.wgan_critic_loss, feature_pair((6,)), {},
         lambda r, f: f.mean() - r.mean(), swap01,
         bad=lambda a: (a[0], a[1][:-1])),
    Case("wgan_generator", L.wgan_generator_loss,
         lambda rng: (_randn(rng, (6, 1)),), {}, lambda f: -f.mean()),
]
IDS = [c.id for c in CASES]


@functools.lru_cache(maxsize=None)
def case_args(case_id):
  """The case's arrays, built once per test session (fixed seed per case)."""
  case = CASES[IDS.index(case_id)]
  seed = sum(map(ord, case_id))
  return case.make(np.random.RandomState(seed))


def is_float(x):
  return np.issubdtype(np.asarray(x).dtype, np.floating)


def float_argnums(args):
  return tuple(i for i, a in enumerate(args) if is_float(a))


def np64(x):
  return x.astype(np.float64) if is_float(x) else x


cases = pytest.mark.parametrize("case", CASES, ids=IDS)


# --------------------------------------------------------------------------
# Generic tests. Compilation dominates the runtime on a small CPU, so each
# case is evaluated eagerly once (op by op, as a user calling the plain
# function outside jit would) and compiled once inside a jit together with
# its gradients, vmap and bf16 variants; the tests share these results.
# Cases that only vary a hyperparameter of a loss tested elsewhere skip the
# transformations.
VARIANTS = {"cwd_features/nhwc", "attention_transfer/p1",
            "attention_transfer/paper_p3", "kd_kl/dense_batchmean_mask",
            "dice/dense_monai",
            "pairwise_similarity/pool2", "embedding_cosine/pooled_tokens",
            "embedding_l2/normalized_nhwc", "focal/cls_weights",
            "pixelwise_kd/dense", "kd_kl/dense", "cross_entropy/dense_mask"}
FULL = [c for c in CASES if c.id not in VARIANTS]
full_cases = pytest.mark.parametrize("case", FULL, ids=[c.id for c in FULL])


def _other(args):
  """A second problem of the same shapes: the first array rolled on axis 0."""
  return (np.roll(args[0], 1, axis=0),) + tuple(args[1:])


def _case(case_id):
  return CASES[IDS.index(case_id)]


def grad_argnums(case, args):
  """The student (argument 0), the other peer for dml and the critic's
  real scores, and float arrays after the teacher (vid's alpha)."""
  both = case.fn in (L.dml, L.wgan_critic_loss)
  return tuple(i for i, a in enumerate(args)
               if is_float(a) and (i != 1 or both))


@functools.lru_cache(maxsize=None)
def eager_value(case_id):
  case = _case(case_id)
  return case.fn(*case_args(case_id), **case.kwargs)


@functools.lru_cache(maxsize=None)
def jitted_bundle(case_id):
  case = _case(case_id)
  args = case_args(case_id)
  fn = functools.partial(case.fn, **case.kwargs)
  stacked = tuple(np.stack([a, b]) for a, b in zip(args, _other(args)))
  bf16 = tuple(a.astype(jnp.bfloat16) if is_float(a) else a for a in args)
  argnums = grad_argnums(case, args)

  def bundle(args, stacked, bf16):
    value, grads = jax.value_and_grad(fn, argnums=argnums)(*args)
    return dict(value=value, grads=grads, vmap=jax.vmap(fn)(*stacked),
                bf16=fn(*bf16))

  return jax.jit(bundle)(args, stacked, bf16)


@cases
def test_golden_value(case):
  args = case_args(case.id)
  got = eager_value(case.id)
  kw64 = {k: np64(v) if isinstance(v, np.ndarray) else v
          for k, v in case.kwargs.items()}
  want = case.ref(*map(np64, args), **kw64)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@cases
def test_same_value_under_jit(case):
  if case.id in VARIANTS:
    got = jax.jit(functools.partial(case.fn, **case.kwargs))(
        *case_args(case.id))
  else:
    got = jitted_bundle(case.id)["value"]
  np.testing.assert_allclose(got, eager_value(case.id), rtol=1e-6,
                             atol=1e-7)


@full_cases
def test_finite_nonzero_gradients(case):
  grads = jitted_bundle(case.id)["grads"]
  for g in grads:
    assert np.all(np.isfinite(g)), case.id
  assert any(np.any(g != 0) for g in grads), "gradient is identically 0"


@full_cases
def test_bf16_inputs_give_finite_float32(case):
  out = jitted_bundle(case.id)["bf16"]
  assert out.dtype == jnp.float32 and np.isfinite(out), case.id
  np.testing.assert_allclose(out, eager_value(case.id), rtol=0.1, atol=0.05)


@full_cases
def test_vmap_matches_loop(case):
  args = case_args(case.id)
  want = [eager_value(case.id), case.fn(*_other(args), **case.kwargs)]
  np.testing.assert_allclose(jitted_bundle(case.id)["vmap"], want,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.equal is not None],
    ids=[c.id for c in CASES if c.equal is not None])
def test_known_minimum_when_student_equals_teacher(case):
  args = case.equal(case_args(case.id))
  got = case.fn(*args, **case.kwargs)
  np.testing.assert_allclose(got, case.minimum(args, case.kwargs),
                             rtol=1e-5, atol=1e-5)


TEMPERATURE_CASES = [c for c in CASES if "temperature" in c.kwargs]


@pytest.mark.parametrize("case", TEMPERATURE_CASES,
                         ids=[c.id for c in TEMPERATURE_CASES])
@pytest.mark.parametrize("tau", [0.5, 3.0])
def test_tau_squared_scaling(case, tau):
  """loss(tau * s, tau * t; tau) == tau^2 * loss(s, t; 1): the softened
  distributions are unchanged, so only the tau^2 factor differs (and
  nothing does with scale_by_tau_squared=False)."""
  args = case_args(case.id)
  kw = dict(case.kwargs)
  kw["temperature"] = 1.0
  base = case.fn(*args, **kw)
  kw["temperature"] = tau
  scaled = (args[0] * tau, args[1] * tau) + tuple(args[2:])
  factor = tau**2 if kw.get("scale_by_tau_squared", True) else 1.0
  np.testing.assert_allclose(case.fn(*scaled, **kw), factor * base,
                             rtol=1e-5, atol=1e-6)


BAD_CASES = [c for c in CASES if c.bad is not None]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.id for c in BAD_CASES])
def test_mismatched_shapes_raise(case):
  args = case.bad(case_args(case.id))
  with pytest.raises(ValueError, match="shape"):
    case.fn(*args, **case.kwargs)


def test_every_registered_loss_has_a_golden_case():
  tested = {c.fn for c in CASES} | {L.gradient_penalty, L.medtex_objective}
  missing = [n for n, s in L.REGISTRY.items() if s.fn not in tested]
  assert not missing


@pytest.mark.parametrize("shape", [(3, 4), (2, 2, 3, 4), (1, 2, 2, 2, 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_kd_kl_shapes_and_dtypes(shape, dtype):
  rng = np.random.RandomState(0)
  s, t = _randn(rng, shape), _randn(rng, shape)
  got = L.kd_kl(jnp.asarray(s, dtype), jnp.asarray(t, dtype),
                temperature=2.0)
  assert got.dtype == jnp.float32
  s64 = np.asarray(jnp.asarray(s, dtype), np.float64)
  t64 = np.asarray(jnp.asarray(t, dtype), np.float64)
  np.testing.assert_allclose(got, ref_kd_kl(s64, t64, 2.0), rtol=1e-5,
                             atol=1e-6)


# --------------------------------------------------------------------------
# Conventions offered by flags: how they relate to the defaults.

def test_kd_kl_batchmean_is_the_pixel_sum_over_the_batch():
  rng = np.random.RandomState(1)
  s, t = _randn(rng, DENSE), _randn(rng, DENSE)
  h, w = DENSE[1:3]
  mean = L.kd_kl(s, t, temperature=2.0)
  batchmean = L.kd_kl(s, t, temperature=2.0, reduction="batchmean")
  np.testing.assert_allclose(batchmean, h * w * mean, rtol=1e-5)
  bare = L.kd_kl(s, t, temperature=2.0, reduction="batchmean",
                 scale_by_tau_squared=False)
  np.testing.assert_allclose(bare, batchmean / 4.0, rtol=1e-6)
  # On (B, C) logits the two reductions agree.
  s, t = _randn(rng, CLS), _randn(rng, CLS)
  np.testing.assert_allclose(L.kd_kl(s, t, reduction="batchmean"),
                             L.kd_kl(s, t), rtol=1e-6)


def test_dice_flags_change_the_value():
  s, y = case_args("dice/dense_transunet")
  # Class 4 absent from labels and predictions: "present" skips it.
  y = np.where(y == 4, 0, y)
  s = s - 20.0 * (np.arange(5) == 4)
  default = float(L.dice_loss(s, y))
  for kw in (dict(squared_denominator=True), dict(average="all"),
             dict(batch=False), dict(include_background=False)):
    assert abs(float(L.dice_loss(s, y, **kw)) - default) > 1e-4, kw


def test_attention_transfer_forms_differ():
  s, t = case_args("attention_transfer/paper")
  code = float(L.attention_transfer(s, t))
  paper = float(L.attention_transfer(s, t, form="paper"))
  assert paper > code > 0  # A norm of entries < 1 vs a mean of squares.


@pytest.mark.parametrize("fn,kw", [
    (L.kd_kl, dict(temperature=3.0, reduction="batchmean",
                   scale_by_tau_squared=False)),
    (L.dice_loss, dict(squared_denominator=True, average="all")),
    (L.attention_transfer, dict(form="paper")),
], ids=["kd_kl", "dice", "attention_transfer"])
def test_grad_without_jit(fn, kw):
  """The plain functions differentiate eagerly too (no jit of their own)."""
  case = {L.kd_kl: "kd_kl/dense_torchdistill",
          L.dice_loss: "dice/dense_transunet",
          L.attention_transfer: "attention_transfer/paper"}[fn]
  args = case_args(case)
  grad = jax.grad(functools.partial(fn, **kw))(*args)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
