"""Heads beyond segmentation: per-head loss terms, masks, ensembles, scores,
reports and the errors that stop a bad multi-head config."""
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kd_jax import data, losses, methods, tasks, train
from kd_jax.evaluate import metrics as metrics_lib


class TwoHeads(nn.Module):
  """A tiny CNN with a grade head (5 classes) and a fovea head (u, v): one
  shared convolution, then a branch per head (so that neither head's
  learning waits on the other's in a short test)."""
  width: int = 8

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    x = (x - 0.5) * 4.0  # Roughly unit scale, for fast learning.
    x = nn.relu(nn.Conv(self.width, (3, 3), strides=2)(x))
    branches = []
    for _ in range(2):
      y = x
      for i in (1, 2):
        y = nn.relu(nn.Conv(self.width * 2**i, (3, 3), strides=2)(y))
      branches.append(y)
    pooled = branches[0].mean((1, 2))
    flat = branches[1].reshape(x.shape[0], -1)
    return {"dr_grade": nn.Dense(5, name="dr_grade")(pooled),
            "fovea": nn.Dense(2, name="fovea")(flat)}, {"embedding": pooled}


FUNDUS = dict(name="synthetic_fundus", image_size=32, num_train=256,
              num_val=64, num_test=64, augment=False)


@pytest.fixture(scope="module")
def fundus():
  ds = data.build(FUNDUS)
  heads = tasks.from_config(dict(dr_grade={}, fovea={}), ds.targets)
  return ds, heads


def _batch(ds, n, start=0):
  ex = [ds.train[i] for i in range(start, start + n)]
  return {k: jnp.asarray(np.stack([e[k] for e in ex])) for k in ex[0]}


def test_heads_take_kind_and_classes_from_the_data(fundus):
  _, heads = fundus
  assert heads["dr_grade"] == tasks.Head("dr_grade", "dr_grade",
                                         "classification", 5,
                                         data.synthetic.DR_GRADES, True)
  assert heads["fovea"].kind == "landmark"
  single = tasks.from_config(None, data.build(dict(
      name="synthetic", image_size=16, num_train=2, num_val=2,
      num_test=2)).targets)
  assert list(single) == [None] and single[None].kind == "segmentation"
  assert single[None].key("mean_dice") == "mean_dice"
  assert heads["fovea"].key("mean_error_px") == "fovea/mean_error_px"


def test_a_two_head_model_learns_both_heads(fundus):
  ds, heads = fundus
  method = methods.Supervised(
      TwoHeads(), [dict(fn="cross_entropy", head="dr_grade"),
                   dict(fn="mse", head="fovea", weight=30.0)], heads)
  tx = optax.adam(3e-3)
  state = train.init_state(method, tx, jax.random.key(0),
                           jnp.zeros((1, 32, 32, 3)))
  step = jax.jit(train.make_train_step(method, tx))
  batches = data.pipeline.train_batches(ds.train, batch_size=32, seed=0)
  for s in range(800):
    state, _ = step(state, {k: jnp.asarray(v) for k, v in
                            batches[s].items()}, {})
  mesh = train.make_mesh()
  scores = train.evaluate(train.make_eval_step(method, heads, mesh), state,
                          ds.val, 16, mesh, heads)
  labels = np.array([ds.val[i]["dr_grade"] for i in range(len(ds.val))])
  majority = np.bincount(labels).max() / len(labels)
  truth = np.stack([ds.val[i]["fovea"] for i in range(len(ds.val))])
  # Predicting the mean fovea position for every image.
  constant = metrics_lib.landmark_scores(
      np.broadcast_to(truth.mean(0), truth.shape), truth,
      np.full((len(truth), 2), 32.0))["mean_error_px"]
  assert scores["dr_grade/accuracy"] > majority + 0.15
  assert scores["dr_grade/kappa"] > 0.5
  assert scores["fovea/mean_error_px"] < 0.6 * constant
  assert set(tasks.headline(heads, scores)) == {
      "dr_grade/accuracy", "dr_grade/macro_f1", "dr_grade/auc",
      "dr_grade/kappa", "fovea/mean_error_px", "fovea/median_error_px"}


def test_eval_scores_equal_numpy_on_the_gathered_outputs(fundus):
  ds, heads = fundus
  method = methods.Supervised(TwoHeads(), [dict(fn="cross_entropy",
                                                head="dr_grade")], heads)
  tx = optax.sgd(0.0)
  state = train.init_state(method, tx, jax.random.key(1),
                           jnp.zeros((1, 32, 32, 3)))
  mesh = train.make_mesh()
  # 64 examples in batches of 24: the last batch is padded.
  scores = train.evaluate(train.make_eval_step(method, heads, mesh), state,
                          ds.val, 24, mesh, heads)
  images = np.stack([ds.val[i]["image"] for i in range(64)])
  out = method.predict(state.params, state.batch_stats, images)
  grade = np.array([ds.val[i]["dr_grade"] for i in range(64)])
  fovea = np.stack([ds.val[i]["fovea"] for i in range(64)])
  want = metrics_lib.classification_scores(np.asarray(out["dr_grade"]), grade,
                                           5)
  for k in ("accuracy", "macro_f1", "auc", "kappa"):
    np.testing.assert_allclose(scores[f"dr_grade/{k}"], want[k], rtol=1e-5)
  err = np.hypot(*((np.asarray(out["fovea"]) - fovea) * 32).T)
  np.testing.assert_allclose(scores["fovea/mean_error_px"], err.mean(),
                             rtol=1e-4)


def test_task_terms_are_exactly_zero_on_unlabelled_examples(fundus):
  ds, heads = fundus
  batch = _batch(ds, 6)
  # Garbage labels on the unlabelled rows: they must not matter.
  labelled = jnp.array([True, False, True, False, False, True])
  batch["dr_grade"] = jnp.where(labelled, batch["dr_grade"], 4)
  batch["fovea"] = jnp.where(labelled[:, None], batch["fovea"], 1e3)
  batch["labelled"] = labelled
  terms = [dict(fn="cross_entropy", head="dr_grade"),
           dict(fn="mse", head="fovea"),
           dict(fn="kd_kl", head="dr_grade", temperature=2.0)]
  fn = losses.objective(terms)
  teacher = {"dr_grade": jax.random.normal(jax.random.key(2), (6, 5)),
             "fovea": jnp.zeros((6, 2))}

  def loss(out, name):
    inputs = tasks.objective_inputs(heads, out, batch)
    inputs["teacher_logits"] = teacher
    return fn(inputs)[1][name]

  out = {"dr_grade": jax.random.normal(jax.random.key(3), (6, 5)),
         "fovea": jax.random.uniform(jax.random.key(4), (6, 2))}
  for name in ("cross_entropy", "mse"):
    g = jax.grad(loss)(out, name)
    rows = np.asarray(jnp.abs(g[name == "mse" and "fovea" or "dr_grade"]))
    assert (rows[~np.asarray(labelled)] == 0).all()
    assert (rows[np.asarray(labelled)].sum(-1) > 0).all()
  # The KD term reads no label: every example counts.
  g = jax.grad(loss)(out, "kd_kl")["dr_grade"]
  assert (np.abs(np.asarray(g)).sum(-1) > 0).all()
  # Value: the unlabelled rows changed nothing.
  kept = {k: v[np.asarray(labelled)] for k, v in batch.items()}
  del kept["labelled"]
  ce = losses.cross_entropy(out["dr_grade"][np.asarray(labelled)],
                            kept["dr_grade"])
  np.testing.assert_allclose(loss(out, "cross_entropy"), ce, rtol=1e-6)


def test_an_ensemble_of_identical_members_equals_one_teacher(fundus):
  ds, heads = fundus
  teacher, student = TwoHeads(width=8), TwoHeads(width=4)
  images = _batch(ds, 4)["image"]
  t_vars = teacher.init(jax.random.key(5), images, train=False)
  frozen = {"params": t_vars["params"], "batch_stats": {}}
  batch = _batch(ds, 4)

  def total(method, frozen):
    variables = method.init(jax.random.key(6), images)
    return method.loss_fn(variables["params"], variables["batch_stats"],
                          frozen, batch, jax.random.key(7))[1][1]

  one = methods.Distill(student, teacher, [
      dict(fn="kd_kl", head="dr_grade", temperature=3.0, name="kd"),
      dict(fn="mse", head="fovea", name="xy")], heads)
  many = methods.Distill(student, [teacher] * 3, [
      dict(fn="ensemble_kd", head="dr_grade", temperature=3.0, name="kd"),
      dict(fn="ensemble_l2", head="fovea", name="xy")], heads)
  m_one, m_many = total(one, frozen), total(many, [frozen] * 3)
  np.testing.assert_allclose(m_many["kd"], m_one["kd"], rtol=1e-5)
  # mse on labels vs ensemble_l2 on the teachers' mean: both mean squared
  # errors, so with the labels set to the teacher's output they agree.
  t_out = teacher.apply(t_vars, images, train=False)[0]
  batch["fovea"] = t_out["fovea"]
  np.testing.assert_allclose(total(many, [frozen] * 3)["xy"],
                             total(one, frozen)["xy"], rtol=1e-5)


def _fundus_config(**stage):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.compute_dtype = "float32"
  c.layers = "flax"
  c.batch_size = 8
  c.steps = 2
  c.log_every = 1
  c.eval_every = 2
  c.checkpoint_every = 2
  c.optimizer = dict(name="adamw", lr=1e-3, weight_decay=0.0, momentum=0.9,
                     warmup_steps=1, grad_clip=0.0)
  c.data = dict(FUNDUS, num_train=16, num_val=8, num_test=8)
  c.heads = dict(dr_grade={}, dme_risk={}, fovea={}, optic_disc={})
  model = dict(name="multitask_resnet18", width=0.125, dropout=0.0)
  task = dict(grade=dict(fn="cross_entropy", head="dr_grade"),
              risk=dict(fn="cross_entropy", head="dme_risk"),
              fovea=dict(fn="mse", head="fovea"),
              disc=dict(fn="mse", head="optic_disc"))
  c.stage_order = ("a",)
  c.stages = dict(a=dict(method="supervised", model=model, losses=task,
                         **stage))
  return c


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.stages.a.losses.grade.update(head="dr_grades"),
     r"loss term 'grade': head='dr_grades'; name one of the run's heads "
     r"\['dme_risk', 'dr_grade', 'fovea', 'optic_disc'\]$"),
    (lambda c: c.stages.a.losses.grade.update(fn="mse"),
     r"mse regresses coordinates, but head 'dr_grade' is a classification "
     r"head"),
    (lambda c: c.stages.a.losses.fovea.update(fn="cross_entropy"),
     r"cross_entropy reads class logits, but head 'fovea' is a landmark "
     r"head"),
    (lambda c: c.heads.update(grade=dict(label="grade")),
     r"heads.grade reads label key 'grade', which the data set does not "
     r"carry; its targets are \['dme_risk', 'dr_grade', 'fovea', "
     r"'optic_disc'\]"),
    (lambda c: c.heads.update(optic_disc=dict(label="dme_risk")),
     r"the output 'optic_disc' of model 'multitask_resnet18' is \(1, 2\), "
     r"but label 'dme_risk' is a "
     r"classification target that needs \(B, 3\)"),
    (lambda c: delattr(c, "heads"),
     r"label key 'label', which the data set does not carry"),
    (lambda c: c.stages.a.update(data=dict(image_size=16)),
     r"data.image_size cannot differ between stages"),
])
def test_multi_head_misconfigurations_stop_before_training(tmp_path, edit,
                                                          match):
  c = _fundus_config()
  edit(c)
  with pytest.raises(train.ConfigError, match=match) as e:
    train.validate(c, str(tmp_path), data.build(c.data))
  assert "\n" not in str(e.value)


def test_ensemble_members_with_other_heads_are_refused(tmp_path):
  c = _fundus_config()
  c.stage_order = ("a", "s")
  # A member trained elsewhere, on four grades.
  other = dict(name="multitask_resnet18", width=0.125, grade_classes=4)
  c.stages.s = dict(
      method="distill", model=c.stages.a.model.to_dict(),
      teachers=[dict(model=c.stages.a.model.to_dict(), stage="a"),
                dict(model=other, checkpoint=str(tmp_path))],
      losses=dict(kd=dict(fn="ensemble_kd", head="dr_grade")))
  ds = data.build(c.data)
  # The member's folder holds no checkpoint (validate says so first): the
  # method is built without loading, as validate builds it.
  method, _ = train.build_method(c, "s", str(tmp_path), ds.num_classes,
                                 load_teacher=False,
                                 heads=train.run_heads(c, ds))
  with pytest.raises(ValueError,
                     match=r"logit distillation needs student and "
                     r"teacher outputs of one shape .* teachers\[1\] .*"
                     r"'dr_grade': \(1, 4\)"):
    jax.eval_shape(lambda x: method.init(jax.random.key(0), x),
                   jnp.zeros((1,) + ds.train[0]["image"].shape))
  c.stages.s.losses.kd.fn = "kd_kl"
  c.stages.s.teachers = c.stages.s.teachers[:1]
  with pytest.raises(train.ConfigError, match=r"'kd' \(kd_kl\) reads one "
                     r"teacher; with teachers=\[...\] use ensemble_kd"):
    train.validate(c, str(tmp_path), data.build(c.data))


def test_a_multi_head_run_reports_no_segmentation_field(tmp_path):
  c = _fundus_config(seed=3)
  workdir = str(tmp_path)
  train.train_and_evaluate(c, workdir)
  results = json.load(open(os.path.join(workdir, "results.json")))
  text = open(os.path.join(workdir, "report.md")).read()
  flat = json.dumps(results)
  for word in ("dice", "iou", "pixel_accuracy"):
    assert word not in flat.lower() and word not in text.lower()
  scores = results["a"]["scores"]
  assert 0 <= scores["dr_grade/accuracy"] <= 1
  assert np.asarray(scores["dr_grade/confusion"]).sum() == 8
  assert scores["fovea/mean_error_px"] >= 0
  assert "| dr_grade/accuracy |" in text
  assert not os.path.exists(os.path.join(workdir, "predictions.png"))
  hist = train.read_history(os.path.join(workdir, "a"))
  assert "val/optic_disc/median_error_px" in hist
