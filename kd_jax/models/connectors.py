"""Connectors: small trainable maps from a student feature to a teacher's shape.

A distillation loss that matches intermediate features (FitNets hints, L1
latent matching, dense feature-map matching) needs the student's array in the
teacher's shape. A connector is that learned map; it is trained with the
student and thrown away at export.

Every connector is a Flax linen module called as `connector(x, train=...)`
on an NHWC map (B, H, W, C) or an NLD token array (B, L, D) (`Linear` and
`Identity` also take a pooled (B, D) vector). Parameters are float32 and the
computation runs in `dtype`.

| kind | module | what it changes | shape in → out |
|---|---|---|---|
| `"conv1x1"` | `Conv1x1` | width (optional BatchNorm) | (B, H, W, C) → (B, H, W, out); (B, L, C) → (B, L, out) |
| `"linear"` | `Linear` | width | (..., C) → (..., out) |
| `"attention_pool"` | `AttentionPool` | grid size and width | (B, H, W, C) or (B, L, C) → (B, h, w, out) or (B, l, out) |
| `"resize_conv1x1"` | `ResizeConv1x1` | grid size (bilinear) and width | as `"attention_pool"` |
| `"identity"` | `Identity` | nothing (checks the width) | x → x |

`build_connector(kind, out_features, **kw)` builds one by name; configs name
connectors the same way (`connector="conv1x1"`).
"""
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ModuleDef = Any


def _check_map_or_tokens(x, who: str):
  if x.ndim not in (3, 4):
    raise ValueError(
        f"{who} takes an NHWC map (4-D) or NLD tokens (3-D); got an array of "
        f"shape {tuple(x.shape)}")


class Conv1x1(nn.Module):
  """1×1 convolution to `out_features` channels, optionally followed by BN.

  On NLD tokens it is the same per-token linear map. With `use_bn` the
  BatchNorm uses batch statistics when `train` and running averages otherwise
  (FitNets-style regressors often add it to equalise scales).
  """
  out_features: int
  use_bn: bool = False
  dtype: Dtype = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    _check_map_or_tokens(x, "Conv1x1")
    spatial = x.ndim - 2
    x = self.conv(self.out_features, (1,) * spatial,
                  use_bias=not self.use_bn, dtype=self.dtype, name="conv")(x)
    if self.use_bn:
      x = self.norm(use_running_average=not train, momentum=0.9,
                    dtype=self.dtype, name="bn")(x)
    return x


class Linear(nn.Module):
  """Dense map of the last axis to `out_features` (vectors, tokens or maps)."""
  out_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train  # No state that depends on the mode.
    return nn.Dense(self.out_features, dtype=self.dtype, name="dense")(x)


class Identity(nn.Module):
  """Passes `x` through; raises if its width is not `out_features`."""
  out_features: Optional[int] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    if self.out_features is not None and x.shape[-1] != self.out_features:
      raise ValueError(
          f"identity connector: the student feature has width {x.shape[-1]} "
          f"but the teacher's is {self.out_features}; use a 'conv1x1', "
          f"'linear' or 'attention_pool' connector")
    return x.astype(self.dtype)


def _grid_of(x):
  """(array as (B, L, C), (h, w) positions grid) for NHWC or NLD input.

  NLD tokens are laid out on a square grid when L is a perfect square (the
  patch tokens of a ViT), else on a 1×L row.
  """
  if x.ndim == 4:
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c), (h, w)
  b, l, c = x.shape
  side = math.isqrt(l)
  return x, ((side, side) if side * side == l else (1, l))


def sincos_2d(grid: Sequence[int], dim: int, dtype=jnp.float32):
  """(h*w, dim) sine-cosine embedding of normalised cell-centre coordinates.

  Coordinates are (i + 0.5) / h and (j + 0.5) / w in [0, 1], so grids of
  different sizes that cover the same image get aligned embeddings: this is
  what lets a query for teacher cell (i, j) find the student cells over the
  same region. `dim` must be a multiple of 4 (sin and cos for each axis).
  """
  if dim % 4:
    raise ValueError(f"sincos_2d needs dim divisible by 4; got {dim}")
  h, w = grid
  n_freq = dim // 4
  # Periods from 2 (the whole image) down to 2/64 of it: resolves grids of up
  # to ~64 cells per side.
  freqs = jnp.pi * 64.0 ** (jnp.arange(n_freq) / max(n_freq - 1, 1))
  yy, xx = jnp.meshgrid((jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w,
                        indexing="ij")
  parts = []
  for coord in (yy.reshape(-1), xx.reshape(-1)):
    angles = coord[:, None] * freqs[None, :]
    parts += [jnp.sin(angles), jnp.cos(angles)]
  return jnp.concatenate(parts, axis=-1).astype(dtype)


class AttentionPool(nn.Module):
  """Learned attention pooling onto the teacher's grid size and width.

  One learned query per target position cross-attends to all student tokens
  (a feature map is flattened to tokens first), so a student map or token grid
  of any size and width becomes the teacher's:

      kv = Dense(hidden)(LayerNorm(student tokens)) + pos(student grid)
      q  = learned queries (zero-initialised) + pos(target grid)
      y  = q + MultiHeadAttention(q, kv)
      y  = y + MLP(LayerNorm(y))
      out = Dense(out_features)(LayerNorm(y))

  `pos` is `sincos_2d` on normalised coordinates, added to both sides, so at
  initialisation each query already prefers the student cells covering the same
  image region; the learned queries and projections refine that. The student
  grid may be any size: an NLD input with a perfect-square length is a square
  grid, otherwise a 1×L row.

  Attributes:
    out_features: the teacher's width (channels or token dimension).
    grid: the teacher's grid: `(h, w)` gives an NHWC output (B, h, w, out);
      an int `l` gives NLD tokens (B, l, out), positioned on a square grid when
      `l` is a perfect square and on a 1×l row otherwise.
    hidden: attention width (multiple of 4 and of `num_heads`).
    num_heads: attention heads.
    mlp_ratio: MLP hidden width as a multiple of `hidden`.
  """
  out_features: int
  grid: Union[int, Sequence[int]]
  hidden: int = 256
  num_heads: int = 8
  mlp_ratio: float = 2.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train  # No dropout or BatchNorm.
    _check_map_or_tokens(x, "AttentionPool")
    if self.hidden % 4 or self.hidden % self.num_heads:
      raise ValueError(
          f"AttentionPool hidden={self.hidden} must be divisible by 4 and by "
          f"num_heads={self.num_heads}")
    (th, tw), as_map = _target_grid(self.grid, "AttentionPool")
    tokens, src_grid = _grid_of(x)
    b = tokens.shape[0]

    kv = nn.LayerNorm(dtype=self.dtype, name="norm_in")(tokens)
    kv = nn.Dense(self.hidden, dtype=self.dtype, name="proj_in")(kv)
    kv = kv + sincos_2d(src_grid, self.hidden, self.dtype)[None]

    queries = self.param("queries", nn.initializers.zeros,
                         (th * tw, self.hidden), jnp.float32)
    q = queries.astype(self.dtype) + sincos_2d((th, tw), self.hidden,
                                               self.dtype)
    q = jnp.broadcast_to(q[None], (b,) + q.shape)

    y = q + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, name="attn")(q, kv)
    h = nn.LayerNorm(dtype=self.dtype, name="norm_mlp")(y)
    h = nn.Dense(int(self.hidden * self.mlp_ratio), dtype=self.dtype,
                 name="mlp_in")(h)
    h = nn.Dense(self.hidden, dtype=self.dtype, name="mlp_out")(nn.gelu(h))
    y = y + h
    y = nn.LayerNorm(dtype=self.dtype, name="norm_out")(y)
    y = nn.Dense(self.out_features, dtype=self.dtype, name="proj_out")(y)
    return y.reshape(b, th, tw, self.out_features) if as_map else y


def _target_grid(g, who):
  """((h, w), as_map) of a connector's `grid` (see `AttentionPool`)."""
  if isinstance(g, int) and g > 0:
    side = math.isqrt(g)
    return ((side, side) if side * side == g else (1, g)), False
  if (isinstance(g, (tuple, list)) and len(g) == 2
      and all(isinstance(v, int) and v > 0 for v in g)):
    return tuple(g), True
  raise ValueError(
      f"{who} grid must be a positive int (number of tokens) or an (h, w) "
      f"pair of positive ints; got {g!r}")


class ResizeConv1x1(nn.Module):
  """The plain baseline of `AttentionPool`: the student map resized
  bilinearly to the teacher's grid (`jax.image.resize`, half-pixel
  centres, antialiased when shrinking), then a 1×1 convolution to the
  teacher's width. Input and `grid` as `AttentionPool`'s (NLD tokens are a
  square grid when L is a perfect square, else a 1×L row)."""
  out_features: int
  grid: Union[int, Sequence[int]]
  dtype: Dtype = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    _check_map_or_tokens(x, "ResizeConv1x1")
    (th, tw), as_map = _target_grid(self.grid, "ResizeConv1x1")
    tokens, (h, w) = _grid_of(x)
    b, _, c = tokens.shape
    grid = tokens.reshape(b, h, w, c).astype(self.dtype)
    grid = jax.image.resize(grid, (b, th, tw, c), "bilinear")
    y = self.conv(self.out_features, (1, 1), dtype=self.dtype,
                  name="conv")(grid)
    return y if as_map else y.reshape(b, th * tw, self.out_features)


_KINDS = {
    "conv1x1": Conv1x1,
    "resize_conv1x1": ResizeConv1x1,
    "linear": Linear,
    "attention_pool": AttentionPool,
    "identity": Identity,
}


def connector_kinds() -> list[str]:
  return sorted(_KINDS)


def build_connector(kind: str, out_features: int, **kw) -> nn.Module:
  """Builds connector `kind`, mapping a student feature to `out_features`.

  Extra keywords go to the module (e.g. `use_bn=True` for "conv1x1",
  `grid=(16, 16)` for "attention_pool"). Raises ValueError naming the choices
  for an unknown kind, and the accepted keywords for a wrong one.
  """
  if kind not in _KINDS:
    raise ValueError(
        f"unknown connector {kind!r}; choose one of {connector_kinds()}")
  cls = _KINDS[kind]
  accepted = sorted(k for k in cls.__dataclass_fields__
                    if k not in ("parent", "name", "out_features"))
  wrong = sorted(set(kw) - set(accepted))
  if wrong:
    raise ValueError(
        f"connector {kind!r}: unknown arguments {wrong}; accepted: {accepted}")
  if kind in ("attention_pool", "resize_conv1x1") and "grid" not in kw:
    raise ValueError(
        f"connector {kind!r} needs grid=(h, w) or grid=num_tokens: "
        "the teacher's grid size")
  return cls(out_features=out_features, **kw)
