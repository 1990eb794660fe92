"""Tests for kd_jax.data.transforms."""

import grain
import numpy as np
import pytest

from kd_jax.data import transforms as T


def _example(h=8, w=8, c=3, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "image": rng.random((h, w, c), dtype=np.float32),
      "label": rng.integers(0, 4, (h, w)).astype(np.int32),
      "fovea_xy": np.array([5.0, 2.0], np.float32),
  }


def test_segmentation_augment_is_grain_random_map_keeping_dtypes():
  aug = T.SegmentationAugment(flip=True, rot90=True, max_rotation_deg=20.0)
  assert isinstance(aug, grain.transforms.RandomMap)
  e = _example()
  seen = set()
  for seed in range(20):
    out = aug.random_map(e, np.random.default_rng(seed))
    assert out["image"].dtype == np.float32 and out["image"].shape == (8, 8, 3)
    assert out["label"].dtype == np.int32 and out["label"].shape == (8, 8)
    # Nearest interpolation: labels stay within the original class ids.
    assert set(np.unique(out["label"])) <= {0, 1, 2, 3}
    seen.add(out["image"].tobytes())
  assert len(seen) > 3  # it does randomise
  # Deterministic given the rng.
  a = aug.random_map(e, np.random.default_rng(7))
  b = aug.random_map(e, np.random.default_rng(7))
  np.testing.assert_array_equal(a["image"], b["image"])
  # Classification examples (scalar label) pass through untouched.
  cls = {"image": e["image"], "label": np.int32(3)}
  assert aug.random_map(cls, np.random.default_rng(0))["label"] == 3


def test_rotate_90_matches_rot90_and_points_follow_pixels():
  e = _example()
  a, b = T.rotate(e, 90.0), T.rot90(e, 1)
  np.testing.assert_allclose(a["image"], b["image"], atol=1e-5)
  np.testing.assert_array_equal(a["label"], b["label"])
  np.testing.assert_allclose(a["fovea_xy"], b["fovea_xy"], atol=1e-5)
  # A marked pixel ends up where the transformed point says.
  for op in (lambda x: T.rot90(x, 1), lambda x: T.rot90(x, 3),
             lambda x: T.flip(x, 0), lambda x: T.flip(x, 1),
             lambda x: T.rotate(x, 90.0)):
    img = np.zeros((8, 8, 1), np.float32)
    img[2, 5] = 1.0  # row y=2, col x=5 = fovea_xy
    out = op({"image": img, "fovea_xy": np.array([5.0, 2.0])})
    y, x = np.unravel_index(np.argmax(out["image"][..., 0]), (8, 8))
    np.testing.assert_allclose(out["fovea_xy"], [x, y], atol=1e-6)


def test_resize_image_masks_and_points():
  e = _example(8, 6)
  out = T.Resize((16, 12)).map(e)
  assert out["image"].shape == (16, 12, 3) and out["image"].dtype == np.float32
  assert out["label"].shape == (16, 12) and out["label"].dtype == np.int32
  # Nearest upsampling by 2 repeats every label twice along each axis.
  np.testing.assert_array_equal(out["label"],
                                e["label"].repeat(2, 0).repeat(2, 1))
  # Pixel-centre convention: x -> (x + 0.5) * s - 0.5.
  np.testing.assert_allclose(out["fovea_xy"], [10.5, 4.5])
  const = {"image": np.full((5, 7, 1), 0.25, np.float32)}
  np.testing.assert_allclose(T.resize(const, (3, 4))["image"], 0.25)
  assert T.resize_image(e["label"], (3, 3), order=0).dtype == np.int32


def test_random_scale_crop_shapes_pad_and_points():
  aug = T.RandomScaleCrop((10, 10), scale_range=(0.5, 2.0), pad_label=255)
  e = _example(8, 8)
  scales = set()
  for seed in range(12):
    out = aug.random_map(e, np.random.default_rng(seed))
    assert out["image"].shape == (10, 10, 3) and out["label"].shape == (10, 10)
    assert out["label"].dtype == np.int32
    assert set(np.unique(out["label"])) <= {0, 1, 2, 3, 255}
    scales.add(255 in out["label"])
  assert scales == {True, False}  # both padded (s < 1.25) and cropped cases
  # A marked pixel and its point move together through scale, crop, flip.
  img = np.zeros((20, 20, 1), np.float32)
  img[6:8, 12:14] = 1.0
  ex = {"image": img, "fovea_xy": np.array([12.5, 6.5])}
  for seed in range(6):
    out = T.RandomScaleCrop((16, 16), (1.0, 1.0)).random_map(
        ex, np.random.default_rng(seed))
    ys, xs = np.nonzero(out["image"][..., 0] > 0.5)
    if len(xs):
      np.testing.assert_allclose(out["fovea_xy"], [xs.mean(), ys.mean()])


def test_color_jitter_and_intensity_helpers():
  e = _example()
  out = T.ColorJitter(0.3, 0.3, 0.3).random_map(e, np.random.default_rng(0))
  assert out["image"].dtype == np.float32 and out["image"].shape == (8, 8, 3)
  assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
  assert not np.allclose(out["image"], e["image"])
  np.testing.assert_array_equal(out["label"], e["label"])
  same = T.ColorJitter(0, 0, 0).random_map(e, np.random.default_rng(0))
  np.testing.assert_allclose(same["image"], e["image"], rtol=1e-6)
  hu = np.array([[-1000, -125, 75, 275, 2000]], np.int16)
  np.testing.assert_allclose(T.ct_window(hu), [[0, 0, 0.5, 1, 1]])
  np.testing.assert_allclose(T.ct_window(hu, -1000, 1000)[0, 0], 0.0)
  with pytest.raises(ValueError, match="high > low"):
    T.ct_window(hu, 10, 10)
  out = T.CTWindow().map({"image": hu[..., None].astype(np.float32)})
  assert out["image"].dtype == np.float32
  x = np.arange(12, dtype=np.float32).reshape(3, 4, 1) * 7 + 3
  z = T.NormalizeSlice().map({"image": x})["image"]
  np.testing.assert_allclose([z.mean(), z.std()], [0, 1], atol=1e-5)
  np.testing.assert_array_equal(T.normalize_slice(np.ones((3, 3))), 0)


def _blocks(h, w, classes=4, block=4, seed=0):
  """A label map of `block`-pixel squares and an image whose one channel is
  the label value itself (so alignment can be read off every pixel)."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, classes, (-(-h // block), -(-w // block)))
  label = coarse.repeat(block, 0).repeat(block, 1)[:h, :w].astype(np.int32)
  return {"image": label[..., None].astype(np.float32), "label": label}


def _interior(label):
  """Pixels whose 3 x 3 neighbourhood is one class: there bilinear and
  nearest sampling must agree. Border pixels never count: their neighbours
  outside the crop are unknown."""
  h, w = label.shape
  p = np.pad(label, 1, constant_values=-1)
  same = np.ones((h, w), bool)
  for dy in range(3):
    for dx in range(3):
      same &= p[dy:dy + h, dx:dx + w] == label
  return same


@pytest.mark.parametrize("hw,scale_range", [((16, 16), (0.5, 2.0)),
                                            ((12, 20), (0.5, 2.0)),
                                            ((15, 9), (0.75, 1.25))])
def test_random_scale_crop_keeps_labels_on_their_pixels(hw, scale_range):
  # The image holds the label value; padding is image 0 with label 0, so
  # it is aligned too. Through grain, as training runs it.
  e = _blocks(*hw)
  aug = T.RandomScaleCrop(scale_range=scale_range)
  ds = grain.MapDataset.source([e] * 24).seed(5).random_map(aug)
  checked = 0
  for i in range(len(ds)):
    out = ds[i]
    # Static shapes and dtypes: the crop is the example's own size.
    assert out["image"].shape == hw + (1,) and out["image"].dtype == np.float32
    assert out["label"].shape == hw and out["label"].dtype == np.int32
    inside = _interior(out["label"])
    np.testing.assert_allclose(out["image"][..., 0][inside],
                               out["label"][inside], atol=1e-5)
    checked += inside.sum()
  assert checked > 0.25 * 24 * hw[0] * hw[1]


def test_random_scale_crop_is_a_pure_function_of_seed_and_index():
  e = _blocks(16, 16, seed=1)
  aug = T.RandomScaleCrop(scale_range=(0.5, 2.0))
  run = lambda seed: grain.MapDataset.source([e] * 8).seed(seed).random_map(
      aug)
  a, b, c = run(3), run(3), run(4)
  for i in (0, 5, 7):  # Any order, any index: the same view.
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    np.testing.assert_array_equal(a[i]["label"], b[i]["label"])
  views = {a[i]["label"].tobytes() for i in range(8)}
  assert len(views) > 4  # Indices draw their own views...
  assert any(not np.array_equal(a[i]["label"], c[i]["label"])
             for i in range(8))  # ...and so does another seed.


def test_random_scale_crop_flips_left_right_half_the_time():
  # Scale 1 and crop = size leave no room to move: the view is the image or
  # its mirror.
  e = _blocks(8, 12, seed=2)
  aug = T.RandomScaleCrop(scale_range=(1.0, 1.0))
  kinds = []
  for seed in range(40):
    out = aug.random_map(e, np.random.default_rng(seed))["label"]
    if np.array_equal(out, e["label"]):
      kinds.append("same")
    else:
      np.testing.assert_array_equal(out, e["label"][:, ::-1])
      kinds.append("mirror")
  assert 8 <= kinds.count("mirror") <= 32
  no_flip = T.RandomScaleCrop(scale_range=(1.0, 1.0), flip=False)
  np.testing.assert_array_equal(
      no_flip.random_map(e, np.random.default_rng(0))["label"], e["label"])


@pytest.mark.parametrize("bad", [(2.0, 1.0), (0.0, 1.0), (-1.0, 2.0), 0.5,
                                 (1.0,), (0.5, float("inf")), (True, 2.0)])
def test_random_scale_crop_refuses_a_bad_scale_range(bad):
  with pytest.raises(ValueError, match=r"^scale_range=.*0 < low <= high"):
    T.RandomScaleCrop(scale_range=bad)


# --------------------------------------------------------------------------
# data.augment="scale_crop": chosen by config, through the training pipeline.


def _synthetic(**options):
  from kd_jax import data
  return data.build(dict(name="synthetic", image_size=24, num_train=8,
                         num_val=2, num_test=2, **options))


def test_scale_crop_by_config_gives_static_batches_per_seed_and_step():
  from kd_jax.data import pipeline
  ds = _synthetic(augment="scale_crop", scale_range=(0.75, 1.5))
  [aug] = ds.train_transforms
  assert isinstance(aug, T.RandomScaleCrop) and aug.flip
  assert aug.scale_range == (0.75, 1.5) and aug.crop_size is None
  plain = _synthetic(augment=False)
  assert plain.train_transforms == []
  batches = lambda d, seed: pipeline.train_batches(
      d.train, batch_size=4, seed=seed, transforms=d.train_transforms)
  a, b, c = batches(ds, 1), batches(ds, 1), batches(ds, 2)
  unaugmented = batches(plain, 1)
  for step in (0, 3, 5):  # Epochs 0, 1, 2 of 8 examples.
    for key in ("image", "label"):
      assert a[step][key].shape == unaugmented[step][key].shape
      assert a[step][key].dtype == unaugmented[step][key].dtype
      np.testing.assert_array_equal(a[step][key], b[step][key])
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  # The views are augmented: same examples, other pixels.
  assert not np.array_equal(a[0]["image"], unaugmented[0]["image"])


@pytest.mark.parametrize("options,match", [
    (dict(augment="scale"), r"data.augment='scale' for synthetic: expected "
     r"True \(the set's own augmentation\), False or 'scale_crop'"),
    (dict(augment="scale_crop", scale_range=(2.0, 0.5)),
     r"data.scale_range=\(2.0, 0.5\) for synthetic: expected \(low, high\) "
     r"with 0 < low <= high"),
    (dict(augment="scale_crop", scale_range=0.5),
     r"data.scale_range=0.5 for synthetic"),
])
def test_bad_scale_crop_settings_are_one_line_errors(options, match):
  with pytest.raises(ValueError, match=match) as e:
    _synthetic(**options)
  assert "\n" not in str(e.value)


def test_scale_crop_is_refused_on_a_set_without_label_maps():
  from kd_jax import data
  with pytest.raises(ValueError, match=r"data.augment='scale_crop' for "
                     r"synthetic_fundus: expected a segmentation data set"):
    data.build(dict(name="synthetic_fundus", image_size=24, num_train=4,
                    num_val=2, num_test=2, augment="scale_crop"))
