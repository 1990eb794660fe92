"""Value checks of a run's settings, before anything trains.

`train.validate` calls `run_values` once, and `stage_values` and `teachers`
per stage. Each
raises ValueError (ConfigError for the run-wide ones) with one line naming
the key and the fix: a value of the right type that cannot run (an lr of 0,
a negative loss weight, `eval_every=0`, splits of other channel counts) would
otherwise fail late, as a library traceback, or not at all.
"""
import functools
import math
import os
import tempfile

import jax
import numpy as np

from kd_jax import models, train

# Run-wide counts that must be whole numbers >= 1: what each is for.
_EVERY = {"log_every": "steps between log lines",
          "eval_every": "steps between evaluations",
          "checkpoint_every": "steps between checkpoints",
          "batch_size": "examples per step"}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _whole(value) -> bool:
  return (isinstance(value, (int, np.integer))
          and not isinstance(value, bool))


def _number(value) -> bool:
  return (isinstance(value, (int, float, np.number))
          and not isinstance(value, bool) and math.isfinite(value))


def run_values(config, workdir: str) -> None:
  """The run-wide keys, and the workdir. Raises ConfigError."""
  for key, what in _EVERY.items():
    v = config.get(key)
    if not _whole(v) or v < 1:
      raise train.ConfigError(f"config.{key}={v!r}: give a whole number >= 1 "
                              f"({what})")
  window = config.get("eval_window", 0)
  if not _whole(window) or window < 0:
    raise train.ConfigError(f"config.eval_window={window!r}: give 0 (whole "
                            "images) or the side in pixels of the windows "
                            "to evaluate on (the training crop size)")
  if config.get("compute_dtype", "float32") not in COMPUTE_DTYPES:
    raise train.ConfigError(f"config.compute_dtype={config.compute_dtype!r}:"
                            f" choose one of {list(COMPUTE_DTYPES)}")
  order = list(config.stage_order)
  twice = sorted({n for n in order if order.count(n) > 1})
  if twice:
    raise train.ConfigError(f"config.stage_order {order} names {twice} more "
                            "than once: a stage trains once per run (copy it "
                            "under another name in config.stages)")
  _workdir(workdir)


def _workdir(workdir: str) -> None:
  """The workdir is a folder this process may write, or can be made one."""
  if not workdir:
    raise train.ConfigError("--workdir is empty: give the folder for "
                            "checkpoints, logs and the report")
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise train.ConfigError(f"--workdir {workdir} is a file, not a folder: "
                            "give another --workdir")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  # Tried, not asked (os.access): root passes every permission check but
  # not a read-only mount or /proc. The probe folder is removed at once.
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".kd_jax_probe-", dir=existing))
  except OSError as e:
    raise train.ConfigError(
        f"--workdir {workdir}: cannot write in {existing} "
        f"({e.strerror}): give a --workdir you can write") from None


def _optimizer(opt, where: str) -> None:
  lr = opt.get("lr")
  if not _number(lr) or lr <= 0:
    raise ValueError(f"{where}.lr={lr!r}: give a number > 0")
  for key in ("warmup_steps",):
    v = opt.get(key, 0)
    if not _whole(v) or v < 0:
      raise ValueError(f"{where}.{key}={v!r}: give a whole number >= 0")
  for key in ("weight_decay", "grad_clip", "momentum"):
    v = opt.get(key, 0) or 0
    if not _number(v) or v < 0:
      raise ValueError(f"{where}.{key}={v!r}: give a number >= 0 (0 turns "
                       "it off)")


def stage_values(config, stage: dict, datasets) -> None:
  """One stage's resolved settings (`train.stage_config`) against its data
  (`train.stage_datasets`). Raises ValueError; `train.validate` names the
  stage."""
  steps, seed = stage["steps"], stage["seed"]
  if not _whole(steps) or steps < 1:
    raise ValueError(f"steps={steps!r}: give a whole number >= 1")
  if not _whole(seed) or seed < 0:
    raise ValueError(f"seed={seed!r}: give a whole number >= 0")
  _optimizer(stage["optimizer"], "optimizer")
  for group, opt in (stage.get("optimizers") or {}).items():
    merged = dict(train._plain(stage["optimizer"]))
    merged.update(train._plain(opt) or {})
    _optimizer(merged, f"optimizers.{group}")
  for term in stage["losses"]:
    w = term.get("weight", 1.0)
    if not _number(w) or w < 0:
      raise ValueError(f"losses.{term.get('name', term.get('fn'))}.weight="
                       f"{w!r}: give a number >= 0 (0 turns the term off)")
  for where, folder in _checkpoint_folders(stage):
    steps = os.path.join(folder, "checkpoints") if os.path.basename(
        os.path.normpath(folder)) != "checkpoints" else folder
    if os.path.isdir(folder) and not (
        os.path.isdir(steps) and any(d.isdigit() for d in os.listdir(steps))):
      raise ValueError(f"{where}.checkpoint {folder!r} holds no checkpoint "
                       f"(no {steps}/<step>): train that stage first, or "
                       "point it at a trained stage's workdir")
  channels = {split: getattr(datasets, split)[0]["image"].shape[-1]
              for split in ("train", "val", "test")}
  if len(set(channels.values())) > 1:
    raise ValueError(
        f"the splits' images have different channel counts {channels}: "
        "give every split the same kind of image (data.channels=1 or 3 "
        "converts where the data set takes it)")


def _checkpoint_folders(value, where=""):
  """(key path, folder) of every non-empty `checkpoint` a stage's settings
  load a frozen model from (a teacher, ensemble members)."""
  found = []
  if isinstance(value, dict):
    if isinstance(value.get("checkpoint"), str) and value["checkpoint"] and (
        not value.get("stage")):
      found.append((where or "checkpoint", value["checkpoint"]))
    for k, v in value.items():
      if k != "checkpoint":
        found += _checkpoint_folders(v, f"{where}.{k}" if where else k)
  elif isinstance(value, list):
    for i, v in enumerate(value):
      found += _checkpoint_folders(v, f"{where}[{i}]")
  return found


def _classes(model_cfg, num_classes):
  """The class count `model_cfg` builds (the data's `num_classes` unless it
  sets its own, as `train._build_model` fills it in); None for a model
  without one."""
  if not models.accepts(model_cfg["name"], "num_classes"):
    return None
  return model_cfg.get("num_classes", num_classes)


def _teacher_members(stage) -> list:
  """(key, member config) of each frozen teacher a stage's settings load."""
  if stage.get("teachers"):
    return [(f"teachers[{i}]", t) for i, t in enumerate(stage["teachers"])]
  return [("teacher", stage["teacher"])] if stage.get("teacher") else []


def teachers(config, stage: dict, ctx, num_classes: int, example) -> None:
  """Each teacher's model against what it loads, so that a 9-class teacher
  built for 4 classes stops now and not, after the earlier stages trained,
  as a restore traceback. A `checkpoint` folder: its saved parameter shapes
  (Orbax metadata, no array read) against the model's abstract ones; an
  earlier `stage`: the two model configs' class counts. Raises ValueError."""
  from kd_jax import checkpoint  # pylint: disable=g-import-not-at-top
  for where, t in _teacher_members(stage):
    mine = _classes(t["model"], num_classes)
    if t.get("stage"):
      theirs = _classes(train.stage_config(config, t["stage"])["model"],
                        num_classes)
      if None not in (mine, theirs) and mine != theirs:
        raise ValueError(
            f"{where}.model builds {mine} classes, stage {t['stage']!r} "
            f"trains {theirs}: set {where}.model.num_classes={theirs} (as "
            f"stages.{t['stage']}.model), or leave it out of both")
      continue
    saved = checkpoint.saved_model_shapes(t["checkpoint"])
    if saved is None:
      continue  # No readable metadata: loading the teacher says why.
    params = jax.eval_shape(functools.partial(
        ctx.build_model(t["model"]).init, train=False),
                            jax.random.key(0), example)["params"]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    built = {"/".join(str(getattr(k, "key", k)) for k in path): x.shape
             for path, x in flat}
    _compare(where, t["checkpoint"], t["model"]["name"], mine, saved, built)


def _compare(where, folder, name, classes, saved, built) -> None:
  """Raises naming the first parameter (by path) that one of the checkpoint
  (`saved`) and the model (`built`) lacks, else the first of other shapes;
  as a class count when every difference is the last axis, from one count
  in the checkpoint to the model's `classes`."""
  differ = sorted(p for p in built.keys() & saved.keys()
                  if saved[p] != built[p])
  missing = sorted(built.keys() - saved.keys())
  extra = sorted(saved.keys() - built.keys())
  if not (differ or missing or extra):
    return
  head = f"{where}.checkpoint {folder!r}"
  counts = {saved[p][-1] for p in differ}
  if (not missing and not extra and classes is not None and len(counts) == 1
      and all(saved[p][:-1] == built[p][:-1] and built[p][-1] == classes
              for p in differ)):
    n = counts.pop()
    raise ValueError(
        f"{head}: the checkpoint has {n} classes, {where}.model {name!r} "
        f"{classes} ({differ[0]} is {saved[differ[0]]} there, "
        f"{built[differ[0]]} here): set {where}.model.num_classes={n}, or "
        f"point {where}.checkpoint at a {classes}-class teacher")
  # A parameter only one side has says "another architecture" most plainly.
  if missing:
    what = f"the model's {missing[0]} is not there"
  elif extra:
    what = f"its {extra[0]} is not in the model"
  else:
    what = (f"{differ[0]} is {saved[differ[0]]} there, {built[differ[0]]} "
            "in the model")
  raise ValueError(
      f"{head} holds another model than {where}.model {name!r} ({what}): "
      f"give {where}.model the settings that teacher was trained with")
