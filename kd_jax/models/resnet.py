"""ResNet-18/34/50/101 (He et al. 2016), torchvision layout, v1.5 bottleneck.

Registered: "resnet18", "resnet34", "resnet50", "resnet101". With the default
1000-class head the parameter counts equal torchvision's: 11,689,512 /
21,797,672 / 25,557,032 / 44,549,160.

Layout: 7×7/2 conv stem → 3×3/2 max pool → four stages of basic (18, 34) or
bottleneck (50, 101) blocks; a bottleneck strides in its 3×3 conv (v1.5) and
a block projects its shortcut (1×1 conv + BN) when stride or width changes.
Convolutions have no bias; BatchNorm uses momentum 0.9 (torch's 0.1) and
eps 1e-5; padding is symmetric as in torch (not XLA "SAME").

Options:
  num_classes: size of the linear head; None → no head, logits is None.
  output_stride: 32 (classification), 16 or 8 (segmentation, as in
    DeepLab/PSPNet): the last stage (16) or last two stages (8) keep the
    resolution and dilate every 3×3 conv of the stage by 2 and 4 instead.
  deep_stem: replace the 7×7 stem with three 3×3 convs (64, 64, 128 × width
    / 64), the "deep base" ResNet of PSPNet and of the Structured KD teacher.
  width: channels of the stem and of stage 1 (64); stages double it. A
    narrow width gives tiny test models with the same structure.

Features (NHWC, H×W the input size, s = output_stride):
  "stem":      after stem conv-BN-ReLU, before max pool: H/2, 64 (128 deep)
  "layer1":    H/4,  64 (basic) | 256 (bottleneck)
  "layer2":    H/8,  128 | 512
  "layer3":    H/16, 256 | 1024  (H/8 when s = 8)
  "layer4":    H/32, 512 | 2048  (H/16 when s = 16, H/8 when s = 8)
  "embedding": (N, C4) global average of "layer4"
Channel figures are for width 64.

Layers are module fields (`conv`, `norm`, `pool`), flax's own by default;
`remat` rematerialises each residual block (`kd_jax.models.remat`).
"""
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.registry import register
from kd_jax.models.remat import checkpointed

DEFAULT_INPUT = {
    "resnet18": (224, 224, 3),
    "resnet34": (224, 224, 3),
    "resnet50": (224, 224, 3),
    "resnet101": (224, 224, 3),
}
RECIPES = {
    "resnet18": "backbone of resnet18_seg / pspnet_resnet18 / multitask_resnet18",
    "resnet34": "classification baseline",
    "resnet50": "backbone of multitask_resnet50 (multi-task KD teachers)",
    "resnet101": "backbone of pspnet_resnet101 (Structured KD teacher)",
}


ModuleDef = Any


def conv(conv_cls: ModuleDef, features: int, kernel: int, *, stride: int = 1,
         dilation: int = 1, dtype: Any = jnp.float32,
         name: Optional[str] = None) -> nn.Conv:
  """A bias-free `conv_cls` with torch-style symmetric padding."""
  pad = dilation * (kernel - 1) // 2
  return conv_cls(features, (kernel, kernel), strides=stride,
                  kernel_dilation=dilation, padding=[(pad, pad), (pad, pad)],
                  use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                  name=name)


def batch_norm(norm_cls: ModuleDef, train: bool, *, dtype: Any = jnp.float32,
               epsilon: float = 1e-5, name: Optional[str] = None):
  """`norm_cls` with torch's momentum (0.1, i.e. 0.9 here) and epsilon."""
  return norm_cls(use_running_average=not train, momentum=0.9,
                  epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32,
                  name=name)


class BasicBlock(nn.Module):
  """Two 3×3 convs (ResNet-18/34)."""
  features: int
  stride: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.dtype
    y = conv(self.conv, self.features, 3, stride=self.stride,
             dilation=self.dilation, dtype=d, name="conv1")(x)
    y = nn.relu(batch_norm(self.norm, train, dtype=d, name="bn1")(y))
    y = conv(self.conv, self.features, 3, dilation=self.dilation, dtype=d,
             name="conv2")(y)
    y = batch_norm(self.norm, train, dtype=d, name="bn2")(y)
    return nn.relu(y + _shortcut(self, x, self.features, self.stride, train))


class Bottleneck(nn.Module):
  """1×1 reduce → 3×3 (strided, v1.5) → 1×1 expand ×4 (ResNet-50/101)."""
  features: int
  stride: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.dtype
    y = conv(self.conv, self.features, 1, dtype=d, name="conv1")(x)
    y = nn.relu(batch_norm(self.norm, train, dtype=d, name="bn1")(y))
    y = conv(self.conv, self.features, 3, stride=self.stride,
             dilation=self.dilation, dtype=d, name="conv2")(y)
    y = nn.relu(batch_norm(self.norm, train, dtype=d, name="bn2")(y))
    y = conv(self.conv, self.features * 4, 1, dtype=d, name="conv3")(y)
    y = batch_norm(self.norm, train, dtype=d, name="bn3")(y)
    return nn.relu(y + _shortcut(self, x, self.features * 4, self.stride, train))


def _shortcut(block, x, features, stride, train):
  if stride == 1 and x.shape[-1] == features:
    return x
  # Called inside the block's compact scope, so these names are the block's
  # own submodules.
  x = conv(block.conv, features, 1, stride=stride, dtype=block.dtype,
           name="proj_conv")(x)
  return batch_norm(block.norm, train, dtype=block.dtype, name="proj_bn")(x)


def stage_strides(output_stride: int) -> tuple[tuple[int, int], ...]:
  """(stride, dilation) of stages 1..4 for a given output stride."""
  table = {
      32: ((1, 1), (2, 1), (2, 1), (2, 1)),
      16: ((1, 1), (2, 1), (2, 1), (1, 2)),
      8: ((1, 1), (2, 1), (1, 2), (1, 4)),
  }
  if output_stride not in table:
    raise ValueError(f"output_stride must be 32, 16 or 8, got {output_stride}")
  return table[output_stride]


class ResNet(nn.Module):
  """ResNet; see the module docstring for options and feature names."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"  # "basic" | "bottleneck"
  num_classes: Optional[int] = 1000
  output_stride: int = 32
  deep_stem: bool = False
  width: int = 64
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  pool: Callable = nn.max_pool
  remat: Any = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    d, w = self.dtype, self.width
    block_cls = checkpointed(
        {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block],
        self.remat)
    feats = {}
    if self.deep_stem:
      for i, ch in enumerate((w, w, 2 * w)):
        x = conv(self.conv, ch, 3, stride=2 if i == 0 else 1, dtype=d,
                 name=f"stem_conv{i + 1}")(x)
        x = nn.relu(batch_norm(self.norm, train, dtype=d,
                               name=f"stem_bn{i + 1}")(x))
    else:
      x = conv(self.conv, w, 7, stride=2, dtype=d, name="stem_conv")(x)
      x = nn.relu(batch_norm(self.norm, train, dtype=d, name="stem_bn")(x))
    feats["stem"] = x
    # Padding with -inf (reduce_window's init), as torch's MaxPool2d(3, 2, 1).
    x = self.pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, (n, (stride, dilation)) in enumerate(
        zip(self.stage_sizes, stage_strides(self.output_stride))):
      for j in range(n):
        x = block_cls(w * 2**i, stride=stride if j == 0 else 1,
                      dilation=dilation, dtype=d, conv=self.conv,
                      norm=self.norm, name=f"layer{i + 1}_{j}")(x, train)
      feats[f"layer{i + 1}"] = x
    feats["embedding"] = jnp.mean(x, axis=(1, 2))
    logits = None
    if self.num_classes is not None:
      logits = nn.Dense(self.num_classes, dtype=d, param_dtype=jnp.float32,
                        name="head")(feats["embedding"])
    return logits, feats


@register("resnet18")
class ResNet18(ResNet):
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"


@register("resnet34")
class ResNet34(ResNet):
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = "basic"


@register("resnet50")
class ResNet50(ResNet):
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"


@register("resnet101")
class ResNet101(ResNet):
  stage_sizes: Sequence[int] = (3, 4, 23, 3)
  block: str = "bottleneck"


def resnet_by_name(arch: str, **kwargs) -> ResNet:
  """A ResNet by registered name ("resnet18" ... "resnet101"); `kwargs` go to
  the module (including its Flax `name`)."""
  classes = {"resnet18": ResNet18, "resnet34": ResNet34,
             "resnet50": ResNet50, "resnet101": ResNet101}
  if arch not in classes:
    raise ValueError(f"unknown ResNet {arch!r}; choose one of {sorted(classes)}")
  return classes[arch](**kwargs)


def stage_channels(arch: str, width: int = 64) -> tuple[int, ...]:
  """Output channels of layer1..layer4 of ResNet `arch` at `width`."""
  exp = 1 if arch in ("resnet18", "resnet34") else 4
  return tuple(width * 2**i * exp for i in range(4))
