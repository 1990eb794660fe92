"""TensorFlow Datasets as a random-access source (no TensorFlow needed).

Reads a prepared TFDS data set stored as `array_record` through
`builder.as_data_source(split)` (what `tfds.data_source` does), and maps each
record to the kd_jax example dict. Images stored as `tfds.features.Tensor`
or encoded `Image` features both arrive as numpy arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from kd_jax.data import transforms
from kd_jax.data.sources.base import (Example, PathLike, check_finite,
                                      check_labels, check_nonempty,
                                      data_error, to_float_image)


class TfdsSource:
  """One split of a TFDS data set, by `name` (+ `data_dir`) or `builder`.

  Args:
    name: registered TFDS name, e.g. "pneumonia_mnist" or "my_set:1.0.0".
    split: split name or slice ("train", "train[:80%]").
    data_dir: where the prepared data set lives.
    builder: an already built `tfds.core.DatasetBuilder` instead of `name`.
    image_key, label_key: feature names for the image and the label (the
      label may be a class id or a segmentation map; None for none).
    extra_keys: other features copied into the example as numpy arrays.
    num_classes: taken from a `ClassLabel` feature when not given.
    image_size: optional (H, W) resize (bilinear image, nearest label map).
    download: let TFDS download and prepare when the data is missing.
  """

  def __init__(self, name: str | None = None, *, split: str = "train",
               data_dir: PathLike | None = None, builder: Any = None,
               image_key: str = "image", label_key: str | None = "label",
               extra_keys: Sequence[str] = (), num_classes: int | None = None,
               image_size: Sequence[int] | None = None,
               download: bool = False):
    import tensorflow_datasets as tfds  # Heavy import: only when used.

    if (name is None) == (builder is None):
      raise ValueError("give exactly one of name and builder")
    where = f"tfds {name or builder.name}[{split}]"
    if builder is None:
      try:
        builder = tfds.builder(name, data_dir=data_dir)
      except Exception as e:  # TFDS raises several types for unknown names.
        raise data_error(where, f"cannot build the data set ({e})",
                         "check the name and data_dir") from e
    if download:
      builder.download_and_prepare()
    try:
      self.data = builder.as_data_source(split=split)
    except Exception as e:
      raise data_error(where, f"cannot open the split ({e})",
                       "prepare the data set first (download=True or "
                       "builder.download_and_prepare()) in array_record "
                       "format, and check the split name") from e
    features = builder.info.features
    wanted = [k for k in (image_key, label_key, *extra_keys) if k]
    missing = [k for k in wanted if k not in features]
    if missing:
      raise data_error(where, f"missing feature(s) {missing}; it has "
                       f"{list(features.keys())}",
                       "pass image_key / label_key / extra_keys")
    if label_key and num_classes is None:
      num_classes = getattr(features[label_key], "num_classes", None)
      if num_classes is None:
        raise data_error(where, f"feature {label_key!r} is not a ClassLabel",
                         "pass num_classes")
    self.name = where
    self.image_key, self.label_key = image_key, label_key
    self.extra_keys = tuple(extra_keys)
    self.num_classes = num_classes
    self.image_size = tuple(image_size) if image_size is not None else None
    if label_key and hasattr(features[label_key], "names"):
      self.class_names = list(features[label_key].names)
    check_nonempty(where, len(self.data))
    # The first record is checked here; ClassLabel ids are valid by design.
    first = self.data[0]
    check_finite(where, np.asarray(first[image_key]))
    if label_key:
      check_labels(where, np.asarray(first[label_key]), num_classes)
      label = np.asarray(first[label_key])
      if label.ndim >= 2 and label.shape[:2] != np.shape(
          first[image_key])[:2]:
        raise data_error(where, f"image shape {np.shape(first[image_key])} "
                         f"does not match label shape {label.shape}",
                         "store a label map of the image's size")

  @property
  def task(self) -> str:
    if not self.label_key:
      return "unlabelled"
    label = np.asarray(self.data[0][self.label_key])
    return "segmentation" if label.ndim >= 2 else "classification"

  def __len__(self) -> int:
    return len(self.data)

  def __getitem__(self, index: int) -> Example:
    record = self.data[int(index)]
    example = {"image": to_float_image(record[self.image_key])}
    if self.label_key:
      label = np.asarray(record[self.label_key])
      if label.ndim == 3 and label.shape[-1] == 1:
        label = label[..., 0]
      example["label"] = label.astype(np.int32)
    for key in self.extra_keys:
      example[key] = np.asarray(record[key])
    if self.image_size is not None:
      example = transforms.resize(example, self.image_size)
    return example

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, n={len(self)})"
