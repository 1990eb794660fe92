"""Command line: `python -m kd_jax.main --config=configs/x.py --workdir=runs/x`.

Any config value can be overridden, e.g. `--config.optimizer.lr=0.01` or
`--config.stages.teacher.steps=100`.

Importing this module changes nothing in the process. For faster reruns set
JAX's persistent compilation cache yourself, e.g.
`JAX_COMPILATION_CACHE_DIR=~/.cache/jax python -m kd_jax.main ...`.
"""
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from kd_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, report.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl parsing, with a one-line message for a misspelt config key."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError, flags.Error) as e:
    msg = str(e)
    if "config" in msg or isinstance(e, (AttributeError, KeyError)):
      sys.exit(f"error: bad --config override: {msg}\n"
               "Check the key against the config file "
               "(python -m kd_jax.main --config=<file> --helpfull lists it).")
    sys.exit(f"error: {msg}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.info("JAX devices: %s", jax.devices())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
