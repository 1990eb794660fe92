"""EfficientViT B0/B1 (Cai et al., ICCV 2023, "EfficientViT: Multi-Scale Linear
Attention for High-Resolution Dense Prediction").

Five stages on an NHWC image, strides 2, 4, 8, 16, 32, hard-swish
activations, BatchNorm:

  stage0  3×3/2 conv → BN → hswish, then `depths[0]` residual DSConv blocks
          (depthwise 3×3 → BN → hswish → pointwise 1×1 → BN)
  stage1, stage2  MBConv blocks (1×1 expand ×4 → BN → hswish → depthwise 3×3
          → BN → hswish → 1×1 project → BN), the first with stride 2, the
          others residual
  stage3, stage4  a stride-2 MBConv (biases instead of the first two BNs, no
          residual), then EfficientViT modules: a residual lightweight
          multi-scale linear attention (LiteMLA) followed by a residual MBConv
          (biases, one BN)
  head    1×1 conv → BN → hswish, global average pool, Linear (no bias) →
          LayerNorm → hswish, Linear → logits

LiteMLA: a 1×1 conv (no bias) makes q, k, v for `width // head_dim` heads of
`head_dim` channels; a multi-scale branch aggregates them with a 5×5
depthwise conv followed by a grouped 1×1 conv (one group per q / k / v of
each head), doubling the heads. Each head runs ReLU linear attention,

    out_n = Σ_m (relu(q_n)·relu(k_m)) v_m / (Σ_m relu(q_n)·relu(k_m) + ε),

computed as relu(q) (relu(k)ᵀ v) in O(N d²) and in float32 (ε = 1e-15),
then a 1×1 conv → BN projects the concatenated heads back.

| name | widths | depths | head_dim | head widths | params (1000 classes) |
|---|---|---|---|---|---|
| `efficientvit_b0` | 8, 16, 32, 64, 128 | 1, 2, 2, 2, 2 | 16 | 1024, 1280 | 3,410,008 (published 3.4 M) |
| `efficientvit_b1` | 16, 32, 64, 128, 256 | 1, 2, 3, 3, 4 | 16 | 1536, 1600 | 9,102,024 (published 9.1 M) |

The published figures are from the authors' model zoo (mit-han-lab/efficientvit
README: B1-r224 9.1 M params, 0.52 G MACs) and the timm model cards
(efficientvit_b0.r224_in1k: 3.4 M params, 0.1 GMACs).

Features (NHWC unless stated):
  "stage0".."stage4"  stage outputs at 1/2, 1/4, 1/8, 1/16, 1/32 of the input
                      side with widths[i] channels
  "embedding"         the pooled head vector fed to the classifier,
                      (B, head_widths[1])

The convolution and BatchNorm layers are module fields (`conv`, `norm`;
flax's by default).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.registry import register
from kd_jax.models.remat import checkpointed

ModuleDef = Any

DEFAULT_INPUT = {
    "efficientvit_b0": (224, 224, 3),
    "efficientvit_b1": (224, 224, 3),
}
RECIPES = {
    "efficientvit_b0": "foundation encoder distillation (student of ViT-L/16)",
    "efficientvit_b1": "foundation encoder distillation (student of ViT-L/16)",
}

hswish = jax.nn.hard_swish


class ConvNormAct(nn.Module):
  """Conv (torch-style k//2 padding) → optional BN → optional activation."""
  features: int
  kernel: int = 3
  strides: int = 1
  groups: int = 1
  use_bias: bool = False
  use_norm: bool = True
  act: Any = None
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, *, train: bool):
    p = self.kernel // 2
    x = self.conv(self.features, (self.kernel, self.kernel),
                  strides=(self.strides, self.strides),
                  padding=((p, p), (p, p)), feature_group_count=self.groups,
                  use_bias=self.use_bias, dtype=self.dtype, name="conv")(x)
    if self.use_norm:
      x = self.norm(use_running_average=not train, momentum=0.9,
                    epsilon=1e-5, dtype=self.dtype, name="bn")(x)
    return self.act(x) if self.act is not None else x


class DSConv(nn.Module):
  features: int
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    layers = dict(conv=self.conv, norm=self.norm)
    x = ConvNormAct(c, 3, groups=c, act=hswish, dtype=self.dtype,
                    name="depth_conv", **layers)(x, train=train)
    return ConvNormAct(self.features, 1, dtype=self.dtype,
                       name="point_conv", **layers)(x, train=train)


class MBConv(nn.Module):
  """Inverted bottleneck; `fewer_norm` puts biases in place of the first two
  BatchNorms (as in stage3/4 and the EfficientViT modules)."""
  features: int
  strides: int = 1
  expand_ratio: float = 4
  fewer_norm: bool = False
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    mid = round(x.shape[-1] * self.expand_ratio)
    fn = self.fewer_norm
    layers = dict(conv=self.conv, norm=self.norm)
    x = ConvNormAct(mid, 1, use_bias=fn, use_norm=not fn, act=hswish,
                    dtype=self.dtype, name="inverted_conv", **layers)(
                        x, train=train)
    x = ConvNormAct(mid, 3, self.strides, groups=mid, use_bias=fn,
                    use_norm=not fn, act=hswish, dtype=self.dtype,
                    name="depth_conv", **layers)(x, train=train)
    return ConvNormAct(self.features, 1, dtype=self.dtype,
                       name="point_conv", **layers)(x, train=train)


def relu_linear_attention(q, k, v, eps=1e-15):
  """ReLU linear attention over tokens; q, k, v are (B, N, heads, d).

  Computed in float32 whatever the input dtype (the reference disables
  autocast here): the normaliser is a sum over all tokens.
  """
  dtype = v.dtype
  q, k, v = (jax.nn.relu(q.astype(jnp.float32)),
             jax.nn.relu(k.astype(jnp.float32)), v.astype(jnp.float32))
  kv = jnp.einsum("bnhd,bnhe->bhde", k, v)
  num = jnp.einsum("bnhd,bhde->bnhe", q, kv)
  den = jnp.einsum("bnhd,bhd->bnh", q, jnp.sum(k, axis=1))[..., None]
  return (num / (den + eps)).astype(dtype)


class LiteMLA(nn.Module):
  """Lightweight multi-scale linear attention; see the module docstring."""
  features: int
  head_dim: int = 16
  scales: Sequence[int] = (5,)
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, *, train: bool):
    b, h, w, c = x.shape
    heads = c // self.head_dim
    total = heads * self.head_dim
    qkv = self.conv(3 * total, (1, 1), use_bias=False, dtype=self.dtype,
                    name="qkv")(x)
    branches = [qkv]
    for s in self.scales:
      y = self.conv(3 * total, (s, s), padding=s // 2,
                    feature_group_count=3 * total, use_bias=False,
                    dtype=self.dtype, name=f"aggreg{s}_dw")(qkv)
      y = self.conv(3 * total, (1, 1), feature_group_count=3 * heads,
                    use_bias=False, dtype=self.dtype,
                    name=f"aggreg{s}_pw")(y)
      branches.append(y)
    # Channels are grouped per head as [q | k | v], head_dim each.
    qkv = jnp.concatenate(branches, axis=-1).reshape(
        b, h * w, -1, 3, self.head_dim)
    out = relu_linear_attention(qkv[..., 0, :], qkv[..., 1, :],
                                qkv[..., 2, :])
    out = out.reshape(b, h, w, -1)
    return ConvNormAct(self.features, 1, dtype=self.dtype, name="proj",
                       conv=self.conv, norm=self.norm)(out, train=train)


class EfficientViTModule(nn.Module):
  head_dim: int = 16
  expand_ratio: float = 4
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    layers = dict(conv=self.conv, norm=self.norm)
    x = x + LiteMLA(c, self.head_dim, dtype=self.dtype, name="context",
                    **layers)(x, train=train)
    return x + MBConv(c, 1, self.expand_ratio, fewer_norm=True,
                      dtype=self.dtype, name="local", **layers)(x, train=train)


class EfficientViT(nn.Module):
  """EfficientViT-B classifier; see the module docstring.

  Attributes:
    num_classes: classifier outputs (1000 for the published counts); 0
      for no classifier (a distilled encoder: the output is "embedding").
    widths, depths: the five stages.
    head_dim: channels per attention head ("dim" in the paper's code).
    head_widths: the head's 1×1 conv and hidden Linear widths.
    expand_ratio: MBConv expansion.
    dropout_rate: dropout before the final Linear, active only when `train`.
    conv, norm: the convolution and BatchNorm layers (flax's by default).
    remat: rematerialise each stage block (`kd_jax.models.remat`).
  """
  num_classes: int = 1000
  widths: Sequence[int] = (8, 16, 32, 64, 128)
  depths: Sequence[int] = (1, 2, 2, 2, 2)
  head_dim: int = 16
  head_widths: Sequence[int] = (1024, 1280)
  expand_ratio: float = 4
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  remat: Any = False  # Each stage block (kd_jax.models.remat).

  @nn.compact
  def __call__(self, x, *, train: bool):
    if x.ndim != 4 or x.shape[1] % 32 or x.shape[2] % 32:
      raise ValueError(
          f"EfficientViT needs NHWC input with height and width divisible by "
          f"32; got shape {tuple(x.shape)}")
    x = x.astype(self.dtype)
    layers = dict(conv=self.conv, norm=self.norm)
    ds_conv, mb_conv, vit_module = (checkpointed(b, self.remat) for b in (
        DSConv, MBConv, EfficientViTModule))
    features = {}
    w0 = self.widths[0]
    x = ConvNormAct(w0, 3, 2, act=hswish, dtype=self.dtype, name="stem",
                    **layers)(x, train=train)
    for i in range(self.depths[0]):
      x = x + ds_conv(w0, self.dtype, name=f"stage0_ds{i}", **layers)(
          x, train)
    features["stage0"] = x

    for s in (1, 2):
      for i in range(self.depths[s]):
        y = mb_conv(self.widths[s], 2 if i == 0 else 1, self.expand_ratio,
                    dtype=self.dtype, name=f"stage{s}_mb{i}", **layers)(
                        x, train)
        x = y if i == 0 else x + y
      features[f"stage{s}"] = x

    for s in (3, 4):
      x = mb_conv(self.widths[s], 2, self.expand_ratio, fewer_norm=True,
                  dtype=self.dtype, name=f"stage{s}_down", **layers)(x, train)
      for i in range(self.depths[s]):
        x = vit_module(self.head_dim, self.expand_ratio, self.dtype,
                       name=f"stage{s}_vit{i}", **layers)(x, train)
      features[f"stage{s}"] = x

    h0, h1 = self.head_widths
    x = ConvNormAct(h0, 1, act=hswish, dtype=self.dtype, name="head_conv",
                    **layers)(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(h1, use_bias=False, dtype=self.dtype, name="head_fc")(x)
    x = hswish(nn.LayerNorm(epsilon=1e-5, dtype=self.dtype,
                            name="head_ln")(x))
    features["embedding"] = x
    if not self.num_classes:  # An encoder: the embedding is the output.
      return x, features
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      name="classifier")(x)
    return logits, features


register("efficientvit_b0")(EfficientViT)


@register("efficientvit_b1")
class EfficientViTB1(EfficientViT):
  widths: Sequence[int] = (16, 32, 64, 128, 256)
  depths: Sequence[int] = (1, 2, 3, 3, 4)
  head_widths: Sequence[int] = (1536, 1600)
