"""Feature distillation losses.

Inputs are the already-projected arrays: connectors (1x1 conv, linear,
attention pooling) live in `kd_jax.models.connectors` and are applied by the
method before these losses. Layouts: NHWC maps (B, H, W, C), NLD tokens
(B, L, D), or pooled vectors (B, D). Losses that compare relations between
examples or positions (AT, pair-wise, SP, PKT, RKD) accept different
channel counts for student and teacher; the others need equal shapes.

No temperature anywhere in this module.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import optax

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
  Used as latent matching in "Distillo, ergo sum". No temperature. 0 when
  equal.

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
  elements. Also the dense L2 feature-map matching loss. No temperature.
  0 when equal.

  Reference: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

  Returns:
    float32 scalar >= 0.
  """
  s, t = _same(student_feature, teacher_feature)
  return jnp.mean((s - t) ** 2)


def _l2_normalize(x, axis=-1, eps=1e-12):
  """x / max(||x||_2, eps) along `axis`, with a finite gradient at x = 0."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  norm = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))  # sq == 0 means x == 0.
  return x / jnp.maximum(norm, eps)


def _safe_norm(x, axis=-1):
  """L2 norm along `axis` with a zero (not NaN) gradient at x = 0, which is
  where a distance loss is at its minimum."""
  sq = jnp.sum(x * x, axis=axis)
  return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _spatial(name, x):
  _checks.min_ndim(name, x, 3, "(B, H, W, C) or (..., H, W, C)")


def _same_spatial(s, t):
  _spatial("student_feature", s)
  _spatial("teacher_feature", t)
  if jnp.shape(s)[:-1] != jnp.shape(t)[:-1]:
    raise ValueError(
        f"student_feature shape {jnp.shape(s)} and teacher_feature shape "
        f"{jnp.shape(t)} must have the same batch and spatial dims "
        f"(channels may differ); resize one of them, e.g. with "
        f"jax.image.resize.")


def _same_batch(s, t, min_batch):
  _checks.min_ndim("student_feature", s, 2, "(B, ...)")
  _checks.min_ndim("teacher_feature", t, 2, "(B, ...)")
  if jnp.shape(s)[0] != jnp.shape(t)[0]:
    raise ValueError(f"student_feature shape {jnp.shape(s)} and "
                     f"teacher_feature shape {jnp.shape(t)} must have the "
                     f"same batch size (axis 0); feature sizes may differ.")
  if jnp.shape(s)[0] < min_batch:
    raise ValueError(f"this loss relates the examples of a batch and needs a "
                     f"batch of at least {min_batch}, got {jnp.shape(s)[0]}.")
  flat = lambda x, n: _checks.as_float(x, n).reshape(x.shape[0], -1)
  return flat(s, "student_feature"), flat(t, "teacher_feature")


AT_FORMS = ("code", "paper")


def attention_transfer(student_feature, teacher_feature, *, p: float = 2.0,
                       form: str = "code", eps: float = 1e-12) -> jax.Array:
  """Attention transfer (activation-based, channel-pooled |f|^p maps).

  Attention map per example, flattened over the spatial positions:
      Q = vec( (1/C) sum_c |f_c|^p ),   q = Q / max(||Q||_2, eps)
  (the paper pools with a sum over channels, the authors' code with a mean;
  the normalisation makes the two equal.)

  Forms (`form`):
    "code" (default), the authors' `at_loss`:
        loss = (1 / (B H W)) sum_b sum_i (q_S,b,i - q_T,b,i)^2
      the mean over examples and positions of the squared difference. The
      authors' scripts weight it by beta = 1000 (`--beta 1e+3`): with the
      mean over B*H*W that is the paper's "beta = 10^3 divided by the
      number of elements in the attention map and batch size", applied to
      the squared norm rather than the norm and without the 1/2.
      mdistiller's `at_loss` and torchdistill's `ATLoss(mode="code")` are
      this form.
    "paper", eq. (2) of the paper with its p = 2 norm (not squared):
        loss = (1 / B) sum_b || q_S,b - q_T,b ||_2
      the mean over examples of the per-example L2 distance; the paper's
      beta / 2 goes in the term's weight. torchdistill's
      `ATLoss(mode="paper")` is this form (it sums the norms over the batch
      and divides by the batch size).
  Reduction: "code", mean over examples and positions; "paper", mean over
  examples. The paper's sum over layers is one term per layer here.
  The peers square f instead of taking |f|^p; for p = 2 that is the same.
  Channels may differ between student and teacher; batch and spatial dims
  must match (the peers pool the larger map to the smaller one; resize in
  the method). No temperature. 0 when the maps are equal.

  Reference: Zagoruyko & Komodakis, "Paying More Attention to Attention",
  ICLR 2017.

  Args:
    student_feature: (..., H, W, C_S).
    teacher_feature: (..., H, W, C_T).
    p: exponent of the channel pooling (paper: 2), > 0.
    form: "code" or "paper" (see above).
    eps: normalisation floor, > 0.

  Returns:
    float32 scalar >= 0.
  """
  _checks.one_of("attention_transfer", "form", form, AT_FORMS)
  _same_spatial(student_feature, teacher_feature)
  return attention_transfer_from_view(
      student_feature, attention_map(teacher_feature, p=p, eps=eps), p=p,
      form=form, eps=eps)


def attention_map(feature, *, p: float = 2.0, eps: float = 1e-12
                  ) -> jax.Array:
  """The teacher view of `attention_transfer`: q of each example, (..., H,
  W), the channel mean of |f|^p L2-normalised over the H W positions (C
  times smaller than the (..., H, W, C) feature)."""
  _spatial("feature", feature)
  a = jnp.mean(jnp.abs(_checks.as_float(feature, "feature")) ** p, axis=-1)
  flat = _l2_normalize(a.reshape(a.shape[:-2] + (-1,)), eps=eps)
  return flat.reshape(a.shape)


def attention_transfer_from_view(student_feature, teacher_view, *,
                                 p: float = 2.0, form: str = "code",
                                 eps: float = 1e-12) -> jax.Array:
  """`attention_transfer` with the teacher given as its view,
  `attention_map(teacher_feature, p=p, eps=eps)` (H, W as the student's)."""
  _checks.one_of("attention_transfer", "form", form, AT_FORMS)
  _spatial("student_feature", student_feature)
  if jnp.shape(student_feature)[:-1] != jnp.shape(teacher_view):
    raise ValueError(
        f"student_feature shape {jnp.shape(student_feature)} and the "
        f"teacher's attention map {jnp.shape(teacher_view)} must have the "
        "same batch and spatial dims; resize one of them, e.g. with "
        "jax.image.resize.")
  diff = (attention_map(student_feature, p=p, eps=eps)
          - _checks.as_float(teacher_view, "teacher_view"))
  diff = diff.reshape(diff.shape[:-2] + (-1,))
  if form == "code":
    return jnp.mean(diff ** 2)
  return jnp.mean(_safe_norm(diff))


def vid(mean, teacher_feature, alpha, *, eps: float = 1e-5) -> jax.Array:
  """Variational information distillation: Gaussian NLL of the teacher.

  Formula: the student regresses the mean mu = connector(f_S) of a Gaussian
  over the teacher feature t with a learned per-channel variance
      sigma_c^2 = softplus(alpha_c) + eps
      nll = 0.5 * ( (t - mu)^2 / sigma_c^2 + log sigma_c^2 )
  (the constant 0.5 log 2 pi is dropped, as in the authors' code).
  Reduction: mean over all elements (batch, positions, channels). No
  temperature. Minimum over mu, reached at mu = t:
  0.5 * mean_c log(softplus(alpha_c) + eps) — not 0, and it decreases as the
  variance shrinks. `alpha` is a trainable parameter of the method.

  Reference: Ahn et al., "Variational Information Distillation for
  Knowledge Transfer", CVPR 2019.

  Args:
    mean: (..., C) regressed mean, same shape as teacher_feature.
    teacher_feature: (..., C).
    alpha: (C,) pre-softplus variance parameters (channels last).
    eps: variance floor > 0.

  Returns:
    float32 scalar.
  """
  _checks.same_shape("mean", mean, "teacher_feature", teacher_feature)
  c = jnp.shape(teacher_feature)[-1] if jnp.ndim(teacher_feature) else None
  if jnp.shape(alpha) != (c,):
    raise ValueError(f"alpha has shape {jnp.shape(alpha)}; it must be ({c},),"
                     f" one variance parameter per channel of "
                     f"teacher_feature {jnp.shape(teacher_feature)} "
                     f"(channels last).")
  mu = _checks.as_float(mean, "mean")
  t = _checks.as_float(teacher_feature, "teacher_feature")
  var = jax.nn.softplus(_checks.as_float(alpha, "alpha")) + eps
  return jnp.mean(0.5 * ((t - mu) ** 2 / var + jnp.log(var)))


def average_pooled(feature, *, size: int) -> jax.Array:
  """(..., H, W, C) averaged over non-overlapping size x size windows:
  (..., H / size, W / size, C). The teacher view of a term with the term
  key pool=size (its student map is pooled alike)."""
  _spatial("feature", feature)
  *lead, h, w, c = jnp.shape(feature)
  if h % size or w % size:
    raise ValueError(f"pool={size} must divide the feature's spatial size "
                     f"{h}x{w}; choose a divisor or drop pool=.")
  x = _checks.as_float(feature, "feature")
  x = x.reshape(tuple(lead) + (h // size, size, w // size, size, c))
  return jnp.mean(x, axis=(-4, -2))


def _max_pool(x, size):
  """Non-overlapping size x size max pooling of (..., H, W, C)."""
  *lead, h, w, c = x.shape
  x = x.reshape(tuple(lead) + (h // size, size, w // size, size, c))
  return jnp.max(x, axis=(-4, -2))


def _max_pool_ceil(x, kernel):
  """Max pooling of (..., H, W, C) with stride = kernel = (kh, kw), no
  padding, ceil mode (PyTorch `MaxPool2d(..., ceil_mode=True)`): the last
  row/column of windows may be partial and takes the max of what it covers.
  Padding with -inf realises that, since every window starts inside the map.
  """
  *lead, h, w, c = x.shape
  kh, kw = kernel
  oh, ow = -(-h // kh), -(-w // kw)
  pad = [(0, 0)] * len(lead) + [(0, oh * kh - h), (0, ow * kw - w), (0, 0)]
  x = jnp.pad(x, pad, constant_values=-jnp.inf)
  x = x.reshape(tuple(lead) + (oh, kh, ow, kw, c))
  return jnp.max(x, axis=(-4, -2))


PAIRWISE_CONVENTIONS = ("kd_jax", "official")


def check_pairwise_options(*, pool_size=1, scale=None,
                           convention="kd_jax") -> None:
  """Raises a ValueError unless `pairwise_similarity`'s options fit
  together: pool_size (a positive integer) with convention="kd_jax", scale
  with "official". Static options only, so `objective` runs it on a term's
  config before any array exists."""
  _checks.one_of("pairwise_similarity", "convention", convention,
                 PAIRWISE_CONVENTIONS)
  if convention == "kd_jax":
    if scale is not None:
      raise ValueError(f"pairwise_similarity: scale={scale!r} belongs to "
                       "convention='official'; give pool_size for kd_jax's "
                       "square nodes, or set convention='official'.")
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or (
        pool_size < 1):
      raise ValueError(f"pool_size must be a positive integer, got "
                       f"{pool_size!r}.")
  else:
    if pool_size != 1:
      raise ValueError(f"pairwise_similarity: pool_size={pool_size!r} "
                       "belongs to convention='kd_jax'; the official "
                       "convention sizes its nodes by scale=.")
    if scale is None:
      raise ValueError("pairwise_similarity(convention='official') needs "
                       "scale= (node size as a fraction of the map; the "
                       "authors' default is 0.5).")


def pairwise_similarity(student_feature, teacher_feature, *,
                        pool_size: int = 1, scale: Optional[float] = None,
                        convention: str = "kd_jax") -> jax.Array:
  """Pair-wise similarity distillation of Structured KD.

  Formula: the map is max-pooled into nodes; for nodes i, j with feature
  vectors f_i, f_j, a_ij = f_i . f_j / (n_i n_j) and
      loss = (1 / (W'H')^2) sum_ij (a^S_ij - a^T_ij)^2
  over the W'H' nodes, averaged over the batch (and any leading axes).
  Reduction: mean over node pairs and examples. Channels may differ; batch
  and spatial dims must match. No temperature. 0 when the similarity
  matrices are equal. The conventions differ in the nodes and the norm:
    convention="kd_jax" (default): nodes of pool_size x pool_size pixels
      (pool_size must divide H and W); n_i = max(|f_i|, 1e-8), and the
      gradient flows through the exact cosine.
    convention="official" (the authors' `CriterionPairWiseforWholeFeat
      AfterPool` and `sim_dis_compute`): `scale` s in (0, 1] gives the
      kernel (int(s H), int(s W)) — non-square on a non-square map —, with
      stride = kernel and ceil mode (the last windows may be partial, so any
      H, W work); n_i = |f_i| + 1e-8 with the gradient stopped through n_i
      (their `L2(f).detach()`). The authors' default is s = 0.5 (2 x 2
      nodes). When int(s H) = int(s W) = k divides H and W the nodes are
      kd_jax's pool_size = k and the values differ only by the eps; the
      gradients differ (the stopped norms).

  Reference: Liu et al., "Structured Knowledge Distillation for Semantic
  Segmentation", CVPR 2019; github.com/irfanICMLL/structure_knowledge_
  distillation, utils/criterion.py and utils/utils.py.

  Args:
    student_feature: (..., H, W, C_S).
    teacher_feature: (..., H, W, C_T).
    pool_size: kd_jax convention: node size in pixels, an integer dividing H
      and W.
    scale: official convention (required there): node size as a fraction of
      the map.
    convention: "kd_jax" or "official" (see above).

  Returns:
    float32 scalar >= 0.
  """
  check_pairwise_options(pool_size=pool_size, scale=scale,
                         convention=convention)
  _same_spatial(student_feature, teacher_feature)
  options = dict(pool_size=pool_size, scale=scale, convention=convention)
  return pairwise_similarity_from_view(
      student_feature, pair_nodes(teacher_feature, **options), **options)


def pair_nodes(feature, *, pool_size: int = 1, scale: Optional[float] = None,
               convention: str = "kd_jax") -> jax.Array:
  """The teacher view of `pairwise_similarity`: the map's nodes, (..., N,
  C), max-pooled and normalised as that convention does (N = H' W' nodes:
  pool_size² or about (1/scale)² times fewer positions than the map)."""
  _spatial("feature", feature)
  h, w = jnp.shape(feature)[-3:-1]
  if convention == "kd_jax":
    if h % pool_size or w % pool_size:
      raise ValueError(f"pool_size={pool_size} must divide the spatial size "
                       f"{h}x{w}; choose a divisor or resize the features.")
    pool = lambda x: _max_pool(x, pool_size)
    normalize = lambda x: _l2_normalize(x, eps=1e-8)
  else:
    # int() truncates, exactly as the authors' int(total_w * self.scale).
    kernel = (int(h * scale), int(w * scale))
    if min(kernel) < 1 or scale > 1:
      raise ValueError(f"pairwise_similarity: scale={scale!r} on a {h}x{w} "
                       f"map gives a pooling kernel of {kernel}; scale must "
                       f"be in [{1 / min(h, w):.4g}, 1] for this map.")
    pool = lambda x: _max_pool_ceil(x, kernel)
    normalize = lambda x: x / (jax.lax.stop_gradient(
        jnp.linalg.norm(x, axis=-1, keepdims=True)) + 1e-8)
  x = pool(_checks.as_float(feature, "feature"))
  return normalize(x.reshape(x.shape[:-3] + (-1, x.shape[-1])))


def pairwise_similarity_from_view(student_feature, teacher_view, *,
                                  pool_size: int = 1,
                                  scale: Optional[float] = None,
                                  convention: str = "kd_jax") -> jax.Array:
  """`pairwise_similarity` with the teacher given as its view,
  `pair_nodes(teacher_feature, ...)` with the same options."""
  check_pairwise_options(pool_size=pool_size, scale=scale,
                         convention=convention)
  _spatial("student_feature", student_feature)
  s = pair_nodes(student_feature, pool_size=pool_size, scale=scale,
                 convention=convention)
  if s.shape[:-1] != jnp.shape(teacher_view)[:-1]:
    raise ValueError(
        f"student_feature shape {jnp.shape(student_feature)} gives nodes "
        f"{s.shape[:-1]}, the teacher's nodes are "
        f"{jnp.shape(teacher_view)[:-1]}: the two maps must have the same "
        "batch and spatial dims (channels may differ).")
  t = _checks.as_float(teacher_view, "teacher_view")
  sim = lambda x: jnp.einsum("...ic,...jc->...ij", x, x)
  return jnp.mean((sim(s) - sim(t)) ** 2)


def similarity_preserving(student_feature, teacher_feature) -> jax.Array:
  """Similarity-preserving KD: match the batch's similarity matrices.

  Formula, with F the (B, D) flattened features of a batch:
      G = F F^T,  G~ = G with each row divided by max(||row||_2, 1e-12)
      loss = (1 / B^2) || G~_T - G~_S ||_F^2
  Reduction: per batch (mean over the B x B entries). Feature sizes may
  differ between student and teacher. No temperature. 0 when equal.

  Reference: Tung & Mori, "Similarity-Preserving Knowledge Distillation",
  ICCV 2019.

  Returns:
    float32 scalar >= 0.
  """
  s, t = _same_batch(student_feature, teacher_feature, 1)
  g = lambda f: _l2_normalize(f @ f.T)
  return jnp.mean((g(t) - g(s)) ** 2)


def pkt(student_feature, teacher_feature, *, eps: float = 1e-7
        ) -> jax.Array:
  """Probabilistic knowledge transfer with the cosine-similarity kernel.

  Formula, with f_i the L2-normalised flattened features of example i:
      K_ij = (f_i . f_j + 1) / 2,     P_ij = K_ij / sum_j K_ij
      loss = (1 / B^2) sum_ij P^T_ij log((P^T_ij + eps) / (P^S_ij + eps))
  Reduction: per batch (mean over all B x B pairs, the diagonal included,
  as in the authors' code). Feature sizes may differ. No temperature.
  0 when the kernels are equal.

  Reference: Passalis & Tefas, "Learning Deep Representations with
  Probabilistic Knowledge Transfer", ECCV 2018.

  Returns:
    float32 scalar.
  """
  s, t = _same_batch(student_feature, teacher_feature, 1)

  def cond(f):
    f = _l2_normalize(f, eps=eps)
    k = (f @ f.T + 1.0) / 2.0
    return k / jnp.sum(k, axis=1, keepdims=True)

  ps, pt = cond(s), cond(t)
  return jnp.mean(pt * jnp.log((pt + eps) / (ps + eps)))


def _pairwise_distances(x):
  """Euclidean distance matrix with zero (and zero gradient) diagonal."""
  sq = jnp.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def rkd_distance(student_feature, teacher_feature, *, delta: float = 1.0
                 ) -> jax.Array:
  """Relational KD, distance-wise potential.

  Formula, with d_ij = ||x_i - x_j||_2 on the flattened features and
  mu = mean of d_ij over the B(B-1) pairs i != j:
      psi_ij = d_ij / mu
      loss = (1 / B^2) sum_ij huber_delta(psi^S_ij - psi^T_ij)
  huber_1 is the smooth L1 of the paper. Reduction: per batch, mean over
  all B^2 ordered pairs (the diagonal contributes 0), as in the authors'
  code. Feature sizes may differ; B >= 2. No temperature. 0 when equal, and
  invariant to a global scaling of either side.

  Reference: Park et al., "Relational Knowledge Distillation", CVPR 2019.

  Returns:
    float32 scalar >= 0.
  """
  s, t = _same_batch(student_feature, teacher_feature, 2)
  b = s.shape[0]

  def psi(x):
    d = _pairwise_distances(x)
    mu = jnp.sum(d) / (b * (b - 1))
    return d / jnp.maximum(mu, 1e-12)

  return jnp.mean(optax.huber_loss(psi(s), psi(t), delta=delta))


def rkd_angle(student_feature, teacher_feature, *, delta: float = 1.0
              ) -> jax.Array:
  """Relational KD, angle-wise potential.

  Formula, with e_ji = (x_i - x_j) / ||x_i - x_j|| (0 when x_i = x_j):
      psi_ijk = cos of the angle at vertex j = e_ji . e_jk
      loss = (1 / B^3) sum_ijk huber_delta(psi^S_ijk - psi^T_ijk)
  Reduction: per batch, mean over all B^3 triplets (degenerate ones, with a
  repeated index, contribute 0), as in the authors' code. Feature sizes may
  differ; B >= 3. No temperature. 0 when equal.

  Reference: Park et al., "Relational Knowledge Distillation", CVPR 2019.

  Returns:
    float32 scalar >= 0.
  """
  s, t = _same_batch(student_feature, teacher_feature, 3)

  def psi(x):
    e = _l2_normalize(x[None, :, :] - x[:, None, :])  # e[j, i] = e_ji.
    return jnp.einsum("jid,jkd->ijk", e, e)

  return jnp.mean(optax.huber_loss(psi(s), psi(t), delta=delta))


def _pooled(x, name):
  """(B, D) as is; (B, ..., D) averaged over the middle (spatial) axes."""
  _checks.min_ndim(name, x, 2, "(B, D) or (B, ..., D)")
  x = _checks.as_float(x, name)
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x


def mean_pooled(feature) -> jax.Array:
  """The teacher view of `embedding_cosine` and `embedding_l2`: (B, D),
  the feature averaged over its positions or tokens (a (B, D) embedding
  as is)."""
  return _pooled(feature, "feature")


def _same_pooled(student_feature, teacher_view):
  s = _pooled(student_feature, "student_feature")
  if s.shape != jnp.shape(teacher_view):
    raise ValueError(
        f"student_feature shape {jnp.shape(student_feature)} pools to "
        f"{s.shape}, the teacher's pooled embedding is "
        f"{jnp.shape(teacher_view)}: give features of one shape (a "
        "connector projects the student's).")
  return s, _checks.as_float(teacher_view, "teacher_view")


def embedding_cosine(student_feature, teacher_feature) -> jax.Array:
  """Global embedding matching with the cosine distance.

  Formula: 1 - cos(e_S, e_T) per example, where e is the embedding (B, D)
  or, for (B, ..., D) inputs, the mean over the spatial/token axes;
  vectors are divided by max(||e||, 1e-8). Reduction: mean over examples.
  No temperature. 0 when the embeddings are parallel.

  Reference: embedding/feature distillation of foundation encoders (e.g.
  Oquab et al., "DINOv2", 2023, distillation into smaller ViTs).

  Returns:
    float32 scalar in [0, 2].
  """
  s, t = _same(student_feature, teacher_feature)
  return embedding_cosine_from_view(s, mean_pooled(t))


def embedding_cosine_from_view(student_feature, teacher_view) -> jax.Array:
  """`embedding_cosine` with the teacher given as `mean_pooled(teacher)`."""
  s, t = _same_pooled(student_feature, teacher_view)
  cos = jnp.sum(_l2_normalize(s, eps=1e-8) * _l2_normalize(t, eps=1e-8), -1)
  return jnp.mean(1.0 - cos)


def embedding_l2(student_feature, teacher_feature, *,
                 normalize: bool = False) -> jax.Array:
  """Global embedding matching with the squared L2 distance.

  Formula: ||e_S - e_T||_2^2 per example (summed over the D embedding
  dims), e pooled as in `embedding_cosine`; with normalize=True both are
  first L2-normalised (then it equals 2 * embedding_cosine).
  Reduction: mean over examples. No temperature. 0 when equal.

  Reference: global embedding matching of foundation encoders (e.g. the
  L2/cosine feature distillation used to compress DINOv2-style ViTs).

  Returns:
    float32 scalar >= 0.
  """
  s, t = _same(student_feature, teacher_feature)
  return embedding_l2_from_view(s, mean_pooled(t), normalize=normalize)


def embedding_l2_from_view(student_feature, teacher_view, *,
                           normalize: bool = False) -> jax.Array:
  """`embedding_l2` with the teacher given as `mean_pooled(teacher)`."""
  s, t = _same_pooled(student_feature, teacher_view)
  if normalize:
    s, t = _l2_normalize(s, eps=1e-8), _l2_normalize(t, eps=1e-8)
  return jnp.mean(jnp.sum((s - t) ** 2, axis=-1))


def feature_map_cosine(student_feature, teacher_feature) -> jax.Array:
  """Dense feature-map matching with the per-position cosine distance.

  Formula: 1 - cos(f_S,i, f_T,i) at every position i (pixel of an NHWC map
  or token of an NLD sequence), along the channel axis; vectors divided by
  max(||f||, 1e-8). Reduction: mean over examples and positions. (For the
  dense L2 form use `hint_l2`, the mean squared error over elements.) No
  temperature. 0 when the maps are parallel at every position.

  Reference: dense feature-map matching as in FitNets (Romero et al. 2015)
  with a cosine distance per position, common in ViT feature distillation.

  Returns:
    float32 scalar in [0, 2].
  """
  s, t = _same(student_feature, teacher_feature)
  cos = jnp.sum(_l2_normalize(s, eps=1e-8) * _l2_normalize(t, eps=1e-8), -1)
  return jnp.mean(1.0 - cos)
