"""Tests for kd_jax.data.build: the acdc and synapse data sets (the other
names: test_data_registry.py)."""
import os

import ml_collections
import numpy as np
import pytest

import synapse_fixture
from kd_jax import data
from kd_jax.data import sources


def _cfg(**kw):
  return ml_collections.ConfigDict(kw)


@pytest.fixture(scope="module")
def synapse_root(tmp_path_factory):
  return synapse_fixture.write(tmp_path_factory.mktemp("synapse"))


def test_synapse_splits_hold_out_the_last_training_cases(synapse_root):
  ds = data.build(_cfg(name="synapse", root=str(synapse_root), list_dir="",
                       image_size=16, augment=True, num_val_cases=1,
                       num_classes=9))
  assert ds.num_classes == 9 and list(ds.class_names) == list(
      sources.SYNAPSE_CLASSES)
  assert len(ds.train) == 9 and len(ds.val) == 3  # 3 slices per case
  val_paths = {ds.val.source.paths[i] for i in ds.val.indices}
  assert all("case0008" in p for p in val_paths)
  train_paths = {ds.train.source.paths[i] for i in ds.train.indices}
  assert not val_paths & train_paths
  # The test split is every slice of the test volumes, resized.
  assert len(ds.test) == 2 * 3 and ds.volumes_split == "test"
  assert len(ds.volumes) == 2
  for split in (ds.train, ds.val, ds.test):
    ex = split[0]
    assert ex["image"].shape == (16, 16, 1) and ex["label"].shape == (16, 16)
    assert ex["image"].dtype == np.float32 and ex["label"].dtype == np.int32
  vol = ds.volumes[0]
  assert vol["image"].shape == (3, 40, 40, 1) and vol["label"].shape == (
      3, 40, 40)
  assert set(np.unique(vol["label"])) <= {0, 1, 3, 6}
  assert ds.train_transforms  # TransUNet's rotation / flip


def test_synapse_less_data_keeps_the_val_cases(synapse_root):
  cfg = dict(name="synapse", root=str(synapse_root), list_dir="",
             image_size=16, augment=False, num_val_cases=1, num_classes=9)
  full = data.build(_cfg(**cfg))
  third = data.build(_cfg(**cfg, train_fraction=1 / 3))
  assert third.train.source.paths == full.train.source.paths
  assert len(third.train) == 3
  assert set(third.train.indices) < set(full.train.indices)
  np.testing.assert_array_equal(third.val.indices, full.val.indices)
  assert third.targets["label"].num_classes == 9


def test_synapse_without_list_files_reads_every_file(synapse_root, tmp_path):
  ds = data.build(_cfg(name="synapse", root=str(synapse_root),
                       list_dir=str(tmp_path), image_size=16, augment=False,
                       num_val_cases=2, num_classes=9))
  assert len(ds.train) == 6 and len(ds.val) == 6
  assert not ds.train_transforms


@pytest.mark.parametrize("kw,match", [
    (dict(root=""), "data.root is empty"),
    (dict(num_val_cases=4), "num_val_cases=4 leaves no train"),
    (dict(root="/nonexistent/synapse"), "folder not found"),
])
def test_synapse_config_errors(synapse_root, kw, match):
  cfg = dict(name="synapse", root=str(synapse_root), list_dir="",
             image_size=16, augment=False, num_val_cases=1, num_classes=9)
  cfg.update(kw)
  with pytest.raises(ValueError, match=match):
    data.build(_cfg(**cfg))


ACDC = os.path.join(str(sources.resolve_data_dir()), "acdc")


@pytest.mark.skipif(not os.path.isdir(ACDC), reason=f"{ACDC} is absent")
def test_acdc_trains_on_slices_and_validates_on_volumes():
  ds = data.build(_cfg(name="acdc", root="", image_size=32, augment=True,
                       max_train=8, max_volumes=2))
  assert ds.num_classes == 4 and ds.class_names[3] == "left_ventricle"
  assert len(ds.train) == 8 and len(ds.volumes) == 2
  assert ds.val is ds.test and ds.volumes_split == "val"
  assert len(ds.val) == sum(ds.volumes.depth(i) for i in range(2))
  ex = ds.train[0]
  assert ex["image"].shape == (32, 32, 1) and ex["label"].shape == (32, 32)
  # Per-slice z-score normalisation of the MRI intensities.
  assert abs(float(ex["image"].mean())) < 0.2
  assert ds.val[0]["image"].shape == (32, 32, 1)
