"""Methods build themselves from their stage config (`from_config`, `check`,
`stage_keys`; kd_jax.methods.base): the trainer builds every stage without
knowing its method's name, the existing configs train exactly as before, and
models without `num_classes` build from a config."""
import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import cpu_layers, data, methods, models, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import default  # noqa: E402

STEPS = 3


def reference_config(layers="flax"):
  """configs/default.py's three stages plus a feature-distillation stage and
  a mutual stage, shrunk: UNets of width 4 (teacher) and 2 (student), depth
  2, 16×16 images, batch 4."""
  c = default.get_config()
  c.layers = layers
  c.batch_size = 4
  c.data.image_size = 16
  c.data.num_train = 8
  c.data.num_val = c.data.num_test = 4
  for name in c.stage_order:
    c.stages[name].model.depth = 2
    c.stages[name].model.width = 2
  c.stages.teacher.model.width = 4
  c.stages.distilled.teacher.model.depth = 2
  c.stages.distilled.teacher.model.width = 4
  teacher = c.stages.teacher.model.to_dict()
  student = c.stages.baseline.model.to_dict()
  ce = dict(fn="cross_entropy", weight=1.0)
  dice = dict(fn="dice", weight=1.0)
  c.stage_order = ("teacher", "baseline", "distilled", "latent", "dml")
  c.stages.latent = dict(
      method="distill", model=student,
      teacher=dict(model=teacher, stage="teacher"),
      losses=dict(ce=ce, hint=dict(fn="hint_l1", weight=0.5,
                                   student="bottleneck",
                                   teacher="bottleneck")))
  c.stages.dml = dict(method="mutual", model=student, peer=teacher,
                      losses=dict(ce=ce, dice=dice,
                                  kl=dict(fn="kd_kl", temperature=1.0)))
  return c


def run_steps(method, c, name, ds, steps=STEPS):
  """The train losses of `steps` steps of the trainer's jitted step from the
  seed's init (a distill stage's teacher: initialised from key 5)."""
  s = train.stage_config(c, name)
  tx = train.make_optimizer(s["optimizer"], s["steps"])
  batches = data.pipeline.train_batches(
      ds.train, batch_size=c.batch_size, seed=c.seed,
      transforms=ds.train_transforms)
  example = jnp.asarray(batches[0]["image"][:1])
  state = train.init_state(method, tx, jax.random.key(c.seed), example)
  frozen = {}
  if hasattr(method, "teacher"):
    frozen = method.teacher.init(jax.random.key(5), example, train=False)
  mesh = train.make_mesh()
  step = train.jit_train_step(train.make_train_step(method, tx), mesh)
  losses = []
  for i in range(steps):
    state, m = step(state, train.to_global(batches[i], mesh), frozen)
    losses.append(float(m["loss"]))
  return losses


def stage_losses(layers="flax"):
  """{stage: losses of its first STEPS steps}, every method built by the
  trainer (`train.build_method`)."""
  c = reference_config(layers)
  ds = data.build(c.data)
  out = {}
  for name in c.stage_order:
    method, _ = train.build_method(c, name, "", ds.num_classes,
                                   load_teacher=False)
    out[name] = run_steps(method, c, name, ds)
  return out


# `stage_losses("flax")` of the methods as the code before methods built
# themselves computed them (commit 554dfd1, train.build_method switching on
# the method's name), float32 on a CPU. Recomputed at 7d8f85b, when the
# training batches changed (augmented views keyed by (seed, epoch, example),
# issue 25): the values of 554dfd1 still held at 3e73b55, the commit before
# that change, so the methods themselves are unchanged.
BEFORE = {
    "teacher": [2.9370522499084473, 2.897289752960205, 2.933582305908203],
    "baseline": [2.8876304626464844, 2.8380279541015625, 2.848278522491455],
    "distilled": [4.695079326629639, 4.518329620361328, 4.519461154937744],
    "latent": [2.5873308181762695, 2.571467399597168, 2.5840566158294678],
    "dml": [7.735777854919434, 7.726837158203125, 7.68581485748291],
}


@pytest.fixture(scope="module")
def built_losses():
  return stage_losses("flax")


def test_existing_configs_give_the_losses_of_before(built_losses):
  for name, want in BEFORE.items():
    # Bit-identical on the machine that recorded them; the tolerance is for
    # another CPU's float32 summation order only.
    np.testing.assert_allclose(built_losses[name], want, rtol=1e-5, atol=0,
                               err_msg=name)


def _by_hand(layers, num_classes):
  """reference_config's methods built from models and loss terms directly."""

  def unet(width):
    m = models.build("unet", num_classes=num_classes, width=width, depth=2,
                     dtype=jnp.float32)
    return cpu_layers.apply(m) if layers == "cpu" else m

  ce = dict(fn="cross_entropy", weight=1.0, name="ce")
  dice = dict(fn="dice", weight=1.0, name="dice")
  return {
      "teacher": methods.Supervised(unet(4), [ce, dice]),
      "baseline": methods.Supervised(unet(2), [ce, dice]),
      # In the config's order: a ConfigDict lists its keys sorted (and a
      # float32 sum depends on the order).
      "distilled": methods.Distill(
          unet(2), unet(4),
          [ce, dict(fn="cwd", weight=3.0, temperature=1.0, name="cwd"),
           dice]),
      "latent": methods.Distill(
          unet(2), unet(4),
          [ce, dict(fn="hint_l1", weight=0.5, student="bottleneck",
                    teacher="bottleneck", name="hint")]),
      "dml": methods.Mutual(
          unet(2), unet(4),
          [ce, dice, dict(fn="kd_kl", temperature=1.0, name="kl")]),
  }


def _modules(method):
  return {a: getattr(method, a) for a in ("model", "teacher", "peer")
          if hasattr(method, a)}


def _fields(module):
  """A module's fields, with functools.partial layers as (func, keywords)."""
  out = {}
  for f in dataclasses.fields(module):
    v = getattr(module, f.name)
    out[f.name] = ((v.func, v.args, v.keywords)
                   if isinstance(v, functools.partial) else v)
  return out


def test_build_path_equals_an_independent_construction(built_losses):
  c = reference_config("flax")
  ds = data.build(c.data)
  hand = _by_hand("flax", ds.num_classes)
  for name in c.stage_order:
    built, frozen = train.build_method(c, name, "", ds.num_classes,
                                       load_teacher=False)
    assert type(built) is type(hand[name]), name
    assert frozen == ({} if name in ("teacher", "baseline", "dml") else None)
    assert {k: _fields(m) for k, m in _modules(built).items()} == {
        k: _fields(m) for k, m in _modules(hand[name]).items()}, name
    # The same programs as `built_losses` (the compilation cache's), and
    # exactly the same losses.
    assert built_losses[name] == run_steps(hand[name], c, name, ds), name


def test_config_layers_cpu_applies_to_every_model_of_every_stage():
  c = reference_config("cpu")
  ds = data.build(c.data)
  hand = _by_hand("cpu", ds.num_classes)
  for name in c.stage_order:
    built, _ = train.build_method(c, name, "", ds.num_classes,
                                  load_teacher=False)
    for key, module in _modules(built).items():
      assert module.norm is cpu_layers.BatchNorm, (name, key)
      assert module.conv_transpose is cpu_layers.ConvTranspose, (name, key)
      assert _fields(module) == _fields(_modules(hand[name])[key]), (name,
                                                                     key)


def test_trainer_never_compares_a_method_name():
  with open(train.__file__, encoding="utf-8") as f:
    source = f.read()
  for name in methods.METHODS:
    assert f'"{name}"' not in source and f"'{name}'" not in source, name
  assert "_build_peer" not in source


class _Anchored:
  """A toy method with its own stage key: supervised, plus an L2 pull of the
  logits toward `anchor` (a float)."""
  model_key = "model"
  stage_keys = frozenset({"anchor"})

  @classmethod
  def check(cls, stage, ctx):
    del ctx
    if not isinstance(stage.get("anchor"), float):
      raise ValueError(f"method 'anchored' needs anchor=<float>; got "
                       f"anchor={stage.get('anchor')!r}")

  @classmethod
  def from_config(cls, stage, ctx):
    return cls(ctx.build_model(stage["model"]), stage["losses"],
               stage["anchor"]), {}

  def __init__(self, model, loss_terms, anchor):
    self.base = methods.Supervised(model, loss_terms)
    self.model, self.anchor = model, anchor
    self.init, self.predict = self.base.init, self.base.predict

  def loss_fn(self, params, batch_stats, frozen, batch, rng):
    loss, (stats, metrics) = self.base.loss_fn(params, batch_stats, frozen,
                                               batch, rng)
    logits = self.predict(params, batch_stats, batch["image"])
    pull = jnp.mean((logits - self.anchor) ** 2)
    return loss + pull, (stats, dict(metrics, pull=pull))


def _one_stage(method, **keys):
  c = default.get_config()
  c.data.image_size = 16
  c.data.num_train = c.data.num_val = c.data.num_test = 4
  c.stage_order = ("s",)
  c.stages.s = dict(method=method, model=dict(name="unet", width=2, depth=2),
                    losses=dict(ce=dict(fn="cross_entropy")), **keys)
  return c


def test_a_method_registered_in_methods_alone_runs(tmp_path, monkeypatch):
  monkeypatch.setitem(methods.METHODS, "anchored", _Anchored)
  c = _one_stage("anchored", anchor=0.5)
  ds = data.build(c.data)
  train.validate(c, str(tmp_path), ds)
  method, frozen = train.build_method(c, "s", str(tmp_path), ds.num_classes)
  assert isinstance(method, _Anchored) and frozen == {}
  assert method.model.norm is cpu_layers.BatchNorm  # config.layers="cpu"
  batch = {k: jnp.asarray(v) for k, v in data.pipeline.train_batches(
      ds.train, batch_size=2, seed=0)[0].items()}
  variables = method.init(jax.random.key(0), batch["image"][:1])
  _, (_, m) = method.loss_fn(variables["params"], variables["batch_stats"],
                             {}, batch, jax.random.key(1))
  assert float(m["pull"]) > 0
  # Its check runs before anything is built; its key is its own.
  with pytest.raises(train.ConfigError,
                     match="^stage 's': method 'anchored' needs anchor"):
    train.validate(_one_stage("anchored", anchor=1), str(tmp_path), ds)
  with pytest.raises(train.ConfigError, match="^stage 's': 'anchor' is read "
                     "by method 'anchored' only, not 'supervised'"):
    train.validate(_one_stage("supervised", anchor=0.5), str(tmp_path), ds)


@pytest.mark.parametrize("method,keys,match", [
    ("supervised", dict(teacher=dict(model=dict(name="unet"),
                                     stage="x")),
     r"'teacher' is read by method 'distill' or 'adversarial' or 'explain' "
     r"only, not 'supervised': remove it, or set method='distill'$"),
    ("mutual", dict(peer=dict(name="unet"), teacher=dict(stage="x")),
     "'teacher' is read by method 'distill' or 'adversarial' or 'explain' "
     "only, not 'mutual'"),
    ("distill", dict(peer=dict(name="unet")),
     "'peer' is read by method 'mutual' only, not 'distill'"),
    ("supervised", dict(teachr=dict(stage="x")),
     r"unknown keys \['teachr'\] for method 'supervised'; allowed: "
     r"\['data', 'losses', 'method', 'model', 'optimizer', 'optimizers', "
     r"'seed', 'steps'\]$"),
    ("distill", dict(teacher=dict(stage="x", model=dict(name="unet")),
                     peers=2),
     r"unknown keys \['peers'\] for method 'distill'; allowed: .*'teacher'"),
    ("distill", {}, "a distill stage needs teacher=dict"),
    ("distill", dict(teacher=dict(model=dict(name="unet"), stage="later")),
     r"teacher.stage 'later' must be an earlier stage in stage_order; the "
     r"stages before 's': \[\]$"),
    ("distill", dict(teacher=dict(model=dict(name="unet"),
                                  checkpoint="/no/such/dir")),
     "teacher.checkpoint '/no/such/dir' is not a folder"),
    ("distill", dict(teacher=dict(model=dict(name="unte"),
                                  checkpoint="/")),
     "teacher.model: unknown model 'unte'"),
    ("nope", {}, "unknown method 'nope'; choose one of"),
])
def test_config_errors_name_the_key_and_the_fix(tmp_path, method, keys,
                                                match):
  c = _one_stage(method, **keys)
  with pytest.raises(train.ConfigError) as e:
    train.validate(c, str(tmp_path), data.build(c.data))
  assert "\n" not in str(e.value)
  assert str(e.value).startswith("stage 's': ")
  assert e.match(match)


def test_empty_keys_of_another_method_are_ignored(tmp_path):
  # As before: peer=None (or {}) on a stage that does not read it is no key.
  c = _one_stage("supervised", peer=None, teacher={})
  train.validate(c, str(tmp_path), data.build(c.data))


def test_models_without_num_classes_build_from_a_stage_config(tmp_path):
  c = _one_stage("supervised")
  c.data = dict(name="synthetic_fundus", image_size=32, num_train=4,
                num_val=4, num_test=4)
  c.heads = dict(dr_grade={}, fovea={})
  c.stages.s.model = dict(name="multitask_resnet18", width=0.25)
  c.stages.s.losses = dict(ce=dict(fn="cross_entropy", head="dr_grade"),
                           xy=dict(fn="mse", head="fovea"))
  c.layers = "flax"
  ds = data.build(c.data)
  train.validate(c, str(tmp_path), ds)
  method, _ = train.build_method(c, "s", str(tmp_path), ds.num_classes,
                                 heads=train.run_heads(c, ds))
  assert type(method.model) is models.multitask.MultiTaskResNet18
  variables = jax.eval_shape(functools.partial(method.init, jax.random.key(0)),
                             jax.ShapeDtypeStruct((1, 32, 32, 3),
                                                  jnp.float32))
  out, _ = jax.eval_shape(functools.partial(method.model.apply, train=False),
                          {"params": variables["params"]["model"],
                           "batch_stats": variables["batch_stats"]["model"]},
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert out["dr_grade"].shape == (1, 5)
  # The paper's ResNet-50 teacher, shapes only.
  build = functools.partial(train._build_model, num_classes=9,
                            dtype=jnp.float32)
  big = build(dict(name="multitask_resnet50"))
  shapes = jax.eval_shape(functools.partial(big.init, train=False),
                          jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert sum(x.size for x in jax.tree.leaves(shapes["params"])) > 20e6


def test_a_config_num_classes_wins_and_is_refused_where_not_taken():
  build = functools.partial(train._build_model, num_classes=9,
                            dtype=jnp.float32)
  assert build(dict(name="unet", width=2, depth=2)).num_classes == 9
  assert build(dict(name="unet", num_classes=3)).num_classes == 3
  with pytest.raises(ValueError, match="multitask_resnet18.*num_classes"):
    build(dict(name="multitask_resnet18", num_classes=3))
  with pytest.raises(ValueError, match=r"a model is dict\(name=<model>"):
    build(dict(width=2))
