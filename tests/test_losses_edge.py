"""Edge cases and loss-specific properties of kd_jax.losses.

Errors must be clear ValueErrors, never NaN: bad hyperparameter values when
an objective is built, bad options, shapes and dtypes when a loss is traced,
two-class DKD; masks that leave nothing valid give 0, eagerly and in jit. Also
the documented semantics that a golden value alone does not pin down (Dice's
skipped classes, DML's stop-gradients, ensemble probability averaging), and
the adversarial and MED-TEX pieces.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses as L

RNG = np.random.RandomState(42)
S = RNG.randn(4, 5).astype(np.float32)
T = RNG.randn(4, 5).astype(np.float32)
Y = np.array([0, 2, 4, 1], np.int32)
SD = RNG.randn(2, 2, 2, 5).astype(np.float32)
TD = RNG.randn(2, 2, 2, 5).astype(np.float32)
YD = RNG.randint(0, 5, (2, 2, 2)).astype(np.int32)


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# --------------------------------------------------------------------------
# Values: checked once when an objective is built, never by the losses.

TEMPERATURE_LOSSES = ["kd_kl", "soft_cross_entropy", "dkd", "dist", "cwd",
                      "cwd_features", "dml", "ensemble_kd"]


def test_every_loss_with_a_temperature_is_checked():
  takes = sorted(n for n, spec in L.REGISTRY.items() if spec.kind != "custom"
                 and "temperature" in inspect.signature(spec.fn).parameters)
  assert takes == sorted(TEMPERATURE_LOSSES)


@pytest.mark.parametrize("name", TEMPERATURE_LOSSES)
@pytest.mark.parametrize("tau", [0, 0.0, -1.0, float("nan")])
def test_non_positive_temperature_fails_when_the_objective_is_built(name,
                                                                     tau):
  with pytest.raises(ValueError,
                     match=f"{name}\\): temperature must be a number > 0"):
    L.objective([dict(fn=name, temperature=tau)])
  L.objective([dict(fn=name, temperature=0.5)])  # A positive one builds.


@pytest.mark.parametrize("term,match", [
    (dict(fn="focal", gamma=-1.0), "gamma must be a number >= 0"),
    (dict(fn="dice", smooth=-1.0), "smooth must be a number >= 0"),
    (dict(fn="attention_transfer", p=0.0), "p must be a number > 0"),
    (dict(fn="attention_transfer", eps=0), "eps must be a number > 0"),
    (dict(fn="vid", eps=0.0), "eps must be a number > 0"),
    (dict(fn="rkd_angle", delta=-2.0), "delta must be a number > 0"),
    (dict(fn="kd_kl", reduction="sum"),
     "reduction must be one of 'mean', 'batchmean'"),
    (dict(fn="attention_transfer", form="torchdistill"),
     "form must be one of 'code', 'paper'"),
    (dict(fn="dice", average="none"), "average must be one of"),
    (dict(fn="dice", squared_denominator="yes"),
     "squared_denominator must be True or False"),
    (dict(fn="kd_kl", scale_by_tau_squared=1), "must be True or False"),
    (dict(fn="dkd", alpha="1"), "alpha must be a number"),
    (dict(fn="pairwise_similarity", pool_size=None),
     "pool_size must be a number"),
])
def test_bad_hyperparameter_values_fail_when_the_objective_is_built(term,
                                                                    match):
  with pytest.raises(ValueError, match=match):
    L.objective([term])


@pytest.mark.parametrize("call,match", [
    (lambda: L.kd_kl(S, T, reduction="sum"), "kd_kl: reduction"),
    (lambda: L.attention_transfer(SD, TD, form="norm"),
     "attention_transfer: form"),
    (lambda: L.dice_loss(S, Y, average=True), "dice_loss: average"),
    (lambda: L.dice_loss(S[:, :1], np.zeros(4, np.int32),
                         include_background=False), "at least 2 classes"),
    (lambda: L.dice_loss(S[0], Y[0], batch=False), r"\(B, \.\.\., C\)"),
])
def test_options_are_checked_statically_by_the_losses(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_losses_are_plain_functions_with_no_jit_of_their_own():
  """No decorator (no per-call signature binding, host checks or inner
  jit): tracing a loss inlines its operations instead of calling a jitted
  copy of it. (jax.nn's own helpers may still appear as nested jits.)"""
  for name, spec in L.REGISTRY.items():
    assert inspect.isfunction(spec.fn), name
    assert not hasattr(spec.fn, "__wrapped__"), name
  for fn, args in ((L.kd_kl, (S, T)), (L.cross_entropy, (S, Y)),
                   (L.attention_transfer, (SD, TD))):
    eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
    names = {str(e.params.get("name")) for e in eqns}
    assert fn.__name__ not in names, fn.__name__
    assert any(e.primitive.name not in ("pjit", "jit") for e in eqns)


def test_traced_temperature_is_allowed():
  fn = jax.jit(lambda tau: L.kd_kl(S, T, temperature=tau))
  np.testing.assert_allclose(fn(2.0), L.kd_kl(S, T, temperature=2.0),
                             rtol=1e-6)


def test_attention_transfer_paper_form_has_a_zero_gradient_at_its_minimum():
  """The L2 norm of a zero difference: value 0, gradient 0 rather than NaN."""
  value, grad = jax.value_and_grad(functools.partial(
      L.attention_transfer, form="paper"))(SD, SD)
  assert value == 0.0 and np.all(grad == 0.0)


# --------------------------------------------------------------------------
# Masks that leave nothing valid: 0 with zero gradient, eagerly and in jit.

NONE_VALID = np.zeros(YD.shape, bool)
ALL_IGNORED = np.full(YD.shape, 255, np.int32)
EMPTY_MASK_CALLS = {  # (logits, mask, all-ignored labels) -> loss
    "cross_entropy/ignore_index": lambda s, m, y: L.cross_entropy(
        s, y, ignore_index=255),
    "cross_entropy/mask": lambda s, m, y: L.cross_entropy(s, YD, mask=m),
    "cross_entropy/weights": lambda s, m, y: L.cross_entropy(
        s, YD, class_weights=np.ones(5, np.float32), mask=m),
    "dice": lambda s, m, y: L.dice_loss(s, y, ignore_index=255),
    "dice/all_per_example": lambda s, m, y: L.dice_loss(
        s, YD, average="all", batch=False, mask=m),
    "focal": lambda s, m, y: L.focal_loss(s, YD, mask=m),
    "kd_kl": lambda s, m, y: L.kd_kl(s, TD, mask=m),
    "kd_kl/batchmean": lambda s, m, y: L.kd_kl(s, TD, reduction="batchmean",
                                               mask=m),
    "pixelwise_kd": lambda s, m, y: L.pixelwise_kd(s, TD, mask=m),
    "soft_cross_entropy": lambda s, m, y: L.soft_cross_entropy(
        s, TD, mask=m),
    "dkd/mask": lambda s, m, y: L.dkd(s, TD, YD, mask=m),
    "dkd/ignore_index": lambda s, m, y: L.dkd(s, TD, y, ignore_index=255),
    "dist": lambda s, m, y: L.dist(s, TD, mask=m),
    "dml": lambda s, m, y: L.dml(s, TD, mask=m),
    "ensemble_kd": lambda s, m, y: L.ensemble_kd(s, TD[None], mask=m),
    "ensemble_l2/example_mask": lambda s, m, y: L.ensemble_l2(
        s, TD[None], mask=m[:, 0, 0]),
}


def test_all_ignored_mask_gives_zero_eagerly():
  """Nothing looks at the mask's values on the host: an empty batch is not
  an error but contributes nothing (and no NaN). Gradients: under jit below
  (op-by-op differentiation of every loss would dominate this file)."""
  for name, call in sorted(EMPTY_MASK_CALLS.items()):
    value = call(SD, NONE_VALID, ALL_IGNORED)
    assert value == 0.0 and value.dtype == jnp.float32, name


def test_all_ignored_mask_gives_zero_and_zero_grad_under_jit():
  """The same inside jit, where the mask and labels are traced. (All losses
  in one jitted function: one compilation.)"""
  names = sorted(EMPTY_MASK_CALLS)

  @jax.jit
  def values_and_grads(s, m, y):
    return [jax.value_and_grad(EMPTY_MASK_CALLS[n])(s, m, y) for n in names]

  for name, (value, grad) in zip(names, values_and_grads(SD, NONE_VALID,
                                                         ALL_IGNORED)):
    assert value == 0.0 and value.dtype == jnp.float32, name
    assert np.all(grad == 0.0), name


def test_partly_ignored_labels_with_mask_and_ignore_index_together():
  labels = YD.copy()
  labels[0] = 255
  mask = np.array([True, False])  # Drops example 1: nothing valid remains.
  assert L.cross_entropy(SD, labels, ignore_index=255, mask=mask) == 0.0
  mask = np.array([False, True])
  np.testing.assert_allclose(
      L.cross_entropy(SD, labels, ignore_index=255, mask=mask),
      L.cross_entropy(SD[1:], YD[1:]), rtol=1e-6)


# --------------------------------------------------------------------------
# Argument and shape errors.

def test_two_class_dkd_raises():
  with pytest.raises(ValueError, match="at least 3 classes.*kd_kl"):
    L.dkd(S[:, :2], T[:, :2], np.zeros(4, np.int32))


@pytest.mark.parametrize("call,match", [
    (lambda: L.cross_entropy(S, Y.astype(np.float32)), "integer"),
    (lambda: L.cross_entropy(S, Y[:3]), r"labels must have shape"),
    (lambda: L.dice_loss(SD, YD[..., 0]), r"labels must have shape"),
    (lambda: L.dkd(S, T, Y[:2]), r"labels must have shape"),
    (lambda: L.cross_entropy(S, Y, class_weights=np.ones(3)),
     "class_weights"),
    (lambda: L.kd_kl(SD, TD, mask=np.ones((2, 3), bool)), "prefix"),
    (lambda: L.cross_entropy(SD, YD, mask=np.ones((1,), bool)), "prefix"),
    (lambda: L.pixelwise_kd(S, T), r"\(\.\.\., H, W, C\)"),
    (lambda: L.cwd(S, T), r"\(\.\.\., H, W, C\)"),
    (lambda: L.ensemble_kd(S, T), r"stack \(E"),
    (lambda: L.pairwise_similarity(SD, TD, pool_size=3), "divide"),
    (lambda: L.pairwise_similarity(SD, TD, pool_size=0), "positive"),
    (lambda: L.rkd_distance(S[:1], T[:1]), "at least 2"),
    (lambda: L.rkd_angle(S[:2], T[:2]), "at least 3"),
    (lambda: L.attention_transfer(SD, TD[:, :1]), "spatial"),
    (lambda: L.vid(SD, TD, np.zeros(4, np.float32)), "alpha"),
    (lambda: L.gradient_penalty(lambda x: x, SD, TD[:1],
                                jax.random.key(0)), "shape"),
    (lambda: L.medtex_objective(S, T, (SD, TD, np.zeros(5))), "triples"),
])
def test_argument_errors_are_clear(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# --------------------------------------------------------------------------
# Semantics.

def test_dice_skips_classes_absent_from_ground_truth_and_prediction():
  # 4 classes; labels and confident predictions only use classes 0 and 1.
  labels = np.array([0, 0, 1, 1], np.int32)
  logits = np.full((4, 4), -8.0, np.float32)
  logits[[0, 1], 0] = 8.0
  logits[[2, 3], 1] = 8.0
  p = np_softmax(logits.astype(np.float64))
  dice = [2 * p[labels == c, c].sum() / (p[:, c].sum() + 2) for c in (0, 1)]
  np.testing.assert_allclose(L.dice_loss(logits, labels, smooth=0.0),
                             1 - np.mean(dice), rtol=1e-5, atol=1e-6)
  assert L.dice_loss(logits, labels) < 1e-3  # Near-perfect: near 0.
  # Class 2 predicted at one pixel but absent from the labels: it now counts
  # with a Dice near 0, so the loss jumps to about 1/3.
  logits[3] = [-8, -8, 8, -8]
  assert abs(float(L.dice_loss(logits, labels)) - (1 - (1 + 2 / 3) / 3)) < 1e-2


def test_focal_with_gamma_zero_is_cross_entropy():
  np.testing.assert_allclose(L.focal_loss(SD, YD, gamma=0.0),
                             L.cross_entropy(SD, YD), rtol=1e-6)


def test_unit_class_weights_give_plain_cross_entropy():
  np.testing.assert_allclose(
      L.cross_entropy(SD, YD, class_weights=np.ones(5, np.float32)),
      L.cross_entropy(SD, YD), rtol=1e-6)


def test_dml_gradients_stop_at_each_target():
  tau = 2.0
  g1, g2 = jax.jit(jax.grad(functools.partial(L.dml, temperature=tau),
                            argnums=(0, 1)))(S, T)
  p1, p2 = np_softmax(S / tau), np_softmax(T / tau)
  # d/dz1 tau^2 KL(sg(p2) || softmax(z1/tau)) = tau (p1 - p2), mean over B.
  np.testing.assert_allclose(g1, tau * (p1 - p2) / len(S), atol=1e-6)
  np.testing.assert_allclose(g2, tau * (p2 - p1) / len(S), atol=1e-6)


def test_kd_kl_does_not_stop_the_teacher_gradient():
  g = jax.jit(jax.grad(L.kd_kl, argnums=1))(S, T)
  assert np.any(g != 0)


def test_ensemble_averages_probabilities_not_logits():
  teachers = np.stack([T, -T, 3 * T])
  pbar = np.mean([np_softmax(t.astype(np.float64)) for t in teachers], 0)
  ps = np_softmax(S.astype(np.float64))
  want = np.mean(np.sum(pbar * np.log(pbar / ps), -1))
  np.testing.assert_allclose(L.ensemble_kd(S, teachers), want, rtol=1e-5)
  logit_avg = L.kd_kl(S, teachers.mean(0))
  assert abs(float(logit_avg) - want) > 1e-2
  np.testing.assert_allclose(L.ensemble_kd(S, T[None], temperature=3.0),
                             L.kd_kl(S, T, temperature=3.0), rtol=1e-6)


def test_dkd_tckd_alone_is_binary_kd_and_stable_for_confident_logits():
  only_tckd = L.dkd(S, T, Y, alpha=1.0, beta=0.0, temperature=1.0)
  ps, pt = np_softmax(S), np_softmax(T)
  bs = np.stack([ps[range(4), Y], 1 - ps[range(4), Y]], -1)
  bt = np.stack([pt[range(4), Y], 1 - pt[range(4), Y]], -1)
  np.testing.assert_allclose(
      only_tckd, np.mean(np.sum(bt * np.log(bt / bs), -1)), rtol=1e-5)
  confident = np.where(np.eye(5)[Y] > 0, 60.0, -60.0).astype(np.float32)
  value, grad = jax.jit(jax.value_and_grad(L.dkd))(confident, T, Y)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_rkd_distance_is_scale_invariant():
  np.testing.assert_allclose(L.rkd_distance(10 * S, T), L.rkd_distance(S, T),
                             rtol=1e-5)


def test_relation_losses_have_finite_gradients_on_zero_and_repeated_rows():
  zero = np.zeros((4, 5), np.float32)  # All-zero features (after ReLU).
  repeated = np.stack([S[0], S[0], S[1], S[2]])
  fns = (L.similarity_preserving, L.pkt, L.rkd_distance, L.rkd_angle,
         L.embedding_cosine, L.embedding_l2, L.feature_map_cosine)

  @jax.jit
  def grads(x):  # One compilation for all of them.
    return [jax.grad(fn)(x, T) for fn in fns]

  for x in (zero, repeated):
    for fn, g in zip(fns, grads(x)):
      assert np.all(np.isfinite(g)), fn.__name__


# --------------------------------------------------------------------------
# Adversarial pieces and MED-TEX.

def test_gradient_penalty_golden_values():
  real, fake = SD, TD
  w = RNG.randn(2, 2, 5).astype(np.float32)
  linear = lambda x: jnp.sum(x * w, axis=(1, 2, 3))  # grad = w everywhere.
  gp = jax.jit(L.gradient_penalty, static_argnums=0)
  np.testing.assert_allclose(
      gp(linear, real, fake, jax.random.key(0)),
      (np.linalg.norm(w.astype(np.float64)) - 1) ** 2, rtol=1e-5)
  # Quadratic critic: grad = x_hat, so the interpolation weights matter.
  key = jax.random.key(3)
  eps = np.asarray(jax.random.uniform(key, (2, 1, 1, 1)), np.float64)
  x_hat = eps * real + (1 - eps) * fake
  want = np.mean((np.linalg.norm(x_hat.reshape(2, -1), axis=1) - 1) ** 2)
  quad = lambda x: 0.5 * jnp.sum(x**2, axis=(1, 2, 3))
  np.testing.assert_allclose(gp(quad, real, fake, key), want, rtol=1e-5)


def test_gradient_penalty_jit_grad_and_constant_critic():
  w0 = RNG.randn(2, 2, 5).astype(np.float32)

  def gp(w, key):  # Critic (sum w.x)^2: input gradient 2 (sum w.x) w.
    return L.gradient_penalty(lambda x: jnp.sum(x * w, axis=(1, 2, 3)) ** 2,
                              SD, TD, key)

  key = jax.random.key(1)
  value, grad = jax.jit(jax.value_and_grad(gp))(w0, key)
  eps = np.asarray(jax.random.uniform(key, (2, 1, 1, 1)), np.float64)
  x_hat = eps * SD + (1 - eps) * TD
  norms = 2 * np.abs(np.sum(x_hat * w0, axis=(1, 2, 3))) * np.linalg.norm(w0)
  np.testing.assert_allclose(value, np.mean((norms - 1) ** 2), rtol=1e-5)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  # A constant critic has zero input gradient: gp = target^2, finite grads.
  const = lambda w: L.gradient_penalty(lambda x: 0 * jnp.sum(x * w), SD, TD,
                                       jax.random.key(0))
  value, grad = jax.jit(jax.value_and_grad(const))(w0)
  assert value == 1.0 and np.all(np.isfinite(grad))


def test_wgan_losses_signs():
  real, fake = np.array([2.0, 4.0]), np.array([1.0, 1.0])
  assert L.wgan_critic_loss(real, fake) == -2.0  # Critic separates: < 0.
  assert L.wgan_generator_loss(fake) == -1.0


def test_medtex_objective_golden_and_jit():
  alpha = RNG.randn(5).astype(np.float32)
  mu2, t2 = RNG.randn(2, 3, 5).astype(np.float32), RNG.randn(2, 3, 5).astype(
      np.float32)
  terms = [(SD, TD, alpha), (mu2, t2, -alpha)]
  total, parts = L.medtex_objective(S, T, terms, lam=0.3, temperature=2.0)
  pt, ps = np_softmax(T / 2.0), np_softmax(S / 2.0)
  # The paper's soft CE: no tau^2 factor, unlike soft_cross_entropy.
  soft_ce = np.mean(-np.sum(pt * np.log(ps), -1))

  def nll(mu, t, a):
    var = np.log1p(np.exp(a.astype(np.float64))) + 1e-5
    return np.mean(0.5 * ((t - mu) ** 2 / var + np.log(var)))

  vid = nll(SD, TD, alpha) + nll(mu2, t2, -alpha)
  np.testing.assert_allclose(parts["soft_ce"], soft_ce, rtol=1e-5)
  np.testing.assert_allclose(parts["vid"], vid, rtol=1e-5)
  np.testing.assert_allclose(total, soft_ce + 0.3 * vid, rtol=1e-5)
  assert parts["total"] is total
  fn = jax.jit(lambda s: L.medtex_objective(s, T, terms, lam=0.3,
                                            temperature=2.0))
  g, aux = jax.grad(fn, has_aux=True)(S)
  np.testing.assert_allclose(aux["total"], total, rtol=1e-6)
  assert np.all(np.isfinite(g))
  # One weight per layer; and the tau^2 of soft_cross_entropy divided out.
  total2, _ = L.medtex_objective(S, T, terms, lam=[0.3, 2.0],
                                 temperature=2.0)
  np.testing.assert_allclose(
      total2, soft_ce + 0.3 * nll(SD, TD, alpha) + 2.0 * nll(mu2, t2, -alpha),
      rtol=1e-5)
  np.testing.assert_allclose(
      parts["soft_ce"] * 4.0,
      L.soft_cross_entropy(S, T, temperature=2.0), rtol=1e-5)
  with pytest.raises(ValueError, match="one per term"):
    L.medtex_objective(S, T, terms, lam=[0.3])


def test_dist_gradient_is_finite_with_one_valid_instance():
  mask = np.zeros(SD.shape[:-1], bool)
  mask[0, 0, 0] = True  # One instance: every class column is constant.
  grad = jax.jit(jax.grad(L.dist))(SD, TD, mask=mask)
  assert np.all(np.isfinite(grad))
