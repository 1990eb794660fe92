"""Synthetic abdominal-CT-like slices: the embedded default data set.

Each example is an axial "slice" through a body phantom: an elliptical body
with a fat rim and muscle wall on -1000 HU air, a vertebra, bowel loops that
look like organs but are background, and 8 labelled organs in the Synapse
order (1 aorta, 2 gallbladder, 3 left kidney, 4 right kidney, 5 liver,
6 pancreas, 7 spleen, 8 stomach). Organs are star-shaped blobs whose size,
position, orientation, outline and mean intensity vary per example; each has
its own smooth texture, and the slice gets scanner noise of random strength.
Several organs are small (aorta, gallbladder) or have little contrast to the
soft tissue around them (pancreas, gallbladder, stomach), and organs may be
missing from a slice, as in real slices.

Intensities are drawn in Hounsfield units and then windowed to [-125, 275] HU
and scaled to [0, 1], the preprocessing TransUNet applies to Synapse CT.

An example is a pure function of (seed, index): `SyntheticCT(seed=s)[i]` is
the same array on every machine and in every process, so splits never overlap
when they use different seeds, and a resumed run sees the same data.
"""
import dataclasses

import numpy as np
from scipy import ndimage

ORGANS = ("background", "aorta", "gallbladder", "left_kidney",
          "right_kidney", "liver", "pancreas", "spleen", "stomach")
NUM_CLASSES = len(ORGANS)
HU_WINDOW = (-125.0, 275.0)

# Per organ: centre (x, y) in body coordinates ([-1, 1], x to the patient's
# left as in radiological display, y down), semi-axes (a, b), mean HU, HU
# spread between examples, and the probability it appears in a slice.
_ORGAN_PRIORS = {
    "liver": ((-0.45, -0.05), (0.42, 0.36), 60.0, 12.0, 0.95),
    "spleen": ((0.55, 0.05), (0.17, 0.22), 50.0, 12.0, 0.8),
    "stomach": ((0.25, -0.35), (0.25, 0.17), 25.0, 15.0, 0.8),
    "left_kidney": ((0.38, 0.42), (0.11, 0.15), 150.0, 30.0, 0.7),
    "right_kidney": ((-0.38, 0.42), (0.11, 0.15), 150.0, 30.0, 0.7),
    "pancreas": ((0.05, 0.1), (0.28, 0.07), 45.0, 10.0, 0.7),
    "gallbladder": ((-0.3, 0.2), (0.07, 0.09), 15.0, 10.0, 0.5),
    "aorta": ((0.05, 0.4), (0.055, 0.055), 180.0, 40.0, 0.95),
}
# Painting order: large organs first, so small ones stay visible on top.
_PAINT_ORDER = ("liver", "spleen", "stomach", "left_kidney", "right_kidney",
                "pancreas", "gallbladder", "aorta")


def _blob(xx, yy, centre, axes, angle, harmonics):
  """Mask of a star-shaped blob: r(θ) = 1 + Σ_k a_k cos(kθ + φ_k) ≤ 1."""
  c, s = np.cos(angle), np.sin(angle)
  dx, dy = xx - centre[0], yy - centre[1]
  u = (c * dx + s * dy) / axes[0]
  v = (-s * dx + c * dy) / axes[1]
  theta = np.arctan2(v, u)
  radius = np.ones_like(theta)
  for k, (amp, phase) in enumerate(harmonics, start=2):
    radius += amp * np.cos(k * theta + phase)
  return np.hypot(u, v) <= radius


def _texture(rng, shape, sigma, strength):
  noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
  return noise / (noise.std() + 1e-8) * strength


def render(rng: np.random.Generator, size: int):
  """One (image float32 (size, size, 1) in [0, 1], label int32 (size, size))."""
  grid = (np.arange(size) + 0.5) / size * 2.0 - 1.0
  xx, yy = np.meshgrid(grid, grid)
  # Body: the ellipse all organ coordinates live in.
  body_a = rng.uniform(0.82, 0.95)
  body_b = rng.uniform(0.62, 0.78)
  shift = rng.uniform(-0.05, 0.05, size=2)
  bx, by = (xx - shift[0]) / body_a, (yy - shift[1]) / body_b
  body_r = np.hypot(bx, by)
  hu = np.full((size, size), -1000.0)
  hu[body_r <= 1.0] = -90.0  # subcutaneous fat
  hu[body_r <= rng.uniform(0.86, 0.92)] = 40.0  # muscle wall and soft tissue
  inner = body_r <= 0.84
  hu[inner] = rng.uniform(-20.0, 35.0)  # visceral fat / mesentery
  label = np.zeros((size, size), np.int32)

  def body_xy(p):
    return (shift[0] + p[0] * body_a, shift[1] + p[1] * body_b)

  # Bowel loops: organ-like distractors labelled background.
  for _ in range(rng.integers(3, 8)):
    centre = body_xy(rng.uniform(-0.6, 0.6, size=2))
    axes = rng.uniform(0.04, 0.1, size=2) * (body_a, body_b)
    harm = [(rng.uniform(0, 0.2), rng.uniform(0, 2 * np.pi)) for _ in range(3)]
    m = _blob(xx, yy, centre, axes, rng.uniform(0, np.pi), harm) & inner
    hu[m] = rng.uniform(-10.0, 70.0)
    if rng.uniform() < 0.4:  # gas pocket
      gas = _blob(xx, yy, centre, axes * 0.4, 0.0, []) & m
      hu[gas] = -600.0
  # Vertebra: bright bone behind the aorta, background.
  vc = body_xy((rng.uniform(-0.05, 0.05), 0.72))
  vert = _blob(xx, yy, vc, (0.12 * body_a, 0.1 * body_b), 0.0, [])
  hu[vert] = 450.0
  hu[_blob(xx, yy, vc, (0.06 * body_a, 0.05 * body_b), 0.0, [])] = 200.0

  for name in _PAINT_ORDER:
    centre0, axes0, mean_hu, hu_spread, p_present = _ORGAN_PRIORS[name]
    if rng.uniform() > p_present:
      continue
    centre = body_xy(np.asarray(centre0) + rng.normal(0, 0.06, size=2))
    scale = rng.uniform(0.6, 1.3)
    axes = (axes0[0] * body_a * scale * rng.uniform(0.85, 1.15),
            axes0[1] * body_b * scale * rng.uniform(0.85, 1.15))
    harm = [(rng.uniform(0, 0.15), rng.uniform(0, 2 * np.pi))
            for _ in range(3)]
    mask = _blob(xx, yy, centre, axes, rng.normal(0, 0.3), harm) & inner
    if not mask.any():
      continue
    organ_hu = mean_hu + rng.normal(0, hu_spread)
    hu[mask] = organ_hu + _texture(rng, (size, size), size / 40.0,
                                   rng.uniform(3.0, 12.0))[mask]
    label[mask] = ORGANS.index(name)
    if name == "stomach" and rng.uniform() < 0.5:  # gas in the stomach
      gas = _blob(xx, yy, (centre[0], centre[1] - axes[1] * 0.4),
                  (axes[0] * 0.5, axes[1] * 0.3), 0.0, []) & mask
      hu[gas] = -700.0

  # Scanner noise and a little blur from the reconstruction kernel.
  hu = ndimage.gaussian_filter(hu, rng.uniform(0.3, 0.8))
  hu = hu + rng.normal(0.0, rng.uniform(8.0, 25.0), size=hu.shape)
  lo, hi = HU_WINDOW
  image = (np.clip(hu, lo, hi) - lo) / (hi - lo)
  return image.astype(np.float32)[..., None], label


# Rendered examples are kept in memory when a source's examples take at most
# this many bytes in all (the default's 512 training slices take 16 MB).
MEMOIZE_MAX_BYTES = 1 << 30


def _checked_index(index, n: int) -> int:
  index = int(index)
  if not 0 <= index < n:
    raise IndexError(f"index {index} out of range [0, {n})")
  return index


@dataclasses.dataclass(frozen=True)
class SyntheticCT:
  """Random-access source of `num_examples` synthetic slices.

  Example `i` is `{"image": float32 (size, size, 1), "label": int32 (size,
  size)}`, drawn from `np.random.default_rng([seed, i])`. Rendering a slice
  costs milliseconds of scipy, more than a training step's share on a small
  CPU, so each example is rendered once and then served from memory (as
  copies: a transform may write to its input), unless the whole source would
  take more than `MEMOIZE_MAX_BYTES`.
  """
  num_examples: int
  size: int = 64
  seed: int = 0

  num_classes = NUM_CLASSES
  class_names = ORGANS

  def __post_init__(self):
    if self.num_examples <= 0:
      raise ValueError(f"SyntheticCT: num_examples must be > 0, got "
                       f"{self.num_examples}")
    if self.size < 16:
      raise ValueError(f"SyntheticCT: size must be >= 16, got {self.size}")
    memoize = self.num_examples * self.size**2 * 8 <= MEMOIZE_MAX_BYTES
    # Not a field: equality and the repr stay those of (n, size, seed).
    object.__setattr__(self, "_rendered", {} if memoize else None)

  def __len__(self):
    return self.num_examples

  def __getitem__(self, index):
    index = _checked_index(index, self.num_examples)
    cached = self._rendered is not None and self._rendered.get(index)
    if not cached:
      # Threads may render one example twice: the same arrays either way.
      cached = render(np.random.default_rng([self.seed, index]), self.size)
      if self._rendered is not None:
        self._rendered[index] = cached
    image, label = cached
    return {"image": image.copy(), "label": label.copy()}


# ----------------------------------------------------------------------------
# Generated fundus photographs with the four targets of IDRiD grading, for
# the multi-task recipe's tests and its CPU demo: a known answer for every
# head, at any size, without data on disk.

DR_GRADES = ("no DR", "mild", "moderate", "severe", "proliferative")
DME_RISKS = ("none", "low", "high")


def render_fundus(rng: np.random.Generator, size: int) -> dict:
  """One generated fundus image and its targets.

  A red-orange disc (the field of view) on black; the optic disc, a bright
  yellow spot on the nasal side; the fovea, a dark spot about 2.5 disc
  diameters temporal to it. DR grade g puts 3g dark-red dots (haemorrhages)
  at random places in the field; DME risk r puts r·2 yellow dots (exudates)
  within two disc radii of the fovea. Landmarks are (u, v) image units
  (kd_jax.data.targets); the original frame is the image itself.
  """
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  c = size / 2
  radius = 0.47 * size
  field = (xx - c) ** 2 + (yy - c) ** 2 <= radius ** 2
  image = np.zeros((size, size, 3), np.float32)
  base = np.array([0.75, 0.35, 0.15]) * rng.uniform(0.8, 1.1)
  image[field] = base
  shade = 1.0 - 0.35 * ((xx - c) ** 2 + (yy - c) ** 2) / radius ** 2
  image *= shade[..., None]

  def spot(x, y, r, colour, blend=1.0):
    w = np.clip(1.2 - np.sqrt((xx - x) ** 2 + (yy - y) ** 2) / r, 0, 1)
    w = blend * np.minimum(w * 1.5, 1.0) * field
    image[:] = image * (1 - w[..., None]) + np.asarray(colour) * w[..., None]

  side = rng.choice([-1.0, 1.0])  # Left or right eye.
  disc_r = size * rng.uniform(0.06, 0.08)
  disc = np.array([c + side * size * rng.uniform(0.18, 0.24),
                   c + size * rng.uniform(-0.06, 0.06)])
  fovea = disc - np.array([side * 5.0 * disc_r, 0.0]) + rng.normal(
      0, size * 0.01, 2)
  spot(*disc, disc_r, (1.0, 0.9, 0.55))
  spot(*fovea, disc_r * 0.9, (0.35, 0.12, 0.05), blend=0.8)
  grade, risk = int(rng.integers(0, 5)), int(rng.integers(0, 3))
  for _ in range(3 * grade):
    a, d = rng.uniform(0, 2 * np.pi), radius * np.sqrt(rng.uniform(0, 0.8))
    spot(c + d * np.cos(a), c + d * np.sin(a), max(size * 0.03, 1.5),
         (0.35, 0.02, 0.02))
  for _ in range(2 * risk):
    a, d = rng.uniform(0, 2 * np.pi), disc_r * rng.uniform(0.6, 2.0)
    spot(fovea[0] + d * np.cos(a), fovea[1] + d * np.sin(a),
         max(size * 0.02, 1.2), (1.0, 0.95, 0.4))
  image += rng.normal(0, 0.03, image.shape)
  return {"image": np.clip(image, 0, 1).astype(np.float32),
          "dr_grade": np.int32(grade), "dme_risk": np.int32(risk),
          "fovea": (fovea / size).astype(np.float32),
          "optic_disc": (disc / size).astype(np.float32),
          "orig_hw": np.array([size, size], np.float32),
          "orig_offset": np.zeros(2, np.float32)}


@dataclasses.dataclass(frozen=True)
class SyntheticFundus:
  """Random-access source of `num_examples` generated fundus images
  (`render_fundus`), example i drawn from `np.random.default_rng([seed, i])`
  and rendered once (small: size² · 12 bytes an example)."""
  num_examples: int
  size: int = 64
  seed: int = 0

  def __post_init__(self):
    if self.num_examples <= 0 or self.size < 16:
      raise ValueError(f"SyntheticFundus needs num_examples > 0 and size >= "
                       f"16, got {self.num_examples}, {self.size}")
    object.__setattr__(self, "_rendered", {})

  def __len__(self):
    return self.num_examples

  def __getitem__(self, index):
    index = _checked_index(index, self.num_examples)
    if index not in self._rendered:
      self._rendered[index] = render_fundus(
          np.random.default_rng([self.seed, index]), self.size)
    return {k: np.array(v) for k, v in self._rendered[index].items()}
