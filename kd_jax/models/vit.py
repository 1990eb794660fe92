"""Vision Transformers, DINOv2 style (Dosovitskiy et al. 2021; Oquab et al.
2023; registers: Darcet et al. 2024).

Patch embedding (p×p conv, stride p; p = 16 unless stated) → [CLS] +
optional register tokens + patch tokens, learned position embeddings on
[CLS] and the patches (DINOv2 puts none on registers) → `depth` pre-norm
blocks

    x = x + LayerScale(Attention(LayerNorm(x)))
    x = x + LayerScale(MLP(LayerNorm(x)))        # MLP: D → 4D → D, GELU

→ final LayerNorm. LayerNorm ε is 1e-6, LayerScale starts at 1e-5 (DINOv2).
The position embedding is learned for `image_size`; other input sizes
(multiples of the patch) resize its patch part bicubically with
antialiasing, as timm's `resample_abs_pos_embed` does (DINOv2's own code
resamples without antialiasing, at a 0.1-patch offset).

| name | width | depth | heads | params (no head, 224², patch 16) |
|---|---|---|---|---|
| `vit_s16` | 384 | 12 | 6 | 21,674,880 (≈ 22 M) |
| `vit_b16` | 768 | 12 | 12 | 85,817,088 (≈ 86 M) |
| `vit_l16` | 1024 | 24 | 16 | 303,350,784 (≈ 304 M) |

`vit_s14`, `vit_b14`, `vit_l14` are the same sizes with DINOv2's 14×14
patches, learned for 518² input (37 × 37 patches); `kd_jax.convert` imports
timm / DINOv2 weights into any of them.

With its ImageNet head (`num_classes=1000`) ViT-S has 22,059,880 and ViT-B
86,586,088 parameters (the published 22 M and 86 M). `vit_tiny` (width 64,
depth 2, 2 heads, learned for 64² input) is a CPU-sized model for tests and
smoke runs. Registers add `num_registers × width` parameters. With
`num_classes` > 0 a linear head on the [CLS] embedding gives the logits; with
`num_classes=0` (the default: a distillation teacher or probe backbone) the
logits are the [CLS] embedding itself. Not included: stochastic depth
(DINOv2 trains ViT-L with it; a frozen teacher does not need it).

Features (after the final LayerNorm unless stated):
  "block{i}"   output of block i = 0..depth-1, all tokens (B, 1+R+N, D), NLD,
               before the final LayerNorm ([CLS], registers, patches)
  "tokens"     patch tokens (B, N, D), N = (H/p)·(W/p), NLD
  "patch_map"  the patch tokens as a map (B, H/p, W/p, D), NHWC
  "registers"  register tokens (B, R, D), only when num_registers > 0
  "embedding"  the [CLS] token (B, D)

The patch embedding's convolution layer is a module field (`conv`; flax's
by default).
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.registry import register
from kd_jax.models.remat import checkpointed

ModuleDef = Any

DEFAULT_INPUT = {
    "vit_s16": (224, 224, 3),
    "vit_b16": (224, 224, 3),
    "vit_l16": (224, 224, 3),
    "vit_s14": (518, 518, 3),
    "vit_b14": (518, 518, 3),
    "vit_l14": (518, 518, 3),
}
RECIPES = {
    "vit_l16": "foundation encoder distillation (teacher of EfficientViT)",
    "vit_b16": "foundation encoder distillation (alternative teacher)",
    "vit_s16": "foundation encoder distillation (small teacher / baseline)",
    "vit_s14": "DINOv2 ViT-S/14 layout, for imported weights",
    "vit_b14": "DINOv2 ViT-B/14 layout, for imported weights",
    "vit_l14": "DINOv2 ViT-L/14 layout, for imported weights",
}

_LN_EPS = 1e-6


class LayerScale(nn.Module):
  """Per-channel learned scale of a residual branch (Touvron et al. 2021)."""
  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value),
                       (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)


class MLP(nn.Module):
  hidden: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    width = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(width, dtype=self.dtype, name="fc2")(x)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class Block(nn.Module):
  """Pre-norm transformer block; LayerScale when `layerscale` is not None.

  `dropout_rate` acts in the MLP (after the GELU and after fc2);
  `attention_dropout_rate` on the attention weights and the attention output,
  as in the ViT / TransUNet reference code. Shared by ViT (LayerScale 1e-5,
  no dropout) and TransUNet's encoder (no LayerScale, MLP dropout 0.1).
  """
  num_heads: int
  mlp_hidden: int
  layerscale: Optional[float] = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    def scale(y, name):
      if self.layerscale is None:
        return y
      return LayerScale(self.layerscale, name=name)(y)

    y = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        dropout_rate=self.attention_dropout_rate, deterministic=not train,
        force_fp32_for_softmax=True, name="attn")(y, y)
    y = nn.Dropout(self.attention_dropout_rate, deterministic=not train)(y)
    x = x + scale(y, "ls1")
    y = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="norm2")(x)
    y = MLP(self.mlp_hidden, self.dropout_rate, self.dtype, name="mlp")(
        y, train=train)
    return x + scale(y, "ls2")


def resize_pos_embed(pos, grid, method="bicubic"):
  """Resizes a (1, h·w, D) patch position embedding to `grid` = (H, W).

  `jax.image.resize` (Keys cubic, a = -0.5, antialiased when shrinking):
  the same values as torch's `interpolate(mode="bicubic", antialias=True)`,
  timm's `resample_abs_pos_embed`.
  """
  n = pos.shape[1]
  side = int(round(n**0.5))
  if side * side != n:
    raise ValueError(f"position embedding of {n} patches is not square")
  if (side, side) == tuple(grid):
    return pos
  d = pos.shape[-1]
  pos = pos.reshape(1, side, side, d)
  pos = jax.image.resize(pos, (1, *grid, d), method=method)
  return pos.reshape(1, grid[0] * grid[1], d)


class ViT(nn.Module):
  """DINOv2-style ViT; see the module docstring for features and presets.

  Attributes:
    num_classes: 0 for no head (logits = [CLS] embedding).
    width, depth, num_heads, mlp_ratio: transformer size.
    patch: patch side in pixels.
    image_size: the input side the position embedding is learned for.
    num_registers: register tokens (0 = none).
    layerscale: LayerScale initial value (None disables it).
    dropout_rate: MLP dropout (0 in DINOv2).
    conv: the patch embedding's convolution layer (flax's by default).
    remat: rematerialise each block (`kd_jax.models.remat`).
  """
  num_classes: int = 0
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  patch: int = 16
  image_size: int = 224
  num_registers: int = 0
  layerscale: Optional[float] = 1e-5
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  remat: Any = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    p = self.patch
    if x.ndim != 4 or x.shape[1] % p or x.shape[2] % p:
      raise ValueError(
          f"ViT(patch={p}) needs NHWC input with height and width divisible "
          f"by {p}; got shape {tuple(x.shape)}")
    b = x.shape[0]
    x = self.conv(self.width, (p, p), strides=(p, p), padding="VALID",
                  dtype=self.dtype, name="patch_embed")(x.astype(self.dtype))
    gh, gw = x.shape[1:3]
    x = x.reshape(b, gh * gw, self.width)

    grid0 = self.image_size // p
    init = nn.initializers.normal(0.02)
    cls = self.param("cls_token", init, (1, 1, self.width), jnp.float32)
    pos = self.param("pos_embed", init, (1, 1 + grid0 * grid0, self.width),
                     jnp.float32)
    pos = jnp.concatenate(
        [pos[:, :1], resize_pos_embed(pos[:, 1:], (gh, gw))], axis=1)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)
                                          ).astype(self.dtype), x], axis=1)
    x = x + pos.astype(self.dtype)
    r = self.num_registers
    if r:
      reg = self.param("registers", init, (1, r, self.width), jnp.float32)
      x = jnp.concatenate(
          [x[:, :1], jnp.broadcast_to(reg, (b, r, self.width)
                                      ).astype(self.dtype), x[:, 1:]], axis=1)

    features = {}
    block = checkpointed(Block, self.remat)
    for i in range(self.depth):
      x = block(self.num_heads, int(self.width * self.mlp_ratio),
                self.layerscale, self.dropout_rate, dtype=self.dtype,
                name=f"block{i}")(x, train)
      features[f"block{i}"] = x
    x = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="norm")(x)

    patches = x[:, 1 + r:]
    features["tokens"] = patches
    features["patch_map"] = patches.reshape(b, gh, gw, self.width)
    if r:
      features["registers"] = x[:, 1:1 + r]
    features["embedding"] = x[:, 0]
    if self.num_classes:
      logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(
          x[:, 0])
    else:
      logits = x[:, 0]
    return logits, features


@register("vit_s16")
class ViTS16(ViT):
  width: int = 384
  depth: int = 12
  num_heads: int = 6


@register("vit_b16")
class ViTB16(ViT):
  width: int = 768
  depth: int = 12
  num_heads: int = 12


@register("vit_l16")
class ViTL16(ViT):
  width: int = 1024
  depth: int = 24
  num_heads: int = 16


# DINOv2's released sizes: patch 14, position embedding learned at 518²
# (37 × 37 patches).
@register("vit_s14")
class ViTS14(ViTS16):
  patch: int = 14
  image_size: int = 518


@register("vit_b14")
class ViTB14(ViTB16):
  patch: int = 14
  image_size: int = 518


@register("vit_l14")
class ViTL14(ViTL16):
  patch: int = 14
  image_size: int = 518


@register("vit_tiny")
class ViTTiny(ViT):
  """A CPU-sized ViT for tests and smoke runs (same code path, 64² input)."""
  width: int = 64
  depth: int = 2
  num_heads: int = 2
  image_size: int = 64


DEFAULT_INPUT["vit_tiny"] = (64, 64, 3)
RECIPES["vit_tiny"] = "CPU smoke runs of foundation encoder distillation"
