"""Tests for kd_jax.methods.mutual (Deep Mutual Learning)."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import losses, methods, models, train
from kd_jax.methods import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import default  # noqa: E402

NUM_CLASSES = 3
TEMPERATURE = 2.0
KL_WEIGHT = 0.7
TERMS = [dict(fn="cross_entropy", weight=1.0), dict(fn="dice", weight=0.5),
         dict(fn="kd_kl", weight=KL_WEIGHT, temperature=TEMPERATURE,
              name="kl")]


def _models():
  # Two tiny heterogeneous peers (different widths), no dropout, so the
  # forward does not depend on the rng.
  return (models.build("unet", num_classes=NUM_CLASSES, width=2, depth=2),
          models.build("unet", num_classes=NUM_CLASSES, width=4, depth=2))


@pytest.fixture(scope="module")
def setup():
  student, peer = _models()
  method = methods.build("mutual", model=student, peer=peer, loss_terms=TERMS)
  rng = np.random.RandomState(0)
  images = rng.randn(2, 16, 16, 1).astype(np.float32)
  labels = rng.randint(0, NUM_CLASSES, (2, 16, 16)).astype(np.int32)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  variables = method.init(jax.random.key(0), batch["image"][:1])
  loss_fn = jax.jit(method.loss_fn)
  return method, variables, batch, loss_fn


def _np_kl(teacher_logits, student_logits, t):
  """tau^2 · mean over pixels of KL(softmax(t/tau) || softmax(s/tau))."""
  def log_softmax(z):
    z = z / t
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  lt = log_softmax(np.asarray(teacher_logits, np.float64))
  ls = log_softmax(np.asarray(student_logits, np.float64))
  return t * t * np.mean(np.sum(np.exp(lt) * (lt - ls), -1))


def _train_logits(method, variables, images):
  """Each peer's train-mode logits, computed without the method."""
  z = []
  for key, module in (("student", method.model), ("peer", method.peer)):
    (logits, _), _ = common.apply_train(
        module, variables["params"][key], variables["batch_stats"][key],
        images, jax.random.key(1))
    z.append(logits)
  return z


def test_params_hold_both_peers_and_predict_uses_the_student(setup):
  method, variables, batch, _ = setup
  assert set(variables["params"]) == {"student", "peer"}
  assert method.model_key == "student"
  n_student = sum(x.size for x in jax.tree.leaves(
      variables["params"]["student"]))
  n_peer = sum(x.size for x in jax.tree.leaves(variables["params"]["peer"]))
  assert n_student < n_peer
  want = method.model.apply({"params": variables["params"]["student"],
                             "batch_stats": variables["batch_stats"]
                             ["student"]}, batch["image"], train=False)[0]
  got = method.predict(variables["params"], variables["batch_stats"],
                       batch["image"])
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_loss_is_the_sum_of_both_peer_losses(setup):
  method, variables, batch, loss_fn = setup
  loss, (_, metrics) = loss_fn(variables["params"], variables["batch_stats"],
                               {}, batch, jax.random.key(3))
  z_s, z_p = _train_logits(method, variables, batch["image"])
  y = batch["label"]

  def task(z):
    return losses.cross_entropy(z, y) + 0.5 * losses.dice_loss(z, y)

  kl_s = _np_kl(z_p, z_s, TEMPERATURE)  # KL(p_peer || p_student)
  kl_p = _np_kl(z_s, z_p, TEMPERATURE)  # KL(p_student || p_peer)
  want = (float(task(z_s)) + KL_WEIGHT * kl_s
          + float(task(z_p)) + KL_WEIGHT * kl_p)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["student/kl"]), kl_s, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["peer/kl"]), kl_p, rtol=1e-5)
  assert kl_s > 0 and kl_p > 0 and not np.isclose(kl_s, kl_p)


def test_each_peer_gets_only_its_own_loss_gradient(setup):
  method, variables, batch, _ = setup
  params, stats = variables["params"], variables["batch_stats"]
  grads = jax.grad(lambda p: method.loss_fn(p, stats, {}, batch,
                                            jax.random.key(3))[0])(params)
  for key in ("student", "peer"):
    assert float(optax.global_norm(grads[key])) > 0, key
  y = batch["label"]

  def own_loss(p, key, module, other_logits):
    (z, _), _ = common.apply_train(module, p, stats[key], batch["image"],
                                   jax.random.key(1))
    return (losses.cross_entropy(z, y) + 0.5 * losses.dice_loss(z, y)
            + KL_WEIGHT * losses.kd_kl(z, other_logits,
                                       temperature=TEMPERATURE))

  # The other peer enters each loss as a constant target: the gradient of the
  # mutual loss w.r.t. one peer is that of its own loss alone.
  z_s, z_p = _train_logits(method, variables, batch["image"])
  for key, module, other in (("student", method.model, z_p),
                             ("peer", method.peer, z_s)):
    want = jax.grad(own_loss)(params[key], key, module, other)
    for g, w in zip(jax.tree.leaves(grads[key]), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)


def test_kl_is_zero_for_identical_peers():
  student, _ = _models()
  method = methods.build("mutual", model=student, peer=student,
                         loss_terms=TERMS)
  images = np.random.RandomState(1).randn(2, 16, 16, 1).astype(np.float32)
  labels = np.random.RandomState(2).randint(0, NUM_CLASSES, (2, 16, 16))
  v = method.init(jax.random.key(0), images[:1])
  params = {"student": v["params"]["student"],
            "peer": v["params"]["student"]}
  stats = {"student": v["batch_stats"]["student"],
           "peer": v["batch_stats"]["student"]}
  loss, (_, m) = method.loss_fn(params, stats, {},
                                {"image": images, "label": labels},
                                jax.random.key(0))
  assert abs(float(m["student/kl"])) < 1e-6
  assert abs(float(m["peer/kl"])) < 1e-6
  np.testing.assert_allclose(float(loss), 2 * float(m["student/total"]),
                             rtol=1e-6)


def test_jit_matches_eager(setup):
  method, variables, batch, loss_fn = setup
  args = (variables["params"], variables["batch_stats"], {}, batch,
          jax.random.key(5))
  jitted, (stats_j, m_j) = loss_fn(*args)
  eager, (stats_e, m_e) = method.loss_fn(*args)
  np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-5)
  for k in m_e:
    np.testing.assert_allclose(float(m_j[k]), float(m_e[k]), rtol=1e-5,
                               atol=1e-7)
  for a, b in zip(jax.tree.leaves(stats_j), jax.tree.leaves(stats_e)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dml_term_is_applied_once_to_the_pair(setup):
  method, variables, batch, _ = setup
  terms = [dict(fn="cross_entropy"), dict(fn="dml", weight=KL_WEIGHT,
                                          temperature=TEMPERATURE)]
  dml = methods.build("mutual", model=method.model, peer=method.peer,
                      loss_terms=terms)
  loss, (_, m) = dml.loss_fn(variables["params"], variables["batch_stats"],
                             {}, batch, jax.random.key(3))
  z_s, z_p = _train_logits(method, variables, batch["image"])
  y = batch["label"]
  sym = _np_kl(z_p, z_s, TEMPERATURE) + _np_kl(z_s, z_p, TEMPERATURE)
  want = (float(losses.cross_entropy(z_s, y))
          + float(losses.cross_entropy(z_p, y)) + KL_WEIGHT * sym)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(m["pair/dml"]), sym, rtol=1e-5)


def test_a_few_train_steps_reduce_the_loss(setup):
  method, variables, batch, _ = setup
  tx = optax.adam(1e-2)
  state = train.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(variables["params"]),
      rng=jax.random.key_data(jax.random.key(0)))
  step = jax.jit(train.make_train_step(method, tx))
  first = None
  for _ in range(12):
    state, m = step(state, batch, {})
    first = float(m["loss"]) if first is None else first
  assert float(m["loss"]) < 0.8 * first
  assert np.isfinite(float(m["peer/kl"]))


@pytest.mark.parametrize("terms,match", [
    ([dict(fn="cross_entropy"), dict(fn="hint_l1", student="enc1",
                                     teacher="enc1")], "features loss"),
    ([dict(fn="cross_entropy"), dict(fn="dice")], "couples the peers"),
    ([dict(fn="kd_kl")], "needs task terms"),
])
def test_bad_loss_terms_are_refused(terms, match):
  student, peer = _models()
  with pytest.raises(ValueError, match=match):
    methods.build("mutual", model=student, peer=peer, loss_terms=terms)


def test_peers_with_different_class_counts_are_refused():
  student = models.build("unet", num_classes=3, width=2, depth=2)
  peer = models.build("unet", num_classes=4, width=2, depth=2)
  method = methods.build("mutual", model=student, peer=peer, loss_terms=TERMS)
  with pytest.raises(ValueError, match="same num_classes"):
    method.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))


def _mutual_config(peer):
  c = default.get_config()
  c.data.image_size = 16
  c.data.num_train = c.data.num_val = c.data.num_test = 4
  c.stage_order = ("dml",)
  kw = {} if peer is None else {"peer": peer}
  c.stages.dml = dict(method="mutual", model=dict(name="unet", width=2,
                                                  depth=2),
                      losses=dict(ce=dict(fn="cross_entropy"),
                                  kl=dict(fn="kd_kl")), **kw)
  return c


@pytest.mark.parametrize("peer,match", [
    (None, "needs peer=dict"),
    (dict(width=2), "needs peer=dict"),
    (dict(name="no_such_model"), "peer .*unknown model"),
    (dict(name="unet", nope=3), "peer"),
])
def test_config_errors_name_the_peer(peer, match, tmp_path):
  from kd_jax import data
  c = _mutual_config(peer)
  with pytest.raises(train.ConfigError, match=f"stage 'dml': .*{match}"):
    train.validate(c, str(tmp_path), data.build(c.data))


def test_peer_on_another_method_is_refused(tmp_path):
  from kd_jax import data
  c = default.get_config()
  c.data.image_size = 16
  c.data.num_train = c.data.num_val = c.data.num_test = 4
  c.stage_order = ("teacher",)
  c.stages.teacher.peer = dict(name="unet")
  with pytest.raises(train.ConfigError, match="'peer' is read by method "
                     "'mutual' only"):
    train.validate(c, str(tmp_path), data.build(c.data))


def test_mutual_stage_builds_from_config(tmp_path):
  from kd_jax import data
  c = _mutual_config(dict(name="unet", width=4, depth=2))
  train.validate(c, str(tmp_path), data.build(c.data))
  method, frozen = train.build_method(c, "dml", str(tmp_path), 9)
  assert isinstance(method, methods.Mutual) and frozen == {}
  assert method.peer.width == 4 and method.model.width == 2


def test_from_config_builds_both_peers_through_the_context():
  built = []

  def build_model(cfg):
    built.append(dict(cfg))
    cfg = dict(cfg)
    return models.build(cfg.pop("name"), num_classes=NUM_CLASSES, **cfg)

  stage = dict(method="mutual", model=dict(name="unet", width=2, depth=2),
               peer=dict(name="unet", width=4, depth=2), losses=TERMS)
  method, frozen = methods.from_config(
      stage, methods.Context(build_model=build_model, stage="dml"))
  assert isinstance(method, methods.Mutual) and frozen == {}
  assert built == [stage["model"], stage["peer"]]
  assert (method.model.width, method.peer.width) == (2, 4)
  assert methods.stage_keys("mutual") - methods.COMMON_STAGE_KEYS == {"peer"}
  with pytest.raises(ValueError, match="needs peer=dict"):
    methods.check(dict(stage, peer=None), methods.Context(build_model))
