"""A folder of images plus a CSV that names them and their labels.

    image,label              (classification: label is a class id or name)
    img/001.png,2
    img/002.png,0

    image,mask               (segmentation: mask is a PNG of class ids)
    img/001.png,masks/001.png

Paths are relative to `image_dir` (default: the CSV's folder). Images are
read with Pillow on access (RGB, or grey with `channels=1`) and scaled to
[0, 1]. Construction checks the CSV, its columns, every file's existence,
label values, and (from image headers only) image/mask size agreement.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from kd_jax.data import transforms
from kd_jax.data.sources.base import (Example, PathLike, ResizedCache,
                                      check_labels, check_nonempty,
                                      data_error, to_float_image)


class FolderCsvSource:
  """Images listed in a CSV with a class label or a mask path per row.

  Args:
    csv_path: the CSV file (header row required).
    image_dir: folder the paths are relative to (default: the CSV's folder).
    image_column: column with image paths.
    label_column: column with class labels (classification), or None.
    mask_column: column with mask paths (segmentation), or None. Exactly one
      of label_column / mask_column.
    class_names: for classification, the ordered class names; labels in the
      CSV may then be names or ids. Without it labels must be integer ids
      and num_classes is given or taken as max + 1.
    num_classes: number of classes (required for segmentation).
    channels: 3 (RGB) or 1 (grey).
    image_size: optional (H, W) resize (bilinear image, nearest mask).
    check_all: read every mask at construction to check its class ids
      (otherwise only the first).
  """

  def __init__(self, csv_path: PathLike, *, image_dir: PathLike | None = None,
               image_column: str = "image",
               label_column: str | None = "label",
               mask_column: str | None = None,
               class_names: Sequence[str] | None = None,
               num_classes: int | None = None, channels: int = 3,
               image_size: Sequence[int] | None = None,
               check_all: bool = True):
    from PIL import Image  # Only the folder sources need Pillow.

    csv_path = Path(csv_path)
    where = str(csv_path)
    if not csv_path.is_file():
      raise data_error(where, "CSV file not found", "pass the path of the CSV "
                       "that lists the images")
    if (label_column is None) == (mask_column is None):
      raise ValueError("give exactly one of label_column (classification) "
                       "and mask_column (segmentation)")
    if channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {channels}")
    self.channels = channels
    self.image_size = tuple(image_size) if image_size is not None else None
    root = Path(image_dir) if image_dir is not None else csv_path.parent
    with open(csv_path, newline="") as f:
      reader = csv.DictReader(f)
      columns = reader.fieldnames or []
      rows = list(reader)
    wanted = [c for c in (image_column, label_column, mask_column) if c]
    missing = [c for c in wanted if c not in columns]
    if missing:
      raise data_error(where, f"missing column(s) {missing}; the header has "
                       f"{columns}", "name the columns with image_column / "
                       "label_column / mask_column")
    check_nonempty(where, len(rows))
    self.image_paths = [root / r[image_column] for r in rows]
    self.mask_paths = ([root / r[mask_column] for r in rows]
                       if mask_column else None)
    for i, path in enumerate(self.image_paths + (self.mask_paths or [])):
      if not path.is_file():
        raise data_error(where, f"row {i % len(rows) + 2} names a missing "
                         f"file {path}", "fix the path or image_dir")
    self.class_names = list(class_names) if class_names is not None else None
    if mask_column:
      if num_classes is None:
        raise data_error(where, "num_classes is not set",
                         "pass num_classes for segmentation masks")
      self.labels = None
      for img, msk in zip(self.image_paths, self.mask_paths):
        with Image.open(img) as a, Image.open(msk) as b:
          if a.size != b.size:
            raise data_error(str(msk), f"mask size {b.size} != image size "
                             f"{a.size} of {img}", "give every image a mask "
                             "of the same size")
      for path in self.mask_paths if check_all else self.mask_paths[:1]:
        check_labels(str(path), self._read_mask(path), num_classes)
    else:
      self.labels = self._parse_labels(where, [r[label_column] for r in rows])
      if num_classes is None:
        num_classes = (len(self.class_names) if self.class_names
                       else int(self.labels.max()) + 1)
      check_labels(f"{where}[{label_column!r}]", self.labels, num_classes)
    self.num_classes = num_classes

  def _parse_labels(self, where: str, values: list[str]) -> np.ndarray:
    out = []
    for i, v in enumerate(values):
      v = v.strip()
      if self.class_names and v in self.class_names:
        out.append(self.class_names.index(v))
        continue
      try:
        out.append(int(v))
      except ValueError:
        choices = f" or one of {self.class_names}" if self.class_names else ""
        raise data_error(where, f"row {i + 2}: label {v!r} is not a class id"
                         f"{choices}", "write integer ids or pass "
                         "class_names") from None
    return np.asarray(out, np.int32)

  @property
  def task(self) -> str:
    return "classification" if self.mask_paths is None else "segmentation"

  def _read_mask(self, path) -> np.ndarray:
    with _open_image(path) as m:
      mask = np.asarray(m)
    return mask[..., 0] if mask.ndim == 3 else mask  # RGB(A) ids: 1 channel

  def __len__(self) -> int:
    return len(self.image_paths)

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    with _open_image(self.image_paths[index]) as im:
      image = np.asarray(im.convert("RGB" if self.channels == 3 else "L"))
    example = {"image": to_float_image(image)}
    if self.mask_paths is None:
      example["label"] = np.asarray(self.labels[index], np.int32)
    else:
      example["label"] = self._read_mask(
          self.mask_paths[index]).astype(np.int32)
    if self.image_size is not None:
      example = transforms.resize(example, self.image_size)
    return example

  def __repr__(self) -> str:
    return (f"FolderCsvSource(n={len(self)}, task={self.task}, "
            f"num_classes={self.num_classes})")


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff",
                    ".webp")


def _open_image(path):
  # Imported here, not kept on the source: a source holding the module
  # could not be pickled into grain's worker processes.
  from PIL import Image  # Only the folder sources need Pillow.
  return Image.open(path)


def read_reduced(pil_image, size: Sequence[int] | None, mode: str):
  """The Pillow image `pil_image` (just opened) in `mode`, decoded no larger
  than it must be for a resize to `size` (H, W): a JPEG is decoded at the
  smallest DCT scale (1/2, 1/4, 1/8) at least `size` (`Image.draft`), and
  any image is then box-averaged by the largest integer factor that keeps
  it at least `size` (`Image.reduce`, over the rows and columns that fill
  whole boxes). A 2000-px fundus photograph read for a 224 or 64 model so
  costs a fraction of a full decode and resize, and the final bilinear
  resize starts from an average of the pixels it would have sampled.
  Without `size`, the full image."""
  if size is None:
    return pil_image.convert(mode)
  out_h, out_w = int(size[0]), int(size[1])
  if pil_image.format == "JPEG":
    pil_image.draft(mode, (out_w, out_h))
  image = pil_image.convert(mode)
  w, h = image.size
  factor = min(w // out_w, h // out_h)
  if factor < 2:
    return image
  return image.reduce(factor, box=(0, 0, w // factor * factor,
                                   h // factor * factor))


class ImageFolderSource:
  """Every image file under a folder (recursively, sorted by path), without
  labels: examples are `{"image"}` alone, read with Pillow on access (RGB,
  or grey with `channels=1`), scaled to [0, 1] and resized to `image_size`
  (H, W) when given. A large image is decoded reduced (`read_reduced`)
  and each resized example kept for the next epochs while the kept ones fit
  the memory share of `ResizedCache`. Only the file list is held in memory
  beyond that. `image_paths` lists the files (the pool's leak check
  compares them)."""

  def __init__(self, image_dir: PathLike, *, channels: int = 3,
               image_size: Sequence[int] | None = None):
    root = Path(image_dir)
    if not root.is_dir():
      raise data_error(str(root), "not a folder", "set data.image_dir to a "
                       "folder of images")
    if channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {channels}")
    self.channels = channels
    self.image_size = tuple(image_size) if image_size is not None else None
    self._resized = ResizedCache(self._read) if image_size else None
    self.image_paths = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not self.image_paths:
      raise data_error(str(root), "holds no image files "
                       f"({', '.join(IMAGE_EXTENSIONS)})",
                       "point data.image_dir at a folder of images")

  def __len__(self) -> int:
    return len(self.image_paths)

  def __getitem__(self, index: int) -> Example:
    if self._resized is not None:
      return self._resized[int(index)]
    return self._read(int(index))

  def _read(self, index: int) -> Example:
    with _open_image(self.image_paths[index]) as im:
      image = np.asarray(read_reduced(
          im, self.image_size, "RGB" if self.channels == 3 else "L"))
    image = to_float_image(image)
    if self.image_size is not None:
      image = transforms.resize_image(image, self.image_size)
    return {"image": image}

  def __repr__(self) -> str:
    return f"ImageFolderSource(n={len(self)})"
