"""SqueezeU-Net (Beheshti & Johnsson, CVPR Workshops 2020).

A U-Net whose 3×3 conv pairs are SqueezeNet fire modules (Iandola et al.
2016): a 1×1 "squeeze" conv to few channels, then two parallel "expand"
branches, 1×1 and 3×3, concatenated. The expanding path upsamples with
*transposed* fire modules: the squeeze is the same, the two expand branches
are stride-2 transposed convolutions. Here they are 2×2 and 3×3 (a 1×1
stride-2 transposed conv would leave three of every four output pixels
zero). Every conv is followed by BatchNorm and ReLU.

Layout for `depth` = 4 and base width `w` (stage i has `w · 2^(i-1)` output
channels, squeeze width = output / `squeeze_ratio`):

    enc1: 3×3 conv(w) → fire(w)                       full resolution
    enc2..enc4: 2×2 max-pool → fire × 2               1/2, 1/4, 1/8
    bottleneck: 2×2 max-pool → fire(16w) × 2 → dropout   1/16
    dec4..dec1: transposed fire (×2 up) → concat skip enc_i → fire
    head: 1×1 conv to num_classes

`width` sets the size. The "Distillo, ergo sum" student (TransUNet →
SqueezeU-Net, ≈ 0.4 M parameters) is the default `width=24`: 382,737
parameters for 9 classes on a 1-channel input (383,169 on 3 channels), and
4,968 BatchNorm statistics; the count does not depend on the spatial size
(`width=25` gives 413,319 if a count above 0.4 M is wanted). The input side
must be divisible by 2^depth.

Features (NHWC unless stated):
  "enc1".."enc{depth}"  encoder stage outputs before pooling (the skips);
                        "enc1" is at full resolution, 1/2^(i-1) for "enc{i}"
  "bottleneck"          the deepest map, 1/2^depth of the input side, 16w ch
  "dec{depth}".."dec1"  decoder stage outputs; "dec{i}" matches "enc{i}"
  "embedding"           global average of "bottleneck", (B, 16w)

Layers are module fields (`conv`, `norm`, `conv_transpose`, `pool`), flax's
own by default.
"""
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.registry import register
from kd_jax.models.remat import checkpointed

# Registered name → default (H, W, C): Synapse CT slices.
DEFAULT_INPUT = {"squeeze_unet": (224, 224, 1)}
RECIPES = {
    "squeeze_unet": "heterogeneous segmentation KD (student of TransUNet)",
}


ModuleDef = Any


def _bn(norm: ModuleDef, train: bool, dtype, name=None):
  return norm(use_running_average=not train, momentum=0.9, dtype=dtype,
              name=name)


class ConvBNReLU(nn.Module):
  features: int
  kernel: int = 3
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = self.conv(self.features, (self.kernel, self.kernel), use_bias=False,
                  dtype=self.dtype, name="conv")(x)
    return nn.relu(_bn(self.norm, train, self.dtype, "bn")(x))


class Fire(nn.Module):
  """Fire module: squeeze 1×1 → [expand 1×1 ‖ expand 3×3], `features` out.

  With `up`, the expand branches are stride-2 transposed convolutions (2×2
  and 3×3) and the output has twice the input's height and width.
  """
  features: int
  squeeze: int
  up: bool = False
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  conv_transpose: ModuleDef = nn.ConvTranspose

  @nn.compact
  def __call__(self, x, train: bool):
    x = ConvBNReLU(self.squeeze, 1, self.dtype, self.conv, self.norm,
                   name="squeeze")(x, train=train)
    half = self.features // 2
    if self.up:
      a = self.conv_transpose(half, (2, 2), strides=(2, 2), use_bias=False,
                              dtype=self.dtype, name="expand1")(x)
      b = self.conv_transpose(self.features - half, (3, 3), strides=(2, 2),
                              use_bias=False, dtype=self.dtype,
                              name="expand3")(x)
    else:
      a = self.conv(half, (1, 1), use_bias=False, dtype=self.dtype,
                    name="expand1")(x)
      b = self.conv(self.features - half, (3, 3), use_bias=False,
                    dtype=self.dtype, name="expand3")(x)
    a = nn.relu(_bn(self.norm, train, self.dtype, "bn1")(a))
    b = nn.relu(_bn(self.norm, train, self.dtype, "bn3")(b))
    return jnp.concatenate([a, b], axis=-1)


@register("squeeze_unet")
class SqueezeUNet(nn.Module):
  """SqueezeU-Net; see the module docstring for layout and feature names.

  Attributes:
    num_classes: output channels of the segmentation head.
    width: channels of the first stage (24 → 0.38 M parameters).
    depth: number of pooling steps (encoder stages after enc1 + bottleneck).
    squeeze_ratio: a fire module squeezes to `features // squeeze_ratio`
      channels (8 in SqueezeNet's fire2: 16 squeeze for 128 out).
    dropout_rate: dropout on the bottleneck, active only when `train`.
    remat: rematerialise each fire module (`kd_jax.models.remat`).
  """
  num_classes: int = 9
  width: int = 24
  depth: int = 4
  squeeze_ratio: int = 8
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  conv_transpose: ModuleDef = nn.ConvTranspose
  pool: Callable = nn.max_pool
  remat: Any = False

  def _fire(self, ch, name, up=False):
    return checkpointed(Fire, self.remat)(
        ch, max(ch // self.squeeze_ratio, 4), up, self.dtype, self.conv,
        self.norm, self.conv_transpose, name=name)

  @nn.compact
  def __call__(self, x, *, train: bool):
    side = 2**self.depth
    if x.ndim != 4 or x.shape[1] % side or x.shape[2] % side:
      raise ValueError(
          f"SqueezeUNet(depth={self.depth}) needs NHWC input with height and "
          f"width divisible by {side}; got shape {tuple(x.shape)}")
    x = x.astype(self.dtype)
    features = {}
    skips = []
    for i in range(self.depth):
      ch = self.width * 2**i
      if i == 0:
        x = ConvBNReLU(ch, 3, self.dtype, self.conv, self.norm,
                       name="stem")(x, train=train)
        x = self._fire(ch, "enc1_fire1")(x, train)
      else:
        x = self.pool(x, (2, 2), strides=(2, 2))
        x = self._fire(ch, f"enc{i + 1}_fire1")(x, train)
        x = self._fire(ch, f"enc{i + 1}_fire2")(x, train)
      features[f"enc{i + 1}"] = x
      skips.append(x)

    ch = self.width * side
    x = self.pool(x, (2, 2), strides=(2, 2))
    x = self._fire(ch, "bottleneck_fire1")(x, train)
    x = self._fire(ch, "bottleneck_fire2")(x, train)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    features["bottleneck"] = x
    features["embedding"] = jnp.mean(x, axis=(1, 2))

    for i in reversed(range(self.depth)):
      ch = self.width * 2**i
      x = self._fire(ch, f"dec{i + 1}_up", up=True)(x, train)
      x = jnp.concatenate([x, skips[i]], axis=-1)
      x = self._fire(ch, f"dec{i + 1}_fire")(x, train)
      features[f"dec{i + 1}"] = x

    logits = self.conv(self.num_classes, (1, 1), dtype=self.dtype,
                  name="head")(x)
    return logits, features
