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
