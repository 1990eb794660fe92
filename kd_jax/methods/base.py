"""The protocol every method follows, and what the trainer hands it.

A method is a class registered by name in `kd_jax.methods.METHODS`. It builds
itself from its stage config, so adding a method touches `kd_jax/methods/`
only; the trainer looks it up by the stage's `method` and never compares a
name:

    class MyMethod:
      model_key = "student"          # the deployable model's key in params
      stage_keys = frozenset({"teacher"})   # stage keys it reads beyond
                                            # COMMON_STAGE_KEYS

      @classmethod
      def check(cls, stage, ctx): ...        # optional: config errors that
                                             # need no model (a folder, an
                                             # earlier stage), one line each
      @classmethod
      def from_config(cls, stage, ctx):      # -> (method, frozen variables)
        ...

      def init(self, rng, images): ...                 # see kd_jax.methods
      def loss_fn(self, params, batch_stats, frozen, batch, rng): ...
      def predict(self, params, batch_stats, images): ...

A method with several parameter groups, each with its own optimizer, names
them (group -> the top-level keys of params it owns) and may update them in
turn inside the one jitted step with an `update` of its own (without one,
every group takes one gradient step of `loss_fn`, `common.default_update`):

      param_groups = {"student": ("student", "connectors"),
                      "critic": ("critic",)}
      def update(self, opt, params, batch_stats, opt_state, frozen, batch,
                 rng): ...
          # -> (params, batch_stats, opt_state, metrics); opt.apply(group,
          # grads, ...) updates a group, metrics hold `loss` and
          # `grad_norm`

The stage's `optimizers=dict(<group>=dict(...))` sets a group's optimizer
over the stage's `optimizer` (`kd_jax.train.make_optimizers`).

What is deployed is `params[model_key]`'s model unless a method says
otherwise (MED-TEX deploys explainer + student):

      deployed_keys = ("explainer", "student")   # params keys exported
      deployed = <a flax module over those keys>  # what export.load rebuilds
      deployed_features = ("mask",)               # features the exported
                                                  # function returns too

A method may return images to log at each evaluation (clu's
`writer.write_images`, e.g. MED-TEX's masks Θ) for a few fixed val images
(N, H, W, C), eval mode; a pure function of arrays, which the trainer jits
once (`train.make_images_step`):

      def eval_images(self, params, batch_stats, images):
        ...   # -> {name: (n, h, w, 1 or 3) float array in [0, 1]}

`stage` is the stage's settings as plain Python values (`train.stage_config`:
`method`, `model`, `losses` as a list of term dicts, `steps`, `optimizer`, and
the method's own keys). `ctx` is a `Context`: what only the trainer knows.
Errors are `ValueError`s of one line naming the key and the fix; the trainer
prefixes the stage's name.
"""
import dataclasses
from typing import Any, Callable, ClassVar, Protocol

# Stage keys the trainer reads (or hands every method): any other key of a
# stage must be in its method's `stage_keys`.
COMMON_STAGE_KEYS = frozenset({"method", "model", "losses", "steps",
                               "optimizer", "optimizers", "seed", "data"})


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method needs from the trainer to build itself.

  build_model: model config dict (`dict(name=..., **fields)`) -> flax module,
      with the run's compute dtype, the data's `num_classes` (for models that
      take one, unless the config sets it) and `config.layers` applied; its
      errors are ValueErrors naming the model's choices.
  stage: the stage's name, for messages.
  workdir: the run's folder; stage `s` trains in `<workdir>/<s>`.
  earlier_stages: the stages before this one in `stage_order` (a frozen
      model may come from one of them, never from a later one).
  load_frozen: False to build without loading frozen variables (checkpoints
      need not exist yet); `from_config` then returns None for them.
  heads: the run's heads (`kd_jax.tasks.from_config`): which outputs the
      models return and which batch key each one's labels come from; the
      method builds its loss inputs with `kd_jax.tasks.objective_inputs`.
  """
  build_model: Callable[[dict], Any]
  stage: str = ""
  workdir: str = ""
  earlier_stages: tuple = ()
  load_frozen: bool = True
  heads: Any = None


class Method(Protocol):
  """The structural type of a method (see the module docstring)."""
  model_key: ClassVar[str]
  stage_keys: ClassVar[frozenset]
  model: Any

  @classmethod
  def from_config(cls, stage: dict, ctx: Context) -> tuple["Method", Any]:
    ...

  def init(self, rng, images) -> dict:
    ...

  def loss_fn(self, params, batch_stats, frozen, batch, rng):
    ...

  def predict(self, params, batch_stats, images):
    ...


def is_set(value) -> bool:
  """A stage key set to None or an empty value counts as absent."""
  return value is not None and not (hasattr(value, "__len__")
                                    and len(value) == 0)
