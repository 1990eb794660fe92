"""3D volumes for volume-wise evaluation, and 2D slice views of them.

A `VolumeSource` yields one whole volume per index:
`{"image": float32 (D, H, W, C), "label": int32 (D, H, W), "name": str,
"spacing": float32 (3,) voxel size (z, y, x) when known}`. It is what
`kd_jax.evaluate.metrics.evaluate_volume` consumes (one slice axis first).
`SliceSource` flattens a volume source into the usual 2D example source.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np

from kd_jax.data import transforms
from kd_jax.data.sources.base import (Example, ResizedCache, check_finite,
                                      check_labels, check_nonempty,
                                      data_error, to_float_image)

# (image, label) for one volume, both indexed [slice, row, col, ...].
LoadFn = Callable[[str], tuple[np.ndarray, np.ndarray]]


class VolumeSource:
  """Volumes named `names`, loaded by `load_fn(name) -> (image, label)`.

  `image_fn` maps one raw 2D slice to float32 HWC (default
  `to_float_image`; e.g. `ct_window` for HU or `normalize_slice` for MRI).
  `load_slice_fn(name, z)`, when given, reads a single slice without loading
  the whole volume (h5 files do this cheaply); otherwise whole volumes are
  loaded and the last few kept in a small cache.

  With `check_all` (default) every volume is read once at construction to
  check shapes, label range and finite pixels; otherwise only the first.
  """

  def __init__(self, names: Sequence[str], load_fn: LoadFn,
               num_classes: int, *, name: str = "volumes",
               image_fn: Callable[[np.ndarray], np.ndarray] | None = None,
               spacing: Sequence[float] | None = None,
               class_names: Sequence[str] | None = None,
               load_slice_fn: Callable[[str, int], tuple[np.ndarray,
                                                         np.ndarray]]
               | None = None,
               check_all: bool = True):
    self.name = name
    self.names = list(names)
    self.num_classes = num_classes
    self.image_fn = image_fn or to_float_image
    self.spacing = (np.asarray(spacing, np.float32)
                    if spacing is not None else None)
    self.class_names = list(class_names) if class_names is not None else None
    self._load = functools.lru_cache(maxsize=2)(load_fn)
    self._load_slice = load_slice_fn
    check_nonempty(name, len(self.names))
    self.depths = []
    for i, vol in enumerate(self.names):
      if check_all or i == 0:
        image, label = self._load(vol)
        self._check(vol, image, label)
        self.depths.append(len(image))
      else:
        self.depths.append(None)
    self._load.cache_clear()

  def _check(self, vol: str, image: np.ndarray, label: np.ndarray) -> None:
    where = f"{self.name}[{vol!r}]"
    if image.ndim not in (3, 4) or label.ndim != 3:
      raise data_error(where, f"expected image (D, H, W[, C]) and label "
                       f"(D, H, W), got {image.shape} and {label.shape}",
                       "store one volume per entry, slice axis first")
    if image.shape[:3] != label.shape:
      raise data_error(where, f"image shape {image.shape} does not match "
                       f"label shape {label.shape}",
                       "give the volume a label of the same size")
    check_finite(where, image)
    check_labels(where, label, self.num_classes)

  task = "segmentation"

  def __len__(self) -> int:
    return len(self.names)

  def depth(self, index: int) -> int:
    """Number of slices of volume `index`."""
    if self.depths[index] is None:
      self.depths[index] = len(self._load(self.names[index])[0])
    return self.depths[index]

  def __getitem__(self, index: int) -> Example:
    vol = self.names[int(index)]
    image, label = self._load(vol)
    example = {
        "image": np.stack([self.image_fn(s) for s in image]),
        "label": np.asarray(label, np.int32),
        "name": vol,
    }
    if self.spacing is not None:
      example["spacing"] = self.spacing
    return example

  def get_slice(self, index: int, z: int) -> Example:
    """One 2D example: slice `z` of volume `index`."""
    vol = self.names[int(index)]
    if self._load_slice is not None:
      image, label = self._load_slice(vol, int(z))
    else:
      image, label = self._load(vol)
      image, label = image[z], label[z]
    return {"image": self.image_fn(image),
            "label": np.asarray(label, np.int32)}

  def __repr__(self) -> str:
    return (f"VolumeSource({self.name!r}, volumes={len(self)}, "
            f"num_classes={self.num_classes})")


def images_as_volumes(source, num_classes: int, *,
                      class_names: Sequence[str] | None = None,
                      name: str = "images") -> VolumeSource:
  """A 2D segmentation source (`{"image": HWC, "label": HW}`) as a
  `VolumeSource` of one-slice volumes, so that data without volumes (DRIVE)
  is scored image by image through the same volume-wise code."""
  def load(index: str):
    ex = source[int(index)]
    return ex["image"][None], np.asarray(ex["label"])[None]
  return VolumeSource([str(i) for i in range(len(source))], load,
                      num_classes, name=name, image_fn=np.asarray,
                      class_names=class_names)


class SliceSource:
  """Every slice of every volume of a `VolumeSource` as a 2D example,
  volume by volume; optionally resized to `image_size` (each resized slice
  computed once: `ResizedCache`)."""

  task = "segmentation"

  def __init__(self, volumes: VolumeSource,
               image_size: Sequence[int] | None = None):
    self.volumes = volumes
    self.num_classes = volumes.num_classes
    self.class_names = volumes.class_names
    self.image_size = tuple(image_size) if image_size is not None else None
    self.index = np.array([(v, z) for v in range(len(volumes))
                           for z in range(volumes.depth(v))], np.int64)
    check_nonempty(f"slices of {volumes!r}", len(self.index))
    self._resized = (ResizedCache(self._resize)
                     if self.image_size is not None else None)

  def __len__(self) -> int:
    return len(self.index)

  def _slice(self, index: int) -> Example:
    v, z = self.index[index]
    return self.volumes.get_slice(v, z)

  def _resize(self, index: int) -> Example:
    return transforms.resize(self._slice(index), self.image_size)

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"{self!r}: slice {index} out of range "
                       f"[0, {len(self)})")
    index %= len(self)
    if self._resized is None:
      return self._slice(index)
    return self._resized[index]

  def __repr__(self) -> str:
    return f"SliceSource({self.volumes!r}, slices={len(self)})"
