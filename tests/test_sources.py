"""Tests for kd_jax.data.sources: fixtures written here, and the shared real
data (skipped where it is absent)."""

import csv
import os
import pickle
from pathlib import Path

import grain
import numpy as np
import pytest

from kd_jax.data import sources as S
from kd_jax.data import transforms as T

DATA = Path(os.environ.get(
    S.DATA_ENV, Path(__file__).parents[1].parent / "shared" / "data"))
needs_data = pytest.mark.skipif(not DATA.is_dir(),
                                reason=f"real data not found at {DATA}")


def _check_example(e, task, num_classes, hw=None):
  assert e["image"].dtype == np.float32 and e["image"].ndim == 3
  assert e["label"].dtype == np.int32
  if task == "segmentation":
    assert e["label"].shape == e["image"].shape[:2]
  else:
    assert e["label"].shape == ()
  assert 0 <= e["label"].min() and e["label"].max() < num_classes
  if hw:
    assert e["image"].shape[:2] == tuple(hw)


# --------------------------------------------------------------------------
# ArraySource, npz reading, subsets, grain.


def test_array_source_contract_and_validation():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, (4, 6, 5)).astype(np.uint8)
  src = S.ArraySource(images, labels, 3)
  e = src[1]
  _check_example(e, "segmentation", 3)
  np.testing.assert_allclose(e["image"], images[1] / 255.0)
  assert src.task == "segmentation" and len(src) == 4
  np.testing.assert_array_equal(src[1]["image"], e["image"])  # deterministic
  with pytest.raises(IndexError):
    src[4]
  with pytest.raises(ValueError, match=r"outside \[0, num_classes=2\)"):
    S.ArraySource(images, labels, 2, name="x.npz")
  with pytest.raises(ValueError, match="does not match mask"):
    S.ArraySource(images, labels[:, :5], 3)
  with pytest.raises(ValueError, match="empty"):
    S.ArraySource(images[:0], labels[:0], 3)
  bad = images.astype(np.float32)
  bad[2, 1, 1, 0] = np.nan
  with pytest.raises(ValueError, match=r"NaN.*\(2, 1, 1, 0\).*nan_to_num"):
    S.ArraySource(bad, labels, 3)
  with pytest.raises(ValueError, match="rows of 'label'"):
    S.ArraySource(images, labels[:3], 3)
  resized = S.ArraySource(images, labels, 3, image_size=(12, 10))[0]
  _check_example(resized, "segmentation", 3, (12, 10))


def test_resized_examples_are_computed_once_and_equal_a_fresh_resize():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 12, 10, 3), np.uint8)
  labels = rng.integers(0, 3, (5, 12, 10))
  src = S.ArraySource(images, labels, 3, extras={"fov": labels > 0},
                      image_size=(8, 6))
  calls = []
  make = src._resized.make  # pylint: disable=protected-access
  src._resized.make = lambda i: calls.append(i) or make(i)
  for i in (0, 3, 0, -2, 3):
    e = src[i]
    j = i % 5
    want = T.resize({"image": images[j].astype(np.float32) / 255,
                     "label": labels[j].astype(np.int32),
                     "fov": labels[j] > 0}, (8, 6))
    assert e.keys() == want.keys()
    for k in want:
      assert e[k].dtype == want[k].dtype
      np.testing.assert_array_equal(e[k], want[k])
    assert not e["image"].flags.writeable  # Kept for later epochs.
  assert calls == [0, 3]
  e["extra"] = 1  # Each access gets its own dict.
  assert "extra" not in src[3]
  # Past the budget, examples are resized on every access, not kept.
  small = S.ResizedCache(lambda i: {"image": np.full((4,), i, np.float32)},
                         max_bytes=40)
  assert [small[i]["image"][0] for i in (0, 1, 2, 0, 2)] == [0, 1, 2, 0, 2]
  assert sorted(small.examples) == [0, 1] and small.bytes == 32
  assert small[2]["image"].flags.writeable
  # A worker process's copy starts empty, with the budget it was given.
  src._resized.make = make  # pylint: disable=protected-access
  copy = pickle.loads(pickle.dumps(src))
  assert src._resized.examples  # pylint: disable=protected-access
  assert not copy._resized.examples  # pylint: disable=protected-access
  np.testing.assert_array_equal(copy[3]["image"], src[3]["image"])


def test_load_npz_partial_rows_and_errors(tmp_path):
  path = tmp_path / "d.npz"
  a = np.arange(5 * 3 * 2, dtype=np.int16).reshape(5, 3, 2)
  names = np.array(["a", "bb", "ccc", "d", "e"])
  np.savez_compressed(path, a=a, names=names, scalar=np.float32(3))
  full = S.load_npz(path, ["a", "names", "scalar"])
  np.testing.assert_array_equal(full["a"], a)
  part = S.load_npz(path, ["a", "names"], limit=2)
  np.testing.assert_array_equal(part["a"], a[:2])
  np.testing.assert_array_equal(part["names"], names[:2])
  with pytest.raises(ValueError, match=r"missing key\(s\) \['b'\]"):
    S.load_npz(path, ["b"])
  with pytest.raises(ValueError, match="file not found"):
    S.load_npz(tmp_path / "nope.npz", ["a"])


def test_split_subset_and_grain_pipeline():
  images = np.zeros((10, 4, 4, 1), np.float32)
  labels = np.arange(10) % 2
  src = S.ArraySource(images, labels, 2)
  train, val = S.split(src, (0.8, 0.2), seed=1)
  assert len(train) == 8 and len(val) == 2
  assert not set(train.indices) & set(val.indices)
  assert train.num_classes == 2
  quarter, = S.split(src, (0.25,))
  assert len(quarter) == 2 or len(quarter) == 3
  seg = S.ArraySource(np.random.rand(6, 8, 8, 1).astype(np.float32),
                      np.random.randint(0, 3, (6, 8, 8)), 3)
  ds = (grain.MapDataset.source(seg).seed(0)
        .random_map(T.SegmentationAugment()).batch(3))
  batch = ds[0]
  assert batch["image"].shape == (3, 8, 8, 1)
  assert batch["label"].shape == (3, 8, 8) and batch["label"].dtype == np.int32
  with pytest.raises(ValueError, match="unknown data source"):
    S.get_source("nope")
  mapped = S.MapSource(train, lambda e: {**e, "image": e["image"] + 1})
  assert len(mapped) == 8 and mapped.num_classes == 2
  np.testing.assert_array_equal(mapped[0]["image"], train[0]["image"] + 1)


# --------------------------------------------------------------------------
# Synapse / TransUNet layout fixtures.


@pytest.fixture()
def synapse_root(tmp_path):
  rng = np.random.default_rng(0)
  train = tmp_path / "train_npz"
  train.mkdir()
  for case in ("case0005_slice000", "case0005_slice001", "case0006_slice000"):
    np.savez(train / f"{case}.npz",
             image=rng.random((16, 16), dtype=np.float32),
             label=rng.integers(0, 9, (16, 16)).astype(np.float32))
  vols = tmp_path / "test_vol_h5"
  vols.mkdir()
  import h5py
  for case, depth in (("case0001", 4), ("case0002", 3)):
    with h5py.File(vols / f"{case}.npy.h5", "w") as f:
      f["image"] = rng.random((depth, 16, 16), dtype=np.float32)
      f["label"] = rng.integers(0, 9, (depth, 16, 16)).astype(np.float32)
  (tmp_path / "train.txt").write_text("case0006_slice000\ncase0005_slice001\n")
  return tmp_path


def test_synapse_slices_and_volumes(synapse_root):
  src = S.synapse_slices(synapse_root)
  assert len(src) == 3 and src.num_classes == 9
  _check_example(src[0], "segmentation", 9, (16, 16))
  listed = S.synapse_slices(synapse_root,
                            list_file=synapse_root / "train.txt",
                            image_size=(8, 8))
  assert len(listed) == 2
  _check_example(listed[1], "segmentation", 9, (8, 8))
  vols = S.synapse_volumes(synapse_root, spacing=(2.0, 1.0, 1.0))
  v = vols[0]
  assert v["image"].shape == (4, 16, 16, 1) and v["label"].shape == (4, 16, 16)
  assert v["name"] == "case0001"
  np.testing.assert_array_equal(v["spacing"], [2.0, 1.0, 1.0])
  slices = S.SliceSource(vols)
  assert len(slices) == 7
  np.testing.assert_array_equal(slices[5]["label"], vols[1]["label"][1])
  np.testing.assert_allclose(slices[5]["image"], vols[1]["image"][1])


def test_synapse_validation_errors(synapse_root, tmp_path_factory):
  with pytest.raises(ValueError, match="folder not found"):
    S.synapse_slices(tmp_path_factory.mktemp("empty"))
  (synapse_root / "bad.txt").write_text("case9999_slice000\n")
  with pytest.raises(ValueError, match="missing.*case9999_slice000.npz"):
    S.synapse_slices(synapse_root, list_file=synapse_root / "bad.txt")
  np.savez(synapse_root / "train_npz" / "case0007_slice000.npz",
           image=np.zeros((16, 16), np.float32),
           label=np.full((16, 16), 9, np.float32))
  with pytest.raises(ValueError, match=r"case0007_slice000.npz.*\[9, 9\]"):
    S.synapse_slices(synapse_root)
  np.savez(synapse_root / "train_npz" / "case0007_slice000.npz",
           image=np.zeros((16, 16), np.float32),
           label=np.zeros((16, 15), np.float32))
  with pytest.raises(ValueError, match="does not match label shape"):
    S.synapse_slices(synapse_root)
  np.savez(synapse_root / "train_npz" / "case0007_slice000.npz",
           img=np.zeros((16, 16), np.float32))
  with pytest.raises(ValueError, match=r"missing key\(s\) \['image', 'label'"):
    S.synapse_slices(synapse_root)
  # check_all=False only opens the first file.
  assert len(S.synapse_slices(synapse_root, check_all=False)) == 4
  import h5py
  with h5py.File(synapse_root / "test_vol_h5" / "case0003.npy.h5", "w") as f:
    image = np.zeros((2, 16, 16), np.float32)
    image[1, 3, 3] = np.nan
    f["image"] = image
    f["label"] = np.zeros((2, 16, 16), np.float32)
  with pytest.raises(ValueError, match="case0003.*NaN"):
    S.synapse_volumes(synapse_root)


# --------------------------------------------------------------------------
# Folder + CSV.


def _write_png(path, array):
  from PIL import Image
  Image.fromarray(array).save(path)


def test_folder_csv_classification_and_segmentation(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / "img").mkdir()
  rows = []
  for i in range(3):
    _write_png(tmp_path / "img" / f"{i}.png",
               rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    _write_png(tmp_path / "img" / f"{i}_m.png",
               rng.integers(0, 4, (10, 12), dtype=np.uint8))
    rows.append({"file": f"img/{i}.png", "diagnosis": ["cat", "dog"][i % 2],
                 "mask": f"img/{i}_m.png"})
  with open(tmp_path / "labels.csv", "w", newline="") as f:
    w = csv.DictWriter(f, ["file", "diagnosis", "mask"])
    w.writeheader()
    w.writerows(rows)
  cls = S.FolderCsvSource(tmp_path / "labels.csv", image_column="file",
                          label_column="diagnosis",
                          class_names=["cat", "dog"])
  assert len(cls) == 3 and cls.num_classes == 2 and cls.task == "classification"
  _check_example(cls[1], "classification", 2, (10, 12))
  assert int(cls[1]["label"]) == 1
  grey = S.FolderCsvSource(tmp_path / "labels.csv", image_column="file",
                           label_column=None, mask_column="mask",
                           num_classes=4, channels=1, image_size=(5, 6))
  e = grey[2]
  _check_example(e, "segmentation", 4, (5, 6))
  assert e["image"].shape == (5, 6, 1)
  with pytest.raises(ValueError, match=r"row 2: label 'cat' is not a class"):
    S.FolderCsvSource(tmp_path / "labels.csv", image_column="file",
                      label_column="diagnosis")
  with pytest.raises(ValueError,
                     match=r"missing column\(s\) \['image', 'label'\]"):
    S.FolderCsvSource(tmp_path / "labels.csv")
  with pytest.raises(ValueError, match=r"labels span \[0, 3\]"):
    S.FolderCsvSource(tmp_path / "labels.csv", image_column="file",
                      label_column=None, mask_column="mask", num_classes=3)
  with pytest.raises(ValueError, match="CSV file not found"):
    S.FolderCsvSource(tmp_path / "nope.csv")
  # A missing image file and a mask of the wrong size.
  (tmp_path / "img" / "2.png").unlink()
  with pytest.raises(ValueError, match=r"row 4 names a missing file"):
    S.FolderCsvSource(tmp_path / "labels.csv", image_column="file",
                      label_column="diagnosis", class_names=["cat", "dog"])
  _write_png(tmp_path / "img" / "2.png", np.zeros((9, 12, 3), np.uint8))
  with pytest.raises(ValueError, match="mask size"):
    S.FolderCsvSource(tmp_path / "labels.csv", image_column="file",
                      label_column=None, mask_column="mask", num_classes=4)
  with open(tmp_path / "empty.csv", "w") as f:
    f.write("image,label\n")
  with pytest.raises(ValueError, match="empty"):
    S.FolderCsvSource(tmp_path / "empty.csv")


# --------------------------------------------------------------------------
# TFDS (array_record, no TensorFlow).

tfds = pytest.importorskip("tensorflow_datasets")


class KdJaxTinySet(tfds.core.GeneratorBasedBuilder):
  """Five 8×8 RGB images with a class label and a mask."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
            "mask": tfds.features.Tensor(shape=(8, 8), dtype=np.uint8),
        }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(5),
            "test": self._generate_examples(2)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      yield i, {"image": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
                "label": i % 3,
                "mask": rng.integers(0, 2, (8, 8), dtype=np.uint8)}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  KdJaxTinySet(data_dir=data_dir, file_format="array_record"
               ).download_and_prepare()
  return data_dir

def test_image_folder_decodes_large_images_reduced(tmp_path):
  from PIL import Image
  # A smooth 320×400 photograph stand-in: low-frequency colour waves, so a
  # box-averaged then bilinear resize and a bilinear one of the full image
  # differ only by resampling.
  yy, xx = np.mgrid[0:320, 0:400] / 400.0
  rgb = np.stack([np.sin(2 * np.pi * xx), np.cos(3 * np.pi * yy),
                  np.sin(np.pi * (xx + yy))], axis=-1)
  rgb = np.round((rgb + 1) * 127.5).astype(np.uint8)
  Image.fromarray(rgb).save(tmp_path / "a.png")
  Image.fromarray(rgb).save(tmp_path / "b.jpg", quality=95)
  size = (32, 40)
  with Image.open(tmp_path / "a.png") as im:  # 10× box average
    assert S.read_reduced(im, size, "RGB").size == (40, 32)
  with Image.open(tmp_path / "b.jpg") as im:  # 1/8 DCT scale, no box
    assert S.read_reduced(im, size, "RGB").size == (50, 40)
  with Image.open(tmp_path / "a.png") as im:
    assert S.read_reduced(im, None, "RGB").size == (400, 320)
  source = S.ImageFolderSource(tmp_path, image_size=size)
  for i, name in enumerate(("a.png", "b.jpg")):
    with Image.open(tmp_path / name) as im:  # the full decode and resize
      full = T.resize_image(S.to_float_image(np.asarray(im.convert("RGB"))),
                            size)
    got = source[i]["image"]
    assert got.shape == (32, 40, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, full, atol=0.03)
    # Kept once computed: the next epoch reads the same pixels.
    assert source[i]["image"] is got
  grey = S.ImageFolderSource(tmp_path, channels=1, image_size=size)
  assert grey[0]["image"].shape == (32, 40, 1)
  # A worker process's copy (grain pickles the source) reads the same.
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(source))[1]["image"],
                                got)




def test_tfds_source(tfds_dir):
  src = S.TfdsSource("kd_jax_tiny_set", split="train", data_dir=tfds_dir,
                     extra_keys=("mask",))
  assert len(src) == 5 and src.num_classes == 3
  assert src.class_names == ["a", "b", "c"]
  _check_example(src[0], "classification", 3, (8, 8))
  assert src[0]["mask"].shape == (8, 8)
  seg = S.TfdsSource(builder=KdJaxTinySet(data_dir=tfds_dir), split="test",
                     label_key="mask", num_classes=2, image_size=(4, 4))
  assert len(seg) == 2 and seg.task == "segmentation"
  _check_example(seg[1], "segmentation", 2, (4, 4))
  with pytest.raises(ValueError, match=r"missing feature\(s\) \['img'\]"):
    S.TfdsSource("kd_jax_tiny_set", data_dir=tfds_dir, image_key="img")
  with pytest.raises(ValueError, match="is not a ClassLabel"):
    S.TfdsSource("kd_jax_tiny_set", data_dir=tfds_dir, label_key="mask")
  with pytest.raises(ValueError, match="cannot open the split"):
    S.TfdsSource("kd_jax_tiny_set", data_dir=tfds_dir, split="validation")


# --------------------------------------------------------------------------
# The shared real data (small slices only).


@needs_data
def test_real_acdc():
  src = S.acdc_slices(DATA, max_examples=4)
  assert len(src) == 4 and src.num_classes == 4
  e = src[0]
  _check_example(e, "segmentation", 4, (256, 256))
  np.testing.assert_allclose(e["image"].mean(), 0.0, atol=1e-4)  # z-scored
  vols = S.acdc_volumes(DATA, max_volumes=1)
  v = vols[0]
  assert v["image"].shape[:3] == v["label"].shape and v["image"].shape[-1] == 1
  assert set(np.unique(v["label"])) <= {0, 1, 2, 3}


@needs_data
def test_real_fundus_sets():
  grading = S.idrid_grading(DATA, max_examples=4)
  e = grading[0]
  _check_example(e, "classification", 5, (256, 256))
  assert e["fovea_xy"].shape == (2,) and e["disc_xy"].dtype == np.float32
  assert 0 <= int(e["dme_risk"]) < 3
  dme = S.idrid_grading(DATA, target="dme_risk", max_examples=4,
                        image_size=(128, 128))
  np.testing.assert_allclose(dme[0]["fovea_xy"],
                             (e["fovea_xy"] + 0.5) / 2 - 0.5, rtol=1e-6)
  # Landmarks in image units do not change with the size.
  np.testing.assert_array_equal(dme[0]["fovea"], e["fovea"])
  assert e["orig_hw"].shape == e["orig_offset"].shape == (2,)
  multi = S.idrid_grading(DATA, target=None, pixel_landmarks=False,
                          max_examples=2)
  assert set(multi[1]) == {"image", "dr_grade", "dme_risk", "fovea",
                           "optic_disc", "orig_hw", "orig_offset"}
  with pytest.raises(ValueError, match="or None"):
    S.idrid_grading(DATA, target="grade")
  lesions = S.idrid_lesions(DATA, lesions=("EX",), max_examples=1,
                            image_size=(64, 64))
  e = lesions[0]
  _check_example(e, "segmentation", 2, (64, 64))
  assert e["lesion_mask"].shape == (64, 64, 5)
  drive = S.drive_vessels(DATA, max_examples=1)
  e = drive[0]
  _check_example(e, "segmentation", 2, (584, 565))
  assert e["fov"].shape == (584, 565) and e["label"].max() == 1
  pm = S.palm(DATA, target="pm", max_examples=2)
  _check_example(pm[1], "classification", 2, (224, 224))


@needs_data
def test_real_pneumonia_and_totalseg():
  val = S.pneumonia_mnist(DATA, split="val")
  assert len(val) == 270
  _check_example(val[0], "classification", 2, (28, 28))
  ct = S.totalseg_ct(DATA, classes=S.SYNAPSE_CLASSES[1:])
  v = ct[0]
  assert v["image"].shape == (30, 101, 122, 1) and ct.num_classes == 9
  assert 0.0 <= v["image"].min() and v["image"].max() <= 1.0
  assert set(np.unique(v["label"])) <= set(range(9))
  np.testing.assert_array_equal(v["spacing"], [3.0, 3.0, 3.0])
  slices = S.get_source("totalseg", data_dir=DATA, image_size=(32, 32))
  assert len(slices) == 30
  _check_example(slices[10], "segmentation", 118, (32, 32))
  with pytest.raises(ValueError, match="unknown classes"):
    S.totalseg_ct(DATA, classes=["heart_of_gold"])


def test_missing_real_file_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="train_slices_256.npz: file not found"):
    S.acdc_slices(tmp_path)
