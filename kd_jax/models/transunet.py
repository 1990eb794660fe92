"""TransUNet (Chen et al. 2021): R50-ViT-B/16 hybrid encoder + cascaded
upsampler (CUP).

Encoder, as the ViT hybrid (Dosovitskiy et al. 2021):
  * ResNetV2 trunk: weight-standardised convs (StdConv) + GroupNorm. Root:
    7×7/2 conv (width ch), GN, ReLU, 3×3/2 max-pool; three stages of
    bottleneck units, (3, 4, 9) for R50, with 4w, 8w, 16w output channels
    (w = 64) and stride 1, 2, 2: the last map is 1/16 of the input side.
    A unit is conv1×1 → GN → ReLU → conv3×3 (stride) → GN → ReLU → conv1×1 →
    GN, added to the (projected: StdConv 1×1 + per-channel GN) input, ReLU.
  * ViT on the 1/16 map: 1×1 "patch" embedding (1024 → 768), learned
    position embeddings (for `image_size`; resized bilinearly for other
    inputs), dropout 0.1, 12 pre-norm blocks (768 wide, 12 heads, MLP 3072
    with dropout 0.1, no attention dropout), final LayerNorm.
Decoder (CUP): the tokens are reshaped to a (H/16, W/16, 768) map, 3×3 conv
→ BN → ReLU to 512 ch, then four ×2 bilinear upsampling blocks with decoder
channels (256, 128, 64, 16); the first three concatenate the CNN skips at
1/8, 1/4, 1/2 (512, 256, 64 ch) before two 3×3 conv → BN → ReLU; a 3×3 conv
segmentation head. A 1-channel input is repeated to 3 channels (CT slices,
as the reference does), so the count does not depend on the input channels.

Layers are module fields (`conv`, `norm`, `std_conv`, `pool`), flax's own by
default; `StdConv` subclasses `nn.Conv`.

`transunet_b16` at 224² with 9 classes has 105,277,081 parameters (the
paper's 105.28 M; the same tensors as the reference code) and 2,880
BatchNorm statistics. Differences from the reference code that do not change
the count: the max-pool uses SAME padding (the reference pads its 55×55
output to 56), and bilinear upsampling uses half-pixel centres (the
reference aligns corners).

`transunet_tiny` (R (1, 1, 1) with w = 16, hidden 128, 2 layers, 4 heads,
MLP 256, decoder (64, 32, 16, 8), 128² input) runs on a CPU; any input side
divisible by 16 works for both.

Features (NHWC maps, NLD tokens):
  "cnn.root"           root output, 1/2 side, w ch (skip 3)
  "cnn.block1"         stage-1 output, 1/4 side, 4w ch (skip 2)
  "cnn.block2"         stage-2 output, 1/8 side, 8w ch (skip 1)
  "cnn.block3"         stage-3 output, 1/16 side, 16w ch (input of the ViT)
  "encoder.block{i}"   tokens after transformer block i = 0..depth-1,
                       (B, (H/16)·(W/16), hidden), NLD
  "encoder"            final encoded tokens (after the LayerNorm), NLD
  "bottleneck"         "encoder" reshaped to (B, H/16, W/16, hidden), NHWC
  "decoder.block{i}"   decoder block i = 0..3 output: 1/8, 1/4, 1/2, 1/1
                       side with decoder_channels[i] ch
  "embedding"          mean of the "encoder" tokens, (B, hidden)
"""
from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.registry import register
from kd_jax.models.remat import checkpointed
from kd_jax.models.vit import Block, resize_pos_embed

DEFAULT_INPUT = {
    "transunet_b16": (224, 224, 1),
    "transunet_tiny": (128, 128, 1),
}
RECIPES = {
    "transunet_b16": "heterogeneous segmentation KD (teacher of SqueezeU-Net)",
    "transunet_tiny": "CPU runs of heterogeneous segmentation KD (teacher)",
}


ModuleDef = Any


class StdConv(nn.Conv):
  """`nn.Conv` with weight standardisation (per output channel, ε = 1e-5)."""

  def param(self, name, init_fn, *init_args, **init_kwargs):
    param = super().param(name, init_fn, *init_args, **init_kwargs)
    if name == "kernel":
      mean = jnp.mean(param, axis=(0, 1, 2), keepdims=True)
      var = jnp.var(param, axis=(0, 1, 2), keepdims=True)
      param = (param - mean) * jax.lax.rsqrt(var + 1e-5)
    return param


def _std_conv(std_conv, features, kernel, strides, dtype, name):
  """Bias-free, He-initialised, symmetric (k-1)/2 padding (the reference)."""
  pad = (kernel - 1) // 2
  return std_conv(features, (kernel, kernel), strides=strides,
                  padding=[(pad, pad), (pad, pad)], use_bias=False,
                  kernel_init=nn.initializers.he_normal(), dtype=dtype,
                  name=name)


def _gn(ch, dtype, name, eps=1e-6, groups=32):
  return nn.GroupNorm(num_groups=min(groups, ch), epsilon=eps, dtype=dtype,
                      name=name)


class Bottleneck(nn.Module):
  """ResNetV2 (ViT hybrid) bottleneck unit; see the module docstring."""
  features: int
  mid: int
  strides: int = 1
  dtype: Any = jnp.float32
  std_conv: ModuleDef = StdConv

  @nn.compact
  def __call__(self, x):
    conv = partial(_std_conv, self.std_conv, dtype=self.dtype)
    residual = x
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = conv(self.features, 1, self.strides, name="proj")(x)
      # One group per channel, with PyTorch's default ε, as the reference.
      residual = nn.GroupNorm(num_groups=self.features, epsilon=1e-5,
                              dtype=self.dtype, name="gn_proj")(residual)
    y = conv(self.mid, 1, 1, name="conv1")(x)
    y = nn.relu(_gn(self.mid, self.dtype, "gn1")(y))
    y = conv(self.mid, 3, self.strides, name="conv2")(y)
    y = nn.relu(_gn(self.mid, self.dtype, "gn2")(y))
    y = conv(self.features, 1, 1, name="conv3")(y)
    y = _gn(self.features, self.dtype, "gn3")(y)
    return nn.relu(residual + y)


class ConvBNReLU(nn.Module):
  features: int
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    x = self.conv(self.features, (3, 3), padding=1, use_bias=False,
                  dtype=self.dtype, name="conv")(x)
    x = self.norm(use_running_average=not train, momentum=0.9,
                  epsilon=1e-5, dtype=self.dtype, name="bn")(x)
    return nn.relu(x)


def _upsample2(x):
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), "bilinear")


class TransUNet(nn.Module):
  """TransUNet; see the module docstring for the layout and feature names.

  Attributes:
    num_classes: segmentation classes (9 for Synapse).
    resnet_blocks: bottleneck units per ResNetV2 stage (three stages).
    resnet_width: root width w (64 for R50).
    hidden, depth, num_heads, mlp_dim: the ViT.
    image_size: input side the position embedding is learned for.
    head_channels: width of the conv after the tokens ("conv_more").
    decoder_channels: the four decoder blocks' widths.
    dropout_rate: ViT embedding and MLP dropout (0.1).
    remat: rematerialise each trunk unit, transformer block and decoder
      conv (`kd_jax.models.remat`).
  """
  num_classes: int = 9
  resnet_blocks: Sequence[int] = (3, 4, 9)
  resnet_width: int = 64
  hidden: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  image_size: int = 224
  head_channels: int = 512
  decoder_channels: Sequence[int] = (256, 128, 64, 16)
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  std_conv: ModuleDef = StdConv
  pool: Callable = nn.max_pool
  remat: Any = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    if x.ndim != 4 or x.shape[1] % 16 or x.shape[2] % 16:
      raise ValueError(
          f"TransUNet needs NHWC input with height and width divisible by "
          f"16; got shape {tuple(x.shape)}")
    if len(self.resnet_blocks) != 3 or len(self.decoder_channels) != 4:
      raise ValueError("TransUNet has three ResNet stages and four decoder "
                       "blocks: resnet_blocks needs 3 entries and "
                       "decoder_channels 4")
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    x = x.astype(self.dtype)
    features = {}

    # ResNetV2 trunk.
    unit = checkpointed(Bottleneck, self.remat, takes_train=False)
    w = self.resnet_width
    x = _std_conv(self.std_conv, w, 7, 2, self.dtype, name="root_conv")(x)
    x = nn.relu(_gn(w, self.dtype, "root_gn")(x))
    features["cnn.root"] = x
    x = self.pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for s, units in enumerate(self.resnet_blocks):
      out, mid = w * 4 * 2**s, w * 2**s
      for u in range(units):
        x = unit(out, mid, 2 if (u == 0 and s > 0) else 1, self.dtype,
                 self.std_conv, name=f"block{s + 1}_unit{u + 1}")(x)
      features[f"cnn.block{s + 1}"] = x
    skips = [features["cnn.block2"], features["cnn.block1"],
             features["cnn.root"]]

    # ViT on the 1/16 map.
    b, gh, gw, _ = x.shape
    x = self.conv(self.hidden, (1, 1), dtype=self.dtype,
                  name="patch_embed")(x)
    x = x.reshape(b, gh * gw, self.hidden)
    g0 = self.image_size // 16
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (1, g0 * g0, self.hidden), jnp.float32)
    x = x + resize_pos_embed(pos, (gh, gw), "bilinear").astype(self.dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    block = checkpointed(Block, self.remat)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, None, self.dropout_rate,
                dtype=self.dtype, name=f"encoder_block{i}")(x, train)
      features[f"encoder.block{i}"] = x
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm")(x)
    features["encoder"] = x
    features["embedding"] = jnp.mean(x, axis=1)
    x = x.reshape(b, gh, gw, self.hidden)
    features["bottleneck"] = x

    # Cascaded upsampler.
    cbr = partial(checkpointed(ConvBNReLU, self.remat), dtype=self.dtype,
                  conv=self.conv, norm=self.norm)
    x = cbr(self.head_channels, name="conv_more")(x, train)
    for i, ch in enumerate(self.decoder_channels):
      x = _upsample2(x)
      if i < len(skips):
        x = jnp.concatenate([x, skips[i].astype(x.dtype)], axis=-1)
      x = cbr(ch, name=f"decoder{i}_conv1")(x, train)
      x = cbr(ch, name=f"decoder{i}_conv2")(x, train)
      features[f"decoder.block{i}"] = x
    logits = self.conv(self.num_classes, (3, 3), padding=1, dtype=self.dtype,
                  name="segmentation_head")(x)
    return logits, features


register("transunet_b16")(TransUNet)


@register("transunet_tiny")
class TransUNetTiny(TransUNet):
  """A CPU-sized TransUNet: same layout, R(1, 1, 1) with w = 16, 2 layers."""
  resnet_blocks: Sequence[int] = (1, 1, 1)
  resnet_width: int = 16
  hidden: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 256
  image_size: int = 128
  head_channels: int = 64
  decoder_channels: Sequence[int] = (64, 32, 16, 8)
