"""Orbax checkpoints of the trainable state, and loading frozen teachers.

Each training stage keeps its own `CheckpointManager` under
`<stage workdir>/checkpoints`. Saves are atomic (Orbax writes to a temporary
folder and renames it), so a run killed mid-save resumes from the previous
complete checkpoint. A newest checkpoint that does not restore all the same
(a disk fault, a file cut short by a copy) is moved into `set_aside/` beside
the steps, never deleted, and the run resumes from the newest one that
restores.
"""
import contextlib
import logging as py_logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

# Replica-parallel saving slices every array per device and compiles per
# shape: ~13 s for the first save on 8 host devices, ~0.1 s without
# (STACK.md). Parameters here are replicated and small, so save plainly.
# Orbax warns that it replaces its own handler, on every import: that line
# says nothing to a user, so it is held back for this one call.


@contextlib.contextmanager
def _without_orbax_warnings():
  """Holds back absl's warnings (Orbax logs through absl) for the block
  only; the logger's level is put back after it."""
  absl_logger = logging.get_absl_logger()
  level = absl_logger.level
  absl_logger.setLevel(py_logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


with _without_orbax_warnings():
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
      override=True)

# Where a checkpoint that fails to restore is moved, inside the checkpoints
# folder (Orbax ignores folders whose names are not step numbers).
SET_ASIDE = "set_aside"


class IncompatibleCheckpoint(ValueError):
  """A checkpoint that reads but holds arrays of other shapes than the state
  asked for: another model or optimizer, not a damaged file."""


def manager(directory: str, *, save_every: int,
            max_to_keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(
          save_interval_steps=save_every, max_to_keep=max_to_keep,
          create=True))


def save(mngr: ocp.CheckpointManager, step: int, state, *, force=False):
  """Saves `state` at `step` (if due, or always with `force`)."""
  return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def _shapes(tree) -> list:
  return sorted(tuple(x.shape) for x in jax.tree.leaves(
      tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype")))


def _set_aside(mngr: ocp.CheckpointManager, step: int, error) -> str:
  """Moves step `step`'s folder into `set_aside/` (a free name there) and
  says so in one line; returns the new path."""
  directory = os.fspath(mngr.directory)
  src = os.path.join(directory, str(step))
  dst = os.path.join(directory, SET_ASIDE, str(step))
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    n = 0
    while os.path.exists(dst):  # Set aside before, at the same step.
      n += 1
      dst = os.path.join(directory, SET_ASIDE, f"{step}.{n}")
    os.rename(src, dst)
  if jax.process_count() > 1:
    # The others must not list the steps before the folder has moved.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"kd_jax set aside {src}")
  reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
  logging.warning("checkpoint %s does not restore (%s); moved to %s, "
                  "resuming from the newest earlier checkpoint", src, reason,
                  dst)
  return dst


def restore(mngr: ocp.CheckpointManager, abstract_state, step=None):
  """Restores the latest (or `step`) checkpoint onto `abstract_state`'s
  structure and shardings; None when the folder holds no checkpoint.

  Without `step`, a newest checkpoint that fails to restore is set aside
  (`set_aside/<step>`, never deleted) and the next newest is tried. One whose
  arrays have other shapes than `abstract_state`'s is no damage but another
  model: `IncompatibleCheckpoint` is raised and nothing is moved."""
  if step is not None:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  while (step := mngr.latest_step()) is not None:
    try:
      return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # pylint: disable=broad-except
      # Any error: Orbax and tensorstore raise many kinds for a bad file.
      error = e
    try:
      # Read through a handler: the manager knows the item's type only
      # after a restore succeeded.
      saved = _shapes(ocp.StandardCheckpointHandler().metadata(
          epath.Path(os.fspath(mngr.directory)) / str(step) / "default"))
    except Exception:  # pylint: disable=broad-except
      saved = None  # Its metadata is damaged too.
    if saved is not None and saved != _shapes(abstract_state):
      where = os.path.join(os.fspath(mngr.directory), str(step))
      raise IncompatibleCheckpoint(
          f"the checkpoint at {where} holds arrays of other shapes than "
          "this stage's model and optimizer (was the config changed?): "
          "use a new --workdir, or "
          "move that stage's folder away to train it afresh") from None
    _set_aside(mngr, step, error)
    mngr.reload()  # Forget the step just moved.
  return None


def _checkpoints_folder(directory: str) -> str:
  """`directory` (a stage workdir or its `checkpoints` folder) as the
  checkpoints folder."""
  if os.path.basename(os.path.normpath(directory)) != "checkpoints":
    return os.path.join(directory, "checkpoints")
  return directory


def _is_array(m) -> bool:
  return hasattr(m, "shape") and hasattr(m, "dtype")


def saved_model_shapes(directory: str) -> dict | None:
  """{parameter path "a/b/kernel": shape} of the deployable model (as
  `load_model_variables` picks it) in the newest checkpoint of `directory`
  whose metadata reads; read from Orbax's metadata, no array is loaded.
  None when no checkpoint's metadata reads (`load_model_variables` then
  says what is wrong)."""
  directory = os.path.abspath(_checkpoints_folder(directory))
  steps = sorted((int(d) for d in os.listdir(directory) if d.isdigit()),
                 reverse=True) if os.path.isdir(directory) else []
  for step in steps:
    try:
      tree = ocp.StandardCheckpointHandler().metadata(
          epath.Path(directory) / str(step) / "default").tree
      params = next(tree["params"][k] for k in ("model", "student")
                    if k in tree["params"])
    except Exception:  # pylint: disable=broad-except
      continue  # Damaged, or not a stage's state: the loader reports it.
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_array)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(m.shape)
            for path, m in flat}
  return None


def load_model_variables(directory: str, keys=None) -> dict:
  """The deployable model's variables from a stage's latest checkpoint.

  `directory` is a stage workdir or its `checkpoints` folder. Returns
  `{"params": ..., "batch_stats": ...}` as numpy arrays of the top-level
  keys `keys` of the state's params (a method's `deployed_keys`): one key's
  variables as they are, several keys' nested under each key (the variables
  of a module whose fields of those names hold the parts). Without `keys`,
  the model the stage trained: key "model" of a supervised stage, "student"
  of a distillation stage. Connectors and optimizer state are left behind.
  """
  directory = _checkpoints_folder(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f"no checkpoints at {directory}: train that stage first, or point "
        "the config's teacher checkpoint at a stage workdir")
  # A read-only manager warns that it is read-only, on every load: held back.
  with _without_orbax_warnings():
    mngr = ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(
            read_only=True, save_interval_steps=0, create=False))
  with mngr:
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"{directory} holds no complete checkpoint")
    for step in steps:
      try:
        meta = ocp.StandardCheckpointHandler().metadata(
            epath.Path(os.path.abspath(directory)) / str(step) / "default")
        # Restore as host numpy arrays, whatever sharding they were saved
        # with.
        target = jax.tree.map(
            lambda m: np.empty(m.shape, m.dtype), meta.tree,
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        state = mngr.restore(step, args=ocp.args.StandardRestore(target))
        break
      except Exception as e:  # pylint: disable=broad-except
        # Not this reader's folder to repair (another run may own it): use
        # the newest earlier checkpoint and leave this one where it is.
        if step == steps[-1]:
          raise ValueError(f"no checkpoint in {directory} restores; the "
                           f"oldest, step {step}: {type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}") from None
        logging.warning("checkpoint %s/%d does not restore (%s); loading "
                        "the one before", directory, step, type(e).__name__)
  if keys is None:
    keys = [k for k in ("model", "student") if k in state["params"]][:1]
    if not keys:
      raise ValueError(f"checkpoint at {directory} holds neither a 'model' "
                       f"nor a 'student': {sorted(state['params'])}")
  missing = [k for k in keys if k not in state["params"]]
  if missing:
    raise ValueError(f"checkpoint at {directory} holds no {missing} (it has "
                     f"{sorted(state['params'])}): it was trained by another "
                     "method; pass the --config the stage was trained with")
  # A part without BatchNorm has no batch_stats entry in the state.
  picked = {"params": {k: state["params"][k] for k in keys},
            "batch_stats": {k: state["batch_stats"].get(k, {}) for k in keys}}
  if len(keys) == 1:
    return {c: v[keys[0]] for c, v in picked.items()}
  return picked
