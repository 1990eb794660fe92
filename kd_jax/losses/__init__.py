"""Distillation and task losses: pure functions of arrays.

    from kd_jax import losses
    loss = losses.kd_kl(student_logits, teacher_logits, temperature=4.0)
    fn = losses.objective([dict(fn="cross_entropy"),
                           dict(fn="kd_kl", weight=0.5, temperature=4.0)])
    total, metrics = fn({"logits": s, "labels": y, "teacher_logits": t})

Every loss imports only jax, jax.numpy and optax, is jit-, grad- and
vmap-safe, and documents its formula, reduction and temperature convention.
`REGISTRY` maps config names to `LossSpec(fn, kind)`; docs/losses.md has the
table of losses.
"""

from kd_jax.losses.adversarial import gradient_penalty
from kd_jax.losses.adversarial import wgan_critic_loss
from kd_jax.losses.adversarial import wgan_generator_loss
from kd_jax.losses.features import attention_map
from kd_jax.losses.features import attention_transfer
from kd_jax.losses.features import embedding_cosine
from kd_jax.losses.features import embedding_l2
from kd_jax.losses.features import feature_map_cosine
from kd_jax.losses.features import hint_l1
from kd_jax.losses.features import hint_l2
from kd_jax.losses.features import mean_pooled
from kd_jax.losses.features import pair_nodes
from kd_jax.losses.features import pairwise_similarity
from kd_jax.losses.features import pkt
from kd_jax.losses.features import rkd_angle
from kd_jax.losses.features import rkd_distance
from kd_jax.losses.features import similarity_preserving
from kd_jax.losses.features import vid
from kd_jax.losses.logits import cwd
from kd_jax.losses.logits import dist
from kd_jax.losses.logits import dkd
from kd_jax.losses.logits import dml
from kd_jax.losses.logits import ensemble_kd
from kd_jax.losses.logits import ensemble_l2
from kd_jax.losses.logits import kd_kl
from kd_jax.losses.logits import pixelwise_kd
from kd_jax.losses.logits import soft_cross_entropy
from kd_jax.losses.medtex import medtex_objective
from kd_jax.losses.objective import KINDS
from kd_jax.losses.objective import LossSpec
from kd_jax.losses.objective import MissingInputError
from kd_jax.losses.objective import objective
from kd_jax.losses.objective import REGISTRY
from kd_jax.losses.objective import TEACHER_VIEWS
from kd_jax.losses.objective import teacher_view
from kd_jax.losses.objective import teacher_views
from kd_jax.losses.objective import term_names
from kd_jax.losses.objective import Viewed
from kd_jax.losses.task import cross_entropy
from kd_jax.losses.task import dice_loss
from kd_jax.losses.task import focal_loss
from kd_jax.losses.task import l1
from kd_jax.losses.task import mse
from kd_jax.losses.task import smooth_l1
