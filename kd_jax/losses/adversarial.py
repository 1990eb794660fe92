"""Adversarial (holistic) distillation: pure WGAN-GP pieces.

In Structured KD's holistic distillation a conditional critic D scores
(image, segmentation map) pairs: the teacher's map is "real", the student's
"fake". The method owns D (a Flax module) and its optimizer and calls these
pieces in alternating steps; here D is just a function of arrays.

Sign convention: every function returns a quantity to *minimise* by the
party named (the critic minimises `wgan_critic_loss + lambda * gp`, the
student minimises `wgan_generator_loss`). No temperature.

Reference: Arjovsky et al., "Wasserstein GAN", ICML 2017; Gulrajani et al.,
"Improved Training of Wasserstein GANs", NeurIPS 2017; Liu et al.,
"Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from kd_jax.losses import _checks


def wgan_critic_loss(real_scores, fake_scores) -> jax.Array:
  """WGAN critic loss: E[D(fake)] - E[D(real)].

  Formula: mean(fake_scores) - mean(real_scores), the negated Wasserstein
  estimate. Reduction: mean over the score elements of each side (one score
  per example, or per patch for a patch critic). Gradients flow into both
  arguments: stop the student's (fake) gradient in the critic step. 0 when
  the scores are equal. No temperature.

  Reference: Arjovsky et al., "Wasserstein GAN", ICML 2017.

  Args:
    real_scores: critic scores of the teacher's (real) outputs, (B,) or
      (B, ...).
    fake_scores: critic scores of the student's (fake) outputs, same shape.

  Returns:
    float32 scalar (may be negative).
  """
  _checks.same_shape("real_scores", real_scores, "fake_scores", fake_scores,
                     "score the teacher's and the student's outputs with the "
                     "same critic on batches of the same size")
  real = _checks.as_float(real_scores, "real_scores")
  fake = _checks.as_float(fake_scores, "fake_scores")
  return jnp.mean(fake) - jnp.mean(real)


def wgan_generator_loss(fake_scores) -> jax.Array:
  """WGAN generator (student) loss: -E[D(fake)].

  Formula: -mean(fake_scores). Reduction: mean over score elements. The
  student is pushed toward outputs the critic scores like the teacher's.
  No temperature.

  Reference: Arjovsky et al., "Wasserstein GAN", ICML 2017.

  Returns:
    float32 scalar.
  """
  return -jnp.mean(_checks.as_float(fake_scores, "fake_scores"))


def gradient_penalty(critic_fn: Callable[[jax.Array], jax.Array], real, fake,
                     key: jax.Array, *, target: float = 1.0) -> jax.Array:
  """WGAN-GP gradient penalty on random interpolates.

  Formula, with eps_b ~ U[0, 1) drawn per example from `key`:
      x^_b = eps_b real_b + (1 - eps_b) fake_b
      g_b = d/dx^_b sum(critic_fn(x^))     (per-example gradient; the critic
                                            must treat examples independently,
                                            e.g. no batch norm)
      gp = (1/B) sum_b (||g_b||_2 - target)^2
  Reduction: mean over examples. Multiply by lambda (10 in the paper) in
  the method. The norm has a zero-safe gradient, so the result and its
  gradients stay finite even when g_b = 0. No temperature. Not wrapped in
  a jit of its own (critic_fn is a Python function): call it inside the
  method's jitted step.

  Reference: Gulrajani et al., "Improved Training of Wasserstein GANs",
  NeurIPS 2017.

  Args:
    critic_fn: maps a (B, ...) batch to scores (B,) or (B, ...); close over
      the critic's parameters and any conditioning input (e.g. the image).
    real: (B, ...) real samples (teacher outputs).
    fake: (B, ...) fake samples (student outputs), same shape.
    key: a jax.random key.
    target: the target gradient norm (1 for the 1-Lipschitz constraint).

  Returns:
    float32 scalar >= 0.
  """
  _checks.same_shape("real", real, "fake", fake)
  _checks.min_ndim("real", real, 1, "(B, ...)")
  if not callable(critic_fn):
    raise ValueError(f"critic_fn must be callable (a function of a batch), "
                     f"got {type(critic_fn).__name__}.")
  real = _checks.as_float(real, "real")
  fake = _checks.as_float(fake, "fake")
  eps = jax.random.uniform(key, (real.shape[0],) + (1,) * (real.ndim - 1),
                           dtype=real.dtype)
  x_hat = eps * real + (1.0 - eps) * fake
  grads = jax.grad(lambda x: jnp.sum(critic_fn(x)))(x_hat)
  sq = jnp.sum(grads.reshape(grads.shape[0], -1) ** 2, axis=-1)
  norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  return jnp.mean((norm - target) ** 2)
