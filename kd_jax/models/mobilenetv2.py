"""MobileNetV2 (Sandler et al. 2018), torchvision layout, and a segmentation
variant.

Registered:
  "mobilenetv2": classifier; 3,504,872 parameters at width 1.0 with the
      1000-class head (torchvision's count, exactly).
  "mobilenetv2_seg": Structured KD student: the trunk at output stride 8 (the
      stride-2 stages 4 and 6 keep the resolution and dilate their depthwise
      convs by 2 and 4), without the 1×1 conv to 1280, and a `SegHead`
      (3×3 conv-BN-ReLU to 128, dropout, 1×1 classifier); logits upsampled to
      the input size. 2.18 M parameters at 19 classes (paper: 2.17 M).

Layout: 3×3/2 conv to 32 → 17 inverted residual blocks in 7 stages
(expansion t, channels c, repeats n, stride s):
(1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2)
(6,320,1,1) → 1×1 conv to 1280 → global average → dropout 0.2 → linear.
A block is 1×1 expand (skipped when t = 1) → 3×3 depthwise → 1×1 linear
projection, BN after each, ReLU6 after the first two, identity shortcut
when stride 1 and widths match. Channel counts are `width` × c rounded to
multiples of 8 (torchvision's `_make_divisible`); the last conv keeps 1280
for width ≤ 1. BatchNorm momentum 0.9 (torch 0.1), eps 1e-5.

Features (NHWC; strides for output_stride 32 | 8; channels at width 1.0):
  "stem":   H/2, 32
  "stage1": H/2, 16     "stage2": H/4, 24     "stage3": H/8, 32
  "stage4": H/16|8, 64  "stage5": H/16|8, 96  "stage6": H/32|8, 160
  "stage7": H/32|8, 320
  "last":   H/32, 1280 (classifier only)
  "embedding": (N, C) global average of the last map
  "head":   H/8, 128 (mobilenetv2_seg only) the map before the classifier

The convolution and BatchNorm layers are module fields (`conv`, `norm`;
flax's by default).
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import resnet
from kd_jax.models.pspnet import SegHead, resize_bilinear
from kd_jax.models.registry import register
from kd_jax.models.remat import checkpointed

ModuleDef = Any

DEFAULT_INPUT = {
    "mobilenetv2": (224, 224, 3),
    "mobilenetv2_seg": (512, 512, 3),
}
RECIPES = {
    "mobilenetv2": "classification baseline; trunk of multitask_mobilenetv2",
    "mobilenetv2_seg": "Structured KD student",
}

# (expansion, channels, repeats, stride) per stage.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
  """Rounds to the nearest multiple of `divisor`, never more than 10% down."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


def _dilations(output_stride: int) -> list[tuple[int, int]]:
  """(stride, dilation) per stage for the requested output stride."""
  out, current, dilation = [], 2, 1  # the stem already strides by 2
  for _, _, _, s in SETTINGS:
    if s == 2 and current >= output_stride:
      dilation *= 2
      s = 1
    current *= s
    out.append((s, dilation))
  return out


class ConvBN(nn.Module):
  """Conv (optionally depthwise) → BN → optional ReLU6."""
  features: int
  kernel: int = 1
  stride: int = 1
  dilation: int = 1
  depthwise: bool = False
  act: bool = True
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, *, train: bool):
    pad = self.dilation * (self.kernel - 1) // 2
    x = self.conv(self.features, (self.kernel, self.kernel),
                  strides=self.stride, kernel_dilation=self.dilation,
                  padding=[(pad, pad), (pad, pad)],
                  feature_group_count=x.shape[-1] if self.depthwise else 1,
                  use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                  name="conv")(x)
    x = resnet.batch_norm(self.norm, train, dtype=self.dtype, name="bn")(x)
    return nn.relu6(x) if self.act else x


class InvertedResidual(nn.Module):
  features: int
  expansion: int
  stride: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    c_in, d = x.shape[-1], self.dtype
    layers = dict(conv=self.conv, norm=self.norm)
    y = x
    if self.expansion != 1:
      y = ConvBN(round(c_in * self.expansion), dtype=d, name="expand",
                 **layers)(y, train=train)
    y = ConvBN(y.shape[-1], 3, self.stride, self.dilation, depthwise=True,
               dtype=d, name="depthwise", **layers)(y, train=train)
    y = ConvBN(self.features, act=False, dtype=d, name="project",
               **layers)(y, train=train)
    if self.stride == 1 and c_in == self.features:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 classifier / trunk; see the module docstring.

  num_classes None → no dropout and linear head (logits None); last_conv
  False → no 1×1 conv to 1280 ("last" absent, "embedding" pools stage7).
  conv, norm: the convolution and BatchNorm layers (flax's by default).
  """
  num_classes: Optional[int] = 1000
  width: float = 1.0
  output_stride: int = 32
  last_conv: bool = True
  dropout: float = 0.2
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  remat: Any = False  # Each inverted residual (kd_jax.models.remat).

  @nn.compact
  def __call__(self, x, *, train: bool):
    d = self.dtype
    layers = dict(conv=self.conv, norm=self.norm)
    block = checkpointed(InvertedResidual, self.remat)
    feats = {}
    x = ConvBN(make_divisible(32 * self.width), 3, 2, dtype=d,
               name="stem", **layers)(x, train=train)
    feats["stem"] = x
    for i, ((t, c, n, _), (s, dil)) in enumerate(
        zip(SETTINGS, _dilations(self.output_stride))):
      for j in range(n):
        x = block(make_divisible(c * self.width), t, s if j == 0 else 1,
                  dil, dtype=d, name=f"stage{i + 1}_{j}", **layers)(x, train)
      feats[f"stage{i + 1}"] = x
    if self.last_conv:
      x = ConvBN(make_divisible(1280 * max(1.0, self.width)), dtype=d,
                 name="last", **layers)(x, train=train)
      feats["last"] = x
    feats["embedding"] = jnp.mean(x, axis=(1, 2))
    logits = None
    if self.num_classes is not None:
      y = nn.Dropout(self.dropout, deterministic=not train)(feats["embedding"])
      logits = nn.Dense(self.num_classes, dtype=d, param_dtype=jnp.float32,
                        name="head")(y)
    return logits, feats


register("mobilenetv2")(MobileNetV2)


@register("mobilenetv2_seg")
class MobileNetV2Seg(nn.Module):
  """Dilated MobileNetV2 trunk + `SegHead`; see the module docstring."""
  num_classes: int = 19
  width: float = 1.0
  head_channels: int = 128
  dropout: float = 0.1
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  remat: Any = False  # The trunk's blocks (kd_jax.models.remat).

  @nn.compact
  def __call__(self, x, *, train: bool):
    size = x.shape[1:3]
    layers = dict(conv=self.conv, norm=self.norm)
    _, feats = MobileNetV2(num_classes=None, width=self.width,
                           output_stride=8, last_conv=False, dtype=self.dtype,
                           name="backbone", remat=self.remat, **layers)(
                               x, train=train)
    feats = dict(feats)
    y, feats["head"] = SegHead(self.num_classes, self.head_channels,
                               self.dropout, dtype=self.dtype,
                               name="seg_head", **layers)(feats["stage7"],
                                                          train=train)
    return resize_bilinear(y, size), feats
