"""What a data set's examples carry: named targets, and landmark units.

A data set declares its targets in `Datasets.targets`, a dict from the
example key that holds the label to a `Target`:

    acdc            {"label": Target("segmentation", 4, ACDC_CLASSES)}
    idrid_grading   {"dr_grade": Target("classification", 5, ..., ordinal),
                     "dme_risk": Target("classification", 3, ...),
                     "fovea": Target("landmark"),
                     "optic_disc": Target("landmark")}

so a task layer can check that every head of a config reads a key the data
carries (`Datasets.require`). Kinds:

    segmentation    int32 (H, W) class ids in [0, num_classes)
    classification  int32 () class id in [0, num_classes); `ordinal` marks
                    ordered grades (quadratic-weighted kappa applies)
    landmark        float32 (2,) (u, v) in image units: u = (x + 0.5) / W,
                    v = (y + 0.5) / H for pixel (x, y) of the image the model
                    sees (pixel centres at integers), so [0, 1] spans the
                    image at any `image_size`. Examples with landmarks also
                    carry "orig_hw" (H, W) and "orig_offset" (x0, y0),
                    float32: the original-pixel size and top-left corner of
                    the region the image shows; `to_original_pixels` maps
                    units back and `landmark_error_px` measures errors in
                    original pixels.
    multilabel      uint8 (H, W, C) binary channels (e.g. IDRiD's five
                    lesion masks), `num_classes` = C

Examples may carry other keys that are not targets (DRIVE's "fov"
field-of-view mask, the landmark frame above, IDRiD's 256-px "fovea_xy").
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from kd_jax.data import transforms

KINDS = ("segmentation", "classification", "landmark", "multilabel")


@dataclasses.dataclass(frozen=True)
class Target:
  """One label an example carries: its kind, and for class targets the
  number and names of the classes."""
  kind: str
  num_classes: int | None = None
  class_names: tuple[str, ...] | None = None
  ordinal: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"target kind {self.kind!r} is unknown; choose one of "
                       f"{list(KINDS)}")
    if self.kind == "landmark":
      if self.num_classes is not None:
        raise ValueError("a landmark target has no num_classes")
    elif not self.num_classes or self.num_classes < 1:
      raise ValueError(f"a {self.kind} target needs num_classes >= 1")
    if self.class_names is not None:
      object.__setattr__(self, "class_names", tuple(self.class_names))
      if len(self.class_names) != self.num_classes:
        raise ValueError(f"{len(self.class_names)} class names for "
                         f"{self.num_classes} classes")


def to_original_pixels(uv: np.ndarray, orig_hw: np.ndarray,
                       orig_offset: np.ndarray | None = None) -> np.ndarray:
  """Image units (..., 2) → (x, y) in original pixels, for the frame
  `orig_hw` (..., 2) (H, W) at `orig_offset` (..., 2) (x0, y0)."""
  xy = transforms.from_unit(uv, orig_hw)
  return xy if orig_offset is None else xy + np.asarray(orig_offset,
                                                        np.float64)


def from_original_pixels(xy: np.ndarray, orig_hw: np.ndarray,
                         orig_offset: np.ndarray | None = None
                         ) -> np.ndarray:
  """Inverse of `to_original_pixels`."""
  xy = np.asarray(xy, np.float64)
  if orig_offset is not None:
    xy = xy - np.asarray(orig_offset, np.float64)
  return transforms.to_unit(xy, orig_hw)


def landmark_error_px(pred_uv: np.ndarray, true_uv: np.ndarray,
                      orig_hw: np.ndarray) -> np.ndarray:
  """Euclidean distance (...,) in original pixels between two landmarks in
  image units (the offset cancels; W and H scale x and y)."""
  wh = np.asarray(orig_hw, np.float64)[..., ::-1]
  diff = (np.asarray(pred_uv, np.float64) - np.asarray(true_uv,
                                                       np.float64)) * wh
  return np.sqrt((diff ** 2).sum(-1))


def segmentation(num_classes: int,
                 class_names: Sequence[str] | None = None) -> Target:
  return Target("segmentation", int(num_classes),
                tuple(class_names) if class_names is not None else None)


def classification(num_classes: int,
                   class_names: Sequence[str] | None = None,
                   ordinal: bool = False) -> Target:
  return Target("classification", int(num_classes),
                tuple(class_names) if class_names is not None else None,
                ordinal)
