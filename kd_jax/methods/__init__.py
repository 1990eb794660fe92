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

Each method class builds itself from its stage config
(`from_config(stage, ctx) -> (method, frozen)`), declares the stage keys it
reads beyond the common ones (`stage_keys`) and may check its config before
anything trains (`check(stage, ctx)`); see `kd_jax.methods.base`. `METHODS`
is the one lookup by name: a new method is a module here and an entry there.
"""
from kd_jax.methods.base import COMMON_STAGE_KEYS, Context, Method, is_set
from kd_jax.methods.common import ParamGroups, default_update
from kd_jax.methods.adversarial import Adversarial
from kd_jax.methods.distill import Distill
from kd_jax.methods.explain import Explain
from kd_jax.methods.mutual import Mutual
from kd_jax.methods.supervised import Supervised

METHODS = {"supervised": Supervised, "distill": Distill, "mutual": Mutual,
           "adversarial": Adversarial, "explain": Explain}


def get(name: str):
  """The method class registered as `name`."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of "
                     f"{sorted(METHODS)}")
  return METHODS[name]


def build(name: str, **kwargs):
  """Method `name` from its constructor's arguments (models, loss terms)."""
  return get(name)(**kwargs)


def stage_keys(name: str) -> frozenset:
  """The stage keys method `name` reads."""
  return COMMON_STAGE_KEYS | getattr(get(name), "stage_keys", frozenset())


def check_stage_keys(stage: dict) -> None:
  """Raises ValueError (one line) on a stage key that the stage's method does
  not read: a key no method reads is unknown (the message lists the keys this
  method reads); a key of another method, set to a value, names that method
  (set to None or empty, it is ignored)."""
  name = stage["method"]
  allowed = stage_keys(name)
  # In METHODS' order, so the plainest reader is the one suggested.
  readers = {k: [m for m in METHODS if k in stage_keys(m)]
             for k in stage if k not in allowed}
  unknown = sorted(k for k, r in readers.items() if not r)
  if unknown:
    raise ValueError(f"unknown keys {unknown} for method {name!r}; "
                     f"allowed: {sorted(allowed)}")
  other = sorted(k for k, r in readers.items() if is_set(stage[k]))
  if other:
    key, by = other[0], readers[other[0]]
    raise ValueError(
        f"{key!r} is read by method {' or '.join(map(repr, by))} only, not "
        f"{name!r}: remove it, or set method={by[0]!r}")


def check(stage: dict, ctx: Context) -> None:
  """The stage's config checks that need no model: its keys, then its
  method's own `check` (an earlier teacher stage, a checkpoint folder, ...)."""
  check_stage_keys(stage)
  method = get(stage["method"])
  if hasattr(method, "check"):
    method.check(stage, ctx)


def from_config(stage: dict, ctx: Context):
  """(method, frozen variables) for `stage`, built by its method's class."""
  return get(stage["method"]).from_config(stage, ctx)
