"""Data: random-access sources and grain pipelines.

`build(config.data)` returns the splits of the configured data set:
`data.name` "synthetic" (generated CT phantoms), "acdc" (cardiac MRI in the
shared data folder) or "synapse" (the TransUNet npz/h5 layout). Real data
sets also give `volumes`, whole 3D volumes for volume-wise Dice/HD95.
"""
import dataclasses
from typing import Any, Sequence

from kd_jax.data import pipeline  # noqa: F401
from kd_jax.data import synthetic


@dataclasses.dataclass
class Datasets:
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


def _synthetic(cfg) -> Datasets:
  from kd_jax.data import transforms

  # Different seeds give disjoint draws: the splits never share a slice.
  def split(n, offset):
    return synthetic.SyntheticCT(n, size=cfg.image_size,
                                 seed=cfg.seed * 1000 + offset)

  augment = [transforms.SegmentationAugment(
      flip=True, rot90=False, max_rotation_deg=15.0)] if cfg.augment else []
  return Datasets(train=split(cfg.num_train, 0), val=split(cfg.num_val, 1),
                  test=split(cfg.num_test, 2),
                  num_classes=synthetic.NUM_CLASSES,
                  class_names=synthetic.ORGANS, train_transforms=augment)


def _size(cfg):
  return (int(cfg.image_size),) * 2


def _transunet_augment(cfg):
  from kd_jax.data import transforms
  # TransUNet's RandomGenerator: rot90 + flip, or a rotation up to 20°.
  return [transforms.SegmentationAugment(
      flip=True, rot90=True, max_rotation_deg=20.0)] if cfg.augment else []


def _acdc(cfg) -> Datasets:
  """ACDC: train slices for training; the 20 validation volumes (10
  patients, none in train) give the val split (their slices, resized) and
  the volumes. The official test split is not in the shared folder, so
  `test` is the val split too: tune and report on it, and say so.

  cfg: root (folder holding acdc/; "" = $KD_JAX_DATA or ../shared/data),
  image_size, augment, max_train / max_volumes (0 = all; for quick runs).
  """
  from kd_jax.data import sources
  root = cfg.get("root") or None
  train = sources.acdc_slices(root, image_size=_size(cfg),
                              max_examples=cfg.get("max_train") or None)
  volumes = sources.acdc_volumes(root,
                                 max_volumes=cfg.get("max_volumes") or None)
  val = sources.SliceSource(volumes, _size(cfg))
  return Datasets(train=train, val=val, test=val, num_classes=4,
                  class_names=sources.ACDC_CLASSES,
                  train_transforms=_transunet_augment(cfg), volumes=volumes,
                  volumes_split="val")


def _synapse(cfg) -> Datasets:
  """Synapse in the TransUNet layout (see sources.synapse): train_npz slices
  for training, minus the last `num_val_cases` cases held out as the val
  split; the test_vol_h5 volumes are the test split (slices, resized) and
  the volumes (TransUNet's protocol: Dice and HD95 per test volume).

  cfg: root, list_dir ("" = <root>/lists_Synapse when it exists, else every
  file; it holds train.txt and test_vol.txt), image_size, augment,
  num_val_cases, num_classes (9).
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
  return Datasets(
      train=sources.Subset(slices, train_idx),
      val=sources.Subset(slices, val_idx),
      test=sources.SliceSource(volumes, _size(cfg)), num_classes=n,
      class_names=sources.SYNAPSE_CLASSES[:n],
      train_transforms=_transunet_augment(cfg), volumes=volumes,
      volumes_split="test")


BUILDERS = {"synthetic": _synthetic, "acdc": _acdc, "synapse": _synapse}


def build(cfg) -> Datasets:
  if cfg.name not in BUILDERS:
    raise ValueError(f"data.name {cfg.name!r} is unknown; choose one of "
                     f"{sorted(BUILDERS)}")
  return BUILDERS[cfg.name](cfg)
