"""Sources for the real medical data sets in the shared data folder.

Each function takes the data folder (`data_dir`, default `$KD_JAX_DATA` or
`../shared/data`; see `resolve_data_dir`) and returns a random-access source;
file layouts are described in that folder's README. Images are float32 HWC in
[0, 1] unless stated (MRI: per-slice z-score; CT: windowed Hounsfield units).
`max_examples` reads only the first rows of the large arrays (quick looks,
tests). Every label is checked against `num_classes` at construction.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from kd_jax.data import transforms
from kd_jax.data.sources.base import (ArraySource, PathLike, check_labels,
                                      check_same_hw, data_error, load_npz,
                                      npz_keys, to_float_image)
from kd_jax.data.sources.volumes import SliceSource, VolumeSource

DATA_ENV = "KD_JAX_DATA"

ACDC_CLASSES = ("background", "right_ventricle", "myocardium",
                "left_ventricle")
IDRID_LESIONS = ("MA", "HE", "EX", "SE", "OD")
PALM_CLASSES = ("high_myopia", "normal", "pathologic_myopia")
# Synapse / BTCV labels as TransUNet numbers them, and the matching
# TotalSegmentator class names (to build a Synapse-like task from its CT).
SYNAPSE_CLASSES = ("background", "aorta", "gallbladder", "spleen",
                   "kidney_left", "kidney_right", "liver", "stomach",
                   "pancreas")


def resolve_data_dir(data_dir: PathLike | None = None) -> Path:
  """`data_dir`, else `$KD_JAX_DATA`, else `../shared/data`."""
  if data_dir is None:
    data_dir = os.environ.get(DATA_ENV, os.path.join("..", "shared", "data"))
  return Path(data_dir)


def _file(data_dir, *parts) -> Path:
  return resolve_data_dir(data_dir).joinpath(*parts)


def _normalizer(normalize: str):
  """MRI intensity handling for one slice."""
  if normalize == "slice":
    return lambda s: transforms.normalize_slice(to_float_image(s))
  if normalize == "unit":
    return to_float_image
  raise ValueError(f"normalize must be 'slice' (per-slice z-score) or 'unit' "
                   f"(x / 255), got {normalize!r}")


# --------------------------------------------------------------------------
# ACDC cardiac MRI.


def acdc_slices(data_dir: PathLike | None = None, *,
                normalize: str = "slice",
                image_size: Sequence[int] | None = None,
                max_examples: int | None = None) -> ArraySource:
  """ACDC training slices (256×256, 4 classes: background, RV, Myo, LV)."""
  path = _file(data_dir, "acdc", "train_slices_256.npz")
  d = load_npz(path, ["image", "label", "names"], max_examples)
  source = ArraySource(d["image"], d["label"], 4, name=str(path),
                       image_fn=_normalizer(normalize), image_size=image_size,
                       class_names=ACDC_CLASSES)
  source.names = d["names"]
  return source


def acdc_volumes(data_dir: PathLike | None = None, *,
                 normalize: str = "slice",
                 max_volumes: int | None = None) -> VolumeSource:
  """ACDC validation volumes at their original in-plane size, for
  volume-wise Dice/HD95 (spacing unknown here: distances in pixels)."""
  path = _file(data_dir, "acdc", "val_volumes.npz")
  names = [str(n) for n in load_npz(path, ["names"])["names"]]
  names = names[:max_volumes] if max_volumes else names
  keys = npz_keys(path)
  missing = [f"{n}_{part}" for n in names for part in ("image", "label")
             if f"{n}_{part}" not in keys]
  if missing:
    raise data_error(str(path), f"volumes listed in 'names' lack keys "
                     f"{missing[:4]}", "store <name>_image and <name>_label "
                     "for every listed volume")
  arrays = load_npz(path, [f"{n}_{p}" for n in names
                           for p in ("image", "label")])
  return VolumeSource(
      names, lambda n: (arrays[f"{n}_image"], arrays[f"{n}_label"]), 4,
      name=str(path), image_fn=_normalizer(normalize),
      class_names=ACDC_CLASSES)


# --------------------------------------------------------------------------
# Fundus photographs.


# IDRiD photographs are 4288 × 2848 (W × H); the shared copies are square
# crops of them (`train_crop_box_xys`: x0, y0, side in original pixels; the
# box is centred vertically, so y0 < 0 where it pads above the photograph).
IDRID_PHOTO_HW = (2848, 4288)
DR_GRADES = ("no_dr", "mild", "moderate", "severe", "proliferative")
DME_RISKS = ("no_exudates", "exudates_far_from_macula",
             "exudates_near_macula")
# Referable DR: grade >= 2 (moderate non-proliferative DR or worse), the
# usual screening threshold for referral to an ophthalmologist (as in
# Gulshan et al., JAMA 2016, and the ICDR scale); mild DR (grade 1) is
# followed up, not referred.
REFERABLE_GRADE = 2
REFERABLE = ("non_referable", "referable")


def idrid_grading(data_dir: PathLike | None = None, *,
                  target: str | None = "dr_grade",
                  pixel_landmarks: bool = True,
                  image_size: Sequence[int] | None = None,
                  max_examples: int | None = None) -> ArraySource:
  """IDRiD parts B+C: 256×256 fundus images with DR grade (0-4), DME risk
  (0-2), fovea and optic-disc centres.

  `label` is the `target` ("dr_grade", 5 classes; "dme_risk", 3;
  "referable", 2: grade >= REFERABLE_GRADE, moderate DR or worse; None: no
  "label" key). Every example also carries "dr_grade", "dme_risk"
  (int32); "fovea" and "optic_disc", float32 (u, v) in image units
  (`transforms.to_unit`: (x + 0.5) / W, (y + 0.5) / H of the image, so a
  resize leaves them unchanged), computed from the original-pixel columns
  `train_*_xy_orig` and the crop box; "orig_hw" (side, side) and
  "orig_offset" (x0, y0), float32, the original-pixel size and top-left
  corner of the square the image shows, so that the original pixel is
  `from_unit(uv, orig_hw) + orig_offset` (`kd_jax.data.targets`). With
  `pixel_landmarks`, also "fovea_xy", "disc_xy" as stored in the file
  (256-px coordinates (orig - x0) * 256 / side, resized with the image).
  """
  targets = {"dr_grade": 5, "dme_risk": 3, "referable": 2}
  if target is not None and target not in targets:
    raise ValueError(f"target must be one of {list(targets)} or None, got "
                     f"{target!r}")
  path = _file(data_dir, "idrid", "grading_256_train.npz")
  d = load_npz(path, ["train_images", "train_dr_grade", "train_dme_risk",
                      "train_fovea_xy", "train_od_xy", "train_fovea_xy_orig",
                      "train_od_xy_orig", "train_crop_box_xys"],
               max_examples)
  box = d["train_crop_box_xys"].astype(np.float64)
  if box.ndim != 2 or box.shape[1] != 3 or (box[:, 2] <= 0).any():
    raise data_error(f"{path}['train_crop_box_xys']", f"shape {box.shape} "
                     "or a side <= 0", "store (x0, y0, side) per image")
  side = box[:, 2:3]
  offset = box[:, :2]
  hw = np.concatenate([side, side], axis=1)
  extras = {"dr_grade": d["train_dr_grade"].astype(np.int32),
            "dme_risk": d["train_dme_risk"].astype(np.int32)}
  for key, column in (("fovea", "train_fovea_xy_orig"),
                      ("optic_disc", "train_od_xy_orig")):
    xy = d[column].astype(np.float64)
    if not np.isfinite(xy).all():
      raise data_error(f"{path}[{column!r}]", "non-finite coordinates",
                       "store a centre for every image")
    extras[key] = transforms.to_unit(xy - offset, hw).astype(np.float32)
  extras["orig_hw"] = hw.astype(np.float32)
  extras["orig_offset"] = offset.astype(np.float32)
  if pixel_landmarks:
    extras["fovea_xy"] = d["train_fovea_xy"]
    extras["disc_xy"] = d["train_od_xy"]
  check_labels(f"{path}['train_dme_risk']", extras["dme_risk"], 3)
  check_labels(f"{path}['train_dr_grade']", extras["dr_grade"], 5)
  labels = dict(extras, referable=(
      extras["dr_grade"] >= REFERABLE_GRADE).astype(np.int32))
  return ArraySource(d["train_images"],
                     labels[target] if target else None,
                     targets[target] if target else None, name=str(path),
                     extras=extras, image_size=image_size,
                     class_names={"dr_grade": DR_GRADES,
                                  "dme_risk": DME_RISKS,
                                  "referable": REFERABLE}.get(target))


def idrid_lesions(data_dir: PathLike | None = None, *,
                  lesions: Sequence[str] = ("MA", "HE", "EX", "SE"),
                  image_size: Sequence[int] | None = None,
                  max_examples: int | None = None) -> ArraySource:
  """IDRiD part A: 512×512 fundus images with lesion masks.

  `label` (H, W) is 1 where any of `lesions` is present (binary
  segmentation); "lesion_mask" (H, W, 5) uint8 holds all five channels
  (MA, HE, EX, SE, OD) for multi-label use and top-K IoU of explanations.
  """
  unknown = [l for l in lesions if l not in IDRID_LESIONS]
  if unknown or not lesions:
    raise ValueError(f"lesions must be a non-empty subset of {IDRID_LESIONS},"
                     f" got {tuple(lesions)}")
  path = _file(data_dir, "idrid", "segmentation_512_train.npz")
  d = load_npz(path, ["train_images", "train_masks"], max_examples)
  masks = d["train_masks"]
  if masks.ndim != 4 or masks.shape[1] != len(IDRID_LESIONS):
    raise data_error(f"{path}['train_masks']", f"shape {masks.shape}, "
                     "expected (N, 5, H, W)", "use the IDRiD npz layout")
  check_labels(f"{path}['train_masks']", masks, 2)
  channels = [IDRID_LESIONS.index(l) for l in lesions]
  label = masks[:, channels].max(axis=1)
  check_same_hw(str(path), d["train_images"], label)
  return ArraySource(d["train_images"], label, 2, name=str(path),
                     extras={"lesion_mask": np.moveaxis(masks, 1, -1)},
                     image_size=image_size,
                     class_names=("background", "lesion"))


def drive_vessels(data_dir: PathLike | None = None, *,
                  image_size: Sequence[int] | None = None,
                  max_examples: int | None = None) -> ArraySource:
  """DRIVE: 584×565 retinal images, vessel labels (2 classes) and "fov"
  (uint8 field-of-view mask; score only inside it)."""
  path = _file(data_dir, "drive", "train.npz")
  d = load_npz(path, ["train_images", "train_vessel", "train_fov"],
               max_examples)
  check_same_hw(f"{path}['train_fov']", d["train_images"], d["train_fov"])
  check_labels(f"{path}['train_fov']", d["train_fov"], 2)
  return ArraySource(d["train_images"], d["train_vessel"], 2, name=str(path),
                     extras={"fov": d["train_fov"]}, image_size=image_size,
                     class_names=("background", "vessel"))


def palm(data_dir: PathLike | None = None, *, target: str = "label3",
         image_size: Sequence[int] | None = None,
         max_examples: int | None = None) -> ArraySource:
  """PALM pathologic myopia: 224×224 fundus images; `target` "label3"
  (0 high myopia, 1 normal, 2 pathologic myopia) or "pm" (binary)."""
  targets = {"label3": 3, "pm": 2}
  if target not in targets:
    raise ValueError(f"target must be one of {list(targets)}, got {target!r}")
  path = _file(data_dir, "palm", "train_224.npz")
  d = load_npz(path, ["train_images", f"train_{target}"], max_examples)
  return ArraySource(d["train_images"], d[f"train_{target}"],
                     targets[target], name=str(path), image_size=image_size,
                     class_names=PALM_CLASSES if target == "label3"
                     else ("other", "pathologic_myopia"))


def pneumonia_mnist(data_dir: PathLike | None = None, *, split: str = "train",
                    image_size: Sequence[int] | None = None,
                    max_examples: int | None = None) -> ArraySource:
  """PneumoniaMNIST 28×28 chest X-rays (1 channel), 0 normal / 1 pneumonia;
  `split` "train" or "val"."""
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  path = _file(data_dir, "pneumoniamnist", "train_val_28.npz")
  d = load_npz(path, [f"{split}_images", f"{split}_labels"], max_examples)
  return ArraySource(d[f"{split}_images"], d[f"{split}_labels"].reshape(-1),
                     2, name=str(path), image_size=image_size,
                     class_names=("normal", "pneumonia"))


# --------------------------------------------------------------------------
# CT (TotalSegmentator example volume).


def remap_labels(label: np.ndarray, keep: Sequence[int]) -> np.ndarray:
  """Maps class `keep[i]` to i + 1 and every other class to 0."""
  lut = np.zeros(max(int(np.max(label)), max(keep)) + 1, np.int32)
  lut[np.asarray(keep)] = np.arange(1, len(keep) + 1)
  return lut[label]


def totalseg_ct(data_dir: PathLike | None = None, *,
                window: tuple[float, float] = (-125.0, 275.0),
                classes: Sequence[str] | None = None) -> VolumeSource:
  """The TotalSegmentator example CT as a one-volume `VolumeSource`.

  Slices (z, y, x) at 3 mm isotropic spacing ("spacing" in the example),
  intensities `ct_window`ed from Hounsfield units. Labels are the model's
  117 classes (118 with background), or, with `classes` (names from its
  `class_names`, e.g. `SYNAPSE_CLASSES[1:]`), those classes renumbered
  1..K and everything else background. Use `SliceSource` for 2D training.
  """
  path = _file(data_dir, "totalseg_example", "ct.npz")
  d = load_npz(path, ["image_hu", "label", "class_names", "spacing_mm"])
  names = [str(n) for n in d["class_names"]]
  label = d["label"]
  if classes is not None:
    unknown = [c for c in classes if c not in names]
    if unknown:
      raise data_error(f"{path}['class_names']", f"unknown classes {unknown}",
                       f"choose from {names}")
    label = remap_labels(label, [names.index(c) for c in classes])
    names = ["background", *classes]
  image = d["image_hu"]
  low, high = window
  return VolumeSource(
      ["totalseg_example"], lambda _: (image, label), len(names),
      name=str(path),
      image_fn=lambda s: transforms.ct_window(s, low, high)[..., None],
      spacing=d["spacing_mm"], class_names=names)


def totalseg_slices(data_dir: PathLike | None = None, *,
                    image_size: Sequence[int] | None = None,
                    **kwargs) -> SliceSource:
  """`totalseg_ct` as 2D axial slices."""
  return SliceSource(totalseg_ct(data_dir, **kwargs), image_size)
