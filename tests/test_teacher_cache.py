"""config.teacher_cache: the teacher's outputs computed once per example.

A cached run must train exactly like an uncached one (same batches, same
losses), resume exactly, and be refused when a random augmentation would
make the cached outputs belong to another view of the image.
"""
import os
import signal
import sys

import jax
import numpy as np
import pytest

from kd_jax import checkpoint, data, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.test_train import tiny_config  # noqa: E402


def cache_config(cache, steps=4):
  c = tiny_config(steps=steps)
  c.log_every = 1
  c.data.augment = False
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
def teacher_dir(tmp_path_factory):
  """A trained (2-step) teacher stage in a workdir of its own."""
  c = cache_config(False)
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


@pytest.fixture(scope="module")
def uncached_and_cached(teacher_dir, tmp_path_factory):
  runs = {}
  for cache in (False, True):
    workdir = str(tmp_path_factory.mktemp(f"cache_{cache}"))
    _, _, state = _distil(cache, teacher_dir, workdir)
    runs[cache] = (state, train.read_history(os.path.join(workdir,
                                                          "distilled")))
  return runs


def test_cached_and_uncached_losses_are_equal(uncached_and_cached):
  (plain, h_plain), (cached, h_cached) = (uncached_and_cached[False],
                                          uncached_and_cached[True])
  for key in ("train/loss", "train/kd", "train/hint", "train/at",
              "train/ce"):
    assert h_plain[key][0] == h_cached[key][0] == [1, 2, 3, 4]
    np.testing.assert_allclose(h_cached[key][1], h_plain[key][1], rtol=1e-5,
                               atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               plain.params, cached.params)


def test_cache_holds_each_examples_teacher_outputs(teacher_dir):
  """Against the teacher applied to one example at a time, in source order."""
  c = cache_config(True)
  c.stages.distilled.teacher.checkpoint = teacher_dir
  ds = data.build(c.data)
  method, _ = train.build_method(c, "distilled", "", ds.num_classes,
                                 load_teacher=False)
  frozen = checkpoint.load_model_variables(teacher_dir)
  cache = train.build_teacher_cache(
      method, frozen, ds.train, transforms=ds.train_transforms,
      batch_size=8, mesh=train.make_mesh())  # 12 examples: one padded batch.
  assert set(cache) == {"logits", "features"}
  assert set(cache["features"]) == {"bottleneck", "enc1"}
  for i in (0, 7, 11):
    logits, feats = method.teacher.apply(
        frozen, ds.train[i]["image"][None], train=False)
    np.testing.assert_allclose(cache["logits"][i], logits[0], atol=1e-5)
    np.testing.assert_allclose(cache["features"]["enc1"][i], feats["enc1"][0],
                               atol=1e-5)
  assert cache["logits"].shape[0] == len(ds.train)


def test_batches_carry_the_outputs_of_their_own_examples():
  """A stand-in cache (each example's image mean) must travel with its
  example through the shuffle and across epochs."""
  ds = data.build(cache_config(True).data)
  means = np.asarray([ds.train[i]["image"].mean() for i in range(len(ds.train))])
  batches = data.pipeline.train_batches(ds.train, batch_size=4, seed=3,
                                        teacher_outputs={"m": means})
  plain = data.pipeline.train_batches(ds.train, batch_size=4, seed=3)
  for step in (0, 2, 5, 9):  # 3 batches per epoch: several epochs.
    b = batches[step]
    np.testing.assert_array_equal(b["image"], plain[step]["image"])
    np.testing.assert_allclose(b["teacher"]["m"], b["image"].mean((1, 2, 3)),
                               rtol=1e-6)


def test_cached_loss_never_touches_the_teacher(teacher_dir):
  c = cache_config(True)
  ds = data.build(c.data)
  method, _ = train.build_method(c, "distilled", "", ds.num_classes,
                                 load_teacher=False)
  frozen = checkpoint.load_model_variables(teacher_dir)
  batch = data.pipeline.train_batches(ds.train, batch_size=4, seed=0)[0]
  variables = method.init(jax.random.key(0), batch["image"][:1])
  rng = jax.random.key(1)
  loss, _ = method.loss_fn(variables["params"], variables["batch_stats"],
                           frozen, batch, rng)
  cached = dict(batch, teacher=method.teacher_outputs(frozen, batch["image"]))
  cached_loss, _ = method.loss_fn(variables["params"],
                                  variables["batch_stats"], None, cached, rng)
  np.testing.assert_allclose(cached_loss, loss, rtol=1e-6)


def test_refused_with_random_augmentation(tmp_path):
  c = cache_config(True)
  c.data.augment = True
  with pytest.raises(train.ConfigError) as e:
    train.validate(c, str(tmp_path), data.build(c.data))
  msg = str(e.value)
  assert "teacher_cache" in msg and "data.augment" in msg
  assert "--config.data.augment=False" in msg
  assert "--config.teacher_cache=False" in msg


def test_refused_when_too_big_for_host_memory(tmp_path, monkeypatch):
  c = cache_config(True)
  monkeypatch.setattr(train, "TEACHER_CACHE_MAX_MEMORY_FRACTION", 1e-9)
  with pytest.raises(train.ConfigError, match="teacher_cache: the teacher "
                     "outputs of 12 training examples take"):
    train.validate(c, str(tmp_path), data.build(c.data))


def test_per_example_bytes_from_shapes_only():
  c = cache_config(True)
  ds = data.build(c.data)
  method, _ = train.build_method(c, "distilled", "", ds.num_classes,
                                 load_teacher=False)
  example = np.zeros((2, 16, 16, 1), np.float32)
  # Teacher width 4, depth 2 on 16²: logits 16·16·9, enc1 16·16·4,
  # bottleneck 4·4·16 (width 4·2² at 16/2²), float32.
  expected = 4 * (16 * 16 * 9 + 16 * 16 * 4 + 4 * 4 * 16)
  assert train.teacher_output_bytes(method, example) == expected


def test_resume_with_cache_is_exact(teacher_dir, uncached_and_cached,
                                    tmp_path, monkeypatch):
  reference, _ = uncached_and_cached[True]
  real_save = checkpoint.save

  def save_then_sigterm(mngr, step, state, force=False):
    out = real_save(mngr, step, state, force=force)
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  monkeypatch.setattr(checkpoint, "save", save_then_sigterm)
  with pytest.raises(SystemExit, match="SIGTERM at step 2"):
    _distil(True, teacher_dir, str(tmp_path))
  monkeypatch.setattr(checkpoint, "save", real_save)
  _, _, resumed = _distil(True, teacher_dir, str(tmp_path))
  assert int(resumed.step) == 4
  jax.tree.map(np.testing.assert_array_equal, reference.params,
               resumed.params)
  jax.tree.map(np.testing.assert_array_equal, reference.opt_state,
               resumed.opt_state)
