"""Command line: `python -m kd_jax.main --config=configs/x.py --workdir=runs/x`.

Any config value can be overridden, e.g. `--config.optimizer.lr=0.01` or
`--config.stages.teacher.steps=100`.

Importing this module changes nothing in the process. For faster reruns set
JAX's persistent compilation cache yourself, e.g.
`JAX_COMPILATION_CACHE_DIR=~/.cache/jax python -m kd_jax.main ...`.
"""
import logging as py_logging
import os
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from kd_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, report.")
flags.DEFINE_bool("restart", False,
                  "Stages trained under another config: move their files to "
                  "<stage>/set_aside/ and train them anew.")
flags.DEFINE_bool("allow_config_change", False,
                  "Stages trained under another config: continue them under "
                  "this one (noted in <stage>/run_record.json).")
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


_KD_JAX_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _OwnInfo(py_logging.Filter):
  """Passes kd_jax's own records and every warning or error: the INFO
  lines of Orbax (hundreds per run), clu's writers and JAX's backend probe
  are for their developers. absl logs every module under one logger
  ("absl"), so the record's file tells whose it is."""

  def filter(self, record):
    return (record.levelno >= py_logging.WARNING
            or record.pathname.startswith(_KD_JAX_DIR))


class _Plain(py_logging.Formatter):
  """`12:03:04 message`, and `WARNING: message` for warnings and errors:
  a line a person reads, without absl's thread id and source line."""

  def format(self, record):
    text = record.getMessage()
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    if record.levelno >= py_logging.WARNING:
      return f"{record.levelname}: {text}"
    return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {text}"


def quiet_console():
  """Orbax and absl internals at WARNING, kd_jax's lines plain. Called by
  `main` only: importing kd_jax changes no logging."""
  for name in ("orbax", "jax", "tensorflow"):
    py_logging.getLogger(name).setLevel(py_logging.WARNING)
  # TensorFlow (imported by clu's writers) logs from C++ at import.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  handler = logging.get_absl_handler()
  handler.addFilter(_OwnInfo())
  handler.setFormatter(_Plain())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_console()
  logging.info("JAX devices: %s", jax.devices())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                             restart=FLAGS.restart,
                             allow_config_change=FLAGS.allow_config_change)
  except (train.ConfigError, train.TrainingDiverged) as e:
    sys.exit(f"error: {e}")
  logging.info("report written to %s",
               os.path.join(FLAGS.workdir, "report.md"))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
