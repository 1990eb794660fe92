"""Distillo arm `kd`: SqueezeU-Net distilled from the frozen TransUNet,
α·CE + β·Dice + δ·KL.

Without `,teacher=<dir>` in the config arg the teacher stage trains first
in the same workdir (or is reused there once finished).

    python -m kd_jax.main --config=configs/distillo/kd.py:cpu \
        --workdir=runs/distillo_kd

Presets and options of the config arg: configs/distillo/common.py.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from configs.distillo import common  # noqa: E402


def get_config(arg="cpu"):
  return common.get_config("kd", arg)
