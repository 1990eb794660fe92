"""Distillo arm `dml`, Deep Mutual Learning: SqueezeU-Net and TransUNet
trained together from scratch, each with α·CE + β·Dice + δ·KL to the
other's prediction.

    python -m kd_jax.main --config=configs/distillo/dml.py:cpu \
        --workdir=runs/distillo_dml

Presets and options of the config arg: configs/distillo/common.py.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from configs.distillo import common  # noqa: E402


def get_config(arg="cpu"):
  return common.get_config("dml", arg)
