"""kd_jax: knowledge distillation for medical imaging in JAX/Flax.

Subpackages: `losses` (pure loss functions), `models` (Flax linen modules),
`methods`, `data`, `evaluate`, `train`.
"""

__version__ = "0.1.0"
