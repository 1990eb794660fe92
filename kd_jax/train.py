"""The generic training loop: every stage of every recipe runs through here.

A config lists stages (`config.stage_order`, `config.stages.<name>`); each
stage trains one method (supervised, distill, ...) in `<workdir>/<name>`,
with its own checkpoints and TensorBoard events, so each resumes on its own.
A distillation stage names its teacher as an earlier stage or a checkpoint
folder. After the stages, `report.md` compares every stage's model on the
test split.

The step is jitted once with explicit shardings over a (`data`, `fsdp`)
`Mesh` of all devices (`kd_jax.sharding`): the batch is split over every
device, the frozen teacher is sliced over `fsdp` (replicated when
`config.mesh.fsdp` is 1), the state is replicated or, with
`config.shard_student`, sliced like the teacher; the state is donated.
"""
import contextlib
import functools
import json
import math
import os
import signal
import socket
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kd_jax import (checkpoint, cpu_layers, data, methods, models, sharding,
                    tasks)
from kd_jax.evaluate import metrics as metrics_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so Orbax saves it as an array


# ----------------------------------------------------------------------------
# Building blocks, each usable on its own (tests, notebooks, benchmarks).


# A launcher of several processes names them here (a torchrun-like launch
# on hosts of your own); SLURM and TPU pods are found by jax itself.
PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
               "JAX_PROCESS_ID")


def initialize_processes(environ=None) -> bool:
  """`jax.distributed.initialize` when the environment says this process is
  one of several: JAX_COORDINATOR_ADDRESS (host:port of process 0),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID, all three; or a SLURM job of more
  than one task; or a TPU pod slice of more than one host. Call it before
  anything touches a device. Returns whether it initialized."""
  env = os.environ if environ is None else environ
  given = [k for k in PROCESS_ENV if env.get(k)]
  if given:
    if len(given) != len(PROCESS_ENV):
      raise ConfigError(f"several processes need all of {list(PROCESS_ENV)};"
                        f" only {given} are set")
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]))
    return True
  tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 or "," in tpu_hosts:
    jax.distributed.initialize()  # jax reads the cluster's environment.
    return True
  return False


def make_mesh(devices=None, fsdp: int = 1) -> Mesh:
  """The (data, fsdp) mesh (`kd_jax.sharding.make_mesh`); a size that does
  not divide the device count is a ConfigError."""
  try:
    return sharding.make_mesh(devices, fsdp)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def mesh_from_config(config) -> Mesh:
  """The run's mesh: `config.mesh.fsdp` devices per fsdp group (default
  1), the rest on `data`."""
  try:
    return sharding.mesh_from_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


SCHEDULES = ("cosine", "poly", "plateau")


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW (`b1`, `b2` optional; weight_decay 0 is Adam) or SGD (`nesterov`
  optional) with a learning-rate schedule after a linear warm-up:
  `cosine` (default), cosine decay to zero; `poly`, lr·(1 − t/T)^power
  (`power`, default 0.9; PSPNet's and Structured KD's schedule, T the steps
  after the warm-up); or `plateau`, the learning rate held and multiplied by
  `plateau.factor` whenever the training loss, averaged over
  `plateau.epoch_steps` steps, has not improved for `plateau.patience` such
  averages (optax's reduce_on_plateau; the train step passes it the loss)."""
  warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
  schedule_name = cfg.get("schedule", "cosine")
  if schedule_name == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup_steps=max(warmup, 1),
        decay_steps=max(total_steps, warmup + 1))
  elif schedule_name == "poly":
    power = float(cfg.get("power", 0.9))
    if not power > 0:
      raise ValueError(f"optimizer.power={power}: give a number > 0 (0.9 "
                       "in PSPNet and Structured KD)")
    schedule = optax.polynomial_schedule(
        cfg.lr, 0.0, power, transition_steps=max(total_steps - warmup, 1))
    if warmup:
      schedule = optax.join_schedules(
          [optax.linear_schedule(0.0, cfg.lr, warmup), schedule], [warmup])
  elif schedule_name == "plateau":
    schedule = optax.linear_schedule(0.0 if warmup else cfg.lr, cfg.lr,
                                     max(warmup, 1))
  else:
    raise ValueError(f"optimizer.schedule {schedule_name!r}: choose one of "
                     f"{list(SCHEDULES)}")
  if cfg.name == "adamw":
    opt = optax.adamw(schedule, b1=float(cfg.get("b1", 0.9)),
                      b2=float(cfg.get("b2", 0.999)),
                      weight_decay=cfg.weight_decay)
  elif cfg.name == "sgd":
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                      optax.sgd(schedule, momentum=cfg.momentum,
                                nesterov=bool(cfg.get("nesterov", False))))
  else:
    raise ValueError(f"optimizer.name {cfg.name!r}: choose 'adamw' or 'sgd'")
  if schedule_name == "plateau":
    p = cfg.get("plateau", {})
    opt = optax.chain(opt, optax.contrib.reduce_on_plateau(
        factor=float(p.get("factor", 0.1)),
        patience=int(p.get("patience", 5)),
        accumulation_size=int(p.get("epoch_steps", 1))))
  if cfg.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt


def make_optimizers(method, stage) -> methods.ParamGroups:
  """The optimizers of a stage (`stage_config`): one over all parameters,
  or, for a method with `param_groups`, one per group, each the stage's
  `optimizer` with the group's entries of `optimizers` over it
  (`optimizers=dict(critic=dict(name="adamw", lr=4e-4))`)."""
  groups = getattr(method, "param_groups", None)
  extra = stage.get("optimizers") or {}
  if not groups:
    if extra:
      raise ValueError(
          f"optimizers={sorted(extra)} sets one optimizer per parameter "
          f"group, but method {stage['method']!r} trains one group: set "
          "optimizer=dict(...) instead")
    return methods.ParamGroups.single(
        make_optimizer(stage["optimizer"], stage["steps"]))
  unknown = sorted(set(extra) - set(groups))
  if unknown:
    raise ValueError(f"optimizers.{unknown[0]}: method {stage['method']!r} "
                     f"has the parameter groups {sorted(groups)}")
  txs = {}
  for group in groups:
    cfg = ml_collections.ConfigDict(_plain(stage["optimizer"]))
    cfg.update(_plain(extra.get(group)) or {})
    try:
      txs[group] = make_optimizer(cfg, stage["steps"])
    except ValueError as e:
      raise ValueError(f"optimizers.{group}: {e}") from None
  return methods.ParamGroups(txs, dict(groups))


def _as_groups(tx) -> methods.ParamGroups:
  return tx if isinstance(tx, methods.ParamGroups) else (
      methods.ParamGroups.single(tx))


def init_state(method, tx, rng, images) -> TrainState:
  """The initial state; `tx` is an optax transformation or the stage's
  `make_optimizers`."""
  variables = method.init(rng, images)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=_as_groups(tx).init(variables["params"]),
      rng=jax.random.key_data(jax.random.fold_in(rng, 1)))


def watched(metrics) -> list[str]:
  """The step metrics whose non-finite value means divergence: `loss` and
  `grad_norm`, and each parameter group's own (`critic/loss`, ...)."""
  return [k for k in metrics
          if k.split("/")[-1] in ("loss", "grad_norm")]


# `config.remat`: each block of a model that offers it (a `remat` field,
# `kd_jax.models.remat`) keeps only its input for the backward pass and
# recomputes its inside there. True keeps nothing else; a policy name keeps
# what it names (matmul and convolution outputs, ...).
REMAT_POLICIES = {
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(config):
  """The models' `remat` field from `config.remat`: False (absent or
  False), True, or a jax.checkpoint policy (a name in REMAT_POLICIES)."""
  value = config.get("remat", False)
  if value is False or value is None or value is True:
    return bool(value)
  if not isinstance(value, str) or value not in REMAT_POLICIES:
    raise ConfigError(f"config.remat={value!r}: give False, True or one of "
                      f"{sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[value]


def check_remat(config, model_name):
  """A ConfigError when `config.remat` is on and the trained model
  `model_name` has no `remat` field (it would change nothing)."""
  if remat_policy(config) is not False and not models.accepts(model_name,
                                                               "remat"):
    offer = [n for n in models.names() if models.accepts(n, "remat")]
    raise ConfigError(f"config.remat={config.remat!r}: model {model_name!r} "
                      f"has no per-block remat (models with it: {offer}); "
                      "set --config.remat=False")


def make_train_step(method, tx, skip_nonfinite=False):
  """The pure train step: (state, batch, frozen) -> (state, metrics).

  `tx` is an optax transformation or the stage's `make_optimizers`. The
  update is the method's own `update` when it has one (several parameter
  groups updated in turn, e.g. a critic and a student), else one gradient
  step of `method.loss_fn` (`methods.default_update`).

  With `skip_nonfinite`, a step with a non-finite `watched` metric leaves
  params, batch_stats and optimizer state as they were (only `step`
  advances, so the data and the random keys stay where an unskipped run's
  are) and reports `skipped` = 1 in its metrics."""
  opt = _as_groups(tx)
  update = getattr(method, "update", None) or functools.partial(
      methods.default_update, method)

  def train_step(state, batch, frozen):
    batch = data.pipeline.decode(batch)  # The image as float32 again.
    # `data.augment_on_device`: the host's draws applied here, batched.
    batch = data.device_augment.apply(batch)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    params, batch_stats, opt_state, metrics = update(
        opt, state.params, state.batch_stats, state.opt_state, frozen, batch,
        rng)
    if skip_nonfinite:
      # A select inside the jitted step: no host round trip to decide.
      ok = jnp.all(jnp.stack([jnp.isfinite(metrics[k])
                              for k in watched(metrics)]))
      params, batch_stats, opt_state = jax.tree.map(
          lambda new, old: jnp.where(ok, new, old),
          (params, batch_stats, opt_state),
          (state.params, state.batch_stats, state.opt_state))
      metrics["skipped"] = jnp.logical_not(ok).astype(jnp.float32)
    return state.replace(step=state.step + 1, params=params,
                         batch_stats=batch_stats, opt_state=opt_state), metrics

  return train_step


def jit_train_step(train_step, mesh: Mesh, state_shardings=None,
                   frozen_shardings=None):
  """jit with the batch split over every device; the state and the frozen
  variables on their shardings (`kd_jax.sharding`; default replicated).
  The metrics are replicated."""
  rep = NamedSharding(mesh, P())
  return jax.jit(train_step,
                 in_shardings=(state_shardings or rep,
                               sharding.batch_sharding(mesh),
                               frozen_shardings or rep),
                 out_shardings=(state_shardings or rep, rep),
                 donate_argnums=(0,))


def eval_predict(predict, config):
  """An eval forward `predict(params, batch_stats, images)` (a method's
  `predict`) as the run evaluates it: with `config.eval_window` = N > 0 on
  N² sliding windows (`metrics.sliding_window`), for models trained on N²
  crops; else on whole images."""
  window = int(config.get("eval_window", 0))
  return metrics_lib.sliding_window(predict, window) if window else predict


def make_eval_step(method, heads, mesh: Mesh, config=None):
  """Jitted (params, batch_stats, batch) -> per-head pieces of the scores
  (`kd_jax.tasks.make_eval_step`), of `eval_predict` under `config`."""
  predict = (method.predict if config is None
             else eval_predict(method.predict, config))
  return tasks.make_eval_step(predict, heads, mesh)


def make_images_step(method, mesh: Mesh, source):
  """state -> the method's `eval_images` of the first 4 images of `source`
  (the val split) as numpy arrays, jitted once; None when the method logs no
  images. The images (the same on every process) are placed whole on every
  device once, and the results come back whole."""
  if not hasattr(method, "eval_images"):
    return None
  images = np.stack([source[i]["image"] for i in range(min(4, len(source)))])
  whole = NamedSharding(mesh, P())
  step = jax.jit(method.eval_images, out_shardings=whole)
  placed = jax.make_array_from_callback(images.shape, whole,
                                        lambda index: images[index])

  def images_step(state):
    return jax.device_get(step(state.params, state.batch_stats, placed))

  return images_step


def to_global(batch, mesh: Mesh):
  """This process's numpy batch → global jax arrays split over every
  device."""
  split = sharding.batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(split, x), batch)


def evaluate(eval_step, state, source, batch_size, mesh, heads) -> dict:
  """Every head's scores (`kd_jax.tasks`) of the state's model over a whole
  source."""
  return tasks.evaluate(eval_step, state.params, state.batch_stats, source,
                        batch_size, mesh, heads, to_global)


# ----------------------------------------------------------------------------
# Stages.


def loss_terms(spec) -> list[dict]:
  """A stage's loss terms as a list of dicts.

  `spec` is a list of term dicts, or a dict of named terms
  (`dict(kd=dict(fn="kd_kl", ...))`), the form whose values can be
  overridden on the command line (`--config.stages.x.losses.kd.weight=2`).
  """
  if hasattr(spec, "items"):
    return [dict(t, name=t.get("name", k)) for k, t in spec.items()]
  return [dict(t) for t in spec]


def _plain(value):
  return value.to_dict() if hasattr(value, "to_dict") else value


def stage_config(config, name):
  """The stage's settings with the run-wide defaults filled in, as plain
  Python values: `method`, `model`, `losses` (a list of term dicts), `steps`,
  `optimizer`, `seed`, `data` (the run's data options with the stage's
  overrides), and whatever keys the stage's method reads (`teacher`,
  `peer`, ...; see `kd_jax.methods`)."""
  stage = config.stages[name]
  opt = config.optimizer.copy_and_resolve_references()
  opt.update(stage.get("optimizer", {}))
  out = {k: _plain(v) for k, v in stage.items()}
  out.update(method=stage.get("method"), model=_plain(stage.get("model")),
             losses=loss_terms(stage.get("losses", {})),
             steps=int(stage.get("steps", config.steps)), optimizer=opt,
             seed=int(stage.get("seed", config.seed)),
             data=stage_data(config, name))
  return out


# The data options a stage may change: what it trains on, never what every
# stage is evaluated on (the split, the image size), so the report's rows
# stay comparable.
STAGE_DATA_KEYS = ("unlabelled", "train_fraction", "max_train", "augment",
                   "scale_range")


def stage_data(config, name) -> dict:
  """The run's `config.data` with stage `name`'s `data` overrides."""
  merged = _plain(config.data)
  merged = dict(merged) if merged else {}
  override = _plain(config.stages[name].get("data")) or {}
  bad = sorted(set(override) - set(STAGE_DATA_KEYS))
  if bad:
    raise ConfigError(f"stage {name!r}: data.{bad[0]} cannot differ between "
                      f"stages (every stage is evaluated on the same "
                      f"splits); a stage may set {list(STAGE_DATA_KEYS)}")
  merged.update(override)
  return merged


# `config.layers`: "flax" (flax's own layers) or "cpu" (kd_jax.cpu_layers'
# pure-JAX forms on a CPU backend, flax's on any other).
LAYERS = ("flax", "cpu")


def _build_model(model_cfg, num_classes, dtype, layers="flax", remat=False):
  """The flax module of `model_cfg` (`dict(name=..., **fields)`) in `dtype`,
  with the data's `num_classes` when its constructor takes one and the config
  does not set it, kd_jax.cpu_layers' forms when `layers == "cpu"`, and
  `remat` (`remat_policy`) in its `remat` field when it has one and
  `remat` is on."""
  if not hasattr(model_cfg, "keys") or not model_cfg.get("name"):
    raise ValueError(f"a model is dict(name=<model>, ...); got "
                     f"{model_cfg!r}; models: {', '.join(models.names())}")
  cfg = dict(model_cfg)
  name = cfg.pop("name")
  if models.accepts(name, "num_classes"):
    cfg.setdefault("num_classes", num_classes)
  if remat is not False and models.accepts(name, "remat"):
    cfg.setdefault("remat", remat)
  model = models.build(name, dtype=dtype, **cfg)
  return cpu_layers.apply(model) if layers == "cpu" else model


class ConfigError(ValueError):
  """A config that cannot run; raised before anything trains."""


class WorkdirLocked(ConfigError):
  """Another live process runs a stage of this workdir."""


class TrainingDiverged(RuntimeError):
  """A stage's loss or gradient went non-finite (`config.on_nonfinite`);
  raised before that state is logged, evaluated or saved."""


# `config.on_nonfinite`: what a step with a non-finite loss or gradient norm
# does. "stop" stops the stage, naming the step and the terms; "skip" leaves
# the state unchanged for that step and stops only once more than
# `config.max_skipped_steps` steps of this run of the stage were skipped.
ON_NONFINITE = ("stop", "skip")
DEFAULT_MAX_SKIPPED_STEPS = 10


def nonfinite_policy(config) -> tuple[str, int]:
  """(on_nonfinite, max_skipped_steps) of `config`, checked."""
  mode = config.get("on_nonfinite", "stop")
  if mode not in ON_NONFINITE:
    raise ConfigError(f"config.on_nonfinite={mode!r}: choose one of "
                      f"{list(ON_NONFINITE)}")
  n = config.get("max_skipped_steps", DEFAULT_MAX_SKIPPED_STEPS)
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ConfigError(f"config.max_skipped_steps={n!r}: give a whole number "
                      ">= 0 (how many non-finite steps on_nonfinite='skip' "
                      "may skip before the stage stops)")
  return mode, int(n)


def build_context(config, name, workdir, num_classes, load_frozen=True,
                  heads=None):
  """The `methods.Context` of stage `name`: what its method needs from the
  run to build itself. `heads` (`kd_jax.tasks.from_config`) defaults to one
  segmentation output of `num_classes` reading "label"."""
  order = list(config.stage_order)
  if heads is None:
    heads = {None: tasks.Head(None, "label", "segmentation", num_classes)}
  return methods.Context(
      build_model=functools.partial(
          _build_model, num_classes=num_classes,
          dtype=jnp.dtype(config.compute_dtype),
          layers=config.get("layers", "flax"),
          remat=remat_policy(config)),
      stage=name, workdir=workdir,
      earlier_stages=tuple(order[:order.index(name)] if name in order
                           else order),
      load_frozen=load_frozen, heads=heads)


def build_method(config, name, workdir, num_classes, load_teacher=True,
                 heads=None):
  """(method, frozen variables) for stage `name`, built by its method's
  class (`methods.from_config`).

  With `load_teacher=False` frozen models are built but not loaded (frozen is
  None): enough to check the stage's wiring before anything trains.
  """
  s = stage_config(config, name)
  methods.check_stage_keys(s)
  return methods.from_config(s, build_context(config, name, workdir,
                                              num_classes, load_teacher,
                                              heads))


def run_heads(config, datasets) -> dict:
  """The run's heads (`config.heads`, or the one "label" output)."""
  try:
    return tasks.from_config(config.get("heads"), datasets.targets)
  except ValueError as e:
    raise ConfigError(str(e)) from None


# Run-wide keys. `epochs` is a config's own FieldReference that its `steps`
# are computed from; `study` holds a study's settings (kd_jax.study).
CONFIG_KEYS = {"seed", "compute_dtype", "layers", "batch_size", "steps",
               "epochs", "log_every", "eval_every", "checkpoint_every",
               "optimizer", "data", "heads", "stage_order", "stages",
               "teacher_cache", "teacher_cache_dtype", "teacher_cache_top_k",
               "study", "on_nonfinite", "max_skipped_steps",
               "mesh", "shard_student", "remat", "eval_window"}


def validate(config, workdir, datasets, cache=None) -> None:
  """Checks the run-wide keys and every stage's keys, models, losses,
  teacher and feature wiring before anything trains, so a typo never costs a
  finished stage."""
  bad = set(config) - CONFIG_KEYS
  if bad:
    raise ConfigError(f"unknown config keys {sorted(bad)}; allowed: "
                     f"{sorted(CONFIG_KEYS)}")
  if config.get("layers", "flax") not in LAYERS:
    raise ConfigError(f"config.layers={config.layers!r}; choose one of "
                      f"{list(LAYERS)}")
  nonfinite_policy(config)
  mesh_from_config(config)  # Its size divides the device count.
  remat_policy(config)
  if not isinstance(config.get("shard_student", False), bool):
    raise ConfigError(f"config.shard_student={config.shard_student!r}: give "
                      "True or False")
  from kd_jax import checks, teacher_cache  # pylint: disable=g-import-not-at-top
  checks.run_values(config, workdir)
  order = list(config.stage_order)
  unknown = [n for n in order if n not in config.stages]
  if unknown or not order:
    raise ConfigError(f"stage_order {order} names stages not in "
                     f"config.stages {sorted(config.stages)}")
  # Shared with the caller's `stage_datasets`: a stage's data (an
  # unlabelled pool read from other data sets) is built once per run.
  cache = {} if cache is None else cache
  for name in order:
    try:
      ds = stage_datasets(config, name, datasets, cache)
      heads = run_heads(config, ds)
      if config.get("eval_window") and not tasks.is_segmentation(heads):
        raise ConfigError(f"config.eval_window={config.eval_window}: "
                          "sliding-window evaluation is for one segmentation "
                          "output; set eval_window=0")
      image = ds.train[0]["image"]
      example = jnp.zeros((1,) + image.shape, jnp.float32)
      if config.data.get("transfer_dtype") == "uint8":
        data.pipeline.check_uint8_range(image)
      s = stage_config(config, name)
      ctx = build_context(config, name, workdir, ds.num_classes, False,
                          heads)
      # Its keys, then what the method checks without a model (an earlier
      # teacher stage, a checkpoint folder, ...).
      methods.check(s, ctx)
      method, _ = methods.from_config(s, ctx)
      check_remat(config, s["model"]["name"])
      out, feats = jax.eval_shape(functools.partial(
          method.model.init_with_output, train=False),
                                  jax.random.key(0), example)[0]
      tasks.check_outputs(heads, out, f"model {s['model']['name']!r}")
      for term in s["losses"]:
        if term.get("output") and term["output"] not in feats:
          raise ValueError(
              f"loss term {term.get('name', term['fn'])!r} reads output "
              f"{term['output']!r}; model {s['model']['name']!r} offers "
              f"{sorted(feats)}")
      tasks.check_terms(heads, s["losses"])
      checks.stage_values(config, s, ds)  # After the method's own checks.
      checks.teachers(config, s, ctx, ds.num_classes, example)
      tx = make_optimizers(method, s)
      jax.eval_shape(functools.partial(init_state, method, tx,
                                       jax.random.key(0)), example)
      if ds.unlabelled is not None:
        data.check_unlabelled(ds, config.batch_size)
    except ConfigError:
      raise
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
      raise ConfigError(f"stage {name!r}: {e}") from None
    if teacher_cache.wanted(config, method):
      teacher_cache.check(config, name, method, ds)


def stage_datasets(config, name, datasets, cache=None):
  """The data stage `name` trains on: the run's `datasets`, or, when the
  stage overrides `data` (`STAGE_DATA_KEYS`), those options' data sets
  (built once per distinct options in `cache`)."""
  if not config.stages[name].get("data"):
    return datasets
  options = stage_data(config, name)
  key = json.dumps(options, sort_keys=True, default=str)
  cache = {} if cache is None else cache
  if key not in cache:
    cache[key] = data.build(options)
  return cache[key]


def _append_history(stage_dir, step, scalars):
  """The scalars also go to `history.jsonl` (one JSON object per line), which
  the report plots without reading TensorBoard files. After a resume, a step
  may appear twice; the later line wins."""
  if jax.process_index() == 0:
    with open(os.path.join(stage_dir, "history.jsonl"), "a") as f:
      f.write(json.dumps(dict(scalars, step=step)) + "\n")


def read_history(stage_dir) -> dict:
  """{metric: (steps, values)} from a stage's `history.jsonl`."""
  by_step = {}
  path = os.path.join(stage_dir, "history.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        by_step.setdefault(row.pop("step"), {}).update(row)
  series = {}
  for step in sorted(by_step):
    for k, v in by_step[step].items():
      series.setdefault(k, ([], []))
      series[k][0].append(step)
      series[k][1].append(v)
  return series


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so it can checkpoint first."""

  def __init__(self):
    self.requested = False

  def __enter__(self):
    self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint and stopping")
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._old)

  def agreed(self) -> bool:
    """Whether any process was asked to stop (every process calls this at
    the same steps, so all stop and save the same step)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(
        np.int32(self.requested))))


# ----------------------------------------------------------------------------
# Workdir lock: one run per stage folder. Two runs on one workdir would
# overwrite each other's checkpoints and report without a word.

LOCK_FILE = "lock"
# Lock files this process holds: path -> how many nested holds (a run locks
# every stage up front, then `train_stage` locks its own again).
_held_locks: dict = {}


def _process_start(pid: int):
  """`pid`'s start time (clock ticks after boot, Linux), which tells the
  process that wrote a lock from a later one given the same pid; None where
  unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _lock_owner_alive(owner: dict) -> bool:
  """Whether the process that wrote lock contents `owner` may still run.
  A lock of another host cannot be checked from here: taken as alive."""
  if owner.get("host") != socket.gethostname():
    return True
  pid = owner.get("pid")
  if not isinstance(pid, int) or pid == os.getpid():
    # This process does not hold it (see stage_lock), so a lock with its pid
    # was left by an earlier process given the same pid (a container
    # restart).
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Alive, another user's.
  start = _process_start(pid)
  return owner.get("start") is None or start is None or start == owner["start"]


def _read_lock(path: str):
  """The lock file's contents, or None while they are not (yet) a whole
  JSON object (written just now, or cut short by a kill)."""
  try:
    with open(path, encoding="utf-8") as f:
      owner = json.load(f)
  except (OSError, ValueError):
    return None
  return owner if isinstance(owner, dict) else None


def _acquire_lock(path: str, workdir: str) -> None:
  me = {"pid": os.getpid(), "host": socket.gethostname(),
        "start": _process_start(os.getpid()), "time": time.time()}
  for attempt in range(20):
    try:
      # O_EXCL: of two runs creating it at once, exactly one succeeds.
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      owner = _read_lock(path)
      if owner is None and attempt < 5:
        time.sleep(0.1)  # Its writer may be between create and write.
        continue
      if owner is not None and _lock_owner_alive(owner):
        raise WorkdirLocked(
            f"workdir {workdir} is in use by pid {owner.get('pid')} on "
            f"{owner.get('host')} (lock {path}): wait for that run to end, "
            "or use another --workdir") from None
      # Stale: move it aside under a name of our own, so that of two runs
      # replacing it at once only one succeeds, then check that what moved
      # is the stale lock and not the other run's fresh one.
      aside = f"{path}.stale-{os.getpid()}"
      try:
        os.rename(path, aside)
      except FileNotFoundError:
        continue
      if _read_lock(aside) != owner:
        with contextlib.suppress(FileExistsError):
          os.link(aside, path)  # Put the other run's lock back.
        os.remove(aside)
        continue
      os.remove(aside)
      logging.warning("removed the stale lock %s of pid %s on %s, which no "
                      "longer runs", path, (owner or {}).get("pid"),
                      (owner or {}).get("host"))
      continue
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(me, f)
    return
  raise WorkdirLocked(f"workdir {workdir}: could not take the lock {path}")


def _release_lock(path: str) -> None:
  owner = _read_lock(path)
  if owner and owner.get("pid") == os.getpid() and (
      owner.get("host") == socket.gethostname()):
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


@contextlib.contextmanager
def stage_lock(stage_dir: str, workdir: str | None = None):
  """Holds `<stage_dir>/lock` (pid and host) while the block runs, released
  however the block ends (an error, SIGTERM's SystemExit). A lock of a live
  process raises WorkdirLocked naming `workdir` and its pid; one whose
  process is gone from this host is replaced, with one line logged. Nested
  holds in one process are fine. In a multi-process run only process 0
  locks."""
  if jax.process_index() != 0:
    yield
    return
  path = os.path.abspath(os.path.join(stage_dir, LOCK_FILE))
  created = False
  if path not in _held_locks:
    created = not os.path.isdir(stage_dir)
    os.makedirs(stage_dir, exist_ok=True)
    try:
      _acquire_lock(path, workdir or os.path.dirname(
          os.path.abspath(stage_dir)))
    except WorkdirLocked:
      _remove_if_empty(stage_dir, created)
      raise
    _held_locks[path] = 0
  _held_locks[path] += 1
  try:
    yield
  finally:
    _held_locks[path] -= 1
    if not _held_locks[path]:
      del _held_locks[path]
      _release_lock(path)
      # A run refused by a later stage's lock leaves no empty stage folder.
      _remove_if_empty(stage_dir, created)


def _remove_if_empty(directory: str, created: bool) -> None:
  if created:
    with contextlib.suppress(OSError):
      os.rmdir(directory)  # Fails, as wanted, once anything is inside.


# ----------------------------------------------------------------------------
# Non-finite losses (`config.on_nonfinite`).


class _StepMetrics:
  """The per-step metrics since the last log step.

  They stay on the device (no host sync per step, so dispatch runs ahead)
  until `check`, which the loop calls where it waits for the device anyway:
  a log step, an evaluation, a checkpoint save. `check` moves the unchecked
  steps' metrics to the host in one transfer and raises TrainingDiverged at
  the first non-finite step (or, when skipping, at the skip one over the
  limit), so no non-finite state is logged, evaluated or saved."""

  def __init__(self, stage, mode, max_skipped, last_checkpoint):
    self.stage, self.mode, self.max_skipped = stage, mode, max_skipped
    self.last_checkpoint = last_checkpoint  # () -> step or None
    self.pending = []  # (step, device metrics), not yet checked
    self.checked = []  # (step, host metrics), checked since the last means
    self.skipped = 0  # steps skipped in this run of the stage

  def add(self, step, metrics):
    self.pending.append((step, metrics))

  def _diverged(self, text):
    last = self.last_checkpoint()
    kept = (f"the newest checkpoint (step {last}) is from before it"
            if last is not None else "no checkpoint was saved")
    return TrainingDiverged(
        f"stage {self.stage!r} {text}; {kept}. Lower "
        "--config.optimizer.lr or set optimizer.grad_clip, or set "
        "on_nonfinite='skip' to skip such steps")

  def check(self):
    if not self.pending:
      return
    steps = [step for step, _ in self.pending]
    host = jax.device_get(jax.tree.map(lambda *x: jnp.stack(x),
                                       *[m for _, m in self.pending]))
    self.pending = []
    for i, step in enumerate(steps):
      m = {k: float(v[i]) for k, v in host.items()}
      self.checked.append((step, m))
      bad = ", ".join(sorted(k for k, v in m.items() if not math.isfinite(v)))
      if m.get("skipped"):
        self.skipped += 1
        if self.skipped > self.max_skipped:
          raise self._diverged(
              f"skipped {self.skipped} steps for a non-finite loss or "
              f"gradient, more than max_skipped_steps={self.max_skipped} "
              f"(the last at step {step}: non-finite {bad})")
      elif not all(math.isfinite(m[k]) for k in watched(m)):
        raise self._diverged(f"diverged at step {step}: non-finite {bad}")

  def means(self) -> dict:
    """The checked steps' mean metrics (over the steps not skipped; with
    `skipped`, the count of those skipped); starts the next window."""
    self.check()
    kept = [m for _, m in self.checked if not m.get("skipped")]
    out = {k: float(np.mean([m[k] for m in kept])) for k in kept[0]
           if k != "skipped"} if kept else {}
    if self.mode == "skip":
      out["skipped"] = float(len(self.checked) - len(kept))
    self.checked = []
    return out


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


def _terms(values: dict) -> str:
  """`loss=… ce=… …`: the loss first, then the rest by name."""
  keys = sorted(values, key=lambda k: (k != "loss", k))
  return " ".join(f"{k}={values[k]:.4g}" for k in keys)


class _ProgressBar:
  """On a terminal, a bar on the last line of `stream` (stage, step, steps/s,
  ETA), redrawn at most 5 times a second and cleared before each log line.
  Not drawn where `stream` is a file or a pipe (a log, CI), whose readers
  would get carriage returns instead of lines."""
  WIDTH = 30

  def __init__(self, where: str, steps: int, stream):
    self.where, self.steps, self.stream = where, steps, stream
    self.on = (getattr(stream, "isatty", lambda: False)()
               and jax.process_index() == 0)
    self.first = None  # (step, time) of the first draw: the rate's origin.
    self.shown = None  # When the bar now on screen was drawn.

  def draw(self, step: int) -> None:
    if not self.on:
      return
    now = time.perf_counter()
    if self.first is None:
      self.first = (step, now)  # After the first step, so not its compile.
    elif (self.shown is not None and step < self.steps
          and now - self.shown < 0.2):
      return
    fill = self.WIDTH * step // self.steps
    text = (f"{self.where} [{'#' * fill}{'.' * (self.WIDTH - fill)}] "
            f"{step}/{self.steps}")
    if step > self.first[0]:
      rate = (step - self.first[0]) / max(now - self.first[1], 1e-9)
      text += f" {rate:.3g} steps/s ETA {_duration((self.steps - step) / rate)}"
    self.stream.write("\r\033[K" + text)  # Back to the line's start, erase.
    self.stream.flush()
    self.shown = now

  def clear(self) -> None:
    if self.shown is not None:
      self.stream.write("\r\033[K")
      self.stream.flush()
      self.shown = None


def train_stage(config, name: str, workdir: str, datasets, mesh=None):
  """Trains (or resumes, or finds finished) stage `name` on `datasets` (the
  stage's own: `stage_datasets`); returns (method, final state). Holds the
  stage folder's lock (`stage_lock`) throughout."""
  with stage_lock(os.path.join(workdir, name), workdir):
    return _train_stage(config, name, workdir, datasets, mesh)


def _train_stage(config, name, workdir, datasets, mesh):
  mesh = mesh_from_config(config) if mesh is None else mesh
  stage_dir = os.path.join(workdir, name)
  order = list(config.stage_order)
  where = (f"stage {order.index(name) + 1}/{len(order)} {name}"
           if name in order else f"stage {name}")
  mode, max_skipped = nonfinite_policy(config)
  s = stage_config(config, name)
  steps = s["steps"]
  from kd_jax import record, teacher_cache  # pylint: disable=g-import-not-at-top
  record.ensure(config, name, workdir)  # Its checkpoints are of this config.
  heads = run_heads(config, datasets)
  method, frozen = build_method(config, name, workdir, datasets.num_classes,
                                heads=heads)
  tx = make_optimizers(method, s)
  frozen_shardings = sharding.fsdp_shardings(frozen, mesh)
  frozen = jax.device_put(frozen, frozen_shardings)

  make_batches = functools.partial(
      data.pipeline.train_batches, datasets.train,
      batch_size=config.batch_size, seed=s["seed"],
      transforms=datasets.train_transforms,
      **({"unlabelled": datasets.unlabelled,
          "unlabelled_per_batch": datasets.unlabelled_per_batch}
         if datasets.unlabelled is not None else {}))
  train_ds = make_batches()
  example = jnp.asarray(train_ds[0]["image"][:1])
  rng = jax.random.key(s["seed"])
  init = functools.partial(init_state, method, tx, rng)
  abstract = jax.eval_shape(init, example)  # Also checks the stage's wiring.
  state_shardings = sharding.state_shardings(
      abstract, mesh, bool(config.get("shard_student", False)))
  # Restored onto these shardings whatever mesh the checkpoint was saved on.
  abstract = sharding.with_shardings(abstract, state_shardings)

  mngr = checkpoint.manager(os.path.join(stage_dir, "checkpoints"),
                            save_every=config.checkpoint_every)
  try:
    state = checkpoint.restore(mngr, abstract)
  except checkpoint.IncompatibleCheckpoint as e:
    mngr.close()
    raise ConfigError(f"stage {name!r}: {e}") from None
  if state is None:
    state = jax.jit(init, out_shardings=state_shardings)(example)
  start = int(state.step)
  if start >= steps:
    logging.info("%s: finished at step %d", where, start)
    mngr.close()
    return method, state
  logging.info("%s: %s from step %d of %d", where, s["method"], start, steps)
  if config.get("shard_student"):
    sliced = sum(not sh.is_fully_replicated
                 for sh in jax.tree.leaves(state_shardings.params))
    logging.info("%s: %d of %d parameter arrays sliced over fsdp=%d", where,
                 sliced, len(jax.tree.leaves(state_shardings.params)),
                 mesh.shape["fsdp"])
  if teacher_cache.wanted(config, method):
    t = time.perf_counter()
    cache = teacher_cache.for_stage(config, name, workdir, method, frozen,
                                    datasets, log=logging.info, mesh=mesh)
    # The stage's batches only: the cache holds the epochs they reach, and
    # the prefetch must not read past them.
    train_ds = make_batches(teacher_outputs=cache.batch_outputs)[:steps]
    logging.info("stage %s: teacher cache %s ready in %.1f s", name,
                 cache.folder, time.perf_counter() - t)

  # clu's writers import TensorFlow (~10 s): only when a stage trains.
  from clu import metric_writers, periodic_actions

  step_fn = jit_train_step(
      make_train_step(method, tx, skip_nonfinite=mode == "skip"),
      mesh, state_shardings, frozen_shardings)
  eval_step = make_eval_step(method, heads, mesh, config)
  # A few fixed val images for a method's image summaries (MED-TEX: Θ).
  images_step = make_images_step(method, mesh, datasets.val)
  writer = metric_writers.create_default_writer(
      stage_dir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams({k: v for k, v in flax.traverse_util.flatten_dict(
        config.to_dict(), sep=".").items() if isinstance(v, (int, float, str))})
  progress = periodic_actions.ReportProgress(num_train_steps=steps,
                                             writer=writer)
  def last_checkpoint():
    mngr.wait_until_finished()
    return mngr.latest_step()

  history = _StepMetrics(name, mode, max_skipped, last_checkpoint)
  clock = (start, time.perf_counter())
  bar = _ProgressBar(where, steps, sys.stderr)
  # Two batches on their way to the devices while the step runs.
  host = data.pipeline.iterate(
      train_ds, start, workers=s["data"].get("workers", 0),
      transfer_dtype=s["data"].get("transfer_dtype", "float32"))
  batches = data.pipeline.DevicePrefetch(
      host, functools.partial(to_global, mesh=mesh), size=2)
  stopped = False
  try:
    with _Preemption() as preempt:
      for step in range(start + 1, steps + 1):
        state, m = step_fn(state, next(batches), frozen)
        history.add(step, m)
        progress(step)
        log = step % config.log_every == 0 or step == steps
        val = step % config.eval_every == 0 or step == steps
        line = []
        if log:
          means = history.means()  # Raises first if a step diverged.
          scalars = {f"train/{k}": v for k, v in means.items()}
          writer.write_scalars(step, scalars)
          _append_history(stage_dir, step, scalars)
          line.append(_terms(means))
        if val:
          history.check()  # No evaluation of a non-finite state.
          scores = evaluate(eval_step, state, datasets.val,
                            config.batch_size, mesh, heads)
          headline = tasks.headline(heads, scores)
          scalars = {f"val/{k}": v for k, v in headline.items()}
          writer.write_scalars(step, scalars)
          if images_step is not None:
            writer.write_images(step, images_step(state))
          _append_history(stage_dir, step, scalars)
          line.append("val " + _terms(headline))
        if log:
          now = time.perf_counter()
          rate = (step - clock[0]) / max(now - clock[1], 1e-9)
          clock = (step, now)
          line.append(f"{rate:.3g} steps/s ETA "
                      f"{_duration((steps - step) / rate)}")
        if line:
          bar.clear()
          logging.info("%s step %d/%d %s", where, step, steps,
                       " | ".join(line))
        bar.draw(step)
        if jax.process_count() == 1:
          stop = preempt.requested  # Read once: SIGTERM may come any time.
        else:  # Agreed where the processes wait anyway: all stop together.
          stop = (log or step == steps or mngr.should_save(step)) and (
              preempt.agreed())
        if stop or step == steps or mngr.should_save(step):
          history.check()  # Never save a non-finite state.
        if stop:
          stopped = True
          checkpoint.save(mngr, step, state, force=True)
          break
        checkpoint.save(mngr, step, state, force=step == steps)
  finally:
    # Stops its prefetch threads, which would otherwise keep the cores busy
    # filling their buffer during the evaluation and the next stage.
    batches.close()
    bar.clear()
    mngr.wait_until_finished()
    mngr.close()
    writer.flush()
  if stopped:
    raise SystemExit(f"stopped by SIGTERM at step {int(state.step)} of stage "
                     f"{name}; rerun with the same --workdir to resume")
  return method, state


def host_copy(tree):
  """`tree`'s global arrays as whole numpy arrays on every process
  (arrays sliced over devices of several processes gathered first; a
  collective, so every process calls it)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def measure_throughput(predict, state, images, repeats=5) -> float:
  """Images/s of the jitted eval-mode forward at this batch (compile excluded)."""
  jax.block_until_ready(predict(state.params, state.batch_stats, images))
  t = time.perf_counter()
  for _ in range(repeats):
    out = predict(state.params, state.batch_stats, images)
  jax.block_until_ready(out)
  return repeats * images.shape[0] / (time.perf_counter() - t)


def train_and_evaluate(config, workdir: str, *, restart=False,
                       allow_config_change=False) -> dict:
  """Runs every stage in order, then evaluates all of them and writes
  `<workdir>/report.md`. Returns the report's rows. Holds every stage's
  lock (`stage_lock`) throughout. A stage trained under another config
  stops the run before anything trains, unless `restart` (its files set
  aside) or `allow_config_change` (`kd_jax.record.resolve`)."""
  from kd_jax import record  # pylint: disable=g-import-not-at-top
  try:
    datasets = data.build(config.data)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"data: {e}") from None
  cache = {}
  validate(config, workdir, datasets, cache)
  flags = dict(restart=restart, allow_config_change=allow_config_change)
  record.resolve(config, workdir, dry_run=True, **flags)
  if config.batch_size % jax.device_count():
    raise ConfigError(f"batch_size {config.batch_size} must be divisible by "
                     f"the {jax.device_count()} devices")
  os.makedirs(workdir, exist_ok=True)
  # Every stage's lock before the first step: a second run on this workdir
  # stops now, not after the stages before the one the first run is in.
  with contextlib.ExitStack() as locks:
    for name in config.stage_order:
      locks.enter_context(stage_lock(os.path.join(workdir, name), workdir))
    record.resolve(config, workdir, **flags)  # Now under the locks.
    return _train_and_evaluate(config, workdir, datasets, cache)


def _train_and_evaluate(config, workdir, datasets, cache):
  from kd_jax.evaluate import explain, report  # matplotlib only to report

  mesh = mesh_from_config(config)
  heads = run_heads(config, datasets)
  segmentation = tasks.is_segmentation(heads)
  results = {}
  for name in config.stage_order:
    method, state = train_stage(config, name, workdir,
                                stage_datasets(config, name, datasets, cache),
                                mesh)
    # Every stage is scored on the run's test split (stages change only
    # what they train on).
    eval_step = make_eval_step(method, heads, mesh, config)
    scores = evaluate(eval_step, state, datasets.test, config.batch_size,
                      mesh, heads)
    # What follows runs on this process's first device, on a whole local
    # copy of the state (gathered when shard_student slices it): no step of
    # it is a collective, so process 0 alone may run the report's
    # predictions.
    local = jax.local_devices()[0]
    host = host_copy(state)
    state = jax.device_put(host, local)
    images = jax.device_put(
        np.stack([datasets.test[i % len(datasets.test)]["image"]
                  for i in range(config.batch_size)]), local)
    predict = jax.jit(eval_predict(method.predict, config))
    results[name] = dict(
        scores=scores,
        summary=models.summary(method.model, (1,) + images.shape[1:]),
        images_per_s=measure_throughput(predict, state, images))
    if segmentation:
      key = method.model_key
      feature = explain.model_cam_feature(method.model, images.shape)
      # Numpy variables, as `export.restore_stage` gives: a later explainer
      # call on restored ones (the Distillo notebook's) reuses the compile,
      # which committed device arrays would not.
      variables = {"params": host.params[key],
                   "batch_stats": host.batch_stats[key]}
      # The report's numpy images go to `local` first, as `images` did: a
      # numpy argument would compile `predict` a second time.
      results[name].update(
          predict=lambda x, p=predict, s=state, d=local: np.asarray(
              jnp.argmax(p(s.params, s.batch_stats, jax.device_put(x, d)),
                         -1)),
          cam_feature=feature,
          explain=lambda x, c, m=method.model, v=variables, f=feature: tuple(
              np.asarray(a) for a in explain.explainer(m, f, c)(v, x)))
  if jax.process_index() == 0:
    report.write(workdir, config, datasets, results, heads=heads)
  return results
