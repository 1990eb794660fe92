"""Data: random-access sources and grain pipelines.

`build(config.data)` returns the splits of the configured data set.
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


BUILDERS = {"synthetic": _synthetic}


def build(cfg) -> Datasets:
  if cfg.name not in BUILDERS:
    raise ValueError(f"data.name {cfg.name!r} is unknown; choose one of "
                     f"{sorted(BUILDERS)}")
  return BUILDERS[cfg.name](cfg)
