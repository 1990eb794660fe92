"""PSPNet (Zhao et al. 2017) and a plain dilated-ResNet segmentation student.

Registered:
  "pspnet_resnet101": the Structured KD teacher (Liu et al. 2019): deep-stem
      ResNet-101 at output stride 8, pyramid pooling (bins 1, 2, 3, 6, 512
      channels each), 3×3 conv to 512, auxiliary head on layer3. 70.4 M
      parameters at 19 classes, as the paper's 70.43 M.
  "pspnet_resnet50", "pspnet_resnet18": the same on other backbones (the
      ResNet-18 one, 128-channel head, is the Structured KD reference
      student).
  "resnet18_seg": plain student: ResNet-18 (standard stem) at output stride 8
      and `SegHead` (3×3 conv to 256, BN, ReLU, dropout, 1×1 classifier).

All return logits (N, H, W, num_classes) at the input size (bilinear,
half-pixel centres, i.e. torch's align_corners=False) and need H, W ≥ 8·bins
only for the pooling to be meaningful, not to run.

PSPNet options: backbone ("resnet18" | "resnet34" | "resnet50" |
"resnet101"), num_classes (19), bins, head_channels (default layer4
channels / 4), aux (True), aux_channels (default layer3 channels / 2),
dropout (0.1, channel-wise), deep_stem (True), width (64).

Features (NHWC) — the backbone's "stem", "layer1".."layer4" (layer3 and
layer4 at H/8), "embedding", plus:
  "head":       (N, H/8, W/8, head_channels) the map before dropout and the
                1×1 classifier (after PPM + 3×3 conv-BN-ReLU for PSPNet);
                Structured KD's pair-wise loss and the discriminator's
                feature matching use it.
  "aux_logits": (N, H, W, num_classes) auxiliary head on layer3, PSPNet
                with aux=True only; weight its CE by 0.4 as in PSPNet.

The convolution, BatchNorm and max-pool layers are module fields (`conv`,
`norm`, `pool`; flax's by default), passed down to the ResNet backbone.
"""
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.models import resnet
from kd_jax.models.registry import register

ModuleDef = Any

_SEG_INPUT = (512, 512, 3)
DEFAULT_INPUT = {
    "pspnet_resnet101": _SEG_INPUT,
    "pspnet_resnet50": _SEG_INPUT,
    "pspnet_resnet18": _SEG_INPUT,
    "resnet18_seg": _SEG_INPUT,
}
RECIPES = {
    "pspnet_resnet101": "Structured KD teacher",
    "pspnet_resnet50": "Structured KD teacher (lighter)",
    "pspnet_resnet18": "Structured KD student (reference code's PSP head)",
    "resnet18_seg": "Structured KD student",
}


def resize_bilinear(x, size: Sequence[int]):
  """Bilinear resize of NHWC `x` to spatial `size` (torch align_corners=False)."""
  n, _, _, c = x.shape
  return jax.image.resize(x, (n, *size, c), "bilinear", antialias=False)


def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  # Row i averages input cells [floor(i n_in / n_out), ceil((i+1) n_in / n_out)),
  # torch's AdaptiveAvgPool2d rule (bins overlap when n_out ∤ n_in).
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x, bins: int):
  """Average-pools NHWC `x` to (bins, bins) as torch's AdaptiveAvgPool2d."""
  _, h, w, _ = x.shape
  mh = jnp.asarray(_pool_matrix(h, bins), x.dtype)
  mw = jnp.asarray(_pool_matrix(w, bins), x.dtype)
  return jnp.einsum("ih,jw,nhwc->nijc", mh, mw, x)


def conv_bn_relu(x, features, kernel, train, dtype, name, *,
                 conv: ModuleDef, norm: ModuleDef):
  x = resnet.conv(conv, features, kernel, dtype=dtype, name=f"{name}_conv")(x)
  return nn.relu(resnet.batch_norm(norm, train, dtype=dtype,
                                   name=f"{name}_bn")(x))


class SegHead(nn.Module):
  """3×3 conv-BN-ReLU → channel dropout → 1×1 classifier.

  Returns (logits at the input map's size, the pre-dropout map).
  """
  num_classes: int
  channels: int = 256
  dropout: float = 0.1
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = conv_bn_relu(x, self.channels, 3, train, self.dtype, "head",
                     conv=self.conv, norm=self.norm)
    y = nn.Dropout(self.dropout, broadcast_dims=(1, 2),
                   deterministic=not train)(x)
    y = self.conv(self.num_classes, (1, 1), dtype=self.dtype,
                  param_dtype=jnp.float32, name="classifier")(y)
    return y, x


class PyramidPooling(nn.Module):
  """PSP module: per bin, pool → 1×1 conv-BN-ReLU → upsample; concat with
  the input; 3×3 conv-BN-ReLU to `channels`."""
  channels: int
  bins: Sequence[int] = (1, 2, 3, 6)
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, *, train: bool):
    layers = dict(conv=self.conv, norm=self.norm)
    size = x.shape[1:3]
    pyramid = [x]
    for b in self.bins:
      p = adaptive_avg_pool(x, b)
      p = conv_bn_relu(p, self.channels, 1, train, self.dtype, f"bin{b}",
                       **layers)
      pyramid.append(resize_bilinear(p, size))
    x = jnp.concatenate(pyramid, axis=-1)
    return conv_bn_relu(x, self.channels, 3, train, self.dtype, "fuse",
                        **layers)


class PSPNet(nn.Module):
  """PSPNet; see the module docstring."""
  backbone: str = "resnet101"
  num_classes: int = 19
  bins: Sequence[int] = (1, 2, 3, 6)
  head_channels: Optional[int] = None
  aux: bool = True
  aux_channels: Optional[int] = None
  dropout: float = 0.1
  deep_stem: bool = True
  width: int = 64
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  pool: Callable = nn.max_pool
  remat: Any = False  # The backbone's blocks (kd_jax.models.remat).

  @nn.compact
  def __call__(self, x, *, train: bool):
    d = self.dtype
    layers = dict(conv=self.conv, norm=self.norm)
    size = x.shape[1:3]
    ch = resnet.stage_channels(self.backbone, self.width)
    _, feats = resnet.resnet_by_name(
        self.backbone, num_classes=None, output_stride=8,
        deep_stem=self.deep_stem, width=self.width, dtype=d,
        name="backbone", pool=self.pool, remat=self.remat, **layers)(
            x, train=train)
    feats = dict(feats)
    y = PyramidPooling(self.head_channels or ch[3] // 4, self.bins, dtype=d,
                       name="ppm", **layers)(feats["layer4"], train=train)
    feats["head"] = y
    y = nn.Dropout(self.dropout, broadcast_dims=(1, 2),
                   deterministic=not train)(y)
    y = self.conv(self.num_classes, (1, 1), dtype=d, param_dtype=jnp.float32,
                  name="classifier")(y)
    if self.aux:
      aux, _ = SegHead(self.num_classes, self.aux_channels or ch[2] // 2,
                       self.dropout, dtype=d, name="aux", **layers)(
                           feats["layer3"], train=train)
      feats["aux_logits"] = resize_bilinear(aux, size)
    return resize_bilinear(y, size), feats


@register("pspnet_resnet101")
class PSPNetResNet101(PSPNet):
  backbone: str = "resnet101"


@register("pspnet_resnet50")
class PSPNetResNet50(PSPNet):
  backbone: str = "resnet50"


@register("pspnet_resnet18")
class PSPNetResNet18(PSPNet):
  backbone: str = "resnet18"


@register("resnet18_seg")
class ResNet18Seg(nn.Module):
  """Dilated ResNet-18 (output stride 8) + `SegHead`; see module docstring."""
  num_classes: int = 19
  head_channels: int = 256
  dropout: float = 0.1
  deep_stem: bool = False
  width: int = 64
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  pool: Callable = nn.max_pool
  remat: Any = False  # The backbone's blocks (kd_jax.models.remat).

  @nn.compact
  def __call__(self, x, *, train: bool):
    layers = dict(conv=self.conv, norm=self.norm)
    size = x.shape[1:3]
    _, feats = resnet.ResNet18(
        num_classes=None, output_stride=8, deep_stem=self.deep_stem,
        width=self.width, dtype=self.dtype, name="backbone", pool=self.pool,
        remat=self.remat, **layers)(x, train=train)
    feats = dict(feats)
    y, feats["head"] = SegHead(self.num_classes, self.head_channels,
                               self.dropout, dtype=self.dtype,
                               name="seg_head", **layers)(feats["layer4"],
                                                          train=train)
    return resize_bilinear(y, size), feats
