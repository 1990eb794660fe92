"""Synapse multi-organ CT in the TransUNet layout (also fits any data set
preprocessed the same way):

    <root>/train_npz/<case>_slice<k>.npz   "image" (H, W) float in [0, 1]
                                           (HU clipped to [-125, 275] and
                                           scaled), "label" (H, W)
    <root>/test_vol_h5/<case>.npy.h5       "image" (D, H, W), "label" (D, H, W)
    lists_Synapse/train.txt, test_vol.txt  one name per line (no extension)

Labels: 0 background, 1 aorta, 2 gallbladder, 3 spleen, 4 left kidney,
5 right kidney, 6 liver, 7 stomach, 8 pancreas (`SYNAPSE_CLASSES`).
TransUNet evaluates the test volumes with voxel spacing 1 (distances in
voxels); pass `spacing` to report millimetres instead.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from kd_jax.data import transforms
from kd_jax.data.sources.base import (Example, PathLike, check_finite,
                                      check_labels, check_nonempty,
                                      data_error, to_float_image,
                                      unreadable_npz)
from kd_jax.data.sources.medical import SYNAPSE_CLASSES
from kd_jax.data.sources.volumes import VolumeSource


def _list_names(folder: Path, suffix: str,
                list_file: PathLike | None) -> list[str]:
  """Names from `list_file` (one per line), else every `*suffix` in folder."""
  if not folder.is_dir():
    raise data_error(str(folder), "folder not found",
                     "pass the Synapse root that holds train_npz/ and "
                     "test_vol_h5/")
  if list_file is not None:
    if not os.path.isfile(list_file):
      raise data_error(str(list_file), "list file not found",
                       "pass the path of train.txt / test_vol.txt or None")
    with open(list_file) as f:
      names = [line.strip() for line in f if line.strip()]
  else:
    names = sorted(p.name[:-len(suffix)] for p in folder.glob("*" + suffix))
  missing = [n for n in names if not (folder / (n + suffix)).is_file()]
  if missing:
    raise data_error(str(folder), f"{len(missing)} listed file(s) missing, "
                     f"e.g. {missing[0] + suffix}",
                     "fix the list file or restore the files")
  check_nonempty(str(folder), len(names))
  return names


class NpzFilesSource:
  """One npz file per 2D example, each with an image and a label map.

  Checks every file at construction (keys, image/label shapes, finite
  pixels, label range) when `check_all`, else only the first.
  """

  task = "segmentation"

  def __init__(self, paths: Sequence[PathLike], num_classes: int, *,
               image_key: str = "image", label_key: str = "label",
               image_fn: Callable[[np.ndarray], np.ndarray] | None = None,
               image_size: Sequence[int] | None = None,
               class_names: Sequence[str] | None = None,
               check_all: bool = True):
    self.paths = [os.fspath(p) for p in paths]
    self.num_classes = num_classes
    self.image_key, self.label_key = image_key, label_key
    self.image_fn = image_fn or to_float_image
    self.image_size = tuple(image_size) if image_size is not None else None
    self.class_names = list(class_names) if class_names is not None else None
    check_nonempty("NpzFilesSource", len(self.paths))
    for path in self.paths if check_all else self.paths[:1]:
      self._read(path, check=True)

  def _read(self, path: str, check: bool = False):
    try:
      d = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      raise unreadable_npz(path, e) from None
    with d:
      missing = [k for k in (self.image_key, self.label_key) if k not in d]
      if missing:
        raise data_error(path, f"missing key(s) {missing}; it has "
                         f"{list(d.keys())}", "write 'image' and 'label' "
                         "arrays (or pass image_key / label_key)")
      try:
        image, label = d[self.image_key], d[self.label_key]
      except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise unreadable_npz(path, e) from None
    if check:
      if image.shape[:2] != label.shape or label.ndim != 2:
        raise data_error(path, f"image shape {image.shape} does not match "
                         f"label shape {label.shape}",
                         "store an (H, W) label of the image's size")
      check_finite(path, image)
      check_labels(path, label, self.num_classes)
    return image, label

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> Example:
    image, label = self._read(self.paths[int(index)])
    example = {"image": self.image_fn(image),
               "label": np.asarray(label, np.int32)}
    if self.image_size is not None:
      example = transforms.resize(example, self.image_size)
    return example

  def __repr__(self) -> str:
    return f"NpzFilesSource(n={len(self)}, num_classes={self.num_classes})"


def synapse_slices(root: PathLike, *, list_file: PathLike | None = None,
                   num_classes: int = 9,
                   image_size: Sequence[int] | None = None,
                   check_all: bool = True) -> NpzFilesSource:
  """Training slices from `<root>/train_npz` (all, or those in list_file)."""
  folder = Path(root) / "train_npz"
  names = _list_names(folder, ".npz", list_file)
  return NpzFilesSource([folder / (n + ".npz") for n in names], num_classes,
                        image_size=image_size, check_all=check_all,
                        class_names=SYNAPSE_CLASSES[:num_classes])


def synapse_volumes(root: PathLike, *, list_file: PathLike | None = None,
                    num_classes: int = 9,
                    spacing: Sequence[float] | None = None,
                    check_all: bool = True) -> VolumeSource:
  """Test volumes from `<root>/test_vol_h5/<case>.npy.h5` (h5py)."""
  import h5py  # Only this layout needs it.

  folder = Path(root) / "test_vol_h5"
  names = _list_names(folder, ".npy.h5", list_file)

  def open_file(name):
    path = folder / (name + ".npy.h5")
    f = h5py.File(path, "r")
    missing = [k for k in ("image", "label") if k not in f]
    if missing:
      f.close()
      raise data_error(str(path), f"missing dataset(s) {missing}; it has "
                       f"{list(f.keys()) if f else []}",
                       "write 'image' and 'label' datasets")
    return f

  def load(name):
    with open_file(name) as f:
      return f["image"][()], f["label"][()]

  def load_slice(name, z):
    with open_file(name) as f:
      return f["image"][z], f["label"][z]

  return VolumeSource(names, load, num_classes, name=str(folder),
                      spacing=spacing, load_slice_fn=load_slice,
                      class_names=SYNAPSE_CLASSES[:num_classes],
                      check_all=check_all)
