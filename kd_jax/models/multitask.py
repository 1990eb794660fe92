"""Multi-task fundus models: a shared trunk and four heads.

Registered:
  "multitask_resnet50":    ResNet-50 trunk (the teachers of the ensemble)
  "multitask_resnet18":    ResNet-18 trunk (student)
  "multitask_mobilenetv2": MobileNetV2 trunk (smaller student)

logits is a dict (not an array) with fixed keys:
  "dr_grade": (N, 5)  diabetic-retinopathy grade logits (0–4)
  "dme_risk": (N, 3)  diabetic-macular-edema risk logits (0–2)
  "fovea":    (N, 2)  fovea centre (x, y)
  "optic_disc": (N, 2) optic-disc centre
The coordinate heads are linear regressions in whatever units the labels
use; we use x / W and y / H of the input image, i.e. [0, 1].

Each head is dropout (`dropout`, train only) → linear on the shared pooled
embedding; `grade_classes` / `risk_classes` change the head sizes.

Features: the trunk's (see resnet.py / mobilenetv2.py): "stem",
"layer1".."layer4" for ResNet trunks, "stem", "stage1".."stage7", "last"
for MobileNetV2, plus "embedding" (N, C) — 2048 / 512 / 1280 channels.
`width` scales the trunk (ResNet: 64·width stem channels; MobileNetV2: its
multiplier).

The convolution, BatchNorm and max-pool layers are module fields (`conv`,
`norm`, `pool`; flax's by default), passed down to the trunk.
"""
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import mobilenetv2, resnet
from kd_jax.models.registry import register

ModuleDef = Any

HEADS = ("dr_grade", "dme_risk", "fovea", "optic_disc")
_FUNDUS_INPUT = (512, 512, 3)
DEFAULT_INPUT = {
    "multitask_resnet50": _FUNDUS_INPUT,
    "multitask_resnet18": _FUNDUS_INPUT,
    "multitask_mobilenetv2": _FUNDUS_INPUT,
}
RECIPES = {
    "multitask_resnet50": "multi-task KD teacher (ensemble member)",
    "multitask_resnet18": "multi-task KD student",
    "multitask_mobilenetv2": "multi-task KD student",
}


class MultiTask(nn.Module):
  """Shared trunk + dr_grade / dme_risk / fovea / optic_disc heads."""
  trunk: str = "resnet50"  # "resnet18" | "resnet34" | "resnet50" | "resnet101" | "mobilenetv2"
  grade_classes: int = 5
  risk_classes: int = 3
  dropout: float = 0.2
  width: float = 1.0
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  pool: Callable = nn.max_pool  # ResNet trunks' stem pool
  remat: Any = False  # The trunk's blocks (kd_jax.models.remat).

  @nn.compact
  def __call__(self, x, *, train: bool):
    d = self.dtype
    layers = dict(conv=self.conv, norm=self.norm)
    if self.trunk == "mobilenetv2":
      body = mobilenetv2.MobileNetV2(num_classes=None, width=self.width,
                                     dtype=d, name="trunk", remat=self.remat,
                                     **layers)
    else:
      body = resnet.resnet_by_name(self.trunk, num_classes=None,
                                   width=int(round(64 * self.width)), dtype=d,
                                   name="trunk", pool=self.pool,
                                   remat=self.remat, **layers)
    _, feats = body(x, train=train)
    sizes = dict(dr_grade=self.grade_classes, dme_risk=self.risk_classes,
                 fovea=2, optic_disc=2)
    logits = {}
    for head in HEADS:
      y = nn.Dropout(self.dropout, deterministic=not train)(feats["embedding"])
      logits[head] = nn.Dense(sizes[head], dtype=d, param_dtype=jnp.float32,
                              name=head)(y)
    return logits, dict(feats)


@register("multitask_resnet50")
class MultiTaskResNet50(MultiTask):
  trunk: str = "resnet50"


@register("multitask_resnet18")
class MultiTaskResNet18(MultiTask):
  trunk: str = "resnet18"


@register("multitask_mobilenetv2")
class MultiTaskMobileNetV2(MultiTask):
  trunk: str = "mobilenetv2"
