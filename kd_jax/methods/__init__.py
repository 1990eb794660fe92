"""Training methods: which modules train, which are frozen, what the loss sees.

A method is built from one stage of the config and exposes
  init(rng, images) -> {"params": ..., "batch_stats": ...}   trainable variables
  loss_fn(params, batch_stats, frozen, batch, rng)
      -> (loss, (new_batch_stats, metrics))                  pure, jittable
  predict(params, batch_stats, images) -> logits             eval mode
  model, model_key                                          the deployable
      model and its key in params/batch_stats
`frozen` holds the variables of frozen modules (a teacher), passed to the
jitted step as an argument so they are never baked into the compiled program
and never saved with the trainable state.
"""
from kd_jax.methods.distill import Distill
from kd_jax.methods.mutual import Mutual
from kd_jax.methods.supervised import Supervised

METHODS = {"supervised": Supervised, "distill": Distill, "mutual": Mutual}


def build(name: str, **kwargs):
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of "
                     f"{sorted(METHODS)}")
  return METHODS[name](**kwargs)
