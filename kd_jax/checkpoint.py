"""Orbax checkpoints of the trainable state, and loading frozen teachers.

Each training stage keeps its own `CheckpointManager` under
`<stage workdir>/checkpoints`. Saves are atomic (Orbax writes to a temporary
folder and renames it), so a run killed mid-save resumes from the previous
complete checkpoint.
"""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

# Replica-parallel saving slices every array per device and compiles per
# shape: ~13 s for the first save on 8 host devices, ~0.1 s without
# (STACK.md). Parameters here are replicated and small, so save plainly.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
    override=True)


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


def restore(mngr: ocp.CheckpointManager, abstract_state, step=None):
  """Restores the latest (or `step`) checkpoint onto `abstract_state`'s
  structure and shardings; None when the folder holds no checkpoint."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))


def load_model_variables(directory: str) -> dict:
  """The deployable model's variables from a stage's latest checkpoint.

  `directory` is a stage workdir or its `checkpoints` folder. Returns
  `{"params": ..., "batch_stats": ...}` as numpy arrays for the model the
  stage trained (key "model" of a supervised stage, "student" of a
  distillation stage); connectors and optimizer state are left behind.
  """
  if os.path.basename(os.path.normpath(directory)) != "checkpoints":
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f"no checkpoints at {directory}: train that stage first, or point "
        "the config's teacher checkpoint at a stage workdir")
  with ocp.CheckpointManager(os.path.abspath(directory),
                             options=ocp.CheckpointManagerOptions(
                                 read_only=True)) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"{directory} holds no complete checkpoint")
    meta = mngr.item_metadata(step)
    # Restore as host numpy arrays, whatever sharding they were saved with.
    target = jax.tree.map(
        lambda m: np.empty(m.shape, m.dtype), meta,
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    state = mngr.restore(step, args=ocp.args.StandardRestore(target))
  for key in ("model", "student"):
    if key in state["params"]:
      return {"params": state["params"][key],
              "batch_stats": state["batch_stats"].get(key, {})}
  raise ValueError(f"checkpoint at {directory} holds neither a 'model' nor a "
                   f"'student': {sorted(state['params'])}")
