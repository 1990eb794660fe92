"""Distillo arm `teacher`: TransUNet trained alone, α·CE + β·Dice.

    python -m kd_jax.main --config=configs/distillo/teacher.py:cpu \
        --workdir=runs/distillo_teacher

Presets and options of the config arg: configs/distillo/common.py.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from configs.distillo import common  # noqa: E402


def get_config(arg="cpu"):
  return common.get_config("teacher", arg)
