"""Batched augmentation on the device (`data.augment_on_device=True`).

The host still draws every example's augmentation from the generator the
training stream seeds per (data seed, epoch, example index)
(`pipeline.view_rng`), with the transforms' own `draw` methods, but skips
the pixel work: `DeviceAugment` ships the draw as a few small arrays under
the example's key "augment" (a `transforms.Warp`: 2×2 matrix, offset,
output box, input region, clamp, label fill, and its inverse for
landmarks; colour factors when the recipe jitters colour). Batches stay a pure function of
(seed, step). Inside the jitted step `apply` warps the batch: images
bilinear (order 1), label maps nearest (order 0), landmarks by the forward
map, then the colour jitter, with the host transforms' conventions
(scipy's `affine_transform` / `zoom` with `grid_mode`), so a device view
equals the host's to float32 round-off, and label maps exactly but where a
source coordinate lies within float32 round-off of a half-pixel tie
(scipy rounds in float64, the device in float32; frequent for a scale of
exactly 1/2, rare otherwise).
"""
from __future__ import annotations

from typing import Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage

from kd_jax.data import transforms as T

KEY = "augment"
_GEOMETRIC = (T.SegmentationAugment, T.RandomScaleCrop, T.RandomResizedCrop)


class DeviceAugment(grain.transforms.RandomMap):
  """The training `transforms` (at most one of `SegmentationAugment` /
  `RandomScaleCrop` / `RandomResizedCrop`, then at most one `ColorJitter`),
  drawn on the host and applied in the step (`apply`): the example keeps
  its pixels and gains "augment"."""

  def __init__(self, transforms: Sequence):
    transforms = list(transforms)
    kinds = [type(t) for t in transforms]
    geometric = [t for t in transforms if isinstance(t, _GEOMETRIC)]
    colour = [t for t in transforms if isinstance(t, T.ColorJitter)]
    if (len(geometric) + len(colour) != len(transforms) or len(geometric) > 1
        or len(colour) > 1 or (geometric and colour
                               and kinds.index(type(colour[0])) == 0)):
      raise ValueError(
          "data.augment_on_device=True moves SegmentationAugment, "
          "RandomScaleCrop or RandomResizedCrop then ColorJitter to the "
          "device; this set's "
          f"training transforms are {[k.__name__ for k in kinds]}: set "
          "data.augment_on_device=False")
    for t in geometric:
      if isinstance(t, T.RandomResizedCrop):
        continue  # It moves the image only (`random_map` checks).
      if (t.spatial_keys, t.point_keys) != (T.SPATIAL_KEYS, T.POINT_KEYS):
        raise ValueError("data.augment_on_device=True moves the default "
                         "spatial and point keys only; set it False")
      if getattr(t, "crop_size", None) is not None:
        raise ValueError("data.augment_on_device=True keeps the image size: "
                         "RandomScaleCrop(crop_size=None) only; set it False")
    self.transforms = transforms
    self.geometric = geometric[0] if geometric else None
    self.colour = colour[0] if colour else None

  def params(self, image_shape, rng: np.random.Generator) -> dict:
    """The draw of one example of `image_shape` (HWC) as arrays, drawn in
    the transforms' order from `rng`: "warp" (22,) float32 (`_WARP`'s
    fields) and, with colour jitter, "colour" (5,) float32 (`_COLOUR`'s);
    two arrays, so batching them stays cheap."""
    hw = tuple(image_shape[:2])
    warp = T.Warp.identity()
    if self.geometric is not None:
      warp = self.geometric.geometry(hw, self.geometric.draw(hw, rng))
    fwd, fwd_offset = warp.inverse()
    box = np.minimum(warp.box, (hw[0], hw[0], hw[1], hw[1]))
    limits = np.clip(warp.limits, 0, (hw[0] - 1,) * 2 + (hw[1] - 1,) * 2)
    out = {"warp": np.concatenate([
        warp.matrix.ravel(), warp.offset, box, fwd.ravel(), fwd_offset,
        (float(warp.clamp), float(warp.fill)), limits]).astype(np.float32)}
    if self.colour is not None:
      p = self.colour.draw(image_shape[-1], rng)
      out["colour"] = np.array(
          [p["brightness"], p["contrast"], p["saturation"], p["saturate"],
           self.colour.clip], np.float32)
    return out

  def random_map(self, element: T.Example,
                 rng: np.random.Generator) -> T.Example:
    if isinstance(self.geometric, T.RandomResizedCrop):
      moved = [k for k in (*T.POINT_KEYS, *T.UNIT_KEYS) if k in element]
      moved += [k for k in T.SPATIAL_KEYS if T._is_map(element, k)]  # pylint: disable=protected-access
      if moved:
        raise ValueError(f"RandomResizedCrop moves the image only but the "
                         f"examples carry {moved[0]!r}, which the device "
                         "warp would move: set data.augment_on_device=False")
    return {**element, KEY: self.params(element["image"].shape, rng)}


def wrap(transforms: Sequence) -> list:
  """The training transforms as the device path runs them: one
  `DeviceAugment` (none when there is no augmentation)."""
  return [DeviceAugment(transforms)] if transforms else []


def on_device(transforms: Sequence) -> bool:
  return any(isinstance(t, DeviceAugment) for t in transforms)


# ----------------------------------------------------------------------------
# In the step (jnp, one example; `apply` vmaps over the batch).

# Offsets of the fields of "warp" and "colour".
_WARP = {"matrix": slice(0, 4), "offset": slice(4, 6), "box": slice(6, 10),
         "forward": slice(10, 14), "forward_offset": slice(14, 16),
         "clamp": 16, "fill": 17, "limits": slice(18, 22)}
_COLOUR = {"jitter": slice(0, 3), "saturate": 3, "clip": 4}


def _fields(p):
  """The named fields of one example's "warp" / "colour" arrays."""
  out = {k: p["warp"][v] for k, v in _WARP.items()}
  out["matrix"] = out["matrix"].reshape(2, 2)
  out["forward"] = out["forward"].reshape(2, 2)
  out["clamp"] = out["clamp"] > 0
  if "colour" in p:
    out.update({k: p["colour"][v] for k, v in _COLOUR.items()})
    out["saturate"], out["clip"] = out["saturate"] > 0, out["clip"] > 0
  return out


def _coordinates(p, hw_out):
  """Source (row, col) of every output pixel, and whether it samples the
  input (False: the fill)."""
  r, c = jnp.meshgrid(jnp.arange(hw_out[0], dtype=jnp.float32),
                      jnp.arange(hw_out[1], dtype=jnp.float32), indexing="ij")
  m, o = p["matrix"], p["offset"]
  y = m[0, 0] * r + m[0, 1] * c + o[0]
  x = m[1, 0] * r + m[1, 1] * c + o[1]
  box, lim = p["box"], p["limits"]
  ok = (r >= box[0]) & (r < box[1]) & (c >= box[2]) & (c < box[3])
  # scipy's mode "constant" takes the fill anywhere outside [0, n - 1] of
  # the input region; mode "nearest" replicates its edge.
  inside = (y >= lim[0]) & (y <= lim[1]) & (x >= lim[2]) & (x <= lim[3])
  ok &= p["clamp"] | inside
  return jnp.clip(y, lim[0], lim[1]), jnp.clip(x, lim[2], lim[3]), ok


def _sample(array, y, x, order):
  """`array` (H, W, ...) at the source coordinates (y, x), which
  `_coordinates` keeps inside it: JAX's `map_coordinates` (scipy's order 1,
  bilinear, or order 0, nearest with half-pixel ties upwards, as scipy's
  floor(c + 0.5) for c >= 0) per trailing channel."""
  flat = array.reshape(array.shape[:2] + (-1,))
  out = jax.vmap(
      lambda a: ndimage.map_coordinates(a, (y, x), order, mode="nearest"),
      in_axes=2, out_axes=-1)(flat)
  return out.reshape(y.shape + array.shape[2:])


def _masked(value, ok, fill):
  ok = ok.reshape(ok.shape + (1,) * (value.ndim - ok.ndim))
  return jnp.where(ok, value, jnp.asarray(fill, value.dtype))


def _move_points(p, xy):
  """(x, y) pixel landmarks through the forward map."""
  rc = xy[..., ::-1].astype(jnp.float32)
  out = rc @ p["forward"].T + p["forward_offset"]
  return out[..., ::-1].astype(xy.dtype)


def _one(p, example):
  p = _fields(p)
  image = example["image"]
  hw = image.shape[:2]
  y, x, ok = _coordinates(p, hw)
  out = dict(example)
  out["image"] = _masked(_sample(image, y, x, 1), ok, 0)
  for key in T.SPATIAL_KEYS:
    value = example.get(key)
    if value is not None and value.ndim >= 2 and value.shape[:2] == hw:
      out[key] = _masked(_sample(value, y, x, 0), ok, p["fill"])
  for key in T.POINT_KEYS:
    if key in example:
      out[key] = _move_points(p, example[key])
  wh = jnp.array(hw[::-1], jnp.float32)
  for key in T.UNIT_KEYS:
    if key in example:
      uv = example[key]
      xy = _move_points(p, uv.astype(jnp.float32) * wh - 0.5)
      out[key] = ((xy + 0.5) / wh).astype(uv.dtype)
  if "jitter" in p:
    b, c, s = p["jitter"][0], p["jitter"][1], p["jitter"][2]
    out["image"] = T.jitter(out["image"], b, c, s, p["saturate"], p["clip"],
                            xp=jnp)
  return out


def apply(batch: dict) -> dict:
  """The batch with every example's "augment" draw applied (its image
  float32, as `pipeline.decode` leaves it) and the key removed; a batch
  without it as it is."""
  if KEY not in batch:
    return batch
  batch = dict(batch)
  params = batch.pop(KEY)
  moved = ["image", *T.SPATIAL_KEYS, *T.POINT_KEYS, *T.UNIT_KEYS]
  part = {k: batch[k] for k in moved if k in batch}
  batch.update(jax.vmap(_one)(params, part))
  return batch


@jax.jit
def apply_images(images, params):
  """The warped and jittered images alone (the teacher cache's views)."""
  return apply({"image": images, KEY: params})["image"]
