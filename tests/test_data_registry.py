"""Tests for kd_jax.data's registry: every data set by name, its targets,
seeded splits, less-data subsets, channels/size, and landmark units.

Real-data tests read the shared folder ($KD_JAX_DATA or ../shared/data) and
skip where it is absent; folder and TFDS sets use fixtures written here.
"""

import csv
import importlib.util
import os
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from kd_jax import data
from kd_jax.data import pipeline, sources, targets, transforms

ROOT = Path(__file__).parents[1]
DATA = Path(os.environ.get(sources.DATA_ENV,
                           ROOT.parent / "shared" / "data"))
needs_data = pytest.mark.skipif(not DATA.is_dir(),
                                reason=f"real data not found at {DATA}")


def build(name, **kw):
  if name not in ("synthetic", "folder", "tfds", "synapse"):
    kw.setdefault("root", str(DATA))
  return data.build(ml_collections.ConfigDict(dict(name=name, **kw)))


def idx(split):
  """Indices into the full source of a split (through a channel map)."""
  split = getattr(split, "source", split) if isinstance(
      split, sources.MapSource) else split
  return set(int(i) for i in split.indices)


# --------------------------------------------------------------------------
# The registry and its one-line errors (no data needed).


def test_every_name_is_registered_with_its_options():
  assert sorted(data.BUILDERS) == sorted([
      "synthetic", "synthetic_fundus", "acdc", "synapse", "idrid_grading",
      "idrid_referable", "idrid_lesions", "drive", "palm", "pneumoniamnist",
      "totalseg", "folder", "tfds", "image_folder", "shared_images"])
  for name in data.BUILDERS:
    assert callable(data.BUILDERS[name]) and isinstance(
        data.options(name), dict)
  for name in ("idrid_grading", "idrid_referable", "idrid_lesions", "drive",
               "palm",
               "totalseg", "folder", "tfds"):
    opts = data.options(name)
    for key in ("image_size", "channels", "seed", "val_fraction",
                "train_fraction", "max_train", "augment"):
      assert key in opts, (name, key)


def test_unknown_name_and_unknown_key_are_one_line_errors():
  with pytest.raises(ValueError) as e:
    data.build(dict(name="idrid"))
  msg = str(e.value)
  assert "\n" not in msg and "'idrid' is unknown" in msg
  assert "idrid_grading" in msg and "pneumoniamnist" in msg
  for name in data.BUILDERS:
    with pytest.raises(ValueError) as e:
      data.build(dict(name=name, image_sise=64))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"data.image_sise is not an option of data set "
                          f"{name!r}; its options are [")
    assert "'image_size'" in msg


@pytest.mark.parametrize("kw,match", [
    (dict(name="palm", num_classes=4), r"data.num_classes=4 for palm: "
     r"expected 3 .* or 2"),
    (dict(name="idrid_lesions", lesions=("MA", "XX")), "non-empty subset"),
    (dict(name="folder"), "data.csv is empty"),
    (dict(name="tfds"), "data.dataset is empty"),
    (dict(name="drive", augment="scale_crop", crop_size=-3),
     r"data.crop_size=-3 for drive: expected a positive int or \(H, W\)"),
    (dict(name="drive", augment="scale_crop", crop_size=(64, 0)),
     r"data.crop_size=\(64, 0\) for drive: expected a positive int"),
    (dict(name="drive", crop_size=64),
     "data.crop_size=64 for drive: only augment='scale_crop' crops"),
])
def test_bad_values_name_the_key_and_the_choices(kw, match):
  with pytest.raises(ValueError, match=match):
    data.build(dict(root=str(DATA), **kw) if kw["name"] not in (
        "folder", "tfds") else kw)


def _config_module(name):
  spec = importlib.util.spec_from_file_location(
      f"cfg_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_project_configs_use_known_options_only():
  configs = [_config_module("default").get_config()]
  distillo = _config_module("distillo")
  configs += [distillo.get_config(a) for a in ("study", "study,synapse",
                                               "kd,full", "kd,synapse_full")]
  for c in configs:
    known = set(data.options(c.data.name))
    assert set(c.data.keys()) - {"name"} <= known, c.data


def test_datasets_require_names_the_missing_label_key():
  ds = data.build(dict(name="synthetic", image_size=16, num_train=2,
                       num_val=1, num_test=1))
  ds.require(["label"])
  with pytest.raises(ValueError, match=r"head 'dr' reads label key "
                     r"'dr_grade', which this data set does not carry; its "
                     r"targets are \['label'\]"):
    ds.require(["label", "dr_grade"], where="head 'dr'")


def test_target_contract():
  t = targets.classification(5, [f"g{i}" for i in range(5)], ordinal=True)
  assert t.kind == "classification" and t.num_classes == 5 and t.ordinal
  assert targets.Target("landmark").num_classes is None
  with pytest.raises(ValueError, match="kind 'points' is unknown"):
    targets.Target("points")
  with pytest.raises(ValueError, match="needs num_classes"):
    targets.Target("segmentation")
  with pytest.raises(ValueError, match="2 class names for 3 classes"):
    targets.segmentation(3, ["a", "b"])


# --------------------------------------------------------------------------
# Splits: seeded orders, stratification, nesting (no data needed).


def test_seeded_order_prefixes_are_stratified_and_nested():
  strata = np.repeat([0, 1, 2, 3, 4], [134, 20, 136, 74, 49])
  order = sources.seeded_order(len(strata), 3, strata)
  np.testing.assert_array_equal(order, sources.seeded_order(len(strata), 3,
                                                            strata))
  assert sorted(order) == list(range(len(strata)))
  counts = np.bincount(strata)
  for k in (10, 83, 200, 400):
    got = np.bincount(strata[order[:k]], minlength=5)
    assert np.all(np.abs(got - counts * k / len(strata)) <= 1.0), (k, got)
  assert not np.array_equal(order, sources.seeded_order(len(strata), 4,
                                                        strata))


def test_synthetic_is_unchanged():
  ds = data.build(dict(name="synthetic", image_size=16, num_train=3,
                       num_val=2, num_test=2, seed=1, augment=False))
  from kd_jax.data import synthetic
  for split, n, offset in ((ds.train, 3, 0), (ds.val, 2, 1),
                           (ds.test, 2, 2)):
    ref = synthetic.SyntheticCT(n, size=16, seed=1000 + offset)
    for i in range(n):
      np.testing.assert_array_equal(split[i]["image"], ref[i]["image"])
      np.testing.assert_array_equal(split[i]["label"], ref[i]["label"])
  assert ds.num_classes == synthetic.NUM_CLASSES
  assert ds.targets == {"label": targets.segmentation(
      synthetic.NUM_CLASSES, synthetic.ORGANS)}
  assert not ds.train_transforms and not ds.test_is_val


# --------------------------------------------------------------------------
# Landmarks in image units through the geometric transforms.


def test_unit_landmarks_follow_every_geometric_transform():
  rng = np.random.default_rng(0)
  e = {"image": rng.random((12, 20, 3)).astype(np.float32),
       "fovea_xy": np.array([4.0, 7.0], np.float32)}
  e["fovea"] = transforms.to_unit(e["fovea_xy"], (12, 20)).astype(np.float32)
  np.testing.assert_allclose(transforms.from_unit(e["fovea"], (12, 20)),
                             e["fovea_xy"], atol=1e-5)
  resized = transforms.resize(e, (24, 10))
  np.testing.assert_array_equal(resized["fovea"], e["fovea"])  # exact
  ops = [lambda x: transforms.flip(x, 0), lambda x: transforms.flip(x, 1),
         lambda x: transforms.rot90(x, 1), lambda x: transforms.rot90(x, 3),
         lambda x: transforms.rotate(x, 33.0),
         lambda x: transforms.resize(x, (24, 10))]
  for op in ops:
    out = op(e)
    np.testing.assert_allclose(
        out["fovea"], transforms.to_unit(out["fovea_xy"],
                                         out["image"].shape[:2]), atol=1e-6)
  crop = transforms.RandomScaleCrop((10, 10), (0.8, 1.5))
  for seed in range(4):
    out = crop.random_map(e, np.random.default_rng(seed))
    np.testing.assert_allclose(
        out["fovea"], transforms.to_unit(out["fovea_xy"], (10, 10)),
        atol=1e-5)
  grey = transforms.to_channels(e["image"], 1)
  assert grey.shape == (12, 20, 1)
  np.testing.assert_allclose(grey[..., 0], e["image"] @ np.array(
      [0.299, 0.587, 0.114], np.float32), rtol=1e-6)
  assert transforms.to_channels(grey, 3).shape == (12, 20, 3)
  assert transforms.to_channels(grey, 0) is grey


def test_original_pixel_helpers():
  hw = np.array([[3416.0, 3416.0], [100.0, 200.0]])
  off = np.array([[288.0, -284.0], [0.0, 0.0]])
  xy = np.array([[1494.0, 1970.0], [10.0, 99.0]])
  uv = targets.from_original_pixels(xy, hw, off)
  np.testing.assert_allclose(targets.to_original_pixels(uv, hw, off), xy)
  np.testing.assert_allclose(uv[1], [(10.5) / 200, 99.5 / 100])
  err = targets.landmark_error_px(uv + [[0.01, 0.0], [0.0, 0.01]], uv, hw)
  np.testing.assert_allclose(err, [34.16, 1.0])


# --------------------------------------------------------------------------
# folder + CSV (fixture).


def _write_png(path, array):
  from PIL import Image
  Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  (root / "img").mkdir()
  for part, n in (("train", 20), ("test", 6)):
    rows = []
    for i in range(n):
      name = f"img/{part}{i}.png"
      _write_png(root / name, rng.integers(0, 256, (10, 12, 3), np.uint8))
      _write_png(root / f"img/{part}{i}_m.png",
                 rng.integers(0, 3, (10, 12), np.uint8))
      rows.append({"file": name, "dx": ["cat", "dog"][i % 2],
                   "mask": f"img/{part}{i}_m.png"})
    with open(root / f"{part}.csv", "w", newline="") as f:
      w = csv.DictWriter(f, ["file", "dx", "mask"])
      w.writeheader()
      w.writerows(rows)
  return root


def _folder(folder, **kw):
  cfg = dict(csv=str(folder / "train.csv"), image_column="file",
             label_column="dx", class_names=("cat", "dog"), image_size=8)
  cfg.update(kw)
  return build("folder", **cfg)


def test_folder_splits_subsets_and_test_csv(folder):
  ds = _folder(folder, val_fraction=0.25, test_csv=str(folder / "test.csv"))
  assert ds.targets == {"label": targets.classification(2, ("cat", "dog"))}
  assert len(ds.train) == 15 and len(ds.val) == 5 and len(ds.test) == 6
  assert not idx(ds.train) & idx(ds.val)
  assert idx(ds.train) | idx(ds.val) == set(range(20))
  # Stratified: 2 or 3 of each class in val.
  assert sorted(int(ds.val[i]["label"]) for i in range(5)) in (
      [0, 0, 0, 1, 1], [0, 0, 1, 1, 1])
  # The test split is the test CSV, whole and in order.
  assert not ds.test_is_val
  assert [p.name for p in ds.test.image_paths] == [f"test{i}.png"
                                                   for i in range(6)]
  e = ds.train[0]
  assert e["image"].shape == (8, 8, 3) and e["label"].shape == ()
  again = _folder(folder, val_fraction=0.25)
  assert idx(again.val) == idx(ds.val) and again.test_is_val
  quarter = _folder(folder, val_fraction=0.25, train_fraction=0.25)
  half = _folder(folder, val_fraction=0.25, train_fraction=0.5)
  assert idx(quarter.train) < idx(half.train) < idx(ds.train)
  assert idx(quarter.val) == idx(half.val) == idx(ds.val)
  assert len(quarter.train) == 4 and len(half.train) == 8  # round(3.75/7.5)
  capped = _folder(folder, val_fraction=0.25, train_fraction=0.5,
                   max_train=3)
  assert len(capped.train) == 3 and idx(capped.train) < idx(half.train)
  other = _folder(folder, val_fraction=0.25, seed=1)
  assert idx(other.val) != idx(ds.val)
  val_csv = _folder(folder, val_csv=str(folder / "test.csv"))
  assert len(val_csv.train) == 20 and len(val_csv.val) == 6


def test_folder_segmentation_grey_and_errors(folder):
  ds = _folder(folder, label_column="label", mask_column="mask",
               class_names=(), num_classes=3, channels=1, augment=True)
  assert ds.targets == {"label": targets.segmentation(3)}
  assert ds.class_names == ("class_0", "class_1", "class_2")
  e = ds.val[0]
  assert e["image"].shape == (8, 8, 1) and e["label"].shape == (8, 8)
  assert len(ds.train_transforms) == 1  # grey: no colour jitter
  for kw, match in [
      (dict(train_fraction=0.0), r"data.train_fraction=0.0 for folder: "
       r"expected a fraction in \(0, 1\]"),
      (dict(val_fraction=1.0), r"val_fraction=1.0 .* in \(0, 1\)"),
      (dict(val_fraction=0.01), "leaving at least one of the 20"),
      (dict(max_train=-1), "an int >= 0"),
      (dict(channels=2), "1 \\(grey\\) or 3"),
      (dict(image_size=-3), "a positive int, \\(H, W\\), or 0"),
  ]:
    with pytest.raises(ValueError, match=match):
      _folder(folder, **kw)


# --------------------------------------------------------------------------
# TFDS (fixture; skipped without tensorflow_datasets).


def test_tfds_splits_and_channels(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class KdJaxRegistrySet(tfds.core.GeneratorBasedBuilder):
    """Ten 8×8 grey images with a class label; a test split of three."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
              "label": tfds.features.ClassLabel(names=["a", "b"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(10, 0),
              "test": self._generate_examples(3, 100)}

    def _generate_examples(self, n, start):
      for i in range(n):
        yield i, {"image": np.full((8, 8, 1), start + i, np.uint8),
                  "label": i % 2}

  KdJaxRegistrySet(data_dir=tmp_path, file_format="array_record"
                   ).download_and_prepare()
  ds = build("tfds", dataset="kd_jax_registry_set", data_dir=str(tmp_path),
             test_split="test", channels=3, image_size=4)
  assert ds.targets == {"label": targets.classification(2, ("a", "b"))}
  assert len(ds.train) == 8 and len(ds.val) == 2 and len(ds.test) == 3
  assert ds.train[0]["image"].shape == (4, 4, 3)
  # Images encode their index: val came from train, test is untouched.
  value = lambda s, i: int(round(float(s[i]["image"][0, 0, 0]) * 255))
  train = {value(ds.train, i) for i in range(8)}
  val = {value(ds.val, i) for i in range(2)}
  assert not train & val and train | val == set(range(10))
  # (TFDS shuffles records when it writes them: compare as sets.)
  assert sorted(value(ds.test, i) for i in range(3)) == [100, 101, 102]
  no_test = build("tfds", dataset="kd_jax_registry_set",
                  data_dir=str(tmp_path), val_split="test")
  assert len(no_test.train) == 10 and len(no_test.val) == 3
  assert no_test.test_is_val


# --------------------------------------------------------------------------
# The shared real data sets.


@needs_data
def test_idrid_grading_all_four_targets_and_split():
  ds = build("idrid_grading")
  raw = np.load(DATA / "idrid" / "grading_256_train.npz")
  assert set(ds.targets) == {"dr_grade", "dme_risk", "fovea", "optic_disc"}
  assert ds.targets["dr_grade"] == targets.classification(
      5, sources.DR_GRADES, ordinal=True)
  assert ds.targets["fovea"].kind == ds.targets["optic_disc"].kind == \
      "landmark"
  assert ds.num_classes == 5 and ds.test_is_val
  # 413 training images (README) → 330 train / 83 val, disjoint, all used.
  assert len(ds.train) == 330 and len(ds.val) == 83
  train, val = idx(ds.train), idx(ds.val)
  assert not train & val and train | val == set(range(413))
  # Stratified by DR grade; label ranges and counts of the file.
  grade = raw["train_dr_grade"]
  np.testing.assert_array_equal(np.bincount(grade), [134, 20, 136, 74, 49])
  np.testing.assert_array_equal(np.bincount(raw["train_dme_risk"]),
                                [177, 41, 195])
  got = np.bincount(grade[sorted(val)], minlength=5)
  assert np.all(np.abs(got - np.bincount(grade) * 83 / 413) <= 1)
  e = ds.val[5]
  assert set(e) == {"image", "dr_grade", "dme_risk", "fovea", "optic_disc",
                    "orig_hw", "orig_offset"}
  assert e["image"].shape == (256, 256, 3) and e["dr_grade"].dtype == np.int32
  i = sorted(val)[5]
  assert int(e["dr_grade"]) == grade[i]
  assert int(e["dme_risk"]) == raw["train_dme_risk"][i]
  # Seeded and fixed.
  assert idx(build("idrid_grading").val) == val
  assert idx(build("idrid_grading", seed=1).val) != val


@needs_data
def test_idrid_coordinates_round_trip_to_original_pixels():
  raw = np.load(DATA / "idrid" / "grading_256_train.npz")
  box = raw["train_crop_box_xys"]
  # The crop box is centred vertically on the 2848-px-high photographs.
  np.testing.assert_array_equal(2 * box[:, 1] + box[:, 2], 2848)
  # The 256-px columns are (orig - x0) * 256 / side.
  np.testing.assert_allclose(
      (raw["train_fovea_xy_orig"] - box[:, :2]) * 256 / box[:, 2:],
      raw["train_fovea_xy"], atol=1e-3)
  for size in (256, 96):
    src = sources.idrid_grading(DATA, target=None, pixel_landmarks=False,
                                image_size=(size, size))
    for i in (0, 17, 412):
      e = src[i]
      for key, column in (("fovea", "train_fovea_xy_orig"),
                          ("optic_disc", "train_od_xy_orig")):
        assert np.all((0 <= e[key]) & (e[key] <= 1))
        np.testing.assert_allclose(
            targets.to_original_pixels(e[key], e["orig_hw"],
                                       e["orig_offset"]),
            raw[column][i], atol=2e-3)
      np.testing.assert_array_equal(e["orig_hw"], [box[i, 2]] * 2)
      # Units agree with the file's 256-px columns to within 0.05 px.
      np.testing.assert_allclose(e["fovea"] * 256, raw["train_fovea_xy"][i],
                                 atol=0.05)
  # Through the data set and the training pipeline with augmentation.
  ds = build("idrid_grading", image_size=64, augment=True, channels=1)
  assert [type(t).__name__ for t in ds.train_transforms] == [
      "SegmentationAugment"]
  batch = pipeline.train_batches(ds.train, batch_size=4, seed=0,
                                 transforms=ds.train_transforms)[0]
  assert batch["image"].shape == (4, 64, 64, 1)
  assert batch["fovea"].shape == (4, 2) and batch["dr_grade"].shape == (4,)
  assert batch["orig_hw"].dtype == np.float32


@needs_data
def test_less_data_subsets_are_fixed_nested_and_stratified():
  full = build("idrid_grading")
  q1, q2 = (build("idrid_grading", train_fraction=0.25) for _ in range(2))
  half = build("idrid_grading", train_fraction=0.5)
  assert idx(q1.train) == idx(q2.train)
  assert len(q1.train) == round(0.25 * 330) and len(half.train) == 165
  assert idx(q1.train) < idx(half.train) < idx(full.train)
  assert idx(q1.val) == idx(half.val) == idx(full.val)
  capped = build("idrid_grading", train_fraction=0.25, max_train=50)
  assert len(capped.train) == 50 and idx(capped.train) < idx(q1.train)
  grade = np.load(DATA / "idrid" / "grading_256_train.npz")["train_dr_grade"]
  tr = sorted(idx(full.train))
  got = np.bincount(grade[sorted(idx(q1.train))], minlength=5)
  assert np.all(np.abs(got - np.bincount(grade[tr], minlength=5) * 82 / 330)
                <= 1)
  pn = build("pneumoniamnist", train_fraction=0.25)
  assert len(pn.train) == 607 and len(pn.val) == 270


@needs_data
def test_idrid_lesions_drive_palm():
  les = build("idrid_lesions", image_size=64, lesions="EX,HE")
  assert len(les.train) == 43 and len(les.val) == 11
  assert not idx(les.train) & idx(les.val)
  assert set(les.targets) == {"label", "lesion_mask"}
  assert les.targets["lesion_mask"] == targets.Target(
      "multilabel", 5, sources.IDRID_LESIONS)
  e = les.train[3]
  assert e["label"].shape == (64, 64) and e["lesion_mask"].shape == (64, 64, 5)
  np.testing.assert_array_equal(e["label"], e["lesion_mask"][..., [1, 2]].max(
      -1))
  drive = build("drive", image_size=64, channels=1)
  assert len(drive.train) == 16 and len(drive.val) == 4
  e = drive.val[0]
  assert e["image"].shape == (64, 64, 1) and set(np.unique(e["label"])) == {
      0, 1}
  assert e["fov"].shape == (64, 64)
  assert drive.targets == {"label": targets.segmentation(
      2, ("background", "vessel"))}
  p3 = build("palm", image_size=32)
  p2 = build("palm", image_size=32, num_classes=2)
  assert len(p3.train) == 320 and len(p3.val) == 80
  assert idx(p3.val) == idx(p2.val)  # One split for both options.
  assert p3.targets["label"].num_classes == 3
  assert p2.targets["label"] == targets.classification(
      2, ("other", "pathologic_myopia"))
  for i in range(0, 80, 7):
    l3, l2 = int(p3.val[i]["label"]), int(p2.val[i]["label"])
    assert 0 <= l3 < 3 and l2 == int(l3 == 2)
  counts = np.bincount([int(p3.val[i]["label"]) for i in range(80)])
  assert np.all(np.abs(counts - np.array([26, 161, 213]) * 80 / 400) <= 1)


@needs_data
def test_pneumoniamnist_and_totalseg():
  pn = build("pneumoniamnist")
  assert len(pn.train) == 2428 and len(pn.val) == 270 and pn.test_is_val
  assert pn.train[0]["image"].shape == (28, 28, 1)
  labels = [int(pn.val[i]["label"]) for i in range(270)]
  assert np.bincount(labels).tolist() == [135, 135]
  rgb = build("pneumoniamnist", channels=3, image_size=32)
  assert rgb.val[0]["image"].shape == (32, 32, 3)
  ts = build("totalseg", image_size=32, classes="synapse")
  assert ts.num_classes == 9 and len(ts.train) == 24 and len(ts.val) == 6
  val = sorted(idx(ts.val))
  assert val == list(range(val[0], val[0] + 6))  # one contiguous block
  assert not set(val) & idx(ts.train)
  e = ts.train[0]
  assert e["image"].shape == (32, 32, 1) and e["label"].max() < 9
  assert build("totalseg", image_size=32).num_classes == 118
  half = build("totalseg", image_size=32, train_fraction=0.5)
  assert len(half.train) == 12 and idx(half.train) < idx(ts.train)


@needs_data
def test_acdc_is_unchanged():
  ds = build("acdc", image_size=32, augment=True, max_train=8, max_volumes=2)
  ref = sources.acdc_slices(DATA, image_size=(32, 32), max_examples=8)
  for i in range(8):
    np.testing.assert_array_equal(ds.train[i]["image"], ref[i]["image"])
    np.testing.assert_array_equal(ds.train[i]["label"], ref[i]["label"])
  assert ds.targets == {"label": targets.segmentation(4,
                                                      sources.ACDC_CLASSES)}
  assert ds.test_is_val and ds.volumes_split == "val"
  tenth = build("acdc", image_size=32, train_fraction=0.1, max_volumes=1)
  assert len(tenth.train) == round(0.1 * 1312)
