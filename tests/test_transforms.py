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
