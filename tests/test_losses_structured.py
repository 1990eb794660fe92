"""Structured KD's two conventions: kd_jax's and the authors' code.

The references below re-derive, in numpy and in the authors' NCHW layout,
what `CriterionPixelWise`, `CriterionPairWiseforWholeFeatAfterPool` and
`sim_dis_compute` of github.com/irfanICMLL/structure_knowledge_distillation
compute (utils/criterion.py, utils/utils.py), so the tests can fail if the
JAX forms drift from either convention.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses as L

RNG = np.random.RandomState(21)

# (B, H, W): square, non-square, and sizes no pooling kernel divides.
SHAPES = [(2, 8, 8), (2, 6, 10), (3, 9, 7)]
DTYPES = [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-3)]


def as_input(x, dtype):
  """The array the loss sees, and the float64 values it holds (bfloat16
  rounds them; the authors' code upcasts with `.float()` too)."""
  a = jnp.asarray(x, dtype)
  return a, np.asarray(a.astype(jnp.float32), np.float64)


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# --------------------------------------------------------------------------
# Pixel-wise.


def official_pixelwise(s, t, mask=None):
  """CriterionPixelWise: sum over every pixel of the batch of the soft CE,
  divided by W*H of the NCHW map (its `N, C, W, H = shape`)."""
  s, t = s.transpose(0, 3, 1, 2), t.transpose(0, 3, 1, 2)  # To NCHW.
  n, c, w, h = s.shape
  flat_t = t.transpose(0, 2, 3, 1).reshape(-1, c)
  flat_s = s.transpose(0, 2, 3, 1).reshape(-1, c)
  ce = -np.sum(np.exp(np_log_softmax(flat_t)) * np_log_softmax(flat_s), 1)
  if mask is not None:
    ce = ce * mask.reshape(-1)
  return ce.sum() / w / h


def kd_jax_pixelwise(s, t, mask=None):
  """Per-pixel KL(q_T || q_S), mean over the (valid) pixels."""
  lt, ls = np_log_softmax(t), np_log_softmax(s)
  kl = np.sum(np.exp(lt) * (lt - ls), -1)
  m = np.ones(kl.shape) if mask is None else mask.astype(np.float64)
  return np.sum(kl * m) / m.sum()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_pixelwise_both_conventions_match_numpy(shape, dtype, rtol, masked):
  s, s64 = as_input(RNG.randn(*shape, 5) * 2, dtype)
  t, t64 = as_input(RNG.randn(*shape, 5) * 2, dtype)
  mask = RNG.rand(*shape) > 0.3 if masked else None
  got_off = L.pixelwise_kd(s, t, convention="official", mask=mask)
  got_ours = L.pixelwise_kd(s, t, mask=mask)
  assert got_off.dtype == got_ours.dtype == jnp.float32
  np.testing.assert_allclose(got_off, official_pixelwise(s64, t64, mask),
                             rtol=rtol)
  np.testing.assert_allclose(got_ours, kd_jax_pixelwise(s64, t64, mask),
                             rtol=rtol, atol=1e-6)


def test_official_pixelwise_is_batch_times_kl_plus_teacher_entropy():
  b, h, w = 3, 5, 4
  s = RNG.randn(b, h, w, 6).astype(np.float32)
  t = RNG.randn(b, h, w, 6).astype(np.float32)
  lt = np_log_softmax(t.astype(np.float64))
  entropy = -np.mean(np.sum(np.exp(lt) * lt, -1))
  np.testing.assert_allclose(
      L.pixelwise_kd(s, t, convention="official"),
      b * (float(L.pixelwise_kd(s, t)) + entropy), rtol=1e-5)
  # Equal logits: kd_jax's term vanishes, the official one keeps the
  # teacher's entropy.
  assert float(L.pixelwise_kd(t, t)) == pytest.approx(0.0, abs=1e-6)
  np.testing.assert_allclose(L.pixelwise_kd(t, t, convention="official"),
                             b * entropy, rtol=1e-5)


def test_pixelwise_conventions_share_the_student_gradient_up_to_batch():
  b = 2
  s = RNG.randn(b, 4, 6, 3).astype(np.float32)
  t = RNG.randn(b, 4, 6, 3).astype(np.float32)
  g_off = jax.grad(lambda x: L.pixelwise_kd(x, t, convention="official"))(s)
  g_ours = jax.grad(lambda x: L.pixelwise_kd(x, t))(s)
  np.testing.assert_allclose(g_off, b * g_ours, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------
# Pair-wise.


def official_pairwise(fs, ft, scale):
  """CriterionPairWiseforWholeFeatAfterPool + sim_dis_compute, on NCHW.

  Kernel (int(H*scale), int(W*scale)), stride = kernel, ceil mode: a window
  that runs past the edge takes the max of the pixels it covers."""
  def pool(f):
    _, _, h, w = f.shape
    kh, kw = int(h * scale), int(w * scale)
    oh, ow = math.ceil(h / kh), math.ceil(w / kw)
    out = np.empty(f.shape[:2] + (oh, ow))
    for i in range(oh):
      for j in range(ow):
        out[:, :, i, j] = f[:, :, i * kh:(i + 1) * kh,
                            j * kw:(j + 1) * kw].max(axis=(2, 3))
    return out

  def similarity(f):
    norm = np.sqrt((f ** 2).sum(1, keepdims=True)) + 1e-8
    f = (f / norm).reshape(f.shape[0], f.shape[1], -1)
    return np.einsum("icm,icn->imn", f, f)

  ps = pool(fs.transpose(0, 3, 1, 2))
  pt = pool(ft.transpose(0, 3, 1, 2))
  err = (similarity(pt) - similarity(ps)) ** 2
  return np.sum(err / (pt.shape[-1] * pt.shape[-2]) ** 2 / pt.shape[0])


def kd_jax_pairwise(fs, ft, k):
  """k x k max-pool nodes, cosine with max(|f|, 1e-8), mean over pairs."""
  def sim(f):
    b, h, w, c = f.shape
    nodes = f.reshape(b, h // k, k, w // k, k, c).max(axis=(2, 4))
    v = nodes.reshape(b, -1, c)
    v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)
    return np.einsum("bic,bjc->bij", v, v)
  return np.mean((sim(fs) - sim(ft)) ** 2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.5, 0.3, 0.75])
@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_official_pairwise_matches_numpy(shape, scale, dtype, rtol):
  fs, fs64 = as_input(RNG.randn(*shape, 4), dtype)
  ft, ft64 = as_input(RNG.randn(*shape, 6), dtype)  # Channels may differ.
  got = L.pairwise_similarity(fs, ft, scale=scale, convention="official")
  assert got.dtype == jnp.float32
  want = official_pairwise(fs64, ft64, scale)
  assert want > 1e-3  # The two sides differ: a vanishing loss proves nothing.
  np.testing.assert_allclose(got, want, rtol=rtol)


@pytest.mark.parametrize("shape,k", [((2, 8, 8), 2), ((2, 6, 10), 2),
                                     ((3, 9, 6), 3)])
@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_kd_jax_pairwise_matches_numpy(shape, k, dtype, rtol):
  fs, fs64 = as_input(RNG.randn(*shape, 4), dtype)
  ft, ft64 = as_input(RNG.randn(*shape, 6), dtype)
  np.testing.assert_allclose(L.pairwise_similarity(fs, ft, pool_size=k),
                             kd_jax_pairwise(fs64, ft64, k), rtol=rtol)


def test_official_kernel_is_non_square_on_a_non_square_map():
  # 6 x 10 at s = 0.5: kernel (3, 5), so 2 x 2 nodes of 3 x 5 pixels;
  # kd_jax's square nodes of 2 x 2 pixels are another graph.
  fs = RNG.randn(2, 6, 10, 4).astype(np.float32)
  ft = RNG.randn(2, 6, 10, 4).astype(np.float32)

  def cosines(f):
    nodes = np.stack([f[:, r:r + 3, q:q + 5].max((1, 2))
                      for r in (0, 3) for q in (0, 5)], 1)
    nodes = nodes / np.linalg.norm(nodes, axis=-1, keepdims=True)
    return np.einsum("bic,bjc->bij", nodes, nodes)

  got = float(L.pairwise_similarity(fs, ft, scale=0.5,
                                    convention="official"))
  np.testing.assert_allclose(got, np.mean((cosines(fs) - cosines(ft)) ** 2),
                             rtol=1e-5)
  assert abs(got - float(L.pairwise_similarity(fs, ft, pool_size=2))) > 1e-3


def test_conventions_agree_in_value_where_the_nodes_agree():
  # 8 x 8 at s = 0.25: kernel 2 = pool_size 2; only the eps differs.
  fs = RNG.randn(2, 8, 8, 3).astype(np.float32)
  ft = RNG.randn(2, 8, 8, 5).astype(np.float32)
  np.testing.assert_allclose(
      L.pairwise_similarity(fs, ft, scale=0.25, convention="official"),
      L.pairwise_similarity(fs, ft, pool_size=2), rtol=1e-5)


def test_official_pairwise_gradient_stops_at_the_norms():
  # Kernel 1 (s = 1/4 of 4 pixels): the nodes are the pixels. With the norms
  # n held constant, g = f / n, A = g g^T and L = sum (A_S - A_T)^2 / (M^2 B),
  # so dL/df_S = 4 (A_S - A_T) g_S / (M^2 B n_S).
  b, h, w = 2, 4, 4
  fs = RNG.randn(b, h, w, 3)
  ft = RNG.randn(b, h, w, 5)

  def unit(f):
    f = f.reshape(b, h * w, -1)
    n = np.sqrt((f ** 2).sum(-1, keepdims=True)) + 1e-8
    return f / n, n

  gs, ns = unit(fs)
  gt, _ = unit(ft)
  diff = gs @ gs.transpose(0, 2, 1) - gt @ gt.transpose(0, 2, 1)
  m = h * w
  want = (4 * diff @ gs / (m * m * b) / ns).reshape(fs.shape)
  grad = lambda **kw: jax.grad(lambda x: L.pairwise_similarity(
      x, jnp.asarray(ft, jnp.float32), **kw))(jnp.asarray(fs, jnp.float32))
  np.testing.assert_allclose(grad(scale=0.25, convention="official"), want,
                             rtol=1e-4, atol=1e-7)
  # kd_jax differentiates the exact cosine: another gradient.
  assert np.abs(np.asarray(grad(pool_size=1)) - want).max() > 1e-4


# --------------------------------------------------------------------------
# Reachable from a config term, and checked there.


def test_objective_passes_the_conventions_through():
  s = RNG.randn(2, 5, 6, 4).astype(np.float32)
  t = RNG.randn(2, 5, 6, 4).astype(np.float32)
  fs = RNG.randn(2, 5, 6, 3).astype(np.float32)
  ft = RNG.randn(2, 5, 6, 7).astype(np.float32)
  fn = L.objective([
      dict(fn="pixelwise_kd", weight=10.0, convention="official"),
      dict(fn="pairwise_similarity", convention="official", scale=0.5,
           student="layer4", teacher="layer4", connector="none", name="pair"),
  ])
  total, metrics = fn(dict(logits=s, teacher_logits=t,
                           features={"pair": (fs, ft)}))
  pixel = official_pixelwise(s.astype(np.float64), t.astype(np.float64))
  pair = official_pairwise(fs.astype(np.float64), ft.astype(np.float64), 0.5)
  np.testing.assert_allclose(metrics["pixelwise_kd"], pixel, rtol=1e-5)
  np.testing.assert_allclose(metrics["pair"], pair, rtol=1e-5)
  np.testing.assert_allclose(total, 10 * pixel + pair, rtol=1e-5)


@pytest.mark.parametrize("term,match", [
    (dict(fn="pixelwise_kd", convention="paper"),
     r"convention must be one of 'kd_jax', 'official'"),
    (dict(fn="pairwise_similarity", convention="torch"),
     r"convention must be one of 'kd_jax', 'official'"),
    (dict(fn="pairwise_similarity", convention="official"), "needs scale="),
    (dict(fn="pairwise_similarity", scale=0.5),
     "scale=0.5 belongs to convention='official'"),
    (dict(fn="pairwise_similarity", convention="official", scale=0.5,
          pool_size=2), "pool_size=2 belongs to convention='kd_jax'"),
    (dict(fn="pairwise_similarity", convention="official", scale=0.0),
     r"scale must be a number in \(0, 1\]"),
    (dict(fn="pairwise_similarity", convention="official", scale=1.5),
     r"scale must be a number in \(0, 1\]"),
])
def test_bad_convention_settings_fail_when_the_objective_is_built(term,
                                                                  match):
  with pytest.raises(ValueError, match=match):
    L.objective([term])


def test_a_scale_too_small_for_the_map_is_refused_when_traced():
  f = np.zeros((1, 4, 6, 2), np.float32)
  with pytest.raises(ValueError, match=r"kernel of \(0, 1\).*\[0.25, 1\]"):
    L.pairwise_similarity(f, f, scale=0.2, convention="official")
