"""kd_jax.teacher_cache: the teacher's outputs for every example's view of
every epoch, stored once on disk.

A step fed from the cache must see what the live teacher gives on the same
augmented view (loss and gradients equal), a cached run must train and
resume exactly like an uncached one, a killed build must resume to the same
bytes, a partial cache must never be read, and a cache built for anything
else must be refused in one line.
"""
import functools
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kd_jax import checkpoint, data, losses, teacher_cache, train
from kd_jax.data import pipeline, synthetic, transforms
from kd_jax.methods import distill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.test_train import tiny_config  # noqa: E402

# Flips, rotations and scale-crops, each drawn per (seed, epoch, example).
AUGMENT = [transforms.RandomScaleCrop(scale_range=(0.75, 1.3), pad_label=0),
           transforms.SegmentationAugment(max_rotation_deg=20.0)]


# The stored name of AT's teacher view of enc1 (p = 2, eps = 1e-12).
AT_VIEW = "views." + distill.view_key("enc1", "attention_map",
                                      {"eps": 1e-12, "p": 2.0})


def cache_config(cache, steps=4):
  c = tiny_config(steps=steps)
  c.log_every = 1
  c.data.augment = True  # Flips and rotations: a new view every epoch.
  c.teacher_cache = cache
  c.stages.teacher.steps = 2
  # Logit and feature terms: the cache holds both kinds of outputs.
  c.stages.distilled.losses = dict(
      ce=dict(fn="cross_entropy"), dice=dict(fn="dice"),
      kd=dict(fn="kd_kl", temperature=4.0),
      hint=dict(fn="hint_l2", student="bottleneck", teacher="bottleneck"),
      at=dict(fn="attention_transfer", student="enc1", teacher="enc1",
              connector="none"))
  return c


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
  """$KD_JAX_CACHE for the module: "auto" caches of every run land here."""
  root = str(tmp_path_factory.mktemp("cache_root"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("KD_JAX_CACHE", root)
    yield root


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A trained (2-step) teacher stage in a workdir of its own."""
  c = cache_config(None)
  workdir = str(tmp_path_factory.mktemp("teacher"))
  train.train_stage(c, "teacher", workdir, data.build(c.data))
  return os.path.join(workdir, "teacher")


def _distil(cache, teacher_dir, workdir, steps=4):
  c = cache_config(cache, steps)
  c.stages.distilled.teacher.stage = ""
  c.stages.distilled.teacher.checkpoint = teacher_dir
  ds = data.build(c.data)
  train.validate(c, workdir, ds)
  _, state = train.train_stage(c, "distilled", workdir, ds)
  return c, ds, jax.device_get(state)


# Whole runs through the trainer (slow: ~60 s here; the step-level tests
# below check the same equalities in CI).
@pytest.fixture(scope="module")
def uncached_and_cached(teacher_dir, cache_root, tmp_path_factory):
  runs = {}
  for cache in (None, "auto"):
    workdir = str(tmp_path_factory.mktemp(f"cache_{cache}"))
    before = teacher_cache.forwards
    _, _, state = _distil(cache, teacher_dir, workdir)
    runs[cache] = (state, train.read_history(os.path.join(workdir,
                                                          "distilled")),
                   teacher_cache.forwards - before)
  return runs


@pytest.mark.slow
def test_cached_and_uncached_runs_are_equal_with_augmentation(
    uncached_and_cached):
  (plain, h_plain, _), (cached, h_cached, built) = (
      uncached_and_cached[None], uncached_and_cached["auto"])
  # 4 steps of 4 over 12 examples reach into 2 epochs, 12 views each.
  assert built == 24
  for key in ("train/loss", "train/kd", "train/hint", "train/at",
              "train/ce"):
    assert h_plain[key][0] == h_cached[key][0] == [1, 2, 3, 4]
    np.testing.assert_allclose(h_cached[key][1], h_plain[key][1], rtol=1e-5,
                               atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               plain.params, cached.params)


@pytest.mark.slow
def test_resume_with_cache_is_exact_and_runs_no_teacher(
    teacher_dir, uncached_and_cached, tmp_path, monkeypatch):
  """Another run asking the same thing ("auto": the same folder) reads the
  first run's cache: no teacher forward, through an interruption too."""
  reference, _, _ = uncached_and_cached["auto"]
  real_save = checkpoint.save

  def save_then_sigterm(mngr, step, state, force=False):
    out = real_save(mngr, step, state, force=force)
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  before = teacher_cache.forwards
  monkeypatch.setattr(checkpoint, "save", save_then_sigterm)
  with pytest.raises(SystemExit, match="SIGTERM at step 2"):
    _distil("auto", teacher_dir, str(tmp_path))
  monkeypatch.setattr(checkpoint, "save", real_save)
  _, _, resumed = _distil("auto", teacher_dir, str(tmp_path))
  assert teacher_cache.forwards == before
  assert int(resumed.step) == 4
  jax.tree.map(np.testing.assert_array_equal, reference.params,
               resumed.params)
  jax.tree.map(np.testing.assert_array_equal, reference.opt_state,
               resumed.opt_state)


# ----------------------------------------------------------------------------
# One step, live teacher vs cache.


def _example(cache, epoch, index):
  """Example `index`'s teacher outputs for its epoch-`epoch` view, float32."""
  return jax.tree.map(lambda x: np.asarray(x[0], np.float32),
                      cache.batch_outputs([epoch], [index]))


def _random_like(shapes, rng):
  """Parameters ~ N(0, 0.3²) and batch statistics in [0.5, 1.5]."""
  return {
      "params": jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(
          np.float32), shapes["params"]),
      "batch_stats": jax.tree.map(lambda x: rng.uniform(
          0.5, 1.5, x.shape).astype(np.float32), shapes.get("batch_stats",
                                                            {}))}


@pytest.fixture(scope="module")
def distill_parts():
  """The distill method (logit KD + feature terms), a teacher (initialised,
  not trained), the tiny training set, and a value-and-grad of its loss
  (jitted once)."""
  c = cache_config(None)
  ds = data.build(c.data)
  method, _ = train.build_method(c, "distilled", "", ds.num_classes,
                                 load_teacher=False)
  example = ds.train[0]["image"][None]
  # Random weights drawn in numpy (an init compile costs ~10 s here); the
  # shapes come from the method's own init (which also builds it).
  rng = np.random.default_rng(2)
  variables = _random_like(jax.eval_shape(method.init, jax.random.key(0),
                                          example), rng)
  frozen = _random_like(jax.eval_shape(lambda x: method.teacher.init(
      jax.random.key(2), x, train=False), example), rng)

  @jax.jit
  def value_and_grad(frozen, batch):
    batch = pipeline.decode(batch)  # As the train step: cached outputs float32.
    fn = lambda p: method.loss_fn(p, variables["batch_stats"], frozen, batch,
                                  jax.random.key(1))[0]
    return jax.value_and_grad(fn)(variables["params"])

  return method, frozen, ds.train, value_and_grad


def _cache_for(method, frozen, source, folder, dtype, epochs=2, seed=5,
               mesh=None):
  m = teacher_cache.manifest(
      teacher_model={"name": "unet"}, teacher_variables=frozen,
      data_options={"name": "synthetic"}, examples=len(source),
      transforms=AUGMENT, input_shape=(16, 16, 1), seed=seed,
      outputs=jax.eval_shape(method.teacher_outputs, frozen,
                             jnp.zeros((1, 16, 16, 1))), dtype=dtype,
      views=method.view_table)
  cache = teacher_cache.TeacherCache(folder, m)
  cache.build(method, frozen, source, AUGMENT, epochs, batch_size=5,
              mesh=mesh)
  return cache


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step_from_cache_equals_live_teacher(distill_parts, tmp_path, dtype):
  """Loss and gradients of the step on an augmented batch (flip, rotation,
  scale-crop) crossing into the second epoch: from a float32 cache as from
  the live teacher to 1e-6; from a bfloat16 cache as from the live teacher's
  outputs rounded to bfloat16."""
  method, frozen, source, value_and_grad = distill_parts
  cache = _cache_for(method, frozen, source, str(tmp_path), dtype)
  live = pipeline.train_batches(source, batch_size=8, seed=5,
                                transforms=AUGMENT)[1]  # Rows 8..15: 2 epochs.
  cached = pipeline.train_batches(source, batch_size=8, seed=5,
                                  transforms=AUGMENT,
                                  teacher_outputs=cache.batch_outputs)[1]
  np.testing.assert_array_equal(cached["image"], live["image"])
  # AT's attention map is a view: stored, and read, in place of enc1.
  assert set(cached["teacher"]) == {"logits", "features", "views"}
  assert set(cached["teacher"]["features"]) == {"bottleneck"}
  if dtype == "float32":
    loss, grads = value_and_grad(frozen, live)  # The teacher runs in the step.
  else:
    # The cache's outputs travel in bfloat16; the step casts them.
    assert cached["teacher"]["logits"].dtype == ml_dtypes.bfloat16
    teacher = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16),
                           method.teacher_outputs(frozen, live["image"]))
    loss, grads = value_and_grad(frozen, dict(live, teacher=teacher))
  # `frozen` is passed (one compile for both) but unread: the batch has it.
  c_loss, c_grads = value_and_grad(frozen, cached)
  np.testing.assert_allclose(c_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               c_grads, grads)


def test_auto_folder_is_shared_by_stages_asking_the_same(
    distill_parts, tmp_path, monkeypatch):
  """Two distill stages of one teacher, data and seed (other loss weights)
  share the "auto" folder: the second builds nothing; another seed gets a
  folder of its own."""
  monkeypatch.setenv("KD_JAX_CACHE", str(tmp_path / "root"))
  c = cache_config("auto", steps=3)
  again = c.stages.distilled.to_dict()
  again["losses"]["kd"]["weight"] = 0.5
  c.stages["again"] = again
  ds = data.build(c.data)
  method, frozen, _, _ = distill_parts
  before = teacher_cache.forwards
  first = teacher_cache.for_stage(c, "distilled", "", method, frozen, ds)
  assert teacher_cache.forwards - before == 12  # 3·4 rows: one epoch.
  second = teacher_cache.for_stage(c, "again", "", method, frozen, ds)
  assert teacher_cache.forwards - before == 12
  assert second.folder == first.folder
  assert first.folder.startswith(str(tmp_path / "root"))
  c.stages.again.seed = 11
  assert teacher_cache.stage_manifest(c, "again", method, frozen, ds)[
      "seed"] == 11
  assert teacher_cache.auto_folder(teacher_cache.stage_manifest(
      c, "again", method, frozen, ds), "") != first.folder


def test_stages_reading_different_outputs_share_one_build(
    distill_parts, tmp_path, monkeypatch):
  """A logits-only stage and a logits + features stage of one teacher, data
  and seed: the first build stores the union, the second stage builds
  nothing and each reads its own outputs; a later run of another config
  reading a subset is served by that folder too."""
  monkeypatch.setenv("KD_JAX_CACHE", str(tmp_path))
  c = cache_config("auto", steps=3)
  logits_only = c.stages.distilled.to_dict()
  logits_only["losses"] = dict(ce=dict(fn="cross_entropy"),
                               kd=dict(fn="kd_kl", temperature=2.0))
  c.stages["logits_only"] = logits_only
  c.stage_order = tuple(c.stage_order) + ("logits_only",)
  ds = data.build(c.data)
  method, frozen, _, _ = distill_parts  # Stage "distilled"'s.
  kd_only, _ = train.build_method(c, "logits_only", "", ds.num_classes,
                                  load_teacher=False)
  before = teacher_cache.forwards
  first = teacher_cache.for_stage(c, "logits_only", "", kd_only, frozen, ds)
  assert teacher_cache.forwards - before == 12  # 3·4 rows: one epoch.
  assert sorted(first.manifest["outputs"]) == [
      "features.bottleneck", "logits", AT_VIEW]
  second = teacher_cache.for_stage(c, "distilled", "", method, frozen, ds)
  assert teacher_cache.forwards - before == 12
  assert second.folder == first.folder
  x = pipeline.example_view(ds.train, 0, 0, 3, ds.train_transforms)["image"]
  want = jax.tree.map(lambda a: np.asarray(a[0]), method.teacher_outputs(
      frozen, x[None]))
  assert set(_example(first, 0, 3)) == {"logits"}
  got = _example(second, 0, 3)
  assert set(got) == {"logits", "features", "views"}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6), got, want)
  # Another run whose config has the logits-only stage alone.
  alone = cache_config("auto", steps=3)
  alone.stages.distilled.losses = logits_only["losses"]
  third = teacher_cache.for_stage(alone, "distilled", "", kd_only, frozen, ds)
  assert third.folder == first.folder
  assert teacher_cache.forwards - before == 12


def test_a_cache_serves_subsets_and_refuses_what_it_lacks(linear, tmp_path,
                                                          monkeypatch):
  method, frozen, _ = linear
  full = _linear_manifest(linear)
  logits = dict(full, outputs={"logits": full["outputs"]["logits"]})
  folder = str(tmp_path / "c")
  teacher_cache.TeacherCache(folder, full)
  assert teacher_cache.TeacherCache(folder, logits).served == {
      "logits": [12]}
  more = dict(full, outputs=dict(full["outputs"], **{"features.max": [1]}))
  with pytest.raises(ValueError, match=r"another outputs\.features\.max "):
    teacher_cache.TeacherCache(folder, more)
  # "auto": the serving folder, else a folder of the request's own.
  monkeypatch.setenv("KD_JAX_CACHE", str(tmp_path / "root"))
  base = teacher_cache.auto_folder(full, "")
  teacher_cache.TeacherCache(base, full)
  assert teacher_cache.auto_folder(logits, "") == base
  own = teacher_cache.auto_folder(more, "")
  assert own.startswith(base + "-")
  teacher_cache.TeacherCache(own, more)
  assert teacher_cache.auto_folder(more, "") == own
  assert teacher_cache.auto_folder(dict(full, seed=9), "") != base


# ----------------------------------------------------------------------------
# Storage, with a linear stand-in teacher (the cache only sees
# `teacher_outputs`).


class LinearTeacher:
  """Classification logits (B, 12) and a pooled feature of an image."""

  def teacher_outputs(self, frozen, images):
    x = images.reshape(images.shape[0], -1)
    return {"logits": x @ frozen["w"],
            "features": {"mean": jnp.mean(images, axis=(1, 2))}}


@pytest.fixture(scope="module")
def linear():
  source = synthetic.SyntheticCT(10, size=16, seed=0)
  frozen = {"w": np.random.default_rng(0).normal(
      size=(256, 12)).astype(np.float32) / 4}
  return LinearTeacher(), frozen, source


def _linear_manifest(linear, **kw):
  method, frozen, source = linear
  return teacher_cache.manifest(
      teacher_model={"name": "linear"}, teacher_variables=frozen,
      data_options={"name": "synthetic"}, examples=len(source),
      transforms=AUGMENT, input_shape=(16, 16, 1), seed=2,
      outputs=jax.eval_shape(method.teacher_outputs, frozen,
                             jnp.zeros((1, 16, 16, 1))), **kw)


def _files(folder):
  out = {}
  for base, _, names in os.walk(folder):
    for n in names:
      with open(os.path.join(base, n), "rb") as f:
        out[os.path.relpath(os.path.join(base, n), folder)] = f.read()
  return out


def test_killed_build_resumes_to_the_same_bytes(linear, tmp_path,
                                                monkeypatch):
  method, frozen, source = linear
  m = _linear_manifest(linear)
  whole = teacher_cache.TeacherCache(str(tmp_path / "whole"), m)
  whole.build(method, frozen, source, AUGMENT, 3, batch_size=4)

  folder = str(tmp_path / "killed")
  cache = teacher_cache.TeacherCache(folder, m)
  cache.build(method, frozen, source, AUGMENT, 1, batch_size=4)
  # What a killed build leaves: a temporary folder of a dead process.
  dead = subprocess.Popen(["true"])
  dead.wait()
  leftover = os.path.join(cache.shard, f"epoch-1.tmp-{socket.gethostname()}-"
                          f"{dead.pid}-0")
  os.makedirs(leftover)
  np.save(os.path.join(leftover, "index.npy"), np.arange(10))
  real, calls = teacher_cache.TeacherCache._forward, []

  def dies_midway(self, *args):
    calls.append(1)
    if len(calls) == 2:  # Epoch 1's second batch.
      raise KeyboardInterrupt
    return real(self, *args)

  monkeypatch.setattr(teacher_cache.TeacherCache, "_forward", dies_midway)
  with pytest.raises(KeyboardInterrupt):
    cache.build(method, frozen, source, AUGMENT, 3, batch_size=4)
  monkeypatch.undo()
  assert cache.missing(3) == [1, 2]
  assert not os.path.exists(leftover)
  # A partial epoch is never read.
  with pytest.raises(FileNotFoundError, match="no complete epoch 1"):
    _example(teacher_cache.TeacherCache(folder, m), 1, 0)
  assert cache.build(method, frozen, source, AUGMENT, 3, batch_size=4) == 2
  assert _files(folder) == _files(str(tmp_path / "whole"))


def test_cache_holds_each_views_outputs(linear, tmp_path):
  """Against the teacher on `example_view`, one example at a time; float16
  storage within float16 rounding."""
  method, frozen, source = linear
  cache = teacher_cache.TeacherCache(
      str(tmp_path), _linear_manifest(linear, dtype="float16"))
  cache.build(method, frozen, source, AUGMENT, 2, batch_size=3)
  for epoch, index in ((0, 0), (0, 9), (1, 4)):
    x = pipeline.example_view(source, 2, epoch, index, AUGMENT)["image"]
    want = method.teacher_outputs(frozen, x[None])
    got = _example(cache, epoch, index)
    assert got["logits"].dtype == np.float32
    np.testing.assert_array_equal(
        got["logits"], np.asarray(want["logits"][0]).astype(np.float16))
    np.testing.assert_array_equal(
        got["features"]["mean"],
        np.asarray(want["features"]["mean"][0]).astype(np.float16))


def test_top_k_logits_keep_the_teachers_top_k_probabilities(linear,
                                                            tmp_path):
  """k = 3 of 12 classes: the stored classes keep their logits, so their
  softmax probabilities (T = 1) are the teacher's; the other 9 share the
  rest equally."""
  method, frozen, source = linear
  m = _linear_manifest(linear, top_k=3)
  cache = teacher_cache.TeacherCache(str(tmp_path), m)
  cache.build(method, frozen, source, AUGMENT, 1, batch_size=4)
  for index in (0, 5):
    x = pipeline.example_view(source, 2, 0, index, AUGMENT)["image"]
    z = np.asarray(method.teacher_outputs(frozen, x[None])["logits"][0],
                   np.float64)
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    top = np.argsort(-z)[:3]
    dense = _example(cache, 0, index)["logits"].astype(np.float64)
    q = np.exp(dense - dense.max()) / np.exp(dense - dense.max()).sum()
    np.testing.assert_allclose(dense[top], z[top], rtol=1e-6)
    np.testing.assert_allclose(q[top], p[top], rtol=1e-5)
    rest = np.setdiff1d(np.arange(12), top)
    np.testing.assert_allclose(q[rest], (1 - p[top].sum()) / 9, rtol=1e-5)
  assert teacher_cache.bytes_per_example(m) == 8 + 3 * 4 + 3 * 2 + 4 + 4


def test_another_manifest_is_refused_in_one_line(linear, tmp_path):
  method, frozen, _ = linear
  folder = str(tmp_path)
  teacher_cache.TeacherCache(folder, _linear_manifest(linear))
  other = dict(frozen, w=frozen["w"] + 1)
  m = _linear_manifest((method, other, linear[2]), dtype="bfloat16")
  m["data"]["transforms"] = teacher_cache.transform_spec(AUGMENT[1:])
  with pytest.raises(ValueError) as e:
    teacher_cache.TeacherCache(folder, m)
  msg = str(e.value)
  assert "\n" not in msg and folder in msg
  assert "another data.transforms, dtype, teacher.variables " in msg
  with open(os.path.join(folder, "manifest.json")) as f:
    assert json.load(f) == _linear_manifest(linear)  # Left as it was.


def test_full_size_cache_is_refused_for_a_view_in_one_line(distill_parts,
                                                          tmp_path):
  """A cache of the layout before teacher views (enc1 stored whole) does
  not serve the AT term, which reads its attention map now."""
  method, frozen, _, _ = distill_parts

  def request(outputs):
    return teacher_cache.manifest(
        teacher_model={"name": "unet"}, teacher_variables=frozen,
        data_options={}, examples=12, transforms=AUGMENT,
        input_shape=(16, 16, 1), seed=5, views=method.view_table,
        outputs=jax.eval_shape(functools.partial(
            method.teacher_outputs, outputs=outputs), frozen,
                               jnp.zeros((1, 16, 16, 1))))

  folder = str(tmp_path)
  teacher_cache.TeacherCache(folder, request(
      ["features.bottleneck", "features.enc1", "logits"]))
  with pytest.raises(ValueError) as e:
    teacher_cache.TeacherCache(folder, request(None))
  msg = str(e.value)
  assert "\n" not in msg and f"another outputs.{AT_VIEW} (" in msg
  assert "it stores features.enc1 at full size" in msg
  # A view of other arguments is another output; p=2 and p=2.0 are one.
  assert losses.teacher_views([dict(fn="attention_transfer", p=2)]) == (
      losses.teacher_views([dict(fn="attention_transfer", p=2.0)]))
  assert distill.view_key("enc1", "attention_map", {"eps": 1e-12,
                                                    "p": 4.0}) != AT_VIEW[6:]


@pytest.mark.parametrize("term, factor", [
    (dict(fn="attention_transfer"), 6),  # The channels, averaged.
    (dict(fn="pairwise_similarity", pool_size=2), 2 * 2),
    # Official nodes: kernel (int(0.5·8), int(0.5·12)) = (4, 6).
    (dict(fn="pairwise_similarity", convention="official", scale=0.5),
     4 * 6),
    (dict(fn="embedding_cosine"), 8 * 12),  # The positions, averaged.
])
def test_each_view_stores_its_factor_fewer_bytes(term, factor):
  """Bytes per example of a teacher view against the feature's, from the
  view's shape: (8, 12, 6) maps, float32."""
  (view, args), = losses.teacher_views([term]).values()
  feature = jax.ShapeDtypeStruct((1, 8, 12, 6), jnp.float32)
  whole, reduced = (teacher_cache.bytes_per_example(teacher_cache.manifest(
      teacher_model={}, teacher_variables={}, data_options={}, examples=1,
      transforms=(), input_shape=(), seed=0, outputs={"features": {"f": x}}))
                    for x in (feature, jax.eval_shape(functools.partial(
                        losses.teacher_view, view, args=args), feature)))
  assert whole - 8 == 4 * 8 * 12 * 6
  assert (reduced - 8) * factor == whole - 8


def test_each_process_stores_and_reads_its_own_examples(linear, tmp_path):
  """Two processes (simulated): each builds its shard (the examples its
  rows of the global batches hold) and its batches carry their outputs."""
  method, frozen, source = linear
  m = _linear_manifest(linear, shard_count=2, rows_per_process=3)
  for p in (0, 1):
    cache = teacher_cache.TeacherCache(str(tmp_path), m, shard_index=p)
    cache.build(method, frozen, source, AUGMENT, 2, batch_size=4)
    ds = pipeline.train_batches(source, batch_size=6, seed=2,
                                transforms=AUGMENT, shard_index=p,
                                shard_count=2, teacher_outputs=cache.batch_outputs)
    for step in (0, 1, 2):  # Stream rows 0..17: epochs 0 and 1.
      b = ds[step]
      want = method.teacher_outputs(frozen, b["image"])
      np.testing.assert_allclose(b["teacher"]["logits"], want["logits"],
                                 rtol=1e-5, atol=1e-5)
    assert len(cache.examples(0)) in (4, 6)
  sizes = [len(teacher_cache.TeacherCache(str(tmp_path), m, p).examples(0))
           for p in (0, 1)]
  assert sum(sizes) == 10


def test_cache_of_another_process_layout_is_refused_in_one_line(linear,
                                                               tmp_path):
  folder = str(tmp_path)
  teacher_cache.TeacherCache(folder, _linear_manifest(
      linear, shard_count=2, rows_per_process=3))
  with pytest.raises(ValueError) as e:
    teacher_cache.TeacherCache(folder, _linear_manifest(linear))
  msg = str(e.value)
  assert "\n" not in msg and folder in msg
  assert ("built by 2 processes of 3 rows each and this run is 1 process: "
          "run with 2 process(es)") in msg
  assert "--config.teacher_cache=auto" in msg


# ----------------------------------------------------------------------------
# The build on the run's mesh: 8 virtual devices in a subprocess (XLA_FLAGS
# must be set before jax starts).


def fsdp_builds(out):
  """Builds 2 epochs of the distill teacher's cache (kernels of 8-16
  channels: most of its bytes sliced) on (data, fsdp) meshes of fsdp 1, 2
  and 4 over 8 devices; writes each cache's arrays and what the build's
  jitted forward took for the teacher to `out` (npz and json)."""
  c = cache_config(None)
  c.stages.distilled.teacher.model.width = 8
  ds = data.build(c.data)
  method, _ = train.build_method(c, "distilled", "", ds.num_classes,
                                 load_teacher=False)
  example = ds.train[0]["image"][None]
  frozen = _random_like(jax.eval_shape(lambda x: method.teacher.init(
      jax.random.key(2), x, train=False), example), np.random.default_rng(3))
  arrays, report = {}, {}
  real, built = teacher_cache._teacher_forward, []

  def spy(*args):  # The build's own forward, as it ran.
    built.append(real(*args))
    return built[-1]

  teacher_cache._teacher_forward = spy
  for fsdp in (1, 2, 4):
    mesh = train.make_mesh(fsdp=fsdp)
    folder = os.path.join(os.path.dirname(out), f"fsdp{fsdp}")
    cache = _cache_for(method, frozen, ds.train, folder, "float32",
                       mesh=mesh)
    for epoch in (0, 1):
      for f in os.listdir(cache.epoch_folder(epoch)):
        arrays[f"{fsdp}/{epoch}/{f}"] = np.load(os.path.join(
            cache.epoch_folder(epoch), f))
    _, fn, placed = built.pop()
    images = jax.ShapeDtypeStruct((8,) + example.shape[1:], example.dtype)
    taken = jax.tree.leaves(fn.lower(placed, images).compile(
    ).input_shardings[0][0])
    report[fsdp] = [
        dict(size=int(x.size), spec=[str(a) for a in sh.spec],
             piece=int(x.addressable_shards[0].data.size))
        for x, sh in zip(jax.tree.leaves(placed), taken)]
  np.savez(out + ".npz", **arrays)
  with open(out + ".json", "w") as f:
    json.dump(report, f)


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("fsdp") / "out")
  env = dict(os.environ, PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  run = subprocess.run(
      [sys.executable, "-c", "import sys; from tests import "
       "test_teacher_cache as t; t.fsdp_builds(sys.argv[1])", out],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(out + ".json") as f:
    report = {int(k): v for k, v in json.load(f).items()}
  return dict(np.load(out + ".npz")), report


def test_cache_built_on_fsdp_mesh_equals_the_replicated_one(fsdp_results):
  arrays, _ = fsdp_results
  names = sorted(k.split("/", 1)[1] for k in arrays if k.startswith("1/"))
  assert "0/index.npy" in names and "1/logits.npy" in names
  for fsdp in (2, 4):
    assert sorted(k.split("/", 1)[1] for k in arrays
                  if k.startswith(f"{fsdp}/")) == names
    for name in names:
      np.testing.assert_allclose(arrays[f"{fsdp}/{name}"],
                                 arrays[f"1/{name}"], rtol=1e-6, atol=1e-6,
                                 err_msg=f"fsdp={fsdp} {name}")


def test_teacher_stays_sliced_while_building(fsdp_results):
  """With fsdp=N the forward takes each large teacher array as N slices
  (one per device of a group), as training holds it; fsdp=1 whole."""
  _, report = fsdp_results
  assert all(x["spec"] == [] and x["piece"] == x["size"] for x in report[1])
  for fsdp in (2, 4):
    sliced = [x for x in report[fsdp] if "fsdp" in x["spec"]]
    assert sum(x["size"] for x in sliced) > 0.8 * sum(
        x["size"] for x in report[fsdp])
    assert all(x["piece"] * fsdp == x["size"] for x in sliced)


def test_config_values():
  c = cache_config("auto")
  ds = data.build(c.data)
  method, _ = train.build_method(c, "distilled", "", ds.num_classes,
                                 load_teacher=False)
  c.teacher_cache_dtype = "int8"
  with pytest.raises(train.ConfigError, match="teacher_cache_dtype='int8'"):
    teacher_cache.check(c, "distilled", method, ds)


def test_bytes_per_example_from_shapes():
  c = cache_config("auto")
  ds = data.build(c.data)
  method, _ = train.build_method(c, "distilled", "", ds.num_classes,
                                 load_teacher=False)
  example = jnp.zeros((1, 16, 16, 1))
  variables = jax.eval_shape(lambda x: method.teacher.init(
      jax.random.key(0), x, train=False), example)
  out = jax.eval_shape(method.teacher_outputs, variables, example)
  m = teacher_cache.manifest(
      teacher_model={}, teacher_variables={}, data_options={}, examples=12,
      transforms=(), input_shape=(16, 16, 1), seed=0, outputs=out,
      dtype="bfloat16", views=method.view_table)
  # Teacher width 4, depth 2 on 16²: logits 16·16·9, AT's map of enc1
  # (16·16·4 with its 4 channels averaged: 4× smaller), bottleneck 4·4·16
  # (width 4·2² at 16/2²), two bytes each, + the index.
  assert m["outputs"][AT_VIEW] == [16, 16]
  assert teacher_cache.bytes_per_example(m) == 8 + 2 * (
      16 * 16 * 9 + 16 * 16 * 4 // 4 + 4 * 4 * 16)


@pytest.mark.slow
def test_command_builds_ahead_and_training_runs_no_teacher(
    teacher_dir, tmp_path, monkeypatch):
  """`python -m kd_jax.teacher_cache`'s body on a run whose teacher stage
  is trained: the distill stage then trains on the cache alone."""
  monkeypatch.setenv("KD_JAX_CACHE", str(tmp_path / "root"))
  c = cache_config(None)
  workdir = os.path.dirname(teacher_dir)
  built = teacher_cache.build_for_run(c, workdir, ["distilled"])
  assert list(built) == ["distilled"] and c.teacher_cache == "auto"
  before = teacher_cache.forwards
  _, state = train.train_stage(c, "distilled", workdir, data.build(c.data))
  assert teacher_cache.forwards == before and int(state.step) == 4
  with pytest.raises(train.ConfigError, match="--stage=nope: not a stage"):
    teacher_cache.build_for_run(c, workdir, ["nope"])
