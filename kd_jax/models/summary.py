"""Parameter and FLOP counts of a model, without running it.

    from kd_jax import models
    models.summary(models.build("resnet50"), (1, 224, 224, 3))
    # {"params": 25557032, "batch_stats": 53120, "flops": 8.0e9}

* `params` counts the `"params"` collection only (what an optimizer trains);
  `batch_stats` counts the BatchNorm running statistics (and spectral-norm
  state) separately. Both come from `jax.eval_shape(model.init, ...)`, so no
  memory is allocated and even PSPNet-ResNet101 counts in about a second.
* `flops` is XLA's cost analysis of the jitted eval-mode forward
  (`model.apply(variables, x, train=False)`), lowered as for a GPU and
  never run. XLA counts a multiply-add as two FLOPs, so ResNet-50 at 224² reads ≈ 8.0e9
  where papers quoting "GFLOPs" as multiply-adds say 4.1. Elementwise work
  (BatchNorm, activations, resizes) is included; convolution taps that fall
  on zero padding are not. The number is for the
  whole `input_shape` batch: use batch 1 for a per-image figure.

Default inputs, for `benchmarks/model_table.py` and `default_input(name)`:
every model module declares a module-level dict

    DEFAULT_INPUT = {"resnet50": (224, 224, 3), ...}   # registered name → HWC

(no batch dimension) and, optionally,

    RECIPES = {"resnet50": "multi-task KD (teacher trunk)", ...}  # free text

naming the recipe(s) that use each registered model, and, only where the
constructor has required arguments,

    DEFAULT_KWARGS = {"unet": dict(num_classes=9), ...}  # for build(name, **kw)

A constructor class may instead carry a `DEFAULT_INPUT` class attribute (an
HWC tuple). A model missing from both gets (224, 224, 3). The table builds
each model with `build(name, **DEFAULT_KWARGS.get(name, {}))`.
"""
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.models import registry

FALLBACK_INPUT = (224, 224, 3)


def _count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def _flops(cost: Any) -> float:
  # jax < 0.4.30 returns a list with one dict per computation; newer a dict.
  if isinstance(cost, (list, tuple)):
    return float(sum(c.get("flops", 0.0) for c in cost if c))
  return float((cost or {}).get("flops", 0.0))


def summary(model, input_shape, *, dtype=jnp.float32) -> dict:
  """Returns dict(params=int, batch_stats=int, flops=float) for `model`.

  Args:
    model: a Flax linen module following the models contract
      (`__call__(x, *, train)`).
    input_shape: the full input shape including the batch, e.g.
      (1, 224, 224, 3).
    dtype: the input's dtype (the model's own `dtype` field sets its compute
      dtype).
  """
  x = jax.ShapeDtypeStruct(tuple(input_shape), dtype)

  def init(x):
    return model.init(jax.random.PRNGKey(0), x, train=False)

  variables = jax.eval_shape(init, x)

  def forward(variables, x):
    return model.apply(variables, x, train=False)

  # Lowering for another platform needs no such device.
  lowered = jax.jit(forward).trace(variables, x).lower(
      lowering_platforms=("cuda",))
  return dict(
      params=_count(variables.get("params", {})),
      batch_stats=_count(variables.get("batch_stats", {})),
      flops=_flops(lowered.cost_analysis()),
  )


def _module_attr(name: str, attr: str):
  ctor = registry._MODELS[name]  # pylint: disable=protected-access
  module = sys.modules.get(getattr(ctor, "__module__", ""), None)
  table = getattr(module, attr, None) or {}
  return table.get(name), ctor


def default_input(name: str, batch: int = 1) -> tuple:
  """The default input shape (batch, H, W, C) of registered model `name`."""
  if name not in registry._MODELS:  # pylint: disable=protected-access
    raise ValueError(f"unknown model {name!r}; choose one of {registry.names()}")
  shape, ctor = _module_attr(name, "DEFAULT_INPUT")
  if shape is None:
    shape = getattr(ctor, "DEFAULT_INPUT", None) or FALLBACK_INPUT
  return (batch, *shape)


def default_kwargs(name: str) -> dict:
  """The keyword arguments the model table builds `name` with (often {})."""
  kwargs, _ = _module_attr(name, "DEFAULT_KWARGS")
  return dict(kwargs or {})


def recipes(name: str) -> str:
  """The free-text recipe note a model module declares for `name`, or ''."""
  note, _ = _module_attr(name, "RECIPES")
  return note or ""
