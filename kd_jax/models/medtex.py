"""MED-TEX models (Nguyen-Duc, Zhao, Cai & Phung, "MED-TEX: Transferring and
Explaining Knowledge with Less Data from Pretrained Medical Imaging Models",
arXiv 2008.02593, ISBI 2022): a teacher CNN, a ~226× smaller student CNN of
the same shape, and the explainer that masks the student's input.

Teacher and student (`MedTexCNN`): four blocks of

    conv k×k (no bias) → BatchNorm → 2×2 max-pool → ReLU

then global average pooling and a linear classifier. The paper gives the
shape and the sizes (teacher ≈ 390 k parameters, student ≈ 1.7 k, "226×
smaller") but not the widths; these widths and 3×3 kernels reproduce the
sizes for 5 classes (DR grades) on a 3-channel image:

| name | widths | kernel | params (5 classes) |
|---|---|---|---|
| `medtex_teacher` | 32, 64, 128, 256 | 3×3 | 390,181 |
| `medtex_student` | 4, 8, 8, 9 | 3×3 | 1,728 (225.8× smaller) |

Features of both (NHWC unless stated):
  "block1".."block4"  block outputs (after the ReLU), 1/2, 1/4, 1/8, 1/16 of
                      the input side, widths[i] channels (the VID layers)
  "embedding"         global average of "block4", (B, widths[3])

Explainer (`MedTexExplainer`, `medtex_explainer`): a U-Net-style autoencoder
with skip connections. `depth` encoder stages of 3×3 conv → BN → ReLU (width
`width · 2^i`), 2×2 max-pooling between them, a bottleneck stage, then
decoder stages that upsample by a 2×2 transposed conv, concatenate the
encoder stage of the same size and apply 3×3 conv → BN → ReLU, and finally a
1×1 conv + sigmoid. Its output ("logits" in the models contract) is the mask
Θ ∈ (0, 1) with the input's height and width and **1 channel** by default,
shared by all input channels so that Θ ⊙ X broadcasts; `per_channel=True`
gives one mask channel per input channel instead. The input side must be
divisible by 2^depth. Features:
  "enc1".."enc{depth}"  encoder stage outputs (the skips)
  "bottleneck"          the deepest map, 1/2^depth of the input side
  "dec{depth}".."dec1"  decoder stage outputs; "dec1" at full resolution
  "mask_logits"         the mask before the sigmoid, (B, H, W, 1 or C)
  "embedding"           global average of "bottleneck", (B, C)

What is deployed (`MedTexExplained`): explainer and student as one module,
`(student logits on Θ ⊙ X, {**student features, "mask": Θ})`; its variables
are `{"explainer": ..., "student": ...}` in each collection.

The convolution, BatchNorm, max-pool (and, in the explainer,
transposed-convolution) layers are module fields (`conv`, `norm`, `pool`,
`conv_transpose`; flax's by default).
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.registry import register

ModuleDef = Any

DEFAULT_INPUT = {
    "medtex_teacher": (224, 224, 3),
    "medtex_student": (224, 224, 3),
    "medtex_explainer": (224, 224, 3),
}
RECIPES = {
    "medtex_teacher": "MED-TEX (frozen teacher)",
    "medtex_student": "MED-TEX (student on the masked input)",
    "medtex_explainer": "MED-TEX (explainer producing the mask)",
}


def _bn(norm: ModuleDef, train, dtype, name):
  return norm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
              dtype=dtype, name=name)


class MedTexCNN(nn.Module):
  """Four conv → BN → max-pool → ReLU blocks + linear classifier.

  Attributes:
    num_classes: classifier outputs.
    widths: channels of the four blocks.
    kernel: conv kernel side.
    conv, norm, pool: the layers (flax's by default).
  """
  num_classes: int = 5
  widths: Sequence[int] = (32, 64, 128, 256)
  kernel: int = 3
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  pool: Callable = nn.max_pool

  @nn.compact
  def __call__(self, x, *, train: bool):
    if x.ndim != 4 or x.shape[1] % 16 or x.shape[2] % 16:
      raise ValueError(
          f"MedTexCNN needs NHWC input with height and width divisible by "
          f"16 (four 2×2 poolings); got shape {tuple(x.shape)}")
    if len(self.widths) != 4:
      raise ValueError(f"MedTexCNN has four blocks; got widths={self.widths}")
    x = x.astype(self.dtype)
    features = {}
    for i, w in enumerate(self.widths):
      x = self.conv(w, (self.kernel, self.kernel), use_bias=False,
                    dtype=self.dtype, name=f"conv{i + 1}")(x)
      x = _bn(self.norm, train, self.dtype, f"bn{i + 1}")(x)
      x = nn.relu(self.pool(x, (2, 2), strides=(2, 2)))
      features[f"block{i + 1}"] = x
    features["embedding"] = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(
        features["embedding"])
    return logits, features


register("medtex_teacher")(MedTexCNN)


@register("medtex_student")
class MedTexStudent(MedTexCNN):
  """MED-TEX student: widths (4, 8, 8, 9), 3×3 (1,728 params)."""
  widths: Sequence[int] = (4, 8, 8, 9)


class ConvBNReLU(nn.Module):
  features: int
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = self.conv(self.features, (3, 3), use_bias=False, dtype=self.dtype,
                  name="conv")(x)
    return nn.relu(_bn(self.norm, train, self.dtype, "bn")(x))


@register("medtex_explainer")
class MedTexExplainer(nn.Module):
  """Autoencoder with skips → 1×1 conv → sigmoid mask; see the module doc.

  Attributes:
    width: channels of the first stage (doubling per stage).
    depth: number of poolings.
    per_channel: one mask channel per input channel instead of one shared.
    conv, norm, conv_transpose, pool: the layers (flax's by default).
  """
  width: int = 16
  depth: int = 3
  per_channel: bool = False
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  conv_transpose: ModuleDef = nn.ConvTranspose
  pool: Callable = nn.max_pool

  @nn.compact
  def __call__(self, x, *, train: bool):
    side = 2**self.depth
    if x.ndim != 4 or x.shape[1] % side or x.shape[2] % side:
      raise ValueError(
          f"MedTexExplainer(depth={self.depth}) needs NHWC input with height "
          f"and width divisible by {side}; got shape {tuple(x.shape)}")
    out_ch = x.shape[-1] if self.per_channel else 1
    x = x.astype(self.dtype)
    layers = dict(conv=self.conv, norm=self.norm)
    features = {}
    skips = []
    for i in range(self.depth):
      x = ConvBNReLU(self.width * 2**i, self.dtype, name=f"enc{i + 1}",
                     **layers)(x, train=train)
      features[f"enc{i + 1}"] = x
      skips.append(x)
      x = self.pool(x, (2, 2), strides=(2, 2))
    x = ConvBNReLU(self.width * side, self.dtype, name="bottleneck",
                   **layers)(x, train=train)
    features["bottleneck"] = x
    features["embedding"] = jnp.mean(x, axis=(1, 2))
    for i in reversed(range(self.depth)):
      ch = self.width * 2**i
      x = self.conv_transpose(ch, (2, 2), strides=(2, 2), dtype=self.dtype,
                              name=f"up{i + 1}")(x)
      x = jnp.concatenate([x, skips[i]], axis=-1)
      x = ConvBNReLU(ch, self.dtype, name=f"dec{i + 1}", **layers)(
          x, train=train)
      features[f"dec{i + 1}"] = x
    mask_logits = self.conv(out_ch, (1, 1), dtype=self.dtype,
                            name="mask_head")(x)
    features["mask_logits"] = mask_logits
    return nn.sigmoid(mask_logits), features


class MedTexExplained(nn.Module):
  """Explainer E and student S as deployed: S(Θ ⊙ X) with Θ = E(X).

  Returns (student outputs on the explained input, features): the student's
  features plus "mask", Θ as E gives it (1 channel, or one per image
  channel), broadcast over the image's channels in the product. Any two
  models of the models contract fit; the variables of each collection are
  `{"explainer": ..., "student": ...}`.

  Attributes:
    explainer: the module giving Θ ∈ [0, 1] with the image's height and
      width (`medtex_explainer`).
    student: the classifier of the explained input (`medtex_student`).
  """
  explainer: nn.Module
  student: nn.Module

  def __call__(self, x, *, train: bool):
    mask, _ = self.explainer(x, train=train)
    outputs, features = self.student(explain_input(mask, x), train=train)
    return outputs, dict(features, mask=mask)


def explain_input(mask, images):
  """X' = Θ ⊙ X in float32 (a 1-channel Θ broadcasts over the channels)."""
  return mask.astype(jnp.float32) * images.astype(jnp.float32)
