"""The Distillo study: every arm for several seeds, then one table.

    python -m kd_jax.study --config=configs/distillo/study.py:cpu \
        --workdir=runs/distillo [--config.study.seeds="(0,1,2)"]

Presets and options of the config arg: configs/distillo/common.py.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from configs.distillo import common  # noqa: E402


def get_config(arg="cpu"):
  return common.get_config("study", arg)
