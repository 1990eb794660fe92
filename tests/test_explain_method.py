"""Method 'explain' (MED-TEX): the explainer's mask, the objective against
KD's soft CE + VID computed independently when Θ ≡ 1, where the gradient
flows, a tiny end-to-end run on real PNGs with exact resume and the
deployed explainer + student, and the config errors."""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

import interrupt
from kd_jax import data, methods, models, train
from kd_jax.methods.explain import Explain

SIZE = 16
TEACHER = dict(name="medtex_teacher", widths=(4, 4, 4, 4), num_classes=2)
STUDENT = dict(name="medtex_student", widths=(2, 3, 3, 4), num_classes=2)
EXPLAINER = dict(name="medtex_explainer", width=2, depth=2)


def _terms(temperature=1.0, lam=0.01):
  return [dict(fn="soft_cross_entropy", temperature=temperature,
               name="soft_ce"),
          dict(fn="vid", weight=lam, student="block2", teacher="block2",
               name="vid2")]


class OnesExplainer(nn.Module):
  """Θ ≡ 1 (a parameter so that the explainer group is not empty)."""

  @nn.compact
  def __call__(self, x, *, train):
    w = self.param("w", nn.initializers.zeros, ())
    return jnp.ones(x.shape[:3] + (1,), jnp.float32) + 0.0 * w, {}


def _build(name, **kw):
  cfg = dict(name, **kw)
  return models.build(cfg.pop("name"), **cfg)


@pytest.fixture(scope="module")
def pieces():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(0, 1, (4, SIZE, SIZE, 3)), jnp.float32)
  batch = {"image": images, "label": jnp.asarray([0, 1, 1, 0], jnp.int32)}
  teacher = _build(TEACHER)
  frozen = teacher.init(jax.random.key(5), images, train=False)
  # BatchNorm statistics away from their init, so eval mode is not identity.
  frozen = {"params": frozen["params"], "batch_stats": jax.tree.map(
      lambda x: x + 0.1, frozen["batch_stats"])}
  return images, batch, teacher, frozen


def _method(explainer, terms, teacher):
  return Explain(model=_build(STUDENT), teacher=teacher, loss_terms=terms,
                 explainer=explainer)


def test_the_explainer_mask_is_in_0_1_with_the_image_shape(pieces):
  images, *_ = pieces
  x = 20.0 * (images - 0.5)  # Large inputs push the sigmoid to its ends.
  for per_channel, ch in ((False, 1), (True, 3)):
    e = _build(EXPLAINER, per_channel=per_channel)
    v = e.init(jax.random.key(0), x, train=False)
    mask, feats = e.apply(v, x, train=False)
    assert mask.shape == (4, SIZE, SIZE, ch)
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    np.testing.assert_allclose(mask, jax.nn.sigmoid(feats["mask_logits"]))


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def test_with_an_all_ones_mask_the_loss_is_soft_ce_plus_vid_on_x(pieces):
  images, batch, teacher, frozen = pieces
  tau, lam = 2.0, 0.3
  method = _method(OnesExplainer(), _terms(tau, lam), teacher)
  v = method.init(jax.random.key(1), images)
  params, stats = v["params"], v["batch_stats"]
  loss, (_, metrics) = method.loss_fn(params, stats, frozen, batch,
                                      jax.random.key(2))
  # Independently: the student (train mode) and the teacher (eval) on X,
  # the connector on the student's block2, then numpy formulas.
  (s_logits, s_feats), _ = method.model.apply(
      {"params": params["student"], "batch_stats": stats["student"]}, images,
      train=True, mutable=["batch_stats"])
  t_logits, t_feats = teacher.apply(frozen, images, train=False)
  conn = dict(params["connectors"]["vid2"])
  alpha = np.asarray(conn.pop("vid_alpha"), np.float64)
  mean, _ = method.connectors["vid2"][0].apply(
      {"params": conn, "batch_stats": stats["connectors"]["vid2"]},
      s_feats["block2"], train=True, mutable=["batch_stats"])
  pt = _np_softmax(np.asarray(t_logits, np.float64) / tau)
  ps = _np_softmax(np.asarray(s_logits, np.float64) / tau)
  soft_ce = np.mean(-np.sum(pt * np.log(ps), -1))  # No tau^2: the paper's.
  var = np.log1p(np.exp(alpha)) + 1e-5
  t2 = np.asarray(t_feats["block2"], np.float64)
  vid = np.mean(0.5 * ((t2 - np.asarray(mean, np.float64)) ** 2 / var
                       + np.log(var)))
  np.testing.assert_allclose(float(metrics["soft_ce"]), soft_ce, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["vid"]), vid, rtol=1e-5)
  np.testing.assert_allclose(float(loss), soft_ce + lam * vid, rtol=1e-5)
  assert float(metrics["mask_mean"]) == 1.0
  # At tau = 1 it is method 'distill''s objective with the same terms on X.
  method = _method(OnesExplainer(), _terms(1.0, lam), teacher)
  v = method.init(jax.random.key(1), images)
  kd = methods.Distill(model=method.model, teacher=teacher,
                       loss_terms=_terms(1.0, lam))
  kd.init(jax.random.key(1), images)
  loss, _ = method.loss_fn(v["params"], v["batch_stats"], frozen, batch,
                           jax.random.key(2))
  kd_loss, _ = kd.loss_fn(
      {k: v["params"][k] for k in ("student", "connectors")},
      {k: v["batch_stats"][k] for k in ("student", "connectors")}, frozen,
      batch, jax.random.key(2))
  np.testing.assert_allclose(float(loss), float(kd_loss), rtol=1e-6)


@pytest.fixture(scope="module")
def grads(pieces):
  """d loss / d (params, frozen) of the real explainer, jitted once."""
  images, batch, teacher, frozen = pieces
  method = _method(_build(EXPLAINER), _terms(), teacher)
  v = method.init(jax.random.key(1), images)

  @jax.jit
  def fn(params, frozen, batch):
    return jax.grad(lambda p, f: method.loss_fn(
        p, v["batch_stats"], f, batch, jax.random.key(2))[0],
                    argnums=(0, 1))(params, frozen)

  return method, v, fn


def _norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2)
                            for x in jax.tree.leaves(tree))))


def test_gradients_reach_the_explainer_through_the_student_only(pieces,
                                                                 grads):
  images, batch, _, frozen = pieces
  _, v, fn = grads
  g_params, g_frozen = fn(v["params"], frozen, batch)
  assert _norm(g_params["explainer"]) > 0
  assert _norm(g_params["student"]) > 0
  assert _norm(g_frozen) == 0.0  # The teacher is frozen.
  # On X = 0, X' = Θ ⊙ X = 0 whatever Θ: no other path reaches E.
  g_zero, _ = fn(v["params"], frozen, dict(batch, image=0 * images))
  assert _norm(g_zero["explainer"]) == 0.0


def test_the_deployed_pair_is_the_student_on_the_masked_image(pieces, grads):
  images, *_ = pieces
  method, v, _ = grads
  p, s = v["params"], v["batch_stats"]
  logits, mask = method.explain(p, s, images)
  m, _ = method.explainer.apply({"params": p["explainer"],
                                 "batch_stats": s["explainer"]}, images,
                                train=False)
  out, _ = method.model.apply({"params": p["student"],
                               "batch_stats": s["student"]}, m * images,
                              train=False)
  np.testing.assert_allclose(mask, m, rtol=1e-6)
  np.testing.assert_allclose(logits, out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(method.predict(p, s, images), out, rtol=1e-5,
                             atol=1e-6)


def test_eval_images_put_theta_under_the_images(pieces, grads):
  images, *_ = pieces
  method, v, _ = grads
  p, s = v["params"], v["batch_stats"]
  x = np.asarray(images) * 1.4 - 0.2  # Values outside [0, 1] clip.
  eager = method.eval_images(p, s, x)["theta"]
  # What the trainer logs: the same function, jitted once.
  state = train.TrainState(step=0, params=p, batch_stats=s, opt_state=None,
                           rng=None)
  source = [{"image": image} for image in x]  # (A val split's examples.)
  logged = train.make_images_step(method, train.make_mesh(), source)(state)
  assert set(logged) == {"theta"} and isinstance(logged["theta"], np.ndarray)
  mask = np.asarray(method.explain(p, s, x)[1]).mean(-1)
  for grid in (np.asarray(eager), logged["theta"]):
    assert grid.shape == (1, 2 * SIZE, 4 * SIZE, 3)
    for i in range(4):
      cols = slice(i * SIZE, (i + 1) * SIZE)
      np.testing.assert_allclose(grid[0, :SIZE, cols], np.clip(x[i], 0, 1),
                                 rtol=1e-6)
      for c in range(3):
        np.testing.assert_allclose(grid[0, SIZE:, cols, c], mask[i],
                                   rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# A tiny run on real PNGs: a supervised teacher, then MED-TEX.


def _write_folder(root):
  """12 PNGs, 16×16 RGB noise; class 1 has a bright square."""
  rng = np.random.default_rng(0)
  root.mkdir(parents=True, exist_ok=True)
  lines = ["image,label"]
  for i in range(12):
    img = rng.integers(0, 120, (SIZE, SIZE, 3), dtype=np.uint8)
    if i % 2:
      img[4:10, 5:11] = 250
    Image.fromarray(img, "RGB").save(root / f"{i:02d}.png")
    lines.append(f"{i:02d}.png,{i % 2}")
  (root / "list.csv").write_text("\n".join(lines) + "\n")
  return str(root / "list.csv")


def tiny_config(csv, steps=4):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.compute_dtype = "float32"
  c.layers = "flax"
  c.batch_size = 2
  c.steps = steps
  c.log_every = 2
  c.eval_every = steps
  c.checkpoint_every = 2
  c.optimizer = dict(name="adamw", lr=1e-3, weight_decay=0.0,
                     warmup_steps=0, grad_clip=0.0)
  c.data = dict(name="folder", csv=csv, image_size=SIZE, val_fraction=0.34)
  c.teacher_cache = None
  c.stage_order = ("teacher", "medtex")
  c.stages = dict(
      teacher=dict(method="supervised", model=dict(TEACHER),
                   losses=dict(ce=dict(fn="cross_entropy")), steps=2),
      medtex=dict(
          method="explain", model=dict(STUDENT),
          explainer=dict(model=dict(EXPLAINER)),
          teacher=dict(model=dict(TEACHER), stage="teacher"),
          losses=dict(soft_ce=dict(fn="soft_cross_entropy"),
                      vid2=dict(fn="vid", weight=0.01, student="block2",
                                teacher="block2"),
                      vid4=dict(fn="vid", weight=0.01, student="block4",
                                teacher="block4")),
          optimizers=dict(explainer=dict(lr=3e-3))))
  return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  c = tiny_config(_write_folder(tmp_path_factory.mktemp("pngs")))
  return c, data.build(c.data)


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(folder, tmp_path_factory, tmp_path,
                                         monkeypatch):
  c, ds = folder
  workdir = str(tmp_path_factory.mktemp("medtex"))
  train.validate(c, workdir, ds)
  train.train_stage(c, "teacher", workdir, ds)
  method, reference = train.train_stage(c, "medtex", workdir, ds)
  reference = jax.device_get(reference)
  assert set(reference.params) == {"explainer", "student", "connectors"}
  assert set(reference.opt_state) == {"explainer", "student"}
  assert train.make_optimizers(method, train.stage_config(
      c, "medtex")).keys == Explain.param_groups
  hist = train.read_history(os.path.join(workdir, "medtex"))
  for k in ("soft_ce", "vid", "mask_mean", "total", "loss"):
    assert np.all(np.isfinite(hist[f"train/{k}"][1])), k
  assert 0 < hist["train/mask_mean"][1][-1] < 1
  other = str(tmp_path)
  os.symlink(os.path.join(workdir, "teacher"), os.path.join(other, "teacher"))
  resumed = interrupt.interrupted_then_resumed(c, "medtex", other, ds,
                                               monkeypatch)
  assert int(resumed.step) == c.steps
  for part in ("params", "opt_state", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, getattr(reference, part),
                 getattr(resumed, part))


def _drop(stage, *keys):
  for k in keys:
    del stage[k]
  return stage


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.stages.medtex.losses.vid2.update(student="nope"),
     "loss term 'vid2': the student has no feature 'nope'; it offers"),
    (lambda c: c.stages.medtex.losses.vid4.update(teacher="enc9"),
     "loss term 'vid4': the teacher has no feature 'enc9'"),
    (lambda c: setattr(c.stages.medtex.explainer, "model",
                       ml_collections.ConfigDict(STUDENT)),
     r"explainer.model gives a mask of shape \(1, 2\) for images"),
    (lambda c: _drop(c.stages.medtex, "explainer"),
     "needs explainer=dict\\(model=dict"),
    (lambda c: c.stages.medtex.explainer.update(width=3),
     "explainer.width: unknown key"),
    (lambda c: c.stages.medtex.explainer.model.update(name="nope"),
     "explainer.model: "),
    (lambda c: c.stages.medtex.losses.update(ce=dict(fn="cross_entropy")),
     "loss term 'ce' \\(cross_entropy\\): method 'explain' trains on"),
    (lambda c: c.stages.medtex.losses.soft_ce.update(weight=0.5),
     "leave it at 1 and set the vid terms' weight"),
    (lambda c: c.stages.medtex.losses.vid2.update(connector="none"),
     "connector='conv1x1'"),
    (lambda c: _drop(c.stages.medtex.losses, "soft_ce"),
     "exactly one soft_cross_entropy term"),
    (lambda c: c.stages.medtex.update(teachers=[dict(TEACHER)]),
     "'teachers' is read by method 'distill'"),
    (lambda c: c.stages.medtex.optimizers.update(critic=dict(lr=1e-3)),
     "optimizers.critic: method 'explain' has the parameter groups"),
])
def test_config_errors_are_one_line_before_training(folder, tmp_path, edit,
                                                    match):
  c, ds = folder
  c = tiny_config(c.data.csv)
  edit(c)
  with pytest.raises(train.ConfigError, match=match) as e:
    train.validate(c, str(tmp_path), ds)
  assert "\n" not in str(e.value)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_a_data_fraction_outside_0_1_is_refused(folder, fraction):
  c, _ = folder
  with pytest.raises(ValueError, match="train_fraction") as e:
    data.build(dict(c.data, train_fraction=fraction))
  assert "\n" not in str(e.value)


def test_med_ex_is_the_stage_without_vid_terms(folder, tmp_path):
  c, ds = folder
  c = tiny_config(c.data.csv)
  _drop(c.stages.medtex.losses, "vid2", "vid4")
  train.validate(c, str(tmp_path), ds)
  method, _ = train.build_method(c, "medtex", str(tmp_path), ds.num_classes,
                                 load_teacher=False)
  v = jax.eval_shape(functools.partial(method.init, jax.random.key(0)),
                     jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))
  assert v["params"]["connectors"] == {}
  assert method.feature_terms == [] and method.vid_weights == []


# ----------------------------------------------------------------------------
# MED-TEX's read-outs: post-hoc fidelity and the top-K overlap with lesions.


@pytest.mark.parametrize("seed", [0, 1])
def test_post_hoc_fidelity_against_numpy(seed):
  from kd_jax.evaluate import metrics
  rng = np.random.default_rng(seed)
  teacher = rng.integers(0, 2, 50)
  student = np.where(rng.uniform(size=50) < 0.8, teacher, 1 - teacher)
  tp = np.sum((student == 1) & (teacher == 1))
  fp = np.sum((student == 1) & (teacher == 0))
  fn = np.sum((student == 0) & (teacher == 1))
  tn = np.sum((student == 0) & (teacher == 0))
  f1_pos, f1_neg = 2 * tp / (2 * tp + fp + fn), 2 * tn / (2 * tn + fn + fp)
  got = metrics.fidelity(student, teacher, 2)
  assert got["fidelity_accuracy"] == pytest.approx((tp + tn) / 50)
  assert got["fidelity_f1_positive"] == pytest.approx(f1_pos)
  assert got["fidelity_f1"] == pytest.approx((f1_pos + f1_neg) / 2)
  assert "fidelity_f1_positive" not in metrics.fidelity(student, teacher, 3)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_topk_overlap_both_forms_against_numpy(k):
  from kd_jax.evaluate import explain
  rng = np.random.default_rng(k)
  maps = rng.uniform(size=(3, 96, 96))  # Continuous: no ties at the K-th.
  lesions = rng.uniform(size=(3, 96, 96)) < 0.2
  lesions[2] = False  # An image without lesions.
  n = k * 32 * 32
  jac, dice = [], []
  for s, b in zip(maps, lesions):
    a = s >= np.sort(s.ravel())[-n]  # The n largest values.
    assert a.sum() == n
    inter = np.sum(a & b)
    jac.append(inter / np.sum(a | b))
    dice.append(2 * inter / (a.sum() + b.sum()))
  j = explain.topk_iou(maps, lesions, k=k)
  d = explain.topk_iou(maps, lesions, k=k, form="dice")
  np.testing.assert_allclose(j, jac, rtol=1e-12)
  np.testing.assert_allclose(d, dice, rtol=1e-12)
  np.testing.assert_allclose(d, 2 * j / (1 + j), rtol=1e-12)
  assert d[2] == j[2] == 0.0
  with pytest.raises(ValueError, match="form='iou'"):
    explain.topk_iou(maps, lesions, form="iou")
