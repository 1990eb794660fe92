"""Conditional discriminator for holistic distillation (Structured KD).

Registered: "sagan_discriminator". It scores a segmentation map together
with its image, as the Wasserstein critic of Liu et al. (2019), whose design
follows SAGAN's discriminator (Zhang et al. 2019):

  input x = image ⊕ class-probability map, concatenated on channels (build it
  with `discriminator_input`), (N, H, W, 3 + num_classes), H, W ≥ 64
  block1..block4: 4×4/2 conv (padding 1) → LeakyReLU(0.1), channels
    conv_dim × 1, 2, 4, 8
  SAGAN self-attention after block3 and after block4
  last: 4×4 conv to 1 channel, no padding; the map is averaged over space
  (a 64×64 input gives a single 1×1 cell, exactly the reference critic).

Returns (score, features): score (N,) unbounded real (a WGAN-GP critic: no
sigmoid); features "block1".."block4" (NHWC, H/2..H/16, block3/block4 after
their attention).

Spectral norm: on by default (`spectral_norm=True`) on the four strided
convs, as the reference critic (not on the last conv or the attention 1×1
convs). It keeps the critic's Lipschitz constant near 1 and stabilises the
alternating training together with the gradient penalty. Its power-iteration
state (`u`, `sigma`) lives in the "batch_stats" collection: apply with
`mutable=["batch_stats"]` when train=True (the vector is refreshed by one
power-iteration step), and train=False for deterministic scoring, e.g. when
taking gradients for the gradient penalty or scoring the student's output in
the generator step if you do not want the state to move. With
`spectral_norm=False` there is no state at all.

Self-attention: query and key 1×1 convs to C/8, value 1×1 conv to C, softmax
over positions (computed in float32), output γ·attention + x with γ a
learned scalar initialised at 0.

The convolution layer is a module field (`conv`; flax's by default).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.registry import register

ModuleDef = Any

DEFAULT_INPUT = {"sagan_discriminator": (64, 64, 3 + 19)}
RECIPES = {"sagan_discriminator": "Structured KD holistic loss (critic)"}


def discriminator_input(image, probs):
  """image (N, H, W, 3) ⊕ probs (N, h, w, K) → (N, h, w, 3 + K).

  The image is resized (bilinear, antialiased) to the probability map's
  size, so a student's H/8 output can be scored against its input.
  """
  n, h, w, _ = probs.shape
  if image.shape[1:3] != (h, w):
    image = jax.image.resize(image, (n, h, w, image.shape[-1]), "bilinear")
  return jnp.concatenate([image.astype(probs.dtype), probs], axis=-1)


class SelfAttention(nn.Module):
  """SAGAN self-attention block (see the module docstring)."""
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape

    def proj(features, name):
      y = self.conv(features, (1, 1), dtype=self.dtype,
                    param_dtype=jnp.float32, name=name)(x)
      return y.reshape(n, h * w, features)

    q, k = proj(max(1, c // 8), "query"), proj(max(1, c // 8), "key")
    v = proj(c, "value")
    energy = jnp.einsum("nic,njc->nij", q, k).astype(jnp.float32)
    attn = jax.nn.softmax(energy, axis=-1).astype(v.dtype)
    out = jnp.einsum("nij,njc->nic", attn, v).reshape(n, h, w, c)
    gamma = self.param("gamma", nn.initializers.zeros, (), jnp.float32)
    return x + gamma.astype(out.dtype) * out


@register("sagan_discriminator")
class Discriminator(nn.Module):
  """Self-attention conditional critic; see the module docstring."""
  conv_dim: int = 64
  spectral_norm: bool = True
  negative_slope: float = 0.1
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, *, train: bool):
    if min(x.shape[1:3]) < 64:
      raise ValueError(f"discriminator input must be at least 64×64, "
                       f"got {x.shape[1:3]}")
    feats = {}
    for i in range(4):
      layer = self.conv(self.conv_dim * 2**i, (4, 4), strides=2,
                        padding=[(1, 1), (1, 1)], dtype=self.dtype,
                        param_dtype=jnp.float32, name=f"block{i + 1}")
      if self.spectral_norm:
        x = nn.SpectralNorm(layer, name=f"block{i + 1}_sn")(
            x, update_stats=train)
      else:
        x = layer(x)
      x = nn.leaky_relu(x, self.negative_slope)
      if i >= 2:
        x = SelfAttention(dtype=self.dtype, conv=self.conv,
                          name=f"attn{i - 1}")(x)
      feats[f"block{i + 1}"] = x
    x = self.conv(1, (4, 4), padding="VALID", dtype=self.dtype,
                  param_dtype=jnp.float32, name="last")(x)
    return jnp.mean(x, axis=(1, 2, 3)), feats
