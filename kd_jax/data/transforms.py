"""Per-example grain transforms and intensity helpers (numpy, before batching).

Every transform takes and returns one example dict
`{"image": float32 HWC, "label": int32 HW or int32 (), ...}` and keeps the
dtype and (unless it is a resize or crop) the shape of every array.

Spatial transforms move three kinds of keys together:

* the image (`"image"`, HWC): bilinear interpolation (order 1);
* label-like maps (`spatial_keys`, default `"label"`, `"mask"`, `"fov"`,
  `"lesion_mask"`):
  nearest neighbour (order 0) so class ids stay class ids. A key is treated
  as a map only when its first two dimensions equal the image's, so a
  classification `"label"` of shape `()` is left alone;
* landmarks (`point_keys`, default `"fovea_xy"`, `"disc_xy"`): `(x, y)` pixel
  coordinates (x = column, y = row, pixel centres at integers), mapped by the
  same geometry as the image;
* landmarks in image units (`unit_keys`, default `"fovea"`, `"optic_disc"`):
  `(u, v)` = `((x + 0.5) / W, (y + 0.5) / H)`, the same pixel-centre convention
  as fractions of the image, so [0, 1] spans the image whatever its size.
  A resize leaves them unchanged (exactly); flips, rotations and crops move
  them (see `to_unit` / `from_unit`).

Intensity helpers: `ct_window` (Hounsfield units → [0, 1]) and
`normalize_slice` (per-slice z-score, for MRI).
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np
from scipy import ndimage

Example = dict[str, Any]

SPATIAL_KEYS = ("label", "mask", "fov", "lesion_mask")
POINT_KEYS = ("fovea_xy", "disc_xy")
UNIT_KEYS = ("fovea", "optic_disc")
# ITU-R BT.601 luma weights: ColorJitter's grey, on the host and the device.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


# --------------------------------------------------------------------------
# Intensity helpers.


def ct_window(hu: np.ndarray, low: float = -125.0,
              high: float = 275.0) -> np.ndarray:
  """Clips Hounsfield units to `[low, high]` and scales to float32 [0, 1].

  The default window (-125, 275) HU is the abdominal soft-tissue window of the
  TransUNet Synapse preprocessing (centre 75, width 400).
  """
  if high <= low:
    raise ValueError(f"ct_window needs high > low, got low={low}, high={high}")
  hu = np.asarray(hu, np.float32)
  return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


def normalize_slice(image: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """Z-scores one 2D slice (HW or HWC): zero mean, unit std over all pixels.

  MRI intensities have no absolute scale, so each slice is normalised on its
  own. A constant slice maps to zeros (std clamped by `eps`).
  """
  image = np.asarray(image, np.float32)
  std = image.std()
  return ((image - image.mean()) / max(float(std), eps)).astype(np.float32)


# --------------------------------------------------------------------------
# Geometry helpers shared by the transforms (numpy, any key).


def resize_image(image: np.ndarray, size: Sequence[int],
                 order: int = 1) -> np.ndarray:
  """Resizes the first two axes of `image` to `size` = (H, W).

  order 1 = bilinear (images), 0 = nearest (masks). Pixel areas are aligned
  (`grid_mode=True`, like `align_corners=False`), edges replicate.
  """
  h, w = image.shape[:2]
  out_h, out_w = int(size[0]), int(size[1])
  if (h, w) == (out_h, out_w):
    return image
  factors = (out_h / h, out_w / w) + (1.0,) * (image.ndim - 2)
  src = image if order == 0 else image.astype(np.float32)
  out = ndimage.zoom(src, factors, order=order, mode="nearest",
                     grid_mode=True)
  # zoom rounds the output shape; guard against float round-off.
  out = out[:out_h, :out_w]
  if out.shape[:2] != (out_h, out_w):
    pad = [(0, out_h - out.shape[0]), (0, out_w - out.shape[1])]
    out = np.pad(out, pad + [(0, 0)] * (out.ndim - 2), mode="edge")
  return out.astype(image.dtype, copy=False)


def to_unit(xy: np.ndarray, hw: Sequence[float] | np.ndarray) -> np.ndarray:
  """Pixel `(x, y)` (pixel centres at integers) → image units
  `((x + 0.5) / W, (y + 0.5) / H)` for an image of height, width `hw`
  (`hw` (2,) or one (H, W) per point, (..., 2))."""
  wh = np.asarray(hw, np.float64)[..., ::-1]
  return (np.asarray(xy, np.float64) + 0.5) / wh


def from_unit(uv: np.ndarray, hw: Sequence[float] | np.ndarray) -> np.ndarray:
  """Inverse of `to_unit`: image units → pixel `(x, y)` of an (H, W) image."""
  wh = np.asarray(hw, np.float64)[..., ::-1]
  return np.asarray(uv, np.float64) * wh - 0.5


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """HWC image with `channels` channels: grey → RGB repeats the channel,
  RGB → grey is the luminance 0.299 R + 0.587 G + 0.114 B; 0 keeps it."""
  have = image.shape[-1]
  if channels in (0, have):
    return image
  if channels == 3 and have == 1:
    return np.repeat(image, 3, axis=-1)
  if channels == 1 and have == 3:
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114],
                                               np.float32)
    return grey[..., None].astype(image.dtype, copy=False)
  raise ValueError(f"cannot turn a {have}-channel image into {channels} "
                   "channels (1 grey or 3 RGB)")


def _is_map(example: Example, key: str) -> bool:
  value = example.get(key)
  image = example["image"]
  return (isinstance(value, np.ndarray) and value.ndim >= 2
          and value.shape[:2] == image.shape[:2])


def _apply_geometry(example: Example, image_fn, map_fn, point_fn,
                    spatial_keys, point_keys,
                    unit_keys: Sequence[str] = UNIT_KEYS) -> Example:
  """Applies one geometric op to the image, the maps and the points (unit
  points go to pixels of the input, through `point_fn`, and back to units
  of the output image)."""
  out = dict(example)
  out["image"] = image_fn(example["image"]).astype(
      example["image"].dtype, copy=False)
  for key in spatial_keys:
    if _is_map(example, key):
      out[key] = map_fn(example[key]).astype(example[key].dtype, copy=False)
  for key in point_keys:
    if key in example:
      xy = np.asarray(example[key])
      out[key] = np.asarray(point_fn(xy.astype(np.float64)), xy.dtype)
  hw_in, hw_out = example["image"].shape[:2], out["image"].shape[:2]
  for key in unit_keys:
    if key in example:
      uv = np.asarray(example[key])
      xy = point_fn(from_unit(uv, hw_in))
      out[key] = np.asarray(to_unit(xy, hw_out), uv.dtype)
  return out


def _affine(array: np.ndarray, matrix: np.ndarray, offset: np.ndarray,
            order: int, cval: float) -> np.ndarray:
  """out[o] = array[matrix @ o + offset] on the first two axes."""
  full = np.eye(array.ndim)
  full[:2, :2] = matrix
  full_offset = np.zeros(array.ndim)
  full_offset[:2] = offset
  src = array if order == 0 else array.astype(np.float32)
  return ndimage.affine_transform(src, full, offset=full_offset,
                                  order=order, mode="constant", cval=cval)


def rotate(example: Example, angle_deg: float,
           spatial_keys: Sequence[str] = SPATIAL_KEYS,
           point_keys: Sequence[str] = POINT_KEYS) -> Example:
  """Rotates about the image centre by `angle_deg` (counter-clockwise as
  displayed with row 0 at the top), keeping the shape; outside is 0."""
  h, w = example["image"].shape[:2]
  centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])  # (row, col)
  t = np.deg2rad(angle_deg)
  # Forward map on (row, col) for a counter-clockwise turn on screen.
  fwd = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
  inv = fwd.T
  offset = centre - inv @ centre

  def point_fn(xy):
    rc = np.array([xy[1], xy[0]])
    r, c = fwd @ (rc - centre) + centre
    return np.array([c, r])

  return _apply_geometry(
      example,
      lambda a: _affine(a, inv, offset, 1, 0.0),
      lambda a: _affine(a, inv, offset, 0, 0),
      point_fn, spatial_keys, point_keys)


def rot90(example: Example, k: int,
          spatial_keys: Sequence[str] = SPATIAL_KEYS,
          point_keys: Sequence[str] = POINT_KEYS) -> Example:
  """`np.rot90(·, k, axes=(0, 1))` on image and maps (counter-clockwise)."""
  k = k % 4
  h, w = example["image"].shape[:2]

  def point_fn(xy):
    x, y = xy
    hh, ww = h, w
    for _ in range(k):  # one counter-clockwise quarter turn at a time
      x, y = y, ww - 1 - x
      hh, ww = ww, hh
    return np.array([x, y])

  turn = lambda a: np.ascontiguousarray(np.rot90(a, k, axes=(0, 1)))
  return _apply_geometry(example, turn, turn, point_fn, spatial_keys,
                         point_keys)


def flip(example: Example, axis: int,
         spatial_keys: Sequence[str] = SPATIAL_KEYS,
         point_keys: Sequence[str] = POINT_KEYS) -> Example:
  """Mirrors rows (`axis=0`, vertical flip) or columns (`axis=1`)."""
  h, w = example["image"].shape[:2]

  def point_fn(xy):
    x, y = xy
    return np.array([w - 1 - x, y]) if axis == 1 else np.array([x, h - 1 - y])

  mirror = lambda a: np.ascontiguousarray(np.flip(a, axis=axis))
  return _apply_geometry(example, mirror, mirror, point_fn, spatial_keys,
                         point_keys)


def resize(example: Example, size: Sequence[int],
           spatial_keys: Sequence[str] = SPATIAL_KEYS,
           point_keys: Sequence[str] = POINT_KEYS) -> Example:
  """Resizes image (bilinear), maps (nearest) and scales points to `size`;
  unit points (`UNIT_KEYS`) are unchanged by definition."""
  h, w = example["image"].shape[:2]
  sy, sx = size[0] / h, size[1] / w
  # Pixel centres: continuous coordinate x + 0.5 scales by sx.
  point_fn = lambda xy: np.array([(xy[0] + 0.5) * sx - 0.5,
                                  (xy[1] + 0.5) * sy - 0.5])
  return _apply_geometry(
      example, lambda a: resize_image(a, size, 1),
      lambda a: resize_image(a, size, 0), point_fn, spatial_keys, point_keys,
      unit_keys=())


# --------------------------------------------------------------------------
# grain transforms.


class SegmentationAugment(grain.transforms.RandomMap):
  """TransUNet's training augmentation: random rot90 + flip, or a small
  random rotation.

  As in TransUNet's `RandomGenerator`: with probability 1/2 the example is
  turned by k·90° (k uniform in 0..3) and mirrored along a random axis;
  otherwise, with probability 1/2, it is rotated by an angle uniform in
  [-max_rotation_deg, max_rotation_deg]. Image bilinear, label nearest
  (TransUNet used nearest for both; bilinear keeps image intensities smooth).
  On non-square images only k ∈ {0, 2} is used so the shape is kept.
  """

  def __init__(self, flip: bool = True, rot90: bool = True,
               max_rotation_deg: float = 20.0,
               spatial_keys: Sequence[str] = SPATIAL_KEYS,
               point_keys: Sequence[str] = POINT_KEYS):
    self.flip = flip
    self.rot90 = rot90
    self.max_rotation_deg = float(max_rotation_deg)
    self.spatial_keys = tuple(spatial_keys)
    self.point_keys = tuple(point_keys)

  def draw(self, hw: Sequence[int], rng: np.random.Generator) -> dict:
    """This example's draw for an image of height, width `hw`: {"k": quarter
    turns or None, "axis": flip axis or None, "angle": degrees or None}.
    The host (`random_map`) and the device (`geometry`,
    `kd_jax.data.device_augment`) both apply it, so they cannot drift."""
    out = {"k": None, "axis": None, "angle": None}
    if (self.flip or self.rot90) and rng.random() < 0.5:
      if self.rot90:
        h, w = hw
        out["k"] = int(rng.integers(4)) if h == w else 2 * int(rng.integers(2))
      if self.flip:
        out["axis"] = int(rng.integers(2))
    elif self.max_rotation_deg > 0 and rng.random() < 0.5:
      out["angle"] = float(rng.uniform(-self.max_rotation_deg,
                                       self.max_rotation_deg))
    return out

  def random_map(self, element: Example, rng: np.random.Generator) -> Example:
    keys = dict(spatial_keys=self.spatial_keys, point_keys=self.point_keys)
    p = self.draw(element["image"].shape[:2], rng)
    if p["k"] is not None:
      element = rot90(element, p["k"], **keys)
    if p["axis"] is not None:
      element = flip(element, p["axis"], **keys)
    if p["angle"] is not None:
      element = rotate(element, p["angle"], **keys)
    return element

  def geometry(self, hw: Sequence[int], p: dict) -> "Warp":
    """The draw `p` as one sampling map (`Warp`): rot90 then flip, or a
    rotation; outside the image is 0 (scipy's mode "constant")."""
    h, w = hw
    warp = Warp.identity()
    if p["k"] is not None:
      for _ in range(p["k"] % 4):  # out[i, j] = in[j, W - 1 - i] per turn.
        warp = warp.then(np.array([[0., 1.], [-1., 0.]]), np.array([0., w - 1]))
        h, w = w, h
    if p["axis"] is not None:
      m = np.diag([-1., 1.]) if p["axis"] == 0 else np.diag([1., -1.])
      warp = warp.then(m, np.array([h - 1., 0.]) if p["axis"] == 0
                       else np.array([0., w - 1.]))
    if p["angle"] is not None:
      centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
      t = np.deg2rad(p["angle"])
      inv = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
      warp = warp.then(inv, centre - inv @ centre)
    return warp


class Warp:
  """A geometric augmentation as one map from output pixels to input
  coordinates, what the device applies (`kd_jax.data.device_augment`):
  output (row, col) `o` samples the input at `matrix @ o + offset` when `o`
  lies in `box` (rows [box[0], box[1]), cols [box[2], box[3])), else the
  fill (image 0, maps `fill`). The input is its region `limits` (rows
  [limits[0], limits[1]], cols [limits[2], limits[3]], pixel centres; the
  whole image by default, a crop's pixels for `RandomResizedCrop`).
  `clamp`: coordinates outside it take its edge (scipy's mode "nearest", a
  resize); else they give the fill (mode "constant", a rotation). Float64
  on the host."""

  def __init__(self, matrix, offset, box=(0., np.inf, 0., np.inf),
               clamp=False, fill=0, limits=(0., np.inf, 0., np.inf)):
    self.matrix = np.asarray(matrix, np.float64)
    self.offset = np.asarray(offset, np.float64)
    self.box = np.asarray(box, np.float64)
    self.limits = np.asarray(limits, np.float64)
    self.clamp, self.fill = bool(clamp), fill

  @classmethod
  def identity(cls) -> "Warp":
    return cls(np.eye(2), np.zeros(2))

  def then(self, matrix, offset) -> "Warp":
    """This warp followed by the map out[o] = prev[matrix @ o + offset] (a
    box-free, clamp-free step: rot90, flip, rotation)."""
    return Warp(self.matrix @ matrix, self.matrix @ offset + self.offset,
                self.box, self.clamp, self.fill, self.limits)

  def inverse(self) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, offset) of the forward map, input (row, col) → output: how
    landmarks move."""
    (a, b), (c, d) = self.matrix
    inv = np.array([[d, -b], [-c, a]]) / (a * d - b * c)
    return inv, -inv @ self.offset


class Resize(grain.transforms.Map):
  """Resizes image (bilinear), label maps (nearest) and points to `size`."""

  def __init__(self, size: Sequence[int],
               spatial_keys: Sequence[str] = SPATIAL_KEYS,
               point_keys: Sequence[str] = POINT_KEYS):
    self.size = (int(size[0]), int(size[1]))
    self.spatial_keys = tuple(spatial_keys)
    self.point_keys = tuple(point_keys)

  def map(self, element: Example) -> Example:
    return resize(element, self.size, self.spatial_keys, self.point_keys)


class RandomScaleCrop(grain.transforms.RandomMap):
  """Structured KD / PSPNet training augmentation: random scale, pad, crop,
  horizontal flip.

  The example is resized by a factor uniform in `scale_range` (image bilinear,
  maps nearest), padded at the bottom/right to at least `crop_size` (image
  with 0, label maps with `pad_label`; use an ignore index such as 255 when
  the loss and `confusion_matrix` should skip padding, since out-of-range
  labels are ignored there), randomly cropped to `crop_size`, and mirrored
  left-right with probability 1/2 when `flip`. `crop_size=None` crops back
  to the example's own size, so a set of one image size keeps its shape.
  Like every RandomMap here, the draws come from the generator the training
  pipeline seeds per (data seed, epoch, example index)
  (`kd_jax.data.pipeline.view_rng`), so a view is a pure function of them.
  """

  def __init__(self, crop_size: Sequence[int] | None = None,
               scale_range: tuple[float, float] = (0.5, 2.0),
               flip: bool = True, pad_label: int = 0,
               spatial_keys: Sequence[str] = SPATIAL_KEYS,
               point_keys: Sequence[str] = POINT_KEYS):
    check_scale_range(scale_range)
    self.crop_size = (None if crop_size is None
                      else (int(crop_size[0]), int(crop_size[1])))
    self.scale_range = (float(scale_range[0]), float(scale_range[1]))
    self.flip = flip
    self.pad_label = pad_label
    self.spatial_keys = tuple(spatial_keys)
    self.point_keys = tuple(point_keys)

  def draw(self, hw: Sequence[int], rng: np.random.Generator) -> dict:
    """This example's draw for an image of height, width `hw`: the scaled
    size, the crop's top-left corner in it and the flip (shared by the host
    and the device, see `SegmentationAugment.draw`)."""
    h, w = hw
    ch, cw = self.crop_size or (h, w)
    s = rng.uniform(*self.scale_range)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    top = int(rng.integers(max(size[0] - ch, 0) + 1))
    left = int(rng.integers(max(size[1] - cw, 0) + 1))
    flipped = bool(self.flip and rng.random() < 0.5)
    return {"size": size, "top": top, "left": left, "flip": flipped}

  def random_map(self, element: Example, rng: np.random.Generator) -> Example:
    keys = dict(spatial_keys=self.spatial_keys, point_keys=self.point_keys)
    h, w = element["image"].shape[:2]
    ch, cw = self.crop_size or (h, w)
    p = self.draw((h, w), rng)
    element = resize(element, p["size"], **keys)
    top, left = p["top"], p["left"]

    def crop(a, fill):
      a = a[top:top + ch, left:left + cw]
      pad = [(0, ch - a.shape[0]), (0, cw - a.shape[1])]
      pad += [(0, 0)] * (a.ndim - 2)
      return np.pad(a, pad, constant_values=fill)

    element = _apply_geometry(
        element, lambda a: crop(a, 0), lambda a: crop(a, self.pad_label),
        lambda xy: xy - np.array([left, top]), **keys)
    if p["flip"]:
      element = flip(element, 1, **keys)
    return element

  def geometry(self, hw: Sequence[int], p: dict) -> Warp:
    """The draw `p` as one `Warp`: output (i, j) of the crop is pixel
    (top + i, left + j') of the scaled image (j' = cw - 1 - j when
    flipped), which samples the input at (x + 0.5) · in / scaled - 0.5
    (`resize_image`'s pixel-area alignment, edges replicated); outside the
    scaled image is padding."""
    if self.crop_size is not None and tuple(self.crop_size) != tuple(hw):
      raise ValueError(f"RandomScaleCrop(crop_size={self.crop_size}) on "
                       f"{tuple(hw)} images changes the image size; the "
                       "device warp keeps it")
    (h, w), (sh, sw) = hw, p["size"]
    ch, cw = hw
    zy, zx = h / sh, w / sw
    rows = (0., min(ch, sh - p["top"]))
    if p["flip"]:  # Crop column j' = cw - 1 - j.
      mx, ox = -zx, (p["left"] + cw - 0.5) * zx - 0.5
      cols = (max(0, cw - (sw - p["left"])), cw)
    else:
      mx, ox = zx, (p["left"] + 0.5) * zx - 0.5
      cols = (0., min(cw, sw - p["left"]))
    return Warp(np.diag([zy, mx]), np.array([(p["top"] + 0.5) * zy - 0.5, ox]),
                box=rows + cols, clamp=True, fill=self.pad_label)


def check_scale_range(scale_range) -> None:
  """Raises a one-line ValueError unless `scale_range` is (low, high) with
  0 < low <= high."""
  ok = (isinstance(scale_range, Sequence) and len(scale_range) == 2
        and all(isinstance(v, (int, float, np.integer, np.floating))
                and not isinstance(v, bool) for v in scale_range)
        and 0 < scale_range[0] <= scale_range[1] < np.inf)
  if not ok:
    raise ValueError(f"scale_range={scale_range!r}: expected (low, high) "
                     "with 0 < low <= high, e.g. (0.5, 2.0)")


class ColorJitter(grain.transforms.RandomMap):
  """Random brightness, contrast and saturation for [0, 1] colour images
  (fundus photographs).

  Each factor is uniform in [1 - s, 1 + s]: brightness multiplies, contrast
  scales around the mean grey level, saturation scales around each pixel's
  grey value (skipped for one-channel images). Results are clipped to [0, 1]
  when `clip`.
  """

  def __init__(self, brightness: float = 0.2, contrast: float = 0.2,
               saturation: float = 0.2, clip: bool = True):
    self.brightness = brightness
    self.contrast = contrast
    self.saturation = saturation
    self.clip = clip

  def draw(self, channels: int, rng: np.random.Generator) -> dict:
    """This example's factors for an image of `channels` channels (1.0 for
    a factor not drawn): {"brightness", "contrast", "saturation"}, and
    "saturate" (False when the saturation step is skipped)."""
    factor = lambda s: rng.uniform(1.0 - s, 1.0 + s) if s > 0 else 1.0
    out = {"brightness": factor(self.brightness),
           "contrast": factor(self.contrast), "saturation": 1.0,
           "saturate": channels == 3 and self.saturation > 0}
    if out["saturate"]:
      out["saturation"] = factor(self.saturation)
    return out

  def random_map(self, element: Example, rng: np.random.Generator) -> Example:
    image = element["image"]
    p = self.draw(image.shape[-1], rng)
    x = jitter(image.astype(np.float32), p["brightness"], p["contrast"],
               p["saturation"], p["saturate"], self.clip)
    return {**element, "image": x.astype(image.dtype)}


def jitter(x, brightness, contrast, saturation, saturate, clip, xp=np):
  """`ColorJitter`'s arithmetic on an (..., H, W, C) float image with drawn
  factors, in numpy (`xp=np`, the host) or jax.numpy (`xp=jnp`, the device
  path, where `saturate` and `clip` may be traced booleans)."""
  x = x * brightness
  mean = x.mean(axis=-1, keepdims=True).mean()
  x = (x - mean) * contrast + mean
  if x.shape[-1] == 3:
    grey = (x @ LUMA)[..., None]
    x = xp.where(saturate, (x - grey) * saturation + grey, x)
  return xp.where(clip, xp.clip(x, 0.0, 1.0), x)


class CTWindow(grain.transforms.Map):
  """Applies `ct_window` to an image in Hounsfield units."""

  def __init__(self, low: float = -125.0, high: float = 275.0):
    self.low, self.high = float(low), float(high)

  def map(self, element: Example) -> Example:
    return {**element, "image": ct_window(element["image"], self.low,
                                          self.high)}


class NormalizeSlice(grain.transforms.Map):
  """Applies `normalize_slice` (per-slice z-score, MRI)."""

  def map(self, element: Example) -> Example:
    return {**element, "image": normalize_slice(element["image"])}


class RandomResizedCrop(grain.transforms.RandomMap):
  """DINO's crop for unlabelled images: a random region resized to `size`,
  mirrored left-right with probability 1/2 (`flip`).

  As torchvision's `RandomResizedCrop`: up to 10 draws of an area fraction
  uniform in `scale` and a log-uniform aspect ratio (w / h) in `ratio`; the
  first whose box fits the image is taken at a uniform position; if none
  fits, the largest centred box whose ratio is clipped to `ratio`. The
  region is resized bilinearly (`resize_image`). Only "image" is read and
  written: an unlabelled example has nothing else to move.
  """

  def __init__(self, size: Sequence[int], scale=(0.25, 1.0),
               ratio=(3 / 4, 4 / 3), flip: bool = True):
    self.size = (int(size[0]), int(size[1]))
    if not 0 < scale[0] <= scale[1] <= 1:
      raise ValueError(f"scale={scale!r}: expected 0 < low <= high <= 1")
    if not 0 < ratio[0] <= ratio[1]:
      raise ValueError(f"ratio={ratio!r}: expected 0 < low <= high")
    self.scale = (float(scale[0]), float(scale[1]))
    self.ratio = (float(ratio[0]), float(ratio[1]))
    self.flip = flip

  def box(self, h: int, w: int, rng: np.random.Generator):
    """(top, left, height, width) of the region to crop."""
    area = h * w
    log_ratio = np.log(self.ratio)
    for _ in range(10):
      target = area * rng.uniform(*self.scale)
      aspect = np.exp(rng.uniform(*log_ratio))
      cw = int(round(np.sqrt(target * aspect)))
      ch = int(round(np.sqrt(target / aspect)))
      if 0 < cw <= w and 0 < ch <= h:
        return (int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1)),
                ch, cw)
    aspect = w / h
    if aspect < self.ratio[0]:
      cw, ch = w, int(round(w / self.ratio[0]))
    elif aspect > self.ratio[1]:
      ch, cw = h, int(round(h * self.ratio[1]))
    else:
      ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw

  def draw(self, hw: Sequence[int], rng: np.random.Generator) -> dict:
    """This example's draw for an image of height, width `hw`: the region
    ("top", "left", "height", "width") and the flip (shared by the host and
    the device, see `SegmentationAugment.draw`)."""
    top, left, ch, cw = self.box(int(hw[0]), int(hw[1]), rng)
    flipped = bool(self.flip and rng.random() < 0.5)
    return {"top": top, "left": left, "height": ch, "width": cw,
            "flip": flipped}

  def random_map(self, element: Example, rng: np.random.Generator) -> Example:
    image = element["image"]
    p = self.draw(image.shape[:2], rng)
    top, left = p["top"], p["left"]
    out = resize_image(image[top:top + p["height"], left:left + p["width"]],
                       self.size)
    if p["flip"]:
      out = out[:, ::-1]
    return {**element, "image": np.ascontiguousarray(out)}

  def geometry(self, hw: Sequence[int], p: dict) -> Warp:
    """The draw `p` as one `Warp`: output (i, j) samples the region at
    (i + 0.5) · height / H - 0.5 rows below its top (`resize_image`'s
    pixel-area alignment; columns alike, from the right when flipped),
    clamped to the region's pixels (its edges replicate)."""
    if tuple(hw) != self.size:
      raise ValueError(f"RandomResizedCrop(size={self.size}) on {tuple(hw)} "
                       "images changes the image size; the device warp "
                       "keeps it: build the images at that size")
    (h, w), top, left = self.size, p["top"], p["left"]
    zy, zx = p["height"] / h, p["width"] / w
    if p["flip"]:  # Output column j is resized column W - 1 - j.
      mx, ox = -zx, left + (w - 0.5) * zx - 0.5
    else:
      mx, ox = zx, left + 0.5 * zx - 0.5
    return Warp(np.diag([zy, mx]), np.array([top + 0.5 * zy - 0.5, ox]),
                clamp=True, limits=(top, top + p["height"] - 1, left,
                                    left + p["width"] - 1))


def dino_augment(size: Sequence[int], channels: int = 3) -> list:
  """The unlabelled student's views: `RandomResizedCrop` (scale 0.25-1,
  flip) then `ColorJitter` (brightness and contrast 0.4, saturation 0.2
  for colour images), DINO's global-crop recipe without blur and
  solarisation."""
  return [RandomResizedCrop(size),
          ColorJitter(brightness=0.4, contrast=0.4,
                      saturation=0.2 if channels == 3 else 0.0)]
