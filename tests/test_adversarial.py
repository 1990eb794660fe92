"""The adversarial method and the trainer's parameter groups: the gradient
penalty against a numeric gradient, each group's update leaves the other's
parameters alone, exact resume of a two-optimizer run, a toy where the
critic separates two distributions and the generator then closes the
Wasserstein estimate, and the config errors."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import interrupt
from kd_jax import data, losses, methods, train

IMAGE = 64  # The critic needs maps of at least 64×64.


def tiny_config(steps=4):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.compute_dtype = "float32"
  c.layers = "flax"
  c.batch_size = 2
  c.steps = steps
  c.log_every = 2
  c.eval_every = steps
  c.checkpoint_every = 2
  c.optimizer = dict(name="sgd", lr=0.01, weight_decay=5e-4, momentum=0.9,
                     warmup_steps=0, grad_clip=0.0, schedule="poly",
                     power=0.9)
  c.data = dict(name="synthetic", image_size=IMAGE, num_train=6, num_val=2,
                num_test=2, seed=0, augment=False)
  c.teacher_cache = None
  net = dict(name="unet", width=2, depth=2)
  task = dict(ce=dict(fn="cross_entropy"))
  c.stage_order = ("teacher", "skd")
  c.stages = dict(
      teacher=dict(method="supervised", model=dict(net), losses=task,
                   steps=2),
      skd=dict(
          method="adversarial", model=dict(net),
          teacher=dict(model=dict(net), stage="teacher"),
          losses=dict(task, pixel=dict(fn="pixelwise_kd", weight=10.0),
                      holistic=dict(fn="wgan_generator", weight=0.1)),
          critic=dict(model=dict(name="sagan_discriminator", conv_dim=2),
                      gp_weight=10.0, updates=2),
          optimizers=dict(critic=dict(name="adamw", lr=4e-4,
                                      weight_decay=0.0, b2=0.99,
                                      schedule="cosine"))))
  return c


# ----------------------------------------------------------------------------
# Gradient penalty against a numeric gradient.


def test_gradient_penalty_matches_central_differences():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 4))
  real = rng.normal(size=(3, 2, 2)).astype(np.float32)
  fake = rng.normal(size=(3, 2, 2)).astype(np.float32)

  def critic(x):  # A nonlinear score of each example on its own.
    v = x.reshape(x.shape[0], -1)
    return jnp.sum(jnp.tanh(v * w[0]) ** 2, -1) + jnp.sum(v * w[1], -1)

  key = jax.random.key(3)
  gp = float(losses.gradient_penalty(critic, real, fake, key))
  # The interpolation weights the penalty draws from `key`.
  eps = np.asarray(jax.random.uniform(key, (3, 1, 1)), np.float64)
  real, fake = real.astype(np.float64), fake.astype(np.float64)
  x_hat = eps * real + (1 - eps) * fake

  def f(x):  # numpy critic of one example
    v = x.reshape(-1)
    return np.sum(np.tanh(v * w[0]) ** 2) + np.sum(v * w[1])

  h, norms = 1e-5, []
  for b in range(3):
    g = np.zeros(4)
    for j in range(4):
      up, down = x_hat[b].reshape(-1).copy(), x_hat[b].reshape(-1).copy()
      up[j] += h
      down[j] -= h
      g[j] = (f(up) - f(down)) / (2 * h)
    norms.append(np.linalg.norm(g))
  np.testing.assert_allclose(gp, np.mean((np.array(norms) - 1.0) ** 2),
                             rtol=1e-4)


# ----------------------------------------------------------------------------
# The method on a tiny segmentation run.


@pytest.fixture(scope="module")
def skd(tmp_path_factory):
  """The teacher trained, the adversarial method built, its state at init."""
  c = tiny_config()
  workdir = str(tmp_path_factory.mktemp("skd"))
  ds = data.build(c.data)
  train.train_stage(c, "teacher", workdir, ds)
  method, frozen = train.build_method(c, "skd", workdir, ds.num_classes)
  s = train.stage_config(c, "skd")
  batch = next(iter(data.pipeline.train_batches(ds.train, batch_size=2,
                                                seed=0)))
  batch = jax.tree.map(jnp.asarray, batch)
  state = train.init_state(method, train.make_optimizers(method, s),
                           jax.random.key(0), batch["image"][:1])
  return c, ds, workdir, method, frozen, s, batch, state


def _one_update(method, opt, state, frozen, batch):
  return jax.jit(lambda st: method.update(
      opt, st.params, st.batch_stats, st.opt_state, frozen, batch,
      jax.random.key(1)))(state)


@pytest.mark.parametrize("frozen_group", ["student", "critic"])
def test_a_group_update_leaves_the_other_group_alone(skd, frozen_group):
  _, _, _, method, frozen, s, batch, state = skd
  opt = train.make_optimizers(method, s)
  # The group under test keeps a zero update; the other trains as usual.
  opt = methods.ParamGroups(dict(opt.txs, **{frozen_group:
                                             optax.set_to_zero()}), opt.keys)
  state = state.replace(opt_state=opt.init(state.params))
  params, _, _, m = _one_update(method, opt, state, frozen, batch)
  kept = opt.part(state.params, frozen_group)
  moved = opt.part(state.params, "critic" if frozen_group == "student"
                   else "student")
  jax.tree.map(np.testing.assert_array_equal, kept,
               opt.part(params, frozen_group))
  changed = jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), moved,
      opt.part(params, "critic" if frozen_group == "student"
               else "student")))
  assert any(changed)
  for k in ("loss", "grad_norm", "holistic", "critic/loss",
            "critic/gradient_penalty", "critic/wasserstein",
            "critic/grad_norm", "ce", "pixel"):
    assert np.isfinite(float(m[k])), k


def test_optimizer_state_is_one_entry_per_group(skd):
  _, _, _, method, _, s, _, state = skd
  assert set(state.opt_state) == {"student", "critic"}
  assert set(state.params) == {"student", "connectors", "critic"}
  opt = train.make_optimizers(method, s)
  assert opt.keys == {"student": ("student", "connectors"),
                      "critic": ("critic",)}


def test_student_loss_includes_the_weighted_holistic_term(skd):
  _, _, _, method, frozen, _, batch, state = skd
  loss, (_, _, logits, _) = method.student_loss(
      state.params, state.batch_stats, frozen, batch, jax.random.key(1))
  probs = jax.nn.softmax(logits, -1)
  score = method._score(state.params["critic"], state.batch_stats["critic"],
                        batch["image"], probs)
  opt = train.make_optimizers(method, train.stage_config(tiny_config(),
                                                         "skd"))
  _, _, _, m2 = _one_update(method, opt, state, frozen, batch)
  np.testing.assert_allclose(float(m2["holistic"]), -float(np.mean(score)),
                             rtol=1e-5)
  np.testing.assert_allclose(float(m2["loss"]),
                             float(loss) + 0.1 * float(m2["holistic"]),
                             rtol=1e-5)


def test_interrupted_two_optimizer_run_resumes_exactly(skd, tmp_path,
                                                       monkeypatch):
  c, ds, workdir, *_ = skd
  _, reference = train.train_stage(c, "skd", workdir, ds)
  reference = jax.device_get(reference)
  # A second workdir sharing the trained teacher: SIGTERM after step 2.
  other = str(tmp_path)
  os.symlink(os.path.join(workdir, "teacher"), os.path.join(other, "teacher"))
  resumed = interrupt.interrupted_then_resumed(c, "skd", other, ds,
                                               monkeypatch)
  assert int(resumed.step) == c.steps
  jax.tree.map(np.testing.assert_array_equal, reference.params,
               resumed.params)
  jax.tree.map(np.testing.assert_array_equal, reference.opt_state,
               resumed.opt_state)
  jax.tree.map(np.testing.assert_array_equal, reference.batch_stats,
               resumed.batch_stats)
  hist = train.read_history(os.path.join(workdir, "skd"))
  for k in ("train/critic/loss", "train/critic/gradient_penalty",
            "train/critic/wasserstein", "train/holistic"):
    assert np.all(np.isfinite(hist[k][1])), k


def test_the_critic_is_not_exported(skd, tmp_path):
  c, ds, workdir, *_ = skd
  from kd_jax import export
  _, state = train.train_stage(c, "skd", workdir, ds)  # Finished: restored.
  out = export.export(c, workdir, "skd", str(tmp_path / "out"))
  _, variables = export.load(out)
  student = jax.device_get(state.params["student"])
  assert jax.tree.structure(variables["params"]) == jax.tree.structure(
      student)
  jax.tree.map(np.testing.assert_array_equal, variables["params"], student)


# ----------------------------------------------------------------------------
# A toy: the critic separates two distributions, then the generator closes
# the Wasserstein estimate, with the method's pieces (ParamGroups, the
# WGAN-GP losses) and its order (generator step, then critic steps).


def _mlp(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  h = jnp.tanh(h @ params["w2"] + params["b2"])
  return (h @ params["w3"])[:, 0]


def test_critic_separates_then_generator_closes_the_estimate():
  mu = jnp.array([2.0, -1.0])  # Real: N(mu, 0.5² I); fake: N(theta, 0.5² I).
  keys = jax.random.split(jax.random.key(0), 4)
  params = {"generator": {"theta": jnp.zeros(2)},
            "critic": {"w1": jax.random.normal(keys[0], (2, 32)) * 0.5,
                       "b1": jnp.zeros(32),
                       "w2": jax.random.normal(keys[1], (32, 32)) / 32**0.5,
                       "b2": jnp.zeros(32),
                       "w3": jax.random.normal(keys[2], (32, 1)) / 32**0.5}}
  opt = methods.ParamGroups(
      {"generator": optax.adam(0.005, b1=0.5),
       "critic": optax.adam(1e-3, b1=0.5)},
      {"generator": ("generator",), "critic": ("critic",)})
  state = opt.init(params)

  def samples(key, theta):
    kr, kf = jax.random.split(key)
    return (mu + 0.5 * jax.random.normal(kr, (256, 2)),
            theta + 0.5 * jax.random.normal(kf, (256, 2)))

  def critic_step(params, state, key):
    real, fake = samples(key, jax.lax.stop_gradient(
        params["generator"]["theta"]))

    def loss(group):
      w = losses.wgan_critic_loss(_mlp(group["critic"], real),
                                  _mlp(group["critic"], fake))
      gp = losses.gradient_penalty(lambda x: _mlp(group["critic"], x), real,
                                   fake, jax.random.fold_in(key, 1))
      return w + 10.0 * gp, w

    (l, w), g = jax.value_and_grad(loss, has_aux=True)(
        opt.part(params, "critic"))
    params, state = opt.apply("critic", g, state, params, l)
    return params, state, -w

  def generator_step(params, state, key):
    def loss(group):
      _, fake = samples(key, group["generator"]["theta"])
      return losses.wgan_generator_loss(_mlp(params["critic"], fake))

    l, g = jax.value_and_grad(loss)(opt.part(params, "generator"))
    return opt.apply("generator", g, state, params, l)

  @jax.jit
  def critic_only(params, state, key):
    def body(carry, k):
      p, s, _ = carry
      return critic_step(p, s, k), None
    (params, state, w), _ = jax.lax.scan(
        body, (params, state, 0.0), jax.random.split(key, 300))
    return params, state, w

  @jax.jit
  def alternate(params, state, key):
    def body(carry, k):
      p, s, _ = carry
      p, s = generator_step(p, s, k)
      for i in range(5):
        p, s, w = critic_step(p, s, jax.random.fold_in(k, i + 2))
      return (p, s, w), None
    (params, state, w), _ = jax.lax.scan(
        body, (params, state, 0.0), jax.random.split(key, 400))
    return params, state, w

  def estimate(params):  # The critic's estimate on fresh, large samples.
    kr, kf = jax.random.split(jax.random.key(99))
    real = mu + 0.5 * jax.random.normal(kr, (8192, 2))
    fake = params["generator"]["theta"] + 0.5 * jax.random.normal(
        kf, (8192, 2))
    return float(jnp.mean(_mlp(params["critic"], real))
                 - jnp.mean(_mlp(params["critic"], fake)))

  # W1 between two translates of one Gaussian is the distance of the means,
  # and a 1-Lipschitz critic's estimate is at most that.
  true_w = float(jnp.linalg.norm(mu))
  params, state, _ = critic_only(params, state, keys[3])
  np.testing.assert_array_equal(params["generator"]["theta"], np.zeros(2))
  assert 0.6 * true_w < estimate(params) < 1.15 * true_w, (
      estimate(params), true_w)
  params, state, _ = alternate(params, state, jax.random.key(5))
  gap = float(jnp.linalg.norm(params["generator"]["theta"] - mu))
  # From 2.24 apart to within the oscillation GAN dynamics keep.
  assert gap < 0.3 * true_w, gap
  assert abs(estimate(params)) < 0.3 * true_w, estimate(params)


# ----------------------------------------------------------------------------
# Config errors: one line, before the first step.


@pytest.fixture(scope="module")
def small_data():
  return data.build(tiny_config().data)


def _drop(stage, *keys):
  for k in keys:
    del stage[k]
  return stage


@pytest.mark.parametrize("edit, match", [
    (lambda c: _drop(c.stages.skd, "critic", "optimizers").update(
        method="distill"), "set method='adversarial' and critic="),
    (lambda c: _drop(c.stages.skd, "critic"), "needs critic=dict"),
    (lambda c: c.stages.skd.losses.update(holistic=dict(fn="cross_entropy")),
     "exactly one holistic term"),
    (lambda c: c.stages.skd.critic.update(updates=0), "critic.updates=0"),
    (lambda c: c.stages.skd.critic.update(gp_weight=-1.0),
     "critic.gp_weight=-1.0"),
    # The critic's two inputs would differ: caught with the teacher's.
    (lambda c: c.stages.skd.teacher.model.update(num_classes=3),
     "teacher.model builds 3 classes, stage 'teacher' trains 9"),
    (lambda c: c.stages.skd.optimizers.update(discriminator=dict(lr=1e-3)),
     "optimizers.discriminator: method 'adversarial' has the parameter "
     "groups"),
    (lambda c: c.stages.teacher.update(optimizers=dict(x=dict(lr=1.0))),
     "trains one group"),
    (lambda c: c.stages.skd.optimizers.critic.update(schedule="step"),
     "optimizers.critic: optimizer.schedule 'step'"),
])
def test_config_errors_are_one_line_before_training(small_data, tmp_path,
                                                    edit, match):
  c = tiny_config()
  edit(c)
  with pytest.raises(train.ConfigError, match=match) as e:
    train.validate(c, str(tmp_path), small_data)
  assert "\n" not in str(e.value)
  assert os.listdir(tmp_path) == []


def test_poly_schedule_is_the_official_formula():
  cfg = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.01, weight_decay=0.0, momentum=0.0, warmup_steps=0,
      grad_clip=0.0, schedule="poly", power=0.9))
  tx = train.make_optimizer(cfg, 40)
  params = {"w": jnp.zeros(())}
  state = tx.init(params)
  got = []
  for _ in range(40):  # SGD without momentum: the update is -lr_t · grad.
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    got.append(-float(updates["w"]))
  # The official code's lr_poly: base_lr · (1 − iter / max_iter) ** power.
  want = [0.01 * (1 - t / 40) ** 0.9 for t in range(40)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_a_critic_of_maps_of_two_shapes_is_refused_at_init():
  from kd_jax import models
  from kd_jax.methods.adversarial import Adversarial
  unet = lambda k: models.build("unet", width=2, depth=2, num_classes=k)  # noqa: E731
  method = Adversarial(
      unet(9), unet(3), [dict(fn="cross_entropy"),
                         dict(fn="wgan_generator", weight=0.1)],
      heads=None, critic=models.build("sagan_discriminator", conv_dim=2))
  with pytest.raises(ValueError, match=r"the critic scores image \+ class "
                     r"maps of one shape: the student gives \(64, 64, 9\) "
                     r"\(9 classes\), the teacher \(64, 64, 3\)"):
    method.init(jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 1)))
