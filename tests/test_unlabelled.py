"""Tests for the unlabelled pool: `data.unlabelled` in the registry and the
mixed batches of `pipeline.train_batches(unlabelled=...)`.

Pipeline tests use tiny array sources whose every image holds one value (its
id), so a batch row says which example it is. The real-data test reads the
shared folder ($KD_JAX_DATA or ../shared/data) and skips where it is absent.
"""

import csv
import os
from pathlib import Path

import grain
import numpy as np
import pytest

from kd_jax import data
from kd_jax.data import pipeline, sources, transforms

ROOT = Path(__file__).parents[1]
DATA = Path(os.environ.get(sources.DATA_ENV,
                           ROOT.parent / "shared" / "data"))


def _images(ids, size=8):
  """uint8 images, image i filled with ids[i] (read back by `_ids`)."""
  return np.broadcast_to(np.asarray(ids, np.uint8)[:, None, None, None],
                         (len(ids), size, size, 1)).copy()


def _ids(images):
  return [int(round(float(x[0, 0, 0]) * 255)) for x in images]


@pytest.fixture(scope="module")
def labelled():
  n = 10
  return sources.ArraySource(
      _images(range(n)), np.arange(n) % 2, 2, name="labelled",
      extras={"orig_hw": np.full((n, 2), 7.0, np.float32)})


@pytest.fixture(scope="module")
def pool():
  return sources.ArraySource(_images(range(100, 112)), None, None,
                             name="pool")


def _batches(labelled, pool, **kw):
  kw = dict(dict(batch_size=8, seed=3, unlabelled=pool,
                 unlabelled_per_batch=3), **kw)
  return pipeline.train_batches(labelled, **kw)


# --------------------------------------------------------------------------
# Mixed batches.


def test_each_batch_has_k_flagged_pool_examples_with_zero_fillers(
    labelled, pool):
  ds = _batches(labelled, pool)
  for step in range(5):
    b = ds[step]
    assert set(b) == {"image", "label", "orig_hw", "labelled"}
    assert b["image"].shape == (8, 8, 8, 1) and b["image"].dtype == np.float32
    assert b["labelled"].dtype == bool
    assert b["labelled"].tolist() == [True] * 5 + [False] * 3
    ids = _ids(b["image"])
    assert all(i < 100 for i in ids[:5]) and all(i >= 100 for i in ids[5:])
    # Fillers: zeros of the labelled keys' shape and dtype.
    assert b["label"].dtype == np.int32 and b["label"].shape == (8,)
    assert b["orig_hw"].dtype == np.float32 and b["orig_hw"].shape == (8, 2)
    assert not b["label"][5:].any() and not b["orig_hw"][5:].any()
    assert (b["orig_hw"][:5] == 7.0).all()
    np.testing.assert_array_equal(b["label"][:5], np.asarray(ids[:5]) % 2)


def test_without_a_pool_batches_are_unchanged(labelled):
  plain = pipeline.train_batches(labelled, batch_size=4, seed=3)
  again = pipeline.train_batches(labelled, batch_size=4, seed=3,
                                 unlabelled=None, unlabelled_per_batch=0)
  for step in range(3):
    a, b = plain[step], again[step]
    assert set(a) == set(b) == {"image", "label", "orig_hw"}
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


class _Shift(grain.transforms.RandomMap):
  """Adds a random offset in [0.5, 1): marks every augmented image."""

  def random_map(self, element, rng):
    return {**element, "image": element["image"] + np.float32(
        rng.uniform(0.5, 1.0))}


def test_batches_are_deterministic_and_resume_by_step(labelled, pool):
  aug = [transforms.SegmentationAugment(rot90=False, max_rotation_deg=15.0),
         _Shift()]
  ds = _batches(labelled, pool, transforms=aug)
  fresh = _batches(labelled, pool, transforms=aug)
  straight = [b for _, b in zip(range(6), pipeline.iterate(ds))]
  resumed = [b for _, b in zip(range(3), pipeline.iterate(fresh, 3))]
  for s, b in enumerate(straight):
    for key in b:
      np.testing.assert_array_equal(b[key], ds[s][key])
      np.testing.assert_array_equal(b[key], fresh[s][key])
  for a, b in zip(straight[3:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # The random transforms reach the pool images too.
  raw = {float(x[0, 0, 0]) for x in _images(range(100, 112)) / 255.0}
  for b in straight:
    assert (b["image"][5:] >= 0.5).all()
    assert not {float(x[0, 0, 0]) for x in b["image"][5:]} & raw


def test_every_pool_image_appears_once_per_pool_epoch(labelled, pool):
  ds = _batches(labelled, pool)  # 12 pool images, 3 per batch: 4 steps.
  epochs = [[i for s in range(4 * e, 4 * e + 4) for i in _ids(
      ds[s]["image"][5:])] for e in range(3)]
  for ids in epochs:
    assert sorted(ids) == list(range(100, 112))
  assert epochs[0] != epochs[1] != epochs[2]  # Reshuffled every pool epoch.
  # The labelled set (10, 5 per batch) keeps its own epochs meanwhile.
  for e in range(3):
    ids = [i for s in (2 * e, 2 * e + 1) for i in _ids(ds[s]["image"][:5])]
    assert sorted(ids) == list(range(10))


def test_two_processes_read_the_one_process_batches(labelled, pool):
  """Each process gets its half of the labelled rows and of the pool rows
  of every global batch: together, one process's batch."""
  one = _batches(labelled, pool, batch_size=8, unlabelled_per_batch=4)
  parts = [_batches(labelled, pool, batch_size=8, unlabelled_per_batch=4,
                    shard_index=i, shard_count=2) for i in range(2)]
  for step in range(6):
    for p in parts:
      assert p[step]["image"].shape[0] == 4
      assert p[step]["labelled"].tolist() == [True, True, False, False]
    lab = [i for p in parts for i in _ids(p[step]["image"][:2])]
    unl = [i for p in parts for i in _ids(p[step]["image"][2:])]
    assert lab == list(_ids(one[step]["image"][:4]))
    assert unl == list(_ids(one[step]["image"][4:]))


def test_pipeline_errors(labelled, pool):
  for kw, match in [
      (dict(unlabelled_per_batch=8), r"unlabelled_per_batch=8: expected an "
       r"int in \[1, 7\]"),
      (dict(unlabelled_per_batch=0), r"unlabelled_per_batch=0: expected"),
      (dict(unlabelled_per_batch=3, shard_index=0, shard_count=2),
       "unlabelled_per_batch 3 is not divisible by the 2 processes"),
      (dict(teacher_outputs={"logits": np.zeros((10, 2))}),
       "no teacher cache with an unlabelled pool"),
      (dict(unlabelled=None), "without an unlabelled pool"),
  ]:
    with pytest.raises(ValueError, match=match) as e:
      _batches(labelled, pool, **kw)
    assert "\n" not in str(e.value)
  big = sources.ArraySource(_images(range(4), size=6), None, None)
  with pytest.raises(ValueError, match=r"unlabelled images are \(6, 6, 1\) "
                     r"float32 .* labelled images are \(8, 8, 1\)"):
    _batches(labelled, big)[0]


# --------------------------------------------------------------------------
# data.unlabelled in the registry.


def _synthetic(**kw):
  return data.build(dict(name="synthetic", image_size=16, num_train=4,
                         num_val=2, num_test=2, **kw))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """Two image folders with a CSV each (RGB 10×12 PNGs), and an empty CSV."""
  from PIL import Image
  root = tmp_path_factory.mktemp("pool")
  rng = np.random.default_rng(0)
  for part, n in (("a", 6), ("b", 5), ("empty", 0)):
    (root / part).mkdir()
    rows = []
    for i in range(n):
      Image.fromarray(rng.integers(0, 256, (10, 12, 3), np.uint8)).save(
          root / part / f"{i}.png")
      rows.append({"image": f"{i}.png", "label": i % 2})
    with open(root / part / "list.csv", "w", newline="") as f:
      w = csv.DictWriter(f, ["image", "label"])
      w.writeheader()
      w.writerows(rows)
  return root


def _folder(folders, part, **kw):
  return dict(name="folder", csv=str(folders / part / "list.csv"), **kw)


def test_no_pool_by_default_and_every_set_takes_the_option():
  for name in data.BUILDERS:
    assert data.options(name)["unlabelled"] is None
  for value in (None, {}, dict(sources=(), per_batch=0)):
    ds = _synthetic(unlabelled=value)
    assert ds.unlabelled is None and ds.unlabelled_per_batch == 0
    data.check_unlabelled(ds, 8)


def test_folder_pool_takes_the_labelled_size_and_channels(folders):
  ds = _synthetic(unlabelled=dict(sources=[_folder(folders, "a"),
                                           _folder(folders, "b")],
                                  per_batch=2))
  assert isinstance(ds.unlabelled, data.ImagePool)
  assert len(ds.unlabelled) == 6 + 5 and ds.unlabelled_per_batch == 2
  assert "unlabelled pool: 11 images" in ds.description
  for i in range(len(ds.unlabelled)):
    ex = ds.unlabelled[i]
    assert set(ex) == {"image"}
    assert ex["image"].shape == (16, 16, 1)
    assert ex["image"].dtype == np.float32
  data.check_unlabelled(ds, 8, process_count=2)
  b = pipeline.train_batches(ds.train, batch_size=4, seed=0,
                             unlabelled=ds.unlabelled,
                             unlabelled_per_batch=ds.unlabelled_per_batch)[0]
  assert b["labelled"].tolist() == [True, True, False, False]
  assert b["label"].shape == (4, 16, 16) and not b["label"][2:].any()


def _error(match, **kw):
  with pytest.raises(ValueError, match=match) as e:
    _synthetic(**kw)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_registry_errors_name_the_key_and_the_choices(folders):
  msg = _error(r"data.unlabelled.sources\[1\] names 'plam', an unknown data "
               r"set; choose one of \[", unlabelled=dict(
                   sources=("drive", "plam"), per_batch=2))
  assert "'palm'" in msg and "'idrid_lesions'" in msg
  _error(r"data.unlabelled.sources\[0\] \(folder\): .*list.csv: the data "
         r"set is empty", unlabelled=dict(
             sources=(_folder(folders, "empty"),), per_batch=2))
  _error(r"data.unlabelled.sources\[0\] \(folder\): pool images are "
         r"\(8, 8, 1\) but the labelled synthetic images are \(16, 16, 1\); "
         r"set image_size=16 in its dict", unlabelled=dict(
             sources=(_folder(folders, "a", image_size=8),), per_batch=2))
  _error(r"pool images are \(16, 16, 3\) .* set channels=1 in its dict",
         unlabelled=dict(sources=(_folder(folders, "a", channels=3),),
                         per_batch=2))
  _error(r"data.unlabelled.sources\[0\] is 'synthetic', the labelled data "
         r"set itself: its images would leak into evaluation",
         unlabelled=dict(sources=("synthetic",), per_batch=2))
  for bad in (0, -1, 2.5, True, "2"):
    _error(r"data.unlabelled.per_batch=.*: expected an int >= 1",
           unlabelled=dict(sources=(_folder(folders, "a"),), per_batch=bad))
  _error(r"data.unlabelled.per_batch=2 but data.unlabelled.sources is empty",
         unlabelled=dict(sources=(), per_batch=2))
  _error(r"data.unlabelled.size is not an option of the unlabelled pool; "
         r"its options are \['per_batch', 'sources'\]",
         unlabelled=dict(sources=("palm",), per_batch=2, size=3))


def test_folder_pool_of_the_labelled_folder_is_refused(folders):
  labelled = _folder(folders, "a", image_size=8)
  with pytest.raises(ValueError, match=r"data.unlabelled.sources\[0\] "
                     r"\(folder\) reads images of the labelled folder set's "
                     r"val/test split: they would leak into evaluation"):
    data.build(dict(labelled, unlabelled=dict(
        sources=(_folder(folders, "a"),), per_batch=1)))
  # Another folder is another data set.
  ds = data.build(dict(labelled, unlabelled=dict(
      sources=(_folder(folders, "b"),), per_batch=1)))
  assert len(ds.unlabelled) == 5
  assert ds.unlabelled[0]["image"].shape == (8, 8, 3)


def test_check_unlabelled(folders):
  ds = _synthetic(unlabelled=dict(sources=(_folder(folders, "b"),),
                                  per_batch=4))
  data.check_unlabelled(ds, 5, process_count=1)
  for batch_size, count, match in [
      (4, 1, r"data.unlabelled.per_batch=4 for batch_size 4: expected an int "
       r"in \[1, 3\]"),
      (2, 1, r"in \[1, 1\]"),
      (8, 3, r"data.unlabelled.per_batch=4 is not divisible by the 3 "
       r"processes"),
  ]:
    with pytest.raises(ValueError, match=match) as e:
      data.check_unlabelled(ds, batch_size, process_count=count)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")
def test_idrid_grading_with_the_fundus_pool():
  names = ("palm", "drive", "idrid_lesions")
  ds = data.build(dict(name="idrid_grading", image_size=64, root=str(DATA),
                       unlabelled=dict(sources=names, per_batch=4)))
  expected = 0
  for name in names:
    other = data.build(dict(name=name, image_size=64, root=str(DATA)))
    expected += len(other.train) + len(other.val)
  assert len(ds.unlabelled) == expected == 400 + 20 + 54
  assert ds.unlabelled_per_batch == 4
  shape = ds.train[0]["image"].shape
  assert shape == (64, 64, 3)
  ends = np.cumsum(ds.unlabelled.sizes)
  for i in np.concatenate([[0], ends[:-1], ends - 1]):
    assert ds.unlabelled[int(i)]["image"].shape == shape
  data.check_unlabelled(ds, 16, process_count=1)
  b = pipeline.train_batches(ds.train, batch_size=16, seed=0,
                             transforms=ds.train_transforms,
                             unlabelled=ds.unlabelled,
                             unlabelled_per_batch=4)[0]
  assert b["image"].shape == (16, 64, 64, 3) and b["labelled"].sum() == 12
  assert not b["dr_grade"][12:].any() and not b["fovea"][12:].any()
