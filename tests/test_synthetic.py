import numpy as np
import pytest

from kd_jax.data import synthetic


@pytest.fixture(scope="module")
def examples():
  src = synthetic.SyntheticCT(48, size=64, seed=3)
  return [src[i] for i in range(len(src))]


def test_deterministic_per_seed_and_index():
  a = synthetic.SyntheticCT(4, size=32, seed=1)
  b = synthetic.SyntheticCT(4, size=32, seed=1)
  c = synthetic.SyntheticCT(4, size=32, seed=2)
  np.testing.assert_array_equal(a[2]["image"], b[2]["image"])
  np.testing.assert_array_equal(a[2]["label"], b[2]["label"])
  assert not np.array_equal(a[2]["image"], c[2]["image"])
  assert not np.array_equal(a[1]["image"], a[2]["image"])


def test_shapes_dtypes_and_window(examples):
  for e in examples:
    assert e["image"].shape == (64, 64, 1) and e["image"].dtype == np.float32
    assert e["label"].shape == (64, 64) and e["label"].dtype == np.int32
    assert e["image"].min() >= 0.0 and e["image"].max() <= 1.0
    assert e["label"].min() >= 0
    assert e["label"].max() < synthetic.NUM_CLASSES


def test_every_organ_appears_and_small_ones_are_small(examples):
  labels = np.stack([e["label"] for e in examples])
  frac = np.bincount(labels.ravel(), minlength=9) / labels.size
  assert (frac[1:] > 0).all(), frac
  organs = synthetic.ORGANS
  # The liver is the largest organ; aorta and gallbladder are small.
  assert frac[organs.index("liver")] == frac[1:].max()
  for small in ("aorta", "gallbladder"):
    assert frac[organs.index(small)] < 0.2 * frac[organs.index("liver")]


def test_organs_vary_in_position_and_size(examples):
  liver = synthetic.ORGANS.index("liver")
  areas, centres = [], []
  for e in examples:
    ys, xs = np.nonzero(e["label"] == liver)
    if len(xs):
      areas.append(len(xs))
      centres.append((xs.mean(), ys.mean()))
  assert np.std(areas) / np.mean(areas) > 0.15
  assert np.std(np.asarray(centres), axis=0).min() > 1.0


def test_organ_intensity_differs_from_surroundings_by_organ(examples):
  # Contrast is not uniform: kidneys and aorta stand out more than pancreas.
  def contrast(name):
    k = synthetic.ORGANS.index(name)
    vals = [abs(e["image"][..., 0][e["label"] == k].mean()
                - e["image"][..., 0][(e["label"] == 0)
                                     & (e["image"][..., 0] > 0.2)].mean())
            for e in examples if (e["label"] == k).any()]
    return np.mean(vals)

  assert contrast("aorta") > 2 * contrast("pancreas")


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_examples"):
    synthetic.SyntheticCT(0)
  with pytest.raises(IndexError):
    synthetic.SyntheticCT(2, size=32)[2]


def test_examples_rendered_once_and_served_as_copies(monkeypatch):
  calls = []
  real = synthetic.render
  monkeypatch.setattr(synthetic, "render",
                      lambda rng, size: calls.append(1) or real(rng, size))
  src = synthetic.SyntheticCT(3, size=32, seed=5)
  first = src[1]
  first["image"][:] = -1.0  # A transform writing to its input.
  again = src[1]
  assert len(calls) == 1
  fresh = synthetic.SyntheticCT(3, size=32, seed=5)  # Its own memory.
  np.testing.assert_array_equal(again["image"], fresh[1]["image"])
  np.testing.assert_array_equal(again["label"], fresh[1]["label"])
  assert len(calls) == 2


def test_large_sources_render_every_time(monkeypatch):
  calls = []
  real = synthetic.render
  monkeypatch.setattr(synthetic, "render",
                      lambda rng, size: calls.append(1) or real(rng, size))
  monkeypatch.setattr(synthetic, "MEMOIZE_MAX_BYTES", 0)
  src = synthetic.SyntheticCT(2, size=32, seed=5)
  np.testing.assert_array_equal(src[0]["image"], src[0]["image"])
  assert len(calls) == 2


def test_synthetic_fundus_targets_match_what_is_drawn():
  from kd_jax.data import synthetic as syn
  src = syn.SyntheticFundus(24, size=64, seed=3)
  again = syn.SyntheticFundus(24, size=64, seed=3)
  for i in range(24):
    ex = src[i]
    np.testing.assert_array_equal(ex["image"], again[i]["image"])
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.float32
    assert 0 <= ex["dr_grade"] < 5 and 0 <= ex["dme_risk"] < 3
    # The optic disc is the brightest spot: its centre pixel is yellow-white.
    x, y = (ex["optic_disc"] * 64 - 0.5).round().astype(int)
    assert ex["image"][y, x].mean() > 0.7
    # The fovea is dark and about 2.5 disc diameters from the disc.
    fx, fy = (ex["fovea"] * 64 - 0.5).round().astype(int)
    assert ex["image"][fy, fx].mean() < ex["image"][y, x].mean() - 0.3
    dist = np.hypot(*((ex["fovea"] - ex["optic_disc"]) * 64))
    assert 0.25 * 64 < dist < 0.45 * 64
  # Haemorrhages (dark red dots) grow with the grade.
  def dark_red(ex):
    im = ex["image"]
    return ((im[..., 0] < 0.45) & (im[..., 1] < 0.12)).sum()
  grades = np.array([src[i]["dr_grade"] for i in range(24)])
  counts = np.array([dark_red(src[i]) for i in range(24)])
  assert np.corrcoef(grades, counts)[0, 1] > 0.7
