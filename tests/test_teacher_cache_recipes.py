"""kd_jax.teacher_cache for every recipe's frozen-teacher method: a training
step fed from the cache equals the step with the live teacher.

Each recipe's own distillation stage, its loss terms as its config writes
them, with tiny models and 16–64 px images, on an augmented batch (flips,
rotations, scale-crops) that crosses into the second epoch's views:

  medtex   MED-TEX (method "explain"): soft CE to the teacher + VID on
           four blocks, the explainer and the student in turn
  skd      structured KD (method "adversarial"): CE + pixel-wise KD +
           pair-wise similarity + the holistic (WGAN-GP critic) term, and
           the ablation's AT and mimic (hint) terms, an embedding term and
           a dense term with pool=4 on the same maps: every teacher view
           (AT's attention map, the pair-wise nodes, the pooled embedding,
           the 4×4-pooled map) beside a feature stored whole, each read as
           the live step reads it
  fundus   multi-task fundus KD from an ensemble of teachers (two here):
           ensemble_kd on the grades, ensemble_l2 on the landmarks
  encoder  foundation-encoder distillation: embedding cosine + dense
           feature-map cosine through attention pooling

The step is the trainer's (`train.make_train_step`) with plain SGD at rate
1 for every parameter group, so the change of the parameters is the
gradient (for the adversarial method: the student's, then the critic's).
"""
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import data, methods, tasks, teacher_cache, train
from kd_jax.data import pipeline, synthetic, transforms
from kd_jax.data import targets as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

AUGMENT = [transforms.RandomScaleCrop(scale_range=(0.75, 1.3), pad_label=0),
           transforms.SegmentationAugment(max_rotation_deg=20.0)]
SEED, BATCH, EXAMPLES = 5, 4, 6  # Batch 1 holds rows 4..7: epochs 0 and 1.
# Halves the compiles. The steps compared run one executable on two inputs,
# so its optimisation level cannot make them differ.
FAST = {"xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True}


def _config(path, arg):
  spec = importlib.util.spec_from_file_location("recipe",
                                                os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


class Images:
  """Random images in [0, 1] (and a class label when `classes`)."""

  def __init__(self, n, size, channels, classes=0):
    rng = np.random.default_rng(0)
    self.images = rng.uniform(0, 1, (n, size, size, channels)).astype(
        np.float32)
    self.labels = rng.integers(0, max(classes, 1), n).astype(np.int32)
    self.classes = classes

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    out = {"image": self.images[i]}
    if self.classes:
      out["label"] = self.labels[i]
    return out


def _medtex():
  c = _config("configs/medtex/medtex.py", "cpu")
  s = c.stages.med_tex
  s.model = dict(name="medtex_student", widths=(2, 3, 3, 4))
  s.teacher.model = dict(name="medtex_teacher", widths=(4, 4, 4, 4))
  s.explainer.model = dict(name="medtex_explainer", width=2, depth=2)
  heads = tasks.from_config(None, {"label": T.classification(2)})
  return c, "med_tex", Images(EXAMPLES, 16, 3, classes=2), heads, 2


def _skd():
  c = _config("configs/skd/ablation.py", "cpu,acdc")
  s = c.stages.skd
  # The critic takes maps of 64×64 at least; UNets keep the step small
  # (their "bottleneck" stands for PSPNet's "head" in the pair term).
  net = dict(name="unet", width=2, depth=2)
  s.model, s.teacher.model = dict(net), dict(net)
  s.losses = {k: v for k, v in s.losses.items() if k != "aux"}  # PSPNet's.
  s.losses.pair.student = s.losses.pair.teacher = "bottleneck"
  s.losses.update(
      at=dict(fn="attention_transfer", weight=1.0, student="enc1",
              teacher="enc1", connector="none"),
      mimic=dict(fn="hint_l2", weight=1.0, student="bottleneck",
                 teacher="bottleneck"),
      emb=dict(fn="embedding_l2", weight=1.0, student="bottleneck",
               teacher="bottleneck", connector="none"),
      dense=dict(fn="feature_map_cosine", weight=1.0, student="enc1",
                 teacher="enc1", connector="none", pool=4))
  s.critic.model.conv_dim = 2
  source = synthetic.SyntheticCT(EXAMPLES, size=64, seed=0)
  heads = tasks.from_config(None, {"label": T.segmentation(
      synthetic.NUM_CLASSES)})
  return c, "skd", source, heads, synthetic.NUM_CLASSES


def _fundus():
  c = _config("configs/fundus_mtl.py", "cpu,synthetic")
  s = c.stages.kd_ensemble
  s.teachers = s.teachers[:2]  # Two members make an ensemble, compile less.
  for member in s.teachers:
    member["model"] = dict(name="multitask_resnet18", width=0.0625)
  s.model = dict(name="multitask_resnet18", width=0.0625)
  ds = data.build(dict(name="synthetic_fundus", image_size=16,
                       num_train=EXAMPLES, num_val=2, num_test=2,
                       augment=False))
  return c, "kd_ensemble", ds.train, train.run_heads(c, ds), ds.num_classes


def _encoder():
  c = _config("configs/encoder/distill.py", "cpu")
  s = c.stages.global_dense
  s.teacher.model = dict(name="vit_tiny", width=16, depth=1, num_heads=2,
                         patch=8, image_size=32, num_classes=3)
  # A one-block ViT student (EfficientViT's step takes ~4x longer to
  # compile); its 4×4 "patch_map" stands for EfficientViT's "stage4".
  s.model = dict(name="vit_tiny", width=8, depth=1, num_heads=2, patch=8,
                 image_size=32, num_classes=0)
  s.losses.dense.student = "patch_map"
  s.losses.dense.connector.update(grid=(4, 4), hidden=8, num_heads=2)
  heads = tasks.from_config(None, {})
  return c, "global_dense", Images(EXAMPLES, 32, 3), heads, 0


RECIPES = {"medtex": _medtex, "skd": _skd, "fundus": _fundus,
           "encoder": _encoder}


def _random_like(tree, rng):
  """Arrays of `tree`'s shapes: parameters ~ N(0, 0.3²), batch variances
  in [0.5, 1.5], integers, keys and optimizer state 0."""
  def fill(path, x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key(0)
    where = jax.tree_util.keystr(path)
    if not jnp.issubdtype(x.dtype, jnp.floating) or "opt_state" in where:
      return np.zeros(x.shape, x.dtype)
    if "var" in where:
      return rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
    return rng.normal(0, 0.3, x.shape).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(fill, tree)


def _sgd(method):
  groups = getattr(method, "param_groups", None)
  if not groups:
    return methods.ParamGroups.single(optax.sgd(1.0))
  return methods.ParamGroups({g: optax.sgd(1.0) for g in groups},
                             dict(groups))


# The encoder's terms are method distill's feature terms (tests/
# test_teacher_cache.py runs them too): slow, to keep this file's CI time.
@pytest.fixture(scope="module", params=[
    pytest.param("encoder", marks=pytest.mark.slow), "fundus", "medtex",
    "skd"])
def recipe(request, tmp_path_factory):
  """The recipe's method with random weights, its step (jitted once), batch
  1 of the augmented stream with the live teacher's outputs on its images,
  and the same batch read from a float32 cache."""
  config, stage, source, heads, num_classes = RECIPES[request.param]()
  method, _ = train.build_method(config, stage, "", num_classes,
                                 load_teacher=False, heads=heads)
  example = jnp.asarray(pipeline.example_view(source, SEED, 0, 0, AUGMENT)[
      "image"][None])
  rng = np.random.default_rng(3)
  tx = _sgd(method)
  state = _random_like(jax.eval_shape(
      lambda x: train.init_state(method, tx, jax.random.key(0), x), example),
                       rng)
  frozen = [_random_like(jax.eval_shape(lambda x, t=t: t.init(
      jax.random.key(1), x, train=False), example), rng)
            for t in method.teachers]
  frozen = [{"params": f["params"], "batch_stats": f.get("batch_stats", {})}
            for f in frozen]
  frozen = frozen if method.ensemble else frozen[0]
  m = teacher_cache.manifest(
      teacher_model={"name": request.param}, teacher_variables=frozen,
      data_options={"name": "test"}, examples=len(source),
      transforms=AUGMENT, input_shape=example.shape[1:], seed=SEED,
      outputs=jax.eval_shape(method.teacher_outputs, frozen, example),
      views=getattr(method, "view_table", {}))
  cache = teacher_cache.TeacherCache(str(tmp_path_factory.mktemp("cache")), m)
  cache.build(method, frozen, source, AUGMENT, 2, batch_size=3)
  live, cached = (pipeline.train_batches(
      source, batch_size=BATCH, seed=SEED, transforms=AUGMENT,
      teacher_outputs=outputs)[1] for outputs in (None, cache.batch_outputs))
  outputs = jax.jit(method.teacher_outputs, compiler_options=FAST)(
      frozen, live["image"])
  step = jax.jit(train.make_train_step(method, tx), compiler_options=FAST)
  return dict(name=request.param, state=state, frozen=frozen, step=step,
              live=live, given=dict(live, teacher=outputs), cached=cached,
              method=method, example=example, cache=cache)


def _assert_steps_equal(name, step, state, live, frozen, cached):
  """Metrics (every loss term, the total, gradient norms) to 1e-6 and the
  SGD step's parameter change (the gradient) to 1e-6 of its largest entry;
  the cached step runs with NaN teacher weights (it must not read them)."""
  np.testing.assert_array_equal(cached["image"], live["image"])
  assert set(cached["teacher"]) == {
      "fundus": {"logits"}, "medtex": {"logits", "features"},
      "encoder": {"features", "views"}}.get(
          name, {"logits", "features", "views"})
  unread = jax.tree.map(lambda x: np.full(np.shape(x), np.nan,
                                          np.asarray(x).dtype), frozen)
  new_live, m_live = step(state, live, frozen)
  new_cached, m_cached = step(state, cached, unread)
  assert set(m_cached) == set(m_live)
  for k in m_live:
    np.testing.assert_allclose(m_cached[k], m_live[k], rtol=1e-6, atol=1e-7,
                               err_msg=f"{name}: metric {k}")
  grads = [jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                        state.params, new.params)
           for new in (new_live, new_cached)]
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads[0]))
  assert scale > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      b, a, rtol=1e-6, atol=1e-6 * scale, err_msg=name), *grads)


def test_step_from_cache_equals_step_on_live_teacher_outputs(recipe):
  """The live teacher run on the batch's images, its outputs handed to
  the step, against the cache's outputs for those views (one compile of
  the step: the teacher inside the step is the slow test below)."""
  r = recipe
  _assert_steps_equal(r["name"], r["step"], r["state"], r["given"],
                      r["frozen"], r["cached"])


def test_cache_files_hold_the_views_at_their_size(recipe):
  """Each teacher view on disk: float32 rows of its own size, the feature's
  divided by the view's factor (skd: UNet width 2, depth 2 at 64²: enc1
  64·64·2, AT's map of it 2× smaller, its pool=4 map 4·4× smaller;
  bottleneck 16·16·8, its mean 16·16× smaller, its official pair-wise
  nodes (kernel int(0.5·16) = 8) 8·8× smaller)."""
  r = recipe
  method, cache = r["method"], r["cache"]
  if r["name"] in ("fundus", "medtex"):  # Logits and VID: no views.
    assert not getattr(method, "view_table", {})
    return
  features = jax.eval_shape(functools.partial(
      method.teacher_outputs, outputs=[
          f"features.{v['feature']}" for v in method.view_table.values()]),
                            r["frozen"], r["example"])["features"]
  factors = {"attention_map": lambda s: s[-1],
             # Positions or tokens (1: the encoder's CLS embedding).
             "mean_pooled": lambda s: int(np.prod(s[:-1])),
             "pair_nodes": lambda s: 8 * 8,
             "average_pooled": lambda s: 4 * 4}
  folder = cache.epoch_folder(0)
  view_shapes = {n[6:]: v for n, v in cache.manifest["outputs"].items()
                 if n.startswith("views.")}
  assert set(view_shapes) == set(method.view_table)
  for key, view in method.view_table.items():
    shape = features[view["feature"]].shape[1:]
    path = os.path.join(folder, f"views.{key}.npy")
    stored = np.load(path, mmap_mode="r")  # Its bytes past the header.
    row = (os.path.getsize(path) - stored.offset) // EXAMPLES
    assert stored.shape == (EXAMPLES,) + tuple(view_shapes[key]), key
    assert row * factors[view["view"]](shape) == 4 * np.prod(shape), key
  if r["name"] == "skd":
    assert sorted(v["view"] for v in method.view_table.values()) == [
        "attention_map", "average_pooled", "mean_pooled", "pair_nodes"]
    assert features["enc1"].shape[1:] == (64, 64, 2)
    assert features["bottleneck"].shape[1:] == (16, 16, 8)


@pytest.mark.slow
def test_step_from_cache_equals_step_with_teacher_inside(recipe):
  """The uncached step as training runs it: the teacher inside the step
  (another compile per recipe: ~30 s each here)."""
  r = recipe
  _assert_steps_equal(r["name"], r["step"], r["state"], r["live"],
                      r["frozen"], r["cached"])
