"""Pieces every method shares: applying linen models in train and eval mode,
and the stage's optimizer(s) as parameter groups."""
import dataclasses

import jax
import optax


def apply_train(model, params, batch_stats, images, rng):
  """Forward in train mode; returns ((logits, features), new_batch_stats)."""
  out, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, images, train=True,
      rngs={"dropout": rng}, mutable=["batch_stats"])
  return out, updates.get("batch_stats", batch_stats)


def apply_eval(model, params, batch_stats, images):
  """Forward in eval mode (running BatchNorm averages, no dropout)."""
  return model.apply({"params": params, "batch_stats": batch_stats}, images,
                     train=False)


def _extra_args(tx, loss):
  # The loss, for transformations that read it (reduce_on_plateau).
  return ({"value": loss}
          if isinstance(tx, optax.GradientTransformationExtraArgs) else {})


@dataclasses.dataclass(frozen=True)
class ParamGroups:
  """The stage's optimizers over the trainable parameters.

  `keys` None: one optax transformation over all of `params`, its state the
  transformation's own (the common case). Otherwise `keys` maps each group
  to the top-level keys of `params` it owns (a method's `param_groups`,
  e.g. student + connectors, critic) and `txs` holds one transformation per
  group, each with its own settings, schedule and state: the optimizer state
  is then `{group: state}`, one pytree, so a checkpoint holds every group's
  state and a resumed run continues each exactly.
  """
  txs: dict
  keys: dict | None = None

  @classmethod
  def single(cls, tx):
    return cls({None: tx})

  @property
  def groups(self) -> tuple:
    return tuple(self.txs)

  def part(self, tree, group):
    """The entries of `tree` (params or gradients) that `group` owns."""
    return {k: tree[k] for k in self.keys[group]}

  def init(self, params):
    if self.keys is None:
      return self.txs[None].init(params)
    owned = [k for g in self.txs for k in self.keys[g]]
    if sorted(owned) != sorted(params):
      raise ValueError(f"parameter groups {self.keys} must own each of the "
                       f"parameters {sorted(params)} exactly once")
    return {g: tx.init(self.part(params, g)) for g, tx in self.txs.items()}

  def apply(self, group, grads, opt_state, params, loss):
    """(params, opt_state) after one update of `group` alone from `grads` (a
    tree of that group's keys); every other group is left as it was.
    `loss` is handed to transformations that read it (plateau)."""
    tx = self.txs[group]
    if self.keys is None:
      updates, state = tx.update(grads, opt_state, params,
                                 **_extra_args(tx, loss))
      return optax.apply_updates(params, updates), state
    sub = self.part(params, group)
    updates, state = tx.update(self.part(grads, group), opt_state[group], sub,
                               **_extra_args(tx, loss))
    return ({**params, **optax.apply_updates(sub, updates)},
            {**opt_state, group: state})

  def apply_all(self, grads, opt_state, params, loss):
    """(params, opt_state) after one update of every group from `grads` (a
    tree like params), each group by its own transformation."""
    for group in self.txs:
      params, opt_state = self.apply(group, grads, opt_state, params, loss)
    return params, opt_state


def default_update(method, opt: ParamGroups, params, batch_stats, opt_state,
                   frozen, batch, rng):
  """One gradient step of every group on `method.loss_fn`: the update of
  every method that has no `update` of its own. Returns (params,
  batch_stats, opt_state, metrics) with `loss` and `grad_norm` in metrics."""

  def loss_fn(p):
    return method.loss_fn(p, batch_stats, frozen, batch, rng)

  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params)
  params, opt_state = opt.apply_all(grads, opt_state, params, loss)
  return params, batch_stats, opt_state, dict(
      metrics, loss=loss, grad_norm=optax.global_norm(grads))
