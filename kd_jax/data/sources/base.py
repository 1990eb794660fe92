"""Shared machinery for data sources: array-backed sources, npz reading,
construction-time validation, subsets.

A source is random access: `len(source)` and `source[i] -> dict` of numpy
arrays, `{"image": float32 HWC, "label": int32 HW | int32 (), ...}`, the same
dict for the same `i` every time. Every source checks its data when it is
built and raises one `ValueError` naming the file or key and the fix, so a
bad data set stops a run before the first training step.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kd_jax.data import transforms

Example = dict[str, Any]
PathLike = str | os.PathLike


def data_error(where: str, problem: str, fix: str) -> ValueError:
  """The one error type sources raise: where, what, and how to fix it."""
  return ValueError(f"{where}: {problem}. Fix: {fix}")


# --------------------------------------------------------------------------
# npz reading.


def unreadable_npz(path: PathLike, error: Exception) -> ValueError:
  """The error for an npz file that does not read: cut short by a copy or
  download, or not an npz at all."""
  return data_error(os.fspath(path), "does not read as an npz file (cut "
                    f"short or damaged: {error})", "copy or write the file "
                    "again")


def _npz_member_names(path: PathLike) -> list[str]:
  try:
    with zipfile.ZipFile(path) as zf:
      return [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
  except (OSError, zipfile.BadZipFile) as e:
    raise unreadable_npz(path, e) from None


def _read_member(zf: zipfile.ZipFile, key: str,
                 limit: int | None) -> np.ndarray:
  """Reads `key` from an open npz; with `limit` only its first rows.

  Compressed npz members cannot be memory-mapped; reading only the bytes of
  the first `limit` rows from the decompressing stream avoids inflating the
  whole array (useful for tests and quick looks at large files).
  """
  with zf.open(key + ".npy") as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
      raise data_error(f"{zf.filename}[{key!r}]", "holds Python objects "
                       "(pickle)", "save plain numeric/string arrays")
    if limit is None or fortran or not shape or limit >= shape[0]:
      rows = shape[0] if shape else None
    else:
      rows = limit
    if rows is None:
      count = 1
      out_shape = shape
    else:
      out_shape = (rows,) + tuple(shape[1:])
      count = int(np.prod(out_shape))
    data = f.read(count * dtype.itemsize)
    array = np.frombuffer(data, dtype=dtype, count=count)
    order = "F" if fortran else "C"
    return array.reshape(out_shape, order=order).copy()


def load_npz(path: PathLike, keys: Sequence[str],
             limit: int | None = None) -> dict[str, np.ndarray]:
  """Loads `keys` from an npz file, checking the file and keys exist.

  With `limit`, only the first `limit` rows of each array are read.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise data_error(path, "file not found", "pass the folder that holds the "
                     "data (e.g. ../shared/data) or the right file path")
  names = _npz_member_names(path)
  missing = [k for k in keys if k not in names]
  if missing:
    raise data_error(path, f"missing key(s) {missing}; it has {names}",
                     "use a file written in the layout this source expects")
  with zipfile.ZipFile(path) as zf:
    return {k: _read_member(zf, k, limit) for k in keys}


def npz_keys(path: PathLike) -> list[str]:
  """Names of the arrays in an npz file (no data is read)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise data_error(path, "file not found", "check the data path")
  return _npz_member_names(path)


# --------------------------------------------------------------------------
# Conversion and validation.


def to_float_image(image: np.ndarray) -> np.ndarray:
  """float32 HWC: integer images are scaled by 1/255 (uint8) or their dtype's
  max; float images pass through; an HW image gets a channel axis."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    out = image.astype(np.float32) / 255.0
  elif np.issubdtype(image.dtype, np.integer) or image.dtype == bool:
    out = image.astype(np.float32)
  else:
    out = image.astype(np.float32, copy=False)
  if out.ndim == 2:
    out = out[..., None]
  return out


def check_nonempty(where: str, n: int) -> None:
  if n == 0:
    raise data_error(where, "the data set is empty",
                     "point the source at a non-empty file / folder / split")


def check_labels(where: str, labels: np.ndarray, num_classes: int) -> None:
  """Labels must be integers in [0, num_classes)."""
  labels = np.asarray(labels)
  if labels.size == 0:
    return
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
    if np.isnan(labels).any() or np.any(labels != np.round(labels)):
      raise data_error(where, "labels are not integers",
                       "store class ids as integers")
  lo, hi = int(labels.min()), int(labels.max())
  if lo < 0 or hi >= num_classes:
    raise data_error(where, f"labels span [{lo}, {hi}], outside "
                     f"[0, num_classes={num_classes})",
                     "pass the right num_classes or remap the labels")


def check_finite(where: str, images: np.ndarray) -> None:
  images = np.asarray(images)
  if np.issubdtype(images.dtype, np.floating) and not np.isfinite(
      images).all():
    bad = np.argwhere(~np.isfinite(images))[0]
    raise data_error(where, f"non-finite (NaN/inf) pixel at index "
                     f"{tuple(int(i) for i in bad)}",
                     "clean the data (e.g. np.nan_to_num) before training")


def check_same_hw(where: str, images: np.ndarray, masks: np.ndarray,
                  image_axes: int = 1) -> None:
  """Images (N, H, W[, C]) and masks (N, H, W) must agree on N, H and W."""
  a = tuple(images.shape[:1 + 2 * image_axes])
  b = tuple(masks.shape[:1 + 2 * image_axes])
  if a != b:
    raise data_error(where, f"image shape {images.shape} does not match mask "
                     f"shape {masks.shape}",
                     "give every image a mask of the same height and width")


# --------------------------------------------------------------------------
# Resized examples, computed once.

# Resized examples are kept (per process: grain worker processes keep their
# own) while they take at most this share of the host memory available
# when the first is kept.
RESIZED_CACHE_MEMORY_FRACTION = 0.125


def available_memory_bytes() -> int:
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ResizedCache:
  """Example i as `make(i)` computed on its first access and kept for the
  next epochs, while the kept examples fit in `max_bytes` (default
  `RESIZED_CACHE_MEMORY_FRACTION` of the available memory); past that,
  computed on every access. No eviction: an epoch reads every example
  once in a random order, so any cache smaller than the set serves the
  same share of reads whichever examples it keeps, and keeping the first
  never churns. Kept arrays are read-only (a transform that wrote into one
  would change every later epoch); each access gets a new dict. A pickled
  copy (a grain worker process's) starts empty."""

  def __init__(self, make: Callable[[int], Example],
               max_bytes: int | None = None):
    self.make, self.max_bytes = make, max_bytes
    self.budget = max_bytes  # Set on the first keep when not given.
    self.examples: dict[int, Example] = {}
    self.bytes = 0

  def __getitem__(self, index: int) -> Example:
    example = self.examples.get(index)
    if example is None:
      example = self.make(index)
      self._keep(index, example)
    return dict(example)

  def __getstate__(self):
    # A worker process (pickled to it by spawn) starts with an empty cache
    # and a budget of its own, so starting one copies no examples.
    return {**self.__dict__, "budget": self.max_bytes, "examples": {},
            "bytes": 0}

  def _keep(self, index: int, example: Example) -> None:
    if self.budget is None:
      self.budget = int(RESIZED_CACHE_MEMORY_FRACTION
                        * available_memory_bytes())
    size = sum(np.asarray(v).nbytes for v in example.values())
    if self.bytes + size > self.budget:
      return
    for value in example.values():
      if isinstance(value, np.ndarray):
        value.flags.writeable = False
    self.examples[index] = example
    self.bytes += size


# --------------------------------------------------------------------------
# Sources.


class ArraySource:
  """Random-access source over arrays with one row per example.

  `images` (N, H, W[, C]) are converted per access by `image_fn` (default
  `to_float_image`, plus an optional resize to `image_size`); `labels` (N,)
  or (N, H, W) become int32; every array in `extras` contributes its row
  under its key (maps are resized with the image, see
  `kd_jax.data.transforms`). With `image_size`, each resized example is
  computed once (`ResizedCache`). All checks run at construction.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray | None,
               num_classes: int | None, *, name: str = "arrays",
               extras: Mapping[str, np.ndarray] | None = None,
               image_fn: Callable[[np.ndarray], np.ndarray] | None = None,
               image_size: Sequence[int] | None = None,
               class_names: Sequence[str] | None = None):
    self.name = name
    self.images = images
    self.labels = labels
    self.extras = dict(extras or {})
    self.num_classes = num_classes
    self.image_fn = image_fn or to_float_image
    self.image_size = tuple(image_size) if image_size is not None else None
    self.class_names = list(class_names) if class_names is not None else None
    self._resized = ResizedCache(self._example) if image_size else None
    check_nonempty(name, len(images))
    for key, array in [("label", labels), *self.extras.items()]:
      if array is not None and len(array) != len(images):
        raise data_error(name, f"{len(images)} images but {len(array)} rows "
                         f"of {key!r}", "give every image exactly one entry")
    check_finite(name, images)
    if labels is not None:
      if np.ndim(labels) >= 3:
        check_same_hw(name, images, labels)
      if num_classes is None:
        raise data_error(name, "num_classes is not set",
                         "pass num_classes for labelled data")
      check_labels(name, labels, num_classes)

  @property
  def task(self) -> str:
    """"segmentation" (per-pixel labels) or "classification"."""
    return ("segmentation" if self.labels is not None
            and np.ndim(self.labels) >= 3 else "classification")

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"{self.name}: index {index} out of range "
                       f"[0, {len(self)})")
    index %= len(self)
    if self._resized is not None:
      return self._resized[index]
    return self._example(index)

  def _example(self, index: int) -> Example:
    example = {"image": self.image_fn(self.images[index])}
    if self.labels is not None:
      example["label"] = np.asarray(self.labels[index], np.int32)
    for key, array in self.extras.items():
      value = np.asarray(array[index])
      example[key] = (value.astype(np.float32)
                      if np.issubdtype(value.dtype, np.floating) else value)
    if self.image_size is not None:
      example = transforms.resize(example, self.image_size)
    return example

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.name!r}, n={len(self)}, "
            f"task={self.task}, num_classes={self.num_classes})")


class Subset:
  """The examples of `source` at `indices`, in that order."""

  def __init__(self, source, indices: Sequence[int]):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    check_nonempty(f"Subset of {source!r}", len(self.indices))
    if self.indices.min() < 0 or self.indices.max() >= len(source):
      raise data_error(f"Subset of {source!r}", "indices out of range",
                       f"use indices in [0, {len(source)})")
    for attr in ("num_classes", "class_names", "task"):
      if hasattr(source, attr):
        setattr(self, attr, getattr(source, attr))

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Example:
    return self.source[int(self.indices[index])]


def split(source, fractions: Sequence[float], seed: int = 0) -> list[Subset]:
  """Random disjoint subsets with the given fractions of `source` (e.g.
  (0.8, 0.2) for train/val, or (0.25,) for a less-data regime)."""
  if any(f <= 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
    raise ValueError(f"fractions must be positive and sum to <= 1, got "
                     f"{tuple(fractions)}")
  order = np.random.default_rng(seed).permutation(len(source))
  bounds = np.round(np.cumsum([0.0, *fractions]) * len(source)).astype(int)
  return [Subset(source, np.sort(order[a:b]))
          for a, b in zip(bounds[:-1], bounds[1:])]


class MapSource:
  """`fn(source[i])` for every example: renames, drops or converts keys
  (e.g. `transforms.to_channels`) without touching the source. Keeps the
  source's `num_classes`, `class_names` and `task` unless given in `attrs`."""

  def __init__(self, source, fn: Callable[[Example], Example], **attrs):
    self.source = source
    self.fn = fn
    for attr in ("num_classes", "class_names", "task"):
      if hasattr(source, attr):
        setattr(self, attr, getattr(source, attr))
    for attr, value in attrs.items():
      setattr(self, attr, value)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> Example:
    return self.fn(self.source[index])

  def __repr__(self) -> str:
    return f"MapSource({self.source!r})"


def seeded_order(n: int, seed: int,
                 strata: Sequence[int] | np.ndarray | None = None
                 ) -> np.ndarray:
  """A fixed order of `range(n)` drawn from `seed`.

  Without `strata` a random permutation. With `strata` (one class id per
  example) every prefix of the order is stratified: class c's j-th
  (shuffled) member gets the key (j + u_c) / n_c (u_c uniform in [0, 1)),
  and the order sorts the keys, so the first k examples hold each class in
  proportion to its size, within one example. Taking prefixes of one order
  gives nested subsets: the first 25 % lie inside the first 50 %.
  """
  rng = np.random.default_rng(seed)
  if strata is None:
    return rng.permutation(n)
  strata = np.asarray(strata).reshape(-1)
  if len(strata) != n:
    raise ValueError(f"{len(strata)} strata for {n} examples")
  keys = np.empty(n, np.float64)
  for c in np.unique(strata):
    members = rng.permutation(np.flatnonzero(strata == c))
    keys[members] = (np.arange(len(members)) + rng.random()) / len(members)
  tie = rng.permutation(n)
  return np.lexsort((tie, keys))
