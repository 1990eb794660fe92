"""ESPNet-C and ESPNet (Mehta et al., ECCV 2018), Structured KD students.

Registered:
  "espnet_c": the encoder with a 1×1 classifier at H/8, logits upsampled
      bilinearly to the input size.
  "espnet":  the encoder plus the light decoder that upsamples by learned
      2×2 transposed convs, fusing the H/4 and H/2 encoder maps.
Defaults α2 = p = 2 and α3 = q = 8 ESP modules at levels 2 and 3, as the
paper's Cityscapes models. Targets for the tests, with 20 classes (the
paper's Cityscapes setting): ESPNet 365,109 parameters (paper: 0.364 M;
the tests allow 1 %); the encoder alone ("espnet_c") counts 349,449. The
default num_classes here is 19 like the other Structured KD models.

Building blocks (all convs bias-free; BatchNorm eps 1e-3, momentum 0.9;
PReLU with one slope per channel, initialised to 0.25):
  ESP module: 1×1 conv reduces to n = C/5 channels (3×3/2 in the
    down-sampling variant), five parallel 3×3 convs with dilation 1, 2, 4, 8,
    16 (the first gives C − 4n channels), hierarchical feature fusion (the
    outputs of dilations 2, 4, 8, 16 are summed cumulatively before
    concatenation, which removes gridding artefacts), a residual add when
    shapes match, then BN-PReLU.
  Input reinforcement: the image average-pooled (3×3/2, zero padding counted)
    to H/2 and H/4 is concatenated with the level-1 and level-2 outputs.
Input H and W must be multiples of 8.

Features (NHWC):
  "level1":  H/2, 19    conv 3×3/2 to 16 ⊕ image/2, BN-PReLU
  "level2":  H/4, 131   ESP modules ⊕ down-sampler output ⊕ image/4
  "level3":  H/8, 256   ESP modules ⊕ down-sampler output
  "head":    same array as "level3": the last encoder map, the one
             Structured KD's pair-wise loss matches
  "decoder": H/2, num_classes (espnet only) fused map before the last
             transposed conv

The convolution, BatchNorm and transposed-convolution layers are module
fields (`conv`, `norm`, `conv_transpose`; flax's by default).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.pspnet import resize_bilinear
from kd_jax.models.registry import register
from kd_jax.models.remat import checkpointed

ModuleDef = Any

DEFAULT_INPUT = {"espnet_c": (512, 512, 3), "espnet": (512, 512, 3)}
RECIPES = {"espnet_c": "Structured KD student", "espnet": "Structured KD student"}


class PReLU(nn.Module):
  """PReLU with a learned slope per channel (torch's nn.PReLU(C))."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    a = self.param("slope", nn.initializers.constant(0.25), (x.shape[-1],),
                   jnp.float32)
    return jnp.where(x >= 0, x, a.astype(self.dtype) * x)


def bn_prelu(x, train, dtype, name, *, norm: ModuleDef):
  x = norm(use_running_average=not train, momentum=0.9, epsilon=1e-3,
           dtype=dtype, param_dtype=jnp.float32, name=f"{name}_bn")(x)
  return PReLU(dtype=dtype, name=f"{name}_act")(x)


def conv(conv_cls: ModuleDef, features, kernel, *, stride=1, dilation=1,
         dtype, name):
  """A bias-free `conv_cls` with torch-style symmetric padding."""
  pad = dilation * (kernel - 1) // 2
  return conv_cls(features, (kernel, kernel), strides=stride,
                  kernel_dilation=dilation, padding=[(pad, pad), (pad, pad)],
                  use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                  name=name)


class ESP(nn.Module):
  """ESP module; `downsample` uses a 3×3/2 reduction and no residual."""
  features: int
  downsample: bool = False
  residual: bool = True
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.dtype
    n = self.features // 5
    n1 = self.features - 4 * n
    if self.downsample:
      r = conv(self.conv, n, 3, stride=2, dtype=d, name="reduce")(x)
    else:
      r = conv(self.conv, n, 1, dtype=d, name="reduce")(x)
    branches = [conv(self.conv, n1, 3, dtype=d, name="d1")(r)]
    total = None
    for rate in (2, 4, 8, 16):
      b = conv(self.conv, n, 3, dilation=rate, dtype=d, name=f"d{rate}")(r)
      total = b if total is None else total + b  # hierarchical fusion
      branches.append(total)
    y = jnp.concatenate(branches, axis=-1)
    if not self.downsample and self.residual and x.shape == y.shape:
      y = x + y
    return bn_prelu(y, train, d, "out", norm=self.norm)


def _avg_pool(x):
  return nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                     count_include_pad=True)


class ESPNet(nn.Module):
  """ESPNet (decoder=True) or ESPNet-C (decoder=False); see module docstring."""
  num_classes: int = 19
  p: int = 2
  q: int = 8
  decoder: bool = True
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  conv_transpose: ModuleDef = nn.ConvTranspose
  remat: Any = False  # Each ESP module (kd_jax.models.remat).

  @nn.compact
  def __call__(self, x, *, train: bool):
    d = self.dtype
    layers = dict(conv=self.conv, norm=self.norm)
    esp = checkpointed(ESP, self.remat)
    size = x.shape[1:3]
    if size[0] % 8 or size[1] % 8:
      raise ValueError(f"ESPNet needs H, W divisible by 8, got {size}")
    img2 = _avg_pool(x)
    img4 = _avg_pool(img2)
    feats = {}
    # Level 1 (H/2).
    y = conv(self.conv, 16, 3, stride=2, dtype=d, name="level1_conv")(x)
    y = bn_prelu(y, train, d, "level1", norm=self.norm)
    l1 = bn_prelu(jnp.concatenate([y, img2.astype(y.dtype)], -1), train, d,
                  "level1_cat", norm=self.norm)
    feats["level1"] = l1
    # Level 2 (H/4).
    down2 = esp(64, downsample=True, dtype=d, name="level2_down", **layers)(
        l1, train)
    y = down2
    for i in range(self.p):
      y = esp(64, dtype=d, name=f"level2_{i}", **layers)(y, train)
    l2 = bn_prelu(jnp.concatenate([y, down2, img4.astype(y.dtype)], -1),
                  train, d, "level2_cat", norm=self.norm)
    feats["level2"] = l2
    # Level 3 (H/8).
    down3 = esp(128, downsample=True, dtype=d, name="level3_down", **layers)(
        l2, train)
    y = down3
    for i in range(self.q):
      y = esp(128, dtype=d, name=f"level3_{i}", **layers)(y, train)
    l3 = bn_prelu(jnp.concatenate([down3, y], -1), train, d, "level3_cat",
                  norm=self.norm)
    feats["level3"] = feats["head"] = l3
    c = self.num_classes
    logits8 = conv(self.conv, c, 1, dtype=d, name="classifier")(l3)
    if not self.decoder:
      return resize_bilinear(logits8, size), feats
    # Decoder: H/8 → H/4, fuse with projected level 2, → H/2, fuse with
    # level 1, → H.
    def up(z, name):
      return self.conv_transpose(c, (2, 2), strides=(2, 2), padding="VALID",
                                 use_bias=False, dtype=d,
                                 param_dtype=jnp.float32, name=name)(z)

    z = self.norm(use_running_average=not train, momentum=0.9,
                  epsilon=1e-3, dtype=d, param_dtype=jnp.float32,
                  name="dec3_bn")(logits8)
    z = up(z, "dec3_up")
    z = jnp.concatenate(
        [conv(self.conv, c, 1, dtype=d, name="dec2_proj")(l2), z], -1)
    z = bn_prelu(z, train, d, "dec2_cat", norm=self.norm)
    z = esp(c, residual=False, dtype=d, name="dec2_esp", **layers)(
        z, train)
    z = bn_prelu(up(z, "dec2_up"), train, d, "dec2_up", norm=self.norm)
    z = conv(self.conv, c, 3, dtype=d, name="dec1_conv")(
        jnp.concatenate([z, l1], -1))
    z = bn_prelu(z, train, d, "dec1", norm=self.norm)
    feats["decoder"] = z
    return up(z, "classifier_up"), feats


@register("espnet")
class ESPNetFull(ESPNet):
  decoder: bool = True


@register("espnet_c")
class ESPNetC(ESPNet):
  decoder: bool = False
