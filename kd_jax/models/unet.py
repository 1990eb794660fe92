"""U-Net (Ronneberger et al., 2015) with width and depth from config.

`UNet(num_classes, width, depth)`: `depth` encoder stages of two 3×3 conv →
BatchNorm → ReLU blocks, each followed by 2×2 max-pooling, a bottleneck stage,
and `depth` decoder stages (2×2 transposed conv, concatenation with the skip,
two conv blocks). Stage `i` (1-based) has `width · 2^(i-1)` channels, the
bottleneck `width · 2^depth`. The input side must be divisible by `2^depth`.

Features (NHWC unless stated):
  "enc1".."enc{depth}"  encoder stage outputs, before pooling (skips)
  "bottleneck"          the deepest map, 1/2^depth of the input side
  "dec{depth}".."dec1"  decoder stage outputs; "dec1" is at full resolution
  "embedding"           global average of "bottleneck", (B, C)

Layers are module fields (`conv`, `norm`, `conv_transpose`, `pool`), flax's
own by default.
"""
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.registry import register
from kd_jax.models.remat import checkpointed

DEFAULT_INPUT = {"unet": (128, 128, 1)}
DEFAULT_KWARGS = {"unet": {"num_classes": 9}}
RECIPES = {"unet": "default recipe: teacher (width 16) and student (width 8)"}


ModuleDef = Any


class ConvBlock(nn.Module):
  features: int
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    for _ in range(2):
      x = self.conv(self.features, (3, 3), use_bias=False,
                    dtype=self.dtype)(x)
      x = self.norm(use_running_average=not train, momentum=0.9,
                    dtype=self.dtype)(x)
      x = nn.relu(x)
    return x


@register("unet")
class UNet(nn.Module):
  num_classes: int
  width: int = 32
  depth: int = 4
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  conv_transpose: ModuleDef = nn.ConvTranspose
  pool: Callable = nn.max_pool
  remat: Any = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    side = 2 ** self.depth
    if x.shape[1] % side or x.shape[2] % side:
      raise ValueError(
          f"UNet(depth={self.depth}) needs input height and width divisible "
          f"by {side}, got {x.shape[1:3]}; resize or crop the input, or lower "
          "depth")
    x = x.astype(self.dtype)
    block = partial(checkpointed(ConvBlock, self.remat), dtype=self.dtype,
                    conv=self.conv, norm=self.norm)
    features = {}
    skips = []
    for i in range(self.depth):
      x = block(self.width * 2**i, name=f"enc{i + 1}")(x, train)
      features[f"enc{i + 1}"] = x
      skips.append(x)
      x = self.pool(x, (2, 2), strides=(2, 2))
    x = block(self.width * 2**self.depth, name="bottleneck")(x, train)
    features["bottleneck"] = x
    features["embedding"] = jnp.mean(x, axis=(1, 2))
    for i in reversed(range(self.depth)):
      ch = self.width * 2**i
      x = self.conv_transpose(ch, (2, 2), strides=(2, 2), dtype=self.dtype,
                              name=f"up{i + 1}")(x)
      x = jnp.concatenate([x, skips[i]], axis=-1)
      x = block(ch, name=f"dec{i + 1}")(x, train)
      features[f"dec{i + 1}"] = x
    logits = self.conv(self.num_classes, (1, 1), dtype=self.dtype,
                  name="head")(x)
    return logits, features
