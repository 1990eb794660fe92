"""Command line: `python -m kd_jax.main --config=configs/x.py --workdir=runs/x`.

Any config value can be overridden, e.g. `--config.optimizer.lr=0.01` or
`--config.stages.teacher.steps=100`.

Importing this module changes nothing in the process. For faster reruns set
JAX's persistent compilation cache yourself, e.g.
`JAX_COMPILATION_CACHE_DIR=~/.cache/jax python -m kd_jax.main ...`.
"""
import difflib
import importlib.util
import logging as py_logging
import os
import re
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from kd_jax import accelerator, train

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
flags.DEFINE_bool("allow_cpu", False,
                  "Train on the CPU although a GPU or TPU is visible (also "
                  "KD_JAX_ALLOW_CPU=1).")
flags.mark_flags_as_required(["config", "workdir"])


def _config_spec(argv):
  """The `--config` value (`file` or `file:preset`) in argv, or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(spec):
  """The config file's `get_config()` (`get_config(preset)` for
  `file:preset`), loaded as config_flags loads it."""
  path, _, preset = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_kd_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def _unknown_override(argv, spec) -> str | None:
  """One line for the first `--config.<key>` override that names a key the
  config file lacks: where, the nearest key and the keys there."""
  try:
    config = _load_config(spec)
  except Exception:  # pylint: disable=broad-except
    return None  # Reported as a config file that does not load.
  for arg in argv:
    m = re.match(r"--(?:no)?config\.([^=]+)", arg)
    if not m:
      continue
    node, parts = config, m.group(1).split(".")
    for i, part in enumerate(parts):
      keys = sorted(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        at = ".".join(parts[:i]) or "the top level"
        near = difflib.get_close_matches(part, keys, n=1)
        return (f"--config.{m.group(1)}: {spec} has no key {part!r} at {at}"
                + (f"; did you mean {near[0]!r}?" if near else "")
                + f"; the keys there: {', '.join(keys) or 'none'}")
      node = node[part]
  return None


def _one_line(e: BaseException) -> str:
  return " ".join(f"{type(e).__name__}: {e}".split())


def parse_flags(argv):
  """absl parsing, with one line for a config file that is missing or does
  not load (a syntax error, get_config raising) and for an override naming
  a key the config lacks (with the keys it has there)."""
  spec = _config_spec(argv)
  if spec and not os.path.isfile(spec.partition(":")[0]):
    sys.exit(f"error: --config {spec}: no such file")
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError, flags.Error) as e:
    unknown = spec and _unknown_override(argv, spec)
    sys.exit(f"error: {unknown or ' '.join(str(e).split())}")
  except Exception as e:  # pylint: disable=broad-except
    # Whatever the user's config file raises while it loads.
    sys.exit(f"error: --config {spec} does not load: {_one_line(e)}")


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
  try:
    train.initialize_processes()  # Before anything touches a device.
  except train.ConfigError as e:
    sys.exit(f"error: {e}")
  idle = not FLAGS.allow_cpu and accelerator.check()
  if idle:
    sys.exit(f"error: {idle}")
  if accelerator.use_partitionable_random():
    logging.info("jax_threefry_partitionable turned on: each device draws "
                 "only its shard of the random numbers")
  logging.info("JAX devices: %s (process %d of %d)", jax.devices(),
               jax.process_index(), jax.process_count())
  try:
    config = FLAGS.config  # config_flags may load the file only now.
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f"error: --config does not load: {_one_line(e)}")
  try:
    train.train_and_evaluate(config, FLAGS.workdir,
                             restart=FLAGS.restart,
                             allow_config_change=FLAGS.allow_config_change)
  except (train.ConfigError, train.TrainingDiverged) as e:
    sys.exit(f"error: {e}")
  if jax.process_index() == 0:  # The one process that writes it.
    logging.info("report written to %s",
                 os.path.join(FLAGS.workdir, "report.md"))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
