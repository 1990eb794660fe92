"""Data sets by name: `build(config.data) -> Datasets`.

`BUILDERS` maps `data.name` to a function of the data config; each function
declares its options and their defaults in `OPTIONS[name]`. `build` refuses
an unknown name or an unknown key with one line naming the choices, fills
the defaults, and calls the builder.

    name            targets (example keys)                   default size
    synthetic       label: segmentation (9 organs)           64
    acdc            label: segmentation (4)                  224
    synapse         label: segmentation (9)                  224
    idrid_grading   dr_grade (5, ordinal), dme_risk (3),     256
                    fovea, optic_disc (landmarks)
    idrid_referable label: classification (2: DR grade >= 2,  256
                    referable, or not)
    idrid_lesions   label: segmentation (background/lesion), 512
                    lesion_mask: multilabel (MA HE EX SE OD)
    drive           label: segmentation (background/vessel)  512
    palm            label: classification (3, or 2 with       224
                    num_classes=2: pathologic myopia or not)
    pneumoniamnist  label: classification (2)                28
    totalseg        label: segmentation (118, or 9 with       128
                    classes="synapse")
    folder          label: classification or segmentation    224
    tfds            label: classification or segmentation    native
    image_folder    none (unlabelled images, any size)       224
    shared_images   none (the shared sets' images pooled)    224

Splits. Only training data is in the shared folder (its README): the
official test splits are kept apart. The builders of the shared sets split
the training file into train / val themselves, seeded by `data.seed` and
fixed: `val_fraction` of the examples (stratified by class for IDRiD
grading, PALM and folder classification sets) are the val split, and `test` is the val split too
(say so when reporting; `Datasets.test_is_val`). ACDC keeps its 20
validation volumes and PneumoniaMNIST its official val split; `folder` and
`tfds` take a real test split when given one (`test_csv`, `test_split`) and
never draw val from it.

Less data. `train_fraction` (0 < f <= 1) and `max_train` (0 = all) keep a
fixed, seeded subset of the train split: a prefix of one seeded (and, for
class sets, stratified) order, so a subset at 0.25 lies inside the one at
0.5 and val never changes. (ACDC's `max_train` keeps its meaning: the first
N slices of the file.)

Images. `image_size` (an int for a square, or (H, W); 0 = the file's size)
resizes with `transforms.resize`: bilinear images, nearest maps, landmarks
in image units unchanged. `channels` (0 = as stored, 1 grey, 3 RGB) converts
with `transforms.to_channels`. `augment=True` adds the training transforms
(flips and a small rotation, with colour jitter for RGB images).
synthetic, acdc and synapse keep their options and behaviour (a square int
`image_size`, no `channels`, TransUNet's augmentation). On a segmentation
set, `augment="scale_crop"` is Structured KD's augmentation instead
(`transforms.RandomScaleCrop`): a random scale uniform in `scale_range`
(default (0.5, 2.0)), a random crop back to the image size or to
`crop_size` (an int for a square, or (H, W); 0 = the image size; training
views only, evaluation sees whole images) (padding with image 0 and label 0
where the scaled image is smaller), a random left-right flip.

Keys are checked per data set: a config that switches `data.name` must
carry only the new set's options (ml_collections cannot drop a key from the
command line, so write the data dict in the config file).

Loading. Every data set also takes `workers` (0: reader threads in the
training process; N: N grain worker processes) and `transfer_dtype`
("float32", "bfloat16", or "uint8" for images in [0, 1]), read by the
trainer's `pipeline.iterate`; they change how batches reach the device, not
which batches (uint8 quantises the image to 1/255). `augment_on_device=True`
moves the training augmentation into the jitted step
(`kd_jax.data.device_augment`): `train_transforms` is then one
`DeviceAugment` that draws each view's parameters on the host (the
unlabelled pool's views too: `pipeline.train_batches` runs them through it).

Unlabelled pool. Every data set takes `unlabelled` (default None: no pool),
`dict(sources=(...), per_batch=k)`: images the student sees with the
teacher's soft targets only (semi-supervised distillation). Each source is a
data-set name ("palm") or a dict of its options (`dict(name="folder",
csv=...)`); the pool is the images of its train and val splits (never its
test split), built at the labelled images' size and channels (and from the
same `root` for the shared sets), so pool and labelled images share one
shape. `Datasets.unlabelled` is that pool (examples `{"image"}`) and
`Datasets.unlabelled_per_batch` = k, the pool examples of each global batch
(`pipeline.train_batches(unlabelled=..., unlabelled_per_batch=...)`;
`check_unlabelled` checks k against the batch size). A pool source that is
the labelled set itself is refused: its images would leak into evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

from kd_jax.data import device_augment
from kd_jax.data import pipeline
from kd_jax.data import synthetic
from kd_jax.data import targets as T
from kd_jax.data import transforms

Target = T.Target


@dataclasses.dataclass
class Datasets:
  """The splits of one data set and what its examples carry.

  `targets` maps each label key of the examples to its `Target` (kind,
  classes). `num_classes` / `class_names` describe the "label" target when
  there is one, else the first class target (IDRiD grading: "dr_grade").
  """
  train: Any
  val: Any
  test: Any
  num_classes: int
  class_names: Sequence[str]
  train_transforms: Sequence[Any] = ()
  # Whole volumes (a sources.VolumeSource) for volume-wise evaluation, and
  # the split they come from ("val" or "test"); None for 2D-only data.
  volumes: Any = None
  volumes_split: str = ""
  targets: Mapping[str, Target] = dataclasses.field(default_factory=dict)
  # One line on where the splits come from, for reports.
  description: str = ""
  # The unlabelled pool (`data.unlabelled`): a random-access source of
  # `{"image"}` examples of the labelled images' shape, or None; and how many
  # examples of each global training batch come from it.
  unlabelled: Any = None
  unlabelled_per_batch: int = 0

  @property
  def test_is_val(self) -> bool:
    """True when no separate test split exists (test is the val split)."""
    return self.test is self.val

  def require(self, keys: Sequence[str], where: str = "a head") -> None:
    """Raises one line when `keys` name a label the examples lack."""
    missing = [k for k in keys if k not in self.targets]
    if missing:
      raise ValueError(f"{where} reads label key {missing[0]!r}, which this "
                       f"data set does not carry; its targets are "
                       f"{sorted(self.targets)}")


BUILDERS: dict[str, Callable[[Any], Datasets]] = {}
OPTIONS: dict[str, dict[str, Any]] = {}


# How the trainer reads the training batches (`kd_jax.data.pipeline.iterate`),
# not which: 0 (threads in this process) or a number of grain worker
# processes, and the image's dtype on its way to the device.
LOADER_OPTIONS = {"workers": 0, "transfer_dtype": "float32",
                  "augment_on_device": False}


def _register(name: str, **options):
  # Every set takes `unlabelled` (the pool, built in `build`, not by the
  # builder), so a pool can join any labelled set, and the options of the
  # trainer's input pipeline (`LOADER_OPTIONS`).
  def wrap(fn):
    BUILDERS[name] = fn
    OPTIONS[name] = {**options, "unlabelled": None, **LOADER_OPTIONS}
    if "augment" in options:  # Read by augment="scale_crop" (`build`).
      OPTIONS[name]["scale_range"] = (0.5, 2.0)
      OPTIONS[name]["crop_size"] = 0
    return fn
  return wrap


def options(name: str) -> dict[str, Any]:
  """The options of data set `name` and their defaults."""
  _check_name(name)
  return dict(OPTIONS[name])


def _check_name(name) -> None:
  if name not in BUILDERS:
    raise ValueError(f"data.name {name!r} is unknown; choose one of "
                     f"{sorted(BUILDERS)}")


def build(cfg) -> Datasets:
  """The splits of the data set `cfg.name`, with `cfg`'s other keys as its
  options (defaults from `OPTIONS`)."""
  given = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  name = given.pop("name", None)
  _check_name(name)
  unknown = sorted(set(given) - set(OPTIONS[name]))
  if unknown:
    raise ValueError(f"data.{unknown[0]} is not an option of data set "
                     f"{name!r}; its options are {sorted(OPTIONS[name])}")
  pool = _pool_config(given.get("unlabelled"), name)
  _check_loader(given)
  merged = {**OPTIONS[name], **given, "name": name}
  augment = merged.get("augment", False)
  scale_crop = augment == "scale_crop"
  if not (isinstance(augment, bool) or scale_crop):
    raise ValueError(f"data.augment={augment!r} for {name}: expected True "
                     "(the set's own augmentation), False or 'scale_crop'")
  if scale_crop:  # The builder adds no augmentation of its own.
    merged["augment"] = False
  merged = ml_collections.ConfigDict(merged)
  if "crop_size" in merged and not scale_crop and _crop_size(merged):
    raise ValueError(f"data.crop_size={merged.crop_size!r} for {name}: "
                     "only augment='scale_crop' crops; set data.augment="
                     "'scale_crop' or data.crop_size=0")
  scale_crop = _scale_crop(merged) if scale_crop else None
  out = BUILDERS[name](merged)
  if scale_crop is not None:
    label = out.targets.get("label")
    if label is None or label.kind != "segmentation":
      raise ValueError(f"data.augment='scale_crop' for {name}: expected a "
                       "segmentation data set (it scales and crops label "
                       "maps); use data.augment=True for this set's own "
                       "augmentation")
    out.train_transforms = [scale_crop]
  if pool is not None:
    _attach_pool(out, merged, *pool)
  if merged.augment_on_device and out.train_transforms:
    out.train_transforms = device_augment.wrap(out.train_transforms)
  return out


# --------------------------------------------------------------------------
# Option checks and shared helpers.


def _check_loader(given) -> None:
  pipeline.check_workers(given.get("workers", 0))
  pipeline.check_transfer_dtype(given.get("transfer_dtype", "float32"))
  if not isinstance(given.get("augment_on_device", False), bool):
    raise ValueError(f"data.augment_on_device="
                     f"{given['augment_on_device']!r}: expected True "
                     "(augmentation in the jitted step) or False")


def _bad(cfg, key: str, expected: str) -> ValueError:
  return ValueError(f"data.{key}={cfg[key]!r} for {cfg.name}: expected "
                    f"{expected}")


def _size(cfg):
  """Square (image_size, image_size): the segmentation sets' convention."""
  return (int(cfg.image_size),) * 2


def _image_size(cfg) -> tuple[int, int] | None:
  """`image_size` as (H, W); None (the file's size) for 0."""
  size = cfg.image_size
  if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
    if size == 0:
      return None
    if size > 0:
      return (int(size),) * 2
  elif (isinstance(size, Sequence) and len(size) == 2
        and all(isinstance(s, (int, np.integer)) and s > 0 for s in size)):
    return (int(size[0]), int(size[1]))
  raise _bad(cfg, "image_size", "a positive int, (H, W), or 0 for the "
             "stored size")


def _set_channels(example, channels):
  return {**example, "image": transforms.to_channels(example["image"],
                                                     channels)}


def _channels(source, cfg, stored: int):
  from kd_jax.data import sources
  if cfg.channels not in (0, 1, 3):
    raise _bad(cfg, "channels", "0 (as stored), 1 (grey) or 3 (RGB)")
  if cfg.channels in (0, stored):
    return source
  return sources.MapSource(source, functools.partial(
      _set_channels, channels=int(cfg.channels)))


def _less_data(order: np.ndarray, cfg) -> np.ndarray:
  """The first `train_fraction` (at most `max_train`) of `order`."""
  f = cfg.train_fraction
  if not isinstance(f, (int, float)) or not 0 < f <= 1:
    raise _bad(cfg, "train_fraction", "a fraction in (0, 1]")
  m = cfg.max_train
  if not isinstance(m, (int, np.integer)) or m < 0:
    raise _bad(cfg, "max_train", "an int >= 0 (0 = all)")
  k = max(1, int(round(f * len(order)))) if f < 1 else len(order)
  if m:
    k = min(k, int(m))
  return order[:k]


def _train_subset(train, cfg, strata=None):
  """`train` itself, or its fixed seeded less-data subset."""
  from kd_jax.data import sources
  if cfg.train_fraction == 1 and not cfg.max_train:
    _less_data(np.arange(1), cfg)  # Checks the values.
    return train
  order = sources.seeded_order(len(train), int(cfg.seed), strata)
  return sources.Subset(train, np.sort(_less_data(order, cfg)))


def _val_count(n, cfg, what):
  """round(val_fraction · n), checked to leave both splits non-empty."""
  f = cfg.val_fraction
  if not isinstance(f, (int, float)) or not 0 < f < 1:
    raise _bad(cfg, "val_fraction", "a fraction in (0, 1)")
  n_val = int(round(f * n))
  if not 1 <= n_val <= n - 1:
    raise _bad(cfg, "val_fraction", f"a fraction leaving at least one of the "
               f"{n} {what} in train and in val")
  return n_val


def _split(full, cfg, strata=None):
  """Seeded train / val split of `full` (stratified by `strata`), then the
  less-data subset of train. Returns (train, val, description)."""
  from kd_jax.data import sources
  n, f = len(full), cfg.val_fraction
  n_val = _val_count(n, cfg, "examples")
  order = sources.seeded_order(n, int(cfg.seed), strata)
  val_idx = np.sort(order[:n_val])
  train_idx = np.sort(_less_data(order[n_val:], cfg))
  how = "stratified, " if strata is not None else ""
  text = (f"{n} examples → {n - n_val} train / {n_val} val ({how}seed "
          f"{cfg.seed}, val_fraction {f})"
          + (f"; training on {len(train_idx)}" if len(train_idx) < n - n_val
             else ""))
  return (sources.Subset(full, train_idx), sources.Subset(full, val_idx),
          text)


_NO_TEST = ("; test = val (the official test split is not in the shared "
            "folder)")


def _augment(cfg, rgb: bool = False):
  if not isinstance(cfg.augment, bool):
    raise _bad(cfg, "augment", "True or False")
  if not cfg.augment:
    return []
  out = [transforms.SegmentationAugment(flip=True, rot90=False,
                                        max_rotation_deg=15.0)]
  return out + ([transforms.ColorJitter()] if rgb else [])


def _crop_size(cfg):
  """`data.crop_size` as (H, W), or None for 0 (the image size)."""
  crop = cfg.crop_size
  crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
  if (len(crop) != 2 or not all(isinstance(c, int) for c in crop)
      or (0 in crop and crop != (0, 0)) or min(crop) < 0):
    raise _bad(cfg, "crop_size", "a positive int or (H, W) of the training "
               "crops, or 0 for the image size")
  return None if crop == (0, 0) else crop


def _scale_crop(cfg):
  """Structured KD's augmentation (`data.augment="scale_crop"`): random
  scale in `data.scale_range`, crop back to the image size (or to
  `data.crop_size`), flip."""
  crop = _crop_size(cfg)
  try:
    return transforms.RandomScaleCrop(crop_size=crop,
                                      scale_range=tuple(cfg.scale_range))
  except (TypeError, ValueError):
    raise _bad(cfg, "scale_range", "(low, high) with 0 < low <= high, e.g. "
               "(0.5, 2.0)") from None


def _transunet_augment(cfg):
  # TransUNet's RandomGenerator: rot90 + flip, or a rotation up to 20°.
  return [transforms.SegmentationAugment(
      flip=True, rot90=True, max_rotation_deg=20.0)] if cfg.augment else []


_SPLIT = dict(seed=0, val_fraction=0.2, train_fraction=1.0, max_train=0)
_IMAGE = dict(root="", channels=0, augment=False)


# --------------------------------------------------------------------------
# The segmentation sets of the first recipes (behaviour unchanged).


@_register("synthetic", image_size=64, num_train=512, num_val=64,
           num_test=256, seed=0, augment=True)
def _synthetic(cfg) -> Datasets:
  """Generated CT phantoms (kd_jax.data.synthetic); disjoint seeded draws."""
  # Different seeds give disjoint draws: the splits never share a slice.
  def split(n, offset):
    return synthetic.SyntheticCT(n, size=cfg.image_size,
                                 seed=cfg.seed * 1000 + offset)

  augment = [transforms.SegmentationAugment(
      flip=True, rot90=False, max_rotation_deg=15.0)] if cfg.augment else []
  return Datasets(train=split(cfg.num_train, 0), val=split(cfg.num_val, 1),
                  test=split(cfg.num_test, 2),
                  num_classes=synthetic.NUM_CLASSES,
                  class_names=synthetic.ORGANS, train_transforms=augment,
                  targets={"label": T.segmentation(synthetic.NUM_CLASSES,
                                                   synthetic.ORGANS)},
                  description=f"synthetic CT phantoms: {cfg.num_train} "
                  f"train / {cfg.num_val} val / {cfg.num_test} test, seed "
                  f"{cfg.seed}")


@_register("synthetic_fundus", image_size=64, num_train=512, num_val=64,
           num_test=256, seed=0, augment=True)
def _synthetic_fundus(cfg) -> Datasets:
  """Generated fundus images with IDRiD grading's four targets
  (kd_jax.data.synthetic.render_fundus); disjoint seeded draws."""
  def split(n, offset):
    return synthetic.SyntheticFundus(n, size=cfg.image_size,
                                     seed=cfg.seed * 1000 + offset)

  return Datasets(
      train=split(cfg.num_train, 0), val=split(cfg.num_val, 1),
      test=split(cfg.num_test, 2), num_classes=5,
      class_names=synthetic.DR_GRADES, train_transforms=_augment(cfg, True),
      targets={"dr_grade": T.classification(5, synthetic.DR_GRADES,
                                            ordinal=True),
               "dme_risk": T.classification(3, synthetic.DME_RISKS,
                                            ordinal=True),
               "fovea": Target("landmark"), "optic_disc": Target("landmark")},
      description=f"synthetic fundus images: {cfg.num_train} train / "
      f"{cfg.num_val} val / {cfg.num_test} test, seed {cfg.seed}")


@_register("acdc", root="", image_size=224, augment=True, max_train=0,
           max_volumes=0, train_fraction=1.0, seed=0)
def _acdc(cfg) -> Datasets:
  """ACDC: train slices for training; the 20 validation volumes (10
  patients, none in train) give the val split (their slices, resized) and
  the volumes. The official test split is not in the shared folder, so
  `test` is the val split too: tune and report on it, and say so.

  cfg: root (folder holding acdc/; "" = $KD_JAX_DATA or ../shared/data),
  image_size, augment, max_train / max_volumes (0 = all; the first N
  slices / volumes of the files, for quick runs), train_fraction (a seeded
  subset of the training slices) and seed.
  """
  from kd_jax.data import sources
  root = cfg.get("root") or None
  train = sources.acdc_slices(root, image_size=_size(cfg),
                              max_examples=cfg.get("max_train") or None)
  if cfg.train_fraction != 1:
    train = _train_subset(train, ml_collections.ConfigDict(
        dict(name="acdc", train_fraction=cfg.train_fraction, max_train=0,
             seed=cfg.seed)))
  volumes = sources.acdc_volumes(root,
                                 max_volumes=cfg.get("max_volumes") or None)
  val = sources.SliceSource(volumes, _size(cfg))
  return Datasets(train=train, val=val, test=val, num_classes=4,
                  class_names=sources.ACDC_CLASSES,
                  train_transforms=_transunet_augment(cfg), volumes=volumes,
                  volumes_split="val",
                  targets={"label": T.segmentation(4, sources.ACDC_CLASSES)},
                  description=f"ACDC: {len(train)} training slices; val = "
                  f"the slices of {len(volumes)} validation volumes" +
                  _NO_TEST)


@_register("synapse", root="", list_dir="", image_size=224, augment=True,
           num_val_cases=2, num_classes=9, train_fraction=1.0, max_train=0,
           seed=0)
def _synapse(cfg) -> Datasets:
  """Synapse in the TransUNet layout (see sources.synapse): train_npz slices
  for training, minus the last `num_val_cases` cases held out as the val
  split; the test_vol_h5 volumes are the test split (slices, resized) and
  the volumes (TransUNet's protocol: Dice and HD95 per test volume).

  cfg: root, list_dir ("" = <root>/lists_Synapse when it exists, else every
  file; it holds train.txt and test_vol.txt), image_size, augment,
  num_val_cases, num_classes (9), train_fraction / max_train / seed (a
  seeded subset of the training slices).
  """
  import os
  from kd_jax.data import sources
  root = cfg.root
  if not root:
    raise ValueError("data.root is empty: set --config.data.root to the "
                     "Synapse folder holding train_npz/ and test_vol_h5/")
  list_dir = cfg.get("list_dir") or os.path.join(root, "lists_Synapse")
  lists = {k: os.path.join(list_dir, f"{k}.txt")
           for k in ("train", "test_vol")}
  lists = {k: v if os.path.isfile(v) else None for k, v in lists.items()}
  n = int(cfg.get("num_classes", 9))
  slices = sources.synapse_slices(root, list_file=lists["train"],
                                  num_classes=n, image_size=_size(cfg))
  case = [os.path.basename(p).split("_slice")[0] for p in slices.paths]
  held_out = sorted(set(case))[-int(cfg.num_val_cases):] \
      if cfg.num_val_cases else []
  train_idx = [i for i, c in enumerate(case) if c not in held_out]
  val_idx = [i for i, c in enumerate(case) if c in held_out]
  if not train_idx or not val_idx:
    raise ValueError(
        f"data.num_val_cases={cfg.num_val_cases} leaves no train or no val "
        f"slices among the {len(set(case))} training cases; choose 1 to "
        f"{len(set(case)) - 1}")
  volumes = sources.synapse_volumes(root, list_file=lists["test_vol"],
                                    num_classes=n)
  train = sources.Subset(slices, train_idx)
  if cfg.train_fraction != 1 or cfg.max_train:
    train = sources.Subset(slices, np.asarray(train_idx)[
        _train_subset(train, cfg).indices])
  names = sources.SYNAPSE_CLASSES[:n]
  return Datasets(
      train=train, val=sources.Subset(slices, val_idx),
      test=sources.SliceSource(volumes, _size(cfg)), num_classes=n,
      class_names=names,
      train_transforms=_transunet_augment(cfg), volumes=volumes,
      volumes_split="test", targets={"label": T.segmentation(n, names)},
      description=f"Synapse: {len(train)} training slices; val = the "
      f"{len(val_idx)} slices of the last {cfg.num_val_cases} training "
      f"cases; test = {len(volumes)} test volumes")


# --------------------------------------------------------------------------
# The other shared sets.


@_register("idrid_grading", image_size=256, **_IMAGE, **_SPLIT)
def _idrid_grading(cfg) -> Datasets:
  """IDRiD parts B+C (grading_256_train.npz, 413 images): DR grade 0-4, DME
  risk 0-2, fovea and optic-disc centres. The coordinates come from the
  file's original-pixel columns (`train_fovea_xy_orig`, `train_od_xy_orig`,
  in the 4288×2848 photographs) and crop boxes; see sources.idrid_grading.
  Val is stratified by DR grade.
  """
  from kd_jax.data import sources
  full = sources.idrid_grading(cfg.root or None, target=None,
                               pixel_landmarks=False,
                               image_size=_image_size(cfg))
  train, val, text = _split(full, cfg, strata=full.extras["dr_grade"])
  dr = T.classification(5, sources.DR_GRADES, ordinal=True)
  train, val = _channels(train, cfg, 3), _channels(val, cfg, 3)
  return Datasets(
      train=train, val=val, test=val,
      num_classes=5, class_names=sources.DR_GRADES,
      train_transforms=_augment(cfg, rgb=cfg.channels != 1),
      targets={"dr_grade": dr,
               "dme_risk": T.classification(3, sources.DME_RISKS,
                                            ordinal=True),
               "fovea": Target("landmark"), "optic_disc": Target("landmark")},
      description=f"IDRiD grading: {text}" + _NO_TEST)


@_register("idrid_referable", image_size=256, **_IMAGE, **_SPLIT)
def _idrid_referable(cfg) -> Datasets:
  """IDRiD grading (grading_256_train.npz, 413 images) as a binary task:
  "label" 1 = referable DR, grade >= 2 (moderate non-proliferative DR or
  worse: the usual screening threshold for referral, as in Gulshan et al.,
  JAMA 2016), 0 = no or mild DR (259 referable, 154 not in the file). Val
  is stratified by the 5 grades, so it is the split of "idrid_grading"
  (and class-stratified for the binary label too). 42 of IDRiD part A's 54
  lesion images ("idrid_lesions") are also in this file
  (`kd_jax.evaluate.lesion_iou.part_overlap`): explanation IoU on them is
  not on unseen images.
  """
  from kd_jax.data import sources
  full = sources.idrid_grading(cfg.root or None, target="referable",
                               pixel_landmarks=False,
                               image_size=_image_size(cfg))
  train, val, text = _split(full, cfg, strata=full.extras["dr_grade"])
  names = sources.REFERABLE
  train, val = _channels(train, cfg, 3), _channels(val, cfg, 3)
  return Datasets(
      train=train, val=val, test=val,
      num_classes=2, class_names=names,
      train_transforms=_augment(cfg, rgb=cfg.channels != 1),
      targets={"label": T.classification(2, names)},
      description=f"IDRiD referable DR (grade >= "
      f"{sources.REFERABLE_GRADE} vs < {sources.REFERABLE_GRADE}): {text}"
      + _NO_TEST)


@_register("idrid_lesions", image_size=512,
           lesions=("MA", "HE", "EX", "SE"), **_IMAGE, **_SPLIT)
def _idrid_lesions(cfg) -> Datasets:
  """IDRiD part A (segmentation_512_train.npz, 54 images): "label" is 1
  where any of `lesions` is (binary segmentation), "lesion_mask" all five
  channels MA, HE, EX, SE, OD."""
  from kd_jax.data import sources
  lesions = cfg.lesions
  if isinstance(lesions, str):
    lesions = [l.strip() for l in lesions.split(",") if l.strip()]
  lesions = tuple(lesions)
  if not lesions or any(l not in sources.IDRID_LESIONS for l in lesions):
    raise _bad(cfg, "lesions", f"a non-empty subset of "
               f"{list(sources.IDRID_LESIONS)}")
  full = sources.idrid_lesions(cfg.root or None, lesions=lesions,
                               image_size=_image_size(cfg))
  train, val, text = _split(full, cfg)
  names = ("background", "lesion")
  train, val = _channels(train, cfg, 3), _channels(val, cfg, 3)
  return Datasets(
      train=train, val=val, test=val,
      num_classes=2, class_names=names,
      train_transforms=_augment(cfg, rgb=cfg.channels != 1),
      targets={"label": T.segmentation(2, names),
               "lesion_mask": Target("multilabel", 5, sources.IDRID_LESIONS)},
      description=f"IDRiD lesions ({'+'.join(lesions)}): {text}" + _NO_TEST
  )


@_register("drive", image_size=512, **_IMAGE, **_SPLIT)
def _drive(cfg) -> Datasets:
  """DRIVE (train.npz, 20 images 584×565): vessel segmentation; examples
  also carry "fov", the field-of-view mask (score inside it)."""
  from kd_jax.data import sources
  full = sources.drive_vessels(cfg.root or None, image_size=_image_size(cfg))
  train, val, text = _split(full, cfg)
  names = ("background", "vessel")
  train, val = _channels(train, cfg, 3), _channels(val, cfg, 3)
  return Datasets(
      train=train, val=val, test=val,
      num_classes=2, class_names=names,
      train_transforms=_augment(cfg, rgb=cfg.channels != 1),
      targets={"label": T.segmentation(2, names)},
      description=f"DRIVE: {text}" + _NO_TEST)


@_register("palm", image_size=224, num_classes=3, **_IMAGE, **_SPLIT)
def _palm(cfg) -> Datasets:
  """PALM (train_224.npz, 400 images): num_classes=3 (high myopia, normal,
  pathologic myopia) or 2 (pathologic myopia or not). Val is stratified by
  the 3 classes, so both options give the same split."""
  from kd_jax.data import sources
  if cfg.num_classes not in (2, 3):
    raise _bad(cfg, "num_classes", "3 (high myopia / normal / pathologic "
               "myopia) or 2 (pathologic myopia or not)")
  full = sources.palm(cfg.root or None,
                      target="label3" if cfg.num_classes == 3 else "pm",
                      image_size=_image_size(cfg))
  # Stratified by the 3 classes either way: both options share one split.
  label3 = full.labels if cfg.num_classes == 3 else sources.load_npz(
      sources.resolve_data_dir(cfg.root or None) / "palm" / "train_224.npz",
      ["train_label3"])["train_label3"]
  train, val, text = _split(full, cfg, strata=label3)
  names = tuple(full.class_names)
  train, val = _channels(train, cfg, 3), _channels(val, cfg, 3)
  return Datasets(
      train=train, val=val, test=val,
      num_classes=cfg.num_classes, class_names=names,
      train_transforms=_augment(cfg, rgb=cfg.channels != 1),
      targets={"label": T.classification(cfg.num_classes, names)},
      description=f"PALM ({cfg.num_classes} classes): {text}" + _NO_TEST
  )


@_register("pneumoniamnist", image_size=28, root="", channels=0,
           augment=False, seed=0, train_fraction=1.0, max_train=0)
def _pneumoniamnist(cfg) -> Datasets:
  """PneumoniaMNIST (train_val_28.npz): its official train (2428) and val
  (270) splits; the less-data subset is stratified by class."""
  from kd_jax.data import sources
  size = _image_size(cfg)
  train = sources.pneumonia_mnist(cfg.root or None, split="train",
                                  image_size=size)
  val = sources.pneumonia_mnist(cfg.root or None, split="val",
                                image_size=size)
  n = len(train)
  train = _train_subset(train, cfg, strata=train.labels)
  names = ("normal", "pneumonia")
  train, val = _channels(train, cfg, 1), _channels(val, cfg, 1)
  return Datasets(
      train=train, val=val, test=val,
      num_classes=2, class_names=names, train_transforms=_augment(cfg),
      targets={"label": T.classification(2, names)},
      description=f"PneumoniaMNIST: official train ({n}"
      + (f", training on {len(train)}" if len(train) < n else "")
      + f") / val ({len(val)}); test = val (the official test split is not "
      "in the shared folder)")


@_register("totalseg", image_size=128, classes="all",
           window=(-125.0, 275.0), **_IMAGE, **_SPLIT)
def _totalseg(cfg) -> Datasets:
  """The TotalSegmentator example CT (30 labelled axial slices; labels are
  the model's output, not manual truth) as 2D slices. `classes`: "all"
  (117 + background), "synapse" (the 8 Synapse organs, renumbered 1-8) or
  a list of class names. Val is one contiguous block of
  round(val_fraction · 30) slices at a seeded position (neighbouring slices
  of one volume are near copies; a block leaks less than a random pick)."""
  from kd_jax.data import sources
  classes = cfg.classes
  if classes == "all":
    classes = None
  elif classes == "synapse":
    classes = sources.SYNAPSE_CLASSES[1:]
  elif isinstance(classes, str) or not isinstance(classes, Sequence):
    raise _bad(cfg, "classes", '"all", "synapse" or a list of class names')
  window = tuple(float(w) for w in cfg.window)
  volumes = sources.totalseg_ct(cfg.root or None, window=window,
                                classes=classes)
  full = sources.SliceSource(volumes, _image_size(cfg))
  n = len(full)
  n_val = _val_count(n, cfg, "slices")
  start = int(np.random.default_rng(int(cfg.seed)).integers(n - n_val + 1))
  val_idx = np.arange(start, start + n_val)
  rest = np.setdiff1d(np.arange(n), val_idx)
  train = sources.Subset(full, rest)
  train = _train_subset(train, cfg)
  if isinstance(train, sources.Subset) and train.source is not full:
    train = sources.Subset(full, rest[train.indices])
  names = tuple(volumes.class_names)
  train = _channels(train, cfg, 1)
  val = _channels(sources.Subset(full, val_idx), cfg, 1)
  return Datasets(
      train=train, val=val, test=val,
      num_classes=volumes.num_classes, class_names=names,
      train_transforms=_augment(cfg),
      targets={"label": T.segmentation(volumes.num_classes, names)},
      description=f"TotalSegmentator example CT: {n} slices → "
      f"{len(train)} train / slices {start}-{start + n_val - 1} val (seed "
      f"{cfg.seed}); test = val; labels are model output")


# --------------------------------------------------------------------------
# User data: a folder with a CSV, and TFDS.


def _targets_of(source, num_classes, class_names) -> dict[str, Target]:
  if source.task == "segmentation":
    return {"label": T.segmentation(num_classes, class_names)}
  if source.task == "classification":
    return {"label": T.classification(num_classes, class_names)}
  return {}


@_register("folder", csv="", image_dir="", image_column="image",
           label_column="label", mask_column="", class_names=(),
           num_classes=0, channels=3, image_size=224, val_csv="",
           test_csv="", augment=False, **_SPLIT)
def _folder(cfg) -> Datasets:
  """Images in a folder listed in a CSV (sources.FolderCsvSource): a class
  per row (`label_column`) or a mask path (`mask_column`, then
  `num_classes` is required). Val is `val_csv` when given, else a seeded
  `val_fraction` of `csv` (stratified by class); test is `test_csv` when
  given (whole, never used for val), else the val split."""
  from kd_jax.data import sources
  if not cfg.csv:
    raise ValueError("data.csv is empty: set --config.data.csv to the CSV "
                     "that lists the images (folder data set)")
  if cfg.channels not in (1, 3):
    raise _bad(cfg, "channels", "1 (grey) or 3 (RGB)")

  def read(path):
    return sources.FolderCsvSource(
        path, image_dir=cfg.image_dir or None,
        image_column=cfg.image_column,
        label_column=None if cfg.mask_column else cfg.label_column,
        mask_column=cfg.mask_column or None,
        class_names=list(cfg.class_names) or None,
        num_classes=cfg.num_classes or None, channels=int(cfg.channels),
        image_size=_image_size(cfg))

  full = read(cfg.csv)
  strata = full.labels if full.task == "classification" else None
  if cfg.val_csv:
    train, val = _train_subset(full, cfg, strata), read(cfg.val_csv)
    text = (f"{len(full)} train rows (training on {len(train)}) / "
            f"{len(val)} val rows of {cfg.val_csv}")
  else:
    train, val, text = _split(full, cfg, strata)
  test = read(cfg.test_csv) if cfg.test_csv else val
  names = tuple(full.class_names) if full.class_names else None
  return Datasets(
      train=train, val=val, test=test, num_classes=full.num_classes,
      class_names=names or tuple(f"class_{i}"
                                 for i in range(full.num_classes)),
      train_transforms=_augment(cfg, rgb=cfg.channels == 3),
      targets=_targets_of(full, full.num_classes, names),
      description=f"folder {cfg.csv}: {text}; "
      + (f"test = {len(test)} rows of {cfg.test_csv}" if cfg.test_csv
         else "test = val"))


@_register("tfds", dataset="", data_dir="", split="train", val_split="",
           test_split="", image_key="image", label_key="label",
           num_classes=0, image_size=0, channels=0, download=False,
           augment=False, **_SPLIT)
def _tfds(cfg) -> Datasets:
  """A prepared TFDS data set in array_record format (sources.TfdsSource):
  `dataset` (a registered name, e.g. "my_set:1.0.0"), `split` for training;
  val is `val_split` when given, else a seeded `val_fraction` of `split`;
  test is `test_split` when given (whole, never used for val), else val.
  `label_key` "" reads no label (unlabelled images)."""
  from kd_jax.data import sources
  if not cfg.dataset:
    raise ValueError("data.dataset is empty: set --config.data.dataset to "
                     "the TFDS name (tfds data set)")

  def read(split):
    return sources.TfdsSource(
        cfg.dataset, split=split, data_dir=cfg.data_dir or None,
        image_key=cfg.image_key, label_key=cfg.label_key or None,
        num_classes=cfg.num_classes or None, image_size=_image_size(cfg),
        download=bool(cfg.download))

  full = read(cfg.split)
  if cfg.val_split:
    train, val = _train_subset(full, cfg), read(cfg.val_split)
    text = (f"{cfg.split} ({len(full)}, training on {len(train)}) / "
            f"{cfg.val_split} ({len(val)})")
  else:
    train, val, text = _split(full, cfg)
    text = f"{cfg.split}: {text}"
  test = read(cfg.test_split) if cfg.test_split else val
  stored = np.shape(full.data[0][cfg.image_key])
  stored = stored[-1] if len(stored) == 3 else 1
  names = tuple(getattr(full, "class_names", ()) or ()) or None
  n = full.num_classes or 0
  train, val = _channels(train, cfg, stored), _channels(val, cfg, stored)
  return Datasets(
      train=train, val=val,
      test=_channels(test, cfg, stored) if cfg.test_split else val,
      num_classes=n,
      class_names=names or tuple(f"class_{i}" for i in range(n)),
      train_transforms=_augment(cfg),
      targets=_targets_of(full, n, names),
      description=f"tfds {cfg.dataset}: {text}; "
      + (f"test = {cfg.test_split} ({len(test)})" if cfg.test_split
         else "test = val"))


# --------------------------------------------------------------------------
# Unlabelled images: no targets, so the run's one output is an embedding
# head (`kd_jax.tasks`) and a stage trains on feature terms alone.


def _unlabelled_augment(cfg, size):
  if not isinstance(cfg.augment, bool):
    raise _bad(cfg, "augment", "True (DINO-style crops, flips and colour "
               "jitter) or False")
  return (transforms.dino_augment(size, int(cfg.channels)) if cfg.augment
          else [])


@_register("image_folder", image_dir="", image_size=224, channels=3,
           augment=True, **_SPLIT)
def _image_folder(cfg) -> Datasets:
  """Every image under `image_dir` (recursively; any size, resized to
  `image_size` on access), streamed from disk (sources.ImageFolderSource):
  a seeded `val_fraction` is the val split, test = val. No labels. With
  `augment`, training views are `transforms.dino_augment`."""
  from kd_jax.data import sources
  if not cfg.image_dir:
    raise ValueError("data.image_dir is empty: set --config.data.image_dir "
                     "to a folder of images (image_folder data set)")
  size = _image_size(cfg)
  if size is None:
    raise _bad(cfg, "image_size", "a positive int or (H, W): the images "
               "may have any size, the model sees one")
  if cfg.channels not in (1, 3):
    raise _bad(cfg, "channels", "1 (grey) or 3 (RGB)")
  full = sources.ImageFolderSource(cfg.image_dir, channels=int(cfg.channels),
                                   image_size=size)
  train, val, text = _split(full, cfg)
  return Datasets(
      train=train, val=val, test=val, num_classes=0, class_names=(),
      train_transforms=_unlabelled_augment(cfg, size), targets={},
      description=f"image folder {cfg.image_dir} (unlabelled): {text}; "
      "test = val")


# The shared sets whose images `shared_images` pools by default.
SHARED_IMAGE_SETS = ("acdc", "idrid_grading", "idrid_lesions", "drive",
                     "palm", "pneumoniamnist")


@_register("shared_images", sets=SHARED_IMAGE_SETS, root="", image_size=224,
           channels=3, augment=True)
def _shared_images(cfg) -> Datasets:
  """The images of the shared sets `sets`, pooled without their labels
  (`ImagePool`), each built at `image_size` with `channels` (grey images
  repeated, colour ones to luminance): train = every set's train split, val =
  every set's val split (test = val). Only train splits are trained on, so
  the val splits the probes score (`kd_jax.probe`) stay unseen."""
  sets = cfg.sets
  if isinstance(sets, str):
    sets = [s.strip() for s in sets.split(",") if s.strip()]
  sets = tuple(sets)
  if not sets or any(s not in SHARED_IMAGE_SETS for s in sets):
    raise _bad(cfg, "sets", f"a non-empty subset of {list(SHARED_IMAGE_SETS)}")
  if cfg.channels not in (1, 3):
    raise _bad(cfg, "channels", "1 (grey) or 3 (RGB)")
  size = _image_size(cfg)
  if size is None or size[0] != size[1]:
    raise _bad(cfg, "image_size", "a positive int (ACDC takes squares only)")
  from kd_jax.data import sources
  to_channels = functools.partial(_set_channels, channels=int(cfg.channels))
  parts = {"train": [], "val": []}
  for name in sets:
    opts = dict(name=name, image_size=size[0], augment=False)
    if "root" in OPTIONS[name]:
      opts["root"] = cfg.root
    built = build(opts)
    for split in parts:
      part = getattr(built, split)
      if np.shape(part[0]["image"])[-1] != cfg.channels:
        part = sources.MapSource(part, to_channels)
      parts[split].append((f"{name}/{split}", part))
  train, val = ImagePool(parts["train"]), ImagePool(parts["val"])
  return Datasets(
      train=train, val=val, test=val, num_classes=0, class_names=(),
      train_transforms=_unlabelled_augment(cfg, size), targets={},
      description=f"shared images (unlabelled): {train!r} train, "
      f"{len(val)} val images; test = val")


# --------------------------------------------------------------------------
# The unlabelled pool (`data.unlabelled`).

_POOL_KEYS = ("per_batch", "sources")
# Sets whose `image_size` is a square int only (no (H, W)).
_SQUARE_ONLY = ("synthetic", "acdc", "synapse")
# Sets whose `root` is the shared folder: a pool of them reads the labelled
# set's folder unless its dict says otherwise.
_SHARED_ROOT = ("acdc", "idrid_grading", "idrid_lesions", "drive", "palm",
                "pneumoniamnist", "totalseg")


class ImagePool:
  """The images of several splits one after another, as `{"image"}`
  examples. Labels and every other key are dropped here, so nothing of a
  pool example can be read as a label downstream."""

  def __init__(self, parts: Sequence[tuple[str, Any]]):
    self.names = [name for name, _ in parts]
    self.parts = [part for _, part in parts]
    self.sizes = [len(part) for part in self.parts]
    self._ends = np.cumsum(self.sizes, dtype=np.int64)

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index: int):
    index, n = int(index), len(self)
    if not -n <= index < n:
      raise IndexError(f"pool index {index} out of range [0, {n})")
    index %= n
    k = int(np.searchsorted(self._ends, index, side="right"))
    start = int(self._ends[k]) - self.sizes[k]
    return {"image": self.parts[k][index - start]["image"]}

  def __repr__(self) -> str:
    parts = ", ".join(f"{a} {b}" for a, b in zip(self.names, self.sizes))
    return f"ImagePool(n={len(self)}: {parts})"


def _pool_config(value, labelled: str):
  """Checks `data.unlabelled` before anything is read: None (or no sources)
  for no pool, else ([(i, source dict)], per_batch)."""
  if value is None:
    return None
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if not isinstance(value, Mapping):
    raise ValueError(f"data.unlabelled={value!r}: expected None (no pool) or "
                     f"dict(sources=(...), per_batch=k)")
  unknown = sorted(set(value) - set(_POOL_KEYS))
  if unknown:
    raise ValueError(f"data.unlabelled.{unknown[0]} is not an option of the "
                     f"unlabelled pool; its options are {list(_POOL_KEYS)}")
  given = value.get("sources") or ()
  per_batch = value.get("per_batch", 0)
  if isinstance(given, (str, Mapping)) or hasattr(given, "to_dict"):
    given = (given,)  # One source need not be wrapped in a tuple.
  if not given:
    if per_batch:
      raise ValueError(f"data.unlabelled.per_batch={per_batch!r} but "
                       f"data.unlabelled.sources is empty: name the pool's "
                       f"data sets, or set per_batch=0 for no pool")
    return None
  if (not isinstance(per_batch, (int, np.integer))
      or isinstance(per_batch, bool) or per_batch < 1):
    raise ValueError(f"data.unlabelled.per_batch={per_batch!r}: expected an "
                     f"int >= 1 (pool examples in each global batch)")
  entries = []
  for i, entry in enumerate(given):
    if hasattr(entry, "to_dict"):
      entry = entry.to_dict()
    if isinstance(entry, str):
      entry = {"name": entry}
    if not isinstance(entry, Mapping) or "name" not in entry:
      raise ValueError(f"data.unlabelled.sources[{i}]={entry!r}: expected a "
                       f"data set name or dict(name=..., <its options>)")
    entry = dict(entry)
    if entry["name"] not in BUILDERS:
      raise ValueError(f"data.unlabelled.sources[{i}] names "
                       f"{entry['name']!r}, an unknown data set; choose one "
                       f"of {sorted(BUILDERS)}")
    if entry.get("unlabelled"):
      raise ValueError(f"data.unlabelled.sources[{i}] ({entry['name']}) sets "
                       f"unlabelled: a pool source has no pool of its own")
    # folder and tfds name many data sets each: `_check_leak` compares what
    # they read instead.
    if (_IMAGES_OF.get(entry["name"], entry["name"])
        == _IMAGES_OF.get(labelled, labelled)
        and labelled not in ("folder", "tfds")):
      what = ("the labelled data set itself" if entry["name"] == labelled
              else f"the images of the labelled data set {labelled!r}")
      raise ValueError(f"data.unlabelled.sources[{i}] is "
                       f"{entry['name']!r}, {what}: its images would leak "
                       f"into evaluation; choose another data set")
    entries.append((i, entry))
  return entries, int(per_batch)


# Data sets that are other targets on another set's images (a pool of one
# would leak the other's val images).
_IMAGES_OF = {"idrid_referable": "idrid_grading"}


def _split_paths(split) -> set:
  """The image files behind a folder split (through subsets and channel
  maps); empty for other sources."""
  from kd_jax.data import sources
  idx = None
  while isinstance(split, (sources.Subset, sources.MapSource)):
    if isinstance(split, sources.Subset):
      idx = split.indices if idx is None else split.indices[idx]
    split = split.source
  paths = getattr(split, "image_paths", None)
  if paths is None:
    return set()
  chosen = paths if idx is None else [paths[int(i)] for i in idx]
  return {os.path.realpath(p) for p in chosen}


def _check_leak(labelled: Datasets, cfg, entry, pool: Datasets,
                where: str) -> None:
  """A folder or tfds pool source may be another data set of that kind;
  refuse it when it reads what the labelled set evaluates on."""
  if entry["name"] != cfg.name:
    return
  if cfg.name == "tfds":
    p = {**OPTIONS["tfds"], **entry}
    same = (p["dataset"], p["data_dir"]) == (cfg.dataset, cfg.data_dir)
    evaluated = {cfg.val_split or cfg.split} | (
        {cfg.test_split} if cfg.test_split else set())
    read = {p["split"]} | ({p["val_split"]} if p["val_split"] else set())
    leak = same and bool(evaluated & read)
  else:
    evaluated = _split_paths(labelled.val) | _split_paths(labelled.test)
    leak = bool(evaluated & (_split_paths(pool.train)
                             | _split_paths(pool.val)))
  if leak:
    raise ValueError(f"{where} reads images of the labelled {cfg.name} set's "
                     f"val/test split: they would leak into evaluation; "
                     f"point it at other images")


def _shape_fix(name: str, got, want, labelled: str) -> str:
  """Which option makes a pool source's images the labelled shape."""
  fixes = []
  if tuple(got[:2]) != tuple(want[:2]):
    hw = tuple(int(s) for s in want[:2])
    if name in _SQUARE_ONLY and hw[0] != hw[1]:
      fixes.append(f"a square data.image_size ({name} takes only squares)")
    else:
      fixes.append(f"image_size={hw[0] if hw[0] == hw[1] else hw} in its "
                   f"dict")
  if len(got) != len(want) or got[-1:] != want[-1:]:
    c = int(want[-1])
    if "channels" in OPTIONS[name]:
      fixes.append(f"channels={c} in its dict")
    elif "channels" in OPTIONS[labelled]:
      fixes.append(f"data.channels={int(got[-1])} ({name} has no channels "
                   f"option)")
    else:
      fixes.append(f"a source with {c} channels")
  return " and ".join(fixes)


def _attach_pool(out: Datasets, cfg, entries, per_batch: int) -> None:
  """Builds each pool source at the labelled images' size and channels, and
  sets `out.unlabelled` to the images of their train and val splits."""
  shape = tuple(np.shape(out.train[0]["image"]))
  hw, c = shape[:2], shape[-1] if len(shape) == 3 else None
  parts, counts = [], []
  for i, entry in entries:
    name = entry["name"]
    where = f"data.unlabelled.sources[{i}] ({name})"
    opts = OPTIONS[name]
    if "image_size" in opts and "image_size" not in entry:
      if hw[0] == hw[1]:
        entry["image_size"] = int(hw[0])
      elif name not in _SQUARE_ONLY:
        entry["image_size"] = tuple(int(s) for s in hw)
    if "channels" in opts and "channels" not in entry and c in (1, 3):
      entry["channels"] = int(c)
    if (name in _SHARED_ROOT and cfg.name in _SHARED_ROOT
        and "root" not in entry):
      entry["root"] = cfg.root
    try:
      pool = build(entry)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    splits = [("train", pool.train)]
    if pool.val is not pool.train:
      splits.append(("val", pool.val))
    n = sum(len(s) for _, s in splits)
    if n == 0:
      raise ValueError(f"{where} has no images in its train and val splits: "
                       f"point it at a non-empty data set or drop it from "
                       f"data.unlabelled.sources")
    _check_leak(out, cfg, entry, pool, where)
    for split_name, split in splits:
      if not len(split):
        continue
      got = tuple(np.shape(split[0]["image"]))
      if got != shape:
        raise ValueError(
            f"{where}: pool images are {got} but the labelled {cfg.name} "
            f"images are {shape}; set {_shape_fix(name, got, shape, cfg.name)}")
      parts.append((f"{name}/{split_name}", split))
    counts.append(f"{name} {n}")
  out.unlabelled = ImagePool(parts)
  out.unlabelled_per_batch = per_batch
  out.description += (f"; unlabelled pool: {len(out.unlabelled)} images "
                      f"({', '.join(counts)}), {per_batch} per batch")


def check_unlabelled(datasets: Datasets, batch_size: int,
                     process_count: int | None = None) -> None:
  """Checks `data.unlabelled.per_batch` against the global batch: at least
  one labelled example per batch, and a pool share that splits evenly over
  the processes (as the labelled share does). No pool: nothing to check."""
  k = datasets.unlabelled_per_batch
  if datasets.unlabelled is None:
    if k:
      raise ValueError(f"data.unlabelled.per_batch={k} with no pool: set "
                       f"data.unlabelled.sources")
    return
  if not 1 <= k <= batch_size - 1:
    raise ValueError(f"data.unlabelled.per_batch={k} for batch_size "
                     f"{batch_size}: expected an int in [1, {batch_size - 1}]"
                     f" (each batch needs a labelled example)")
  if process_count is None:
    import jax
    process_count = jax.process_count()
  if k % process_count:
    raise ValueError(f"data.unlabelled.per_batch={k} is not divisible by the "
                     f"{process_count} processes: choose a multiple of "
                     f"{process_count} in [1, {batch_size - 1}]")
