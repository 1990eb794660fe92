"""A stage interrupted by a real SIGTERM and resumed: the shared step of the
exact-resume tests."""
import os
import signal

import jax
import pytest

from kd_jax import checkpoint, train


def interrupted_then_resumed(config, stage, workdir, datasets, monkeypatch,
                             at=2):
  """Trains `stage` in `workdir`, sends this process SIGTERM right after the
  checkpoint of step `at` (the loop then saves step `at` + 1 and stops),
  reruns it to the end and returns the final state on the host."""
  real_save = checkpoint.save

  def save_then_sigterm(mngr, step, state, force=False):
    out = real_save(mngr, step, state, force=force)
    if step == at:
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  monkeypatch.setattr(checkpoint, "save", save_then_sigterm)
  with pytest.raises(SystemExit, match=f"SIGTERM at step {at + 1}"):
    train.train_stage(config, stage, workdir, datasets)
  monkeypatch.setattr(checkpoint, "save", real_save)
  _, state = train.train_stage(config, stage, workdir, datasets)
  return jax.device_get(state)
