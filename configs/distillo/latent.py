"""Distillo arm `latent`: SqueezeU-Net taught by the frozen TransUNet,
α·CE + β·Dice + δ·L1 between the bottleneck embeddings (the student's
through a learned 1×1 conv).

Without `,teacher=<dir>` in the config arg the teacher stage trains first
in the same workdir (or is reused there once finished).

    python -m kd_jax.main --config=configs/distillo/latent.py:cpu \
        --workdir=runs/distillo_latent

Presets and options of the config arg: configs/distillo/common.py.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from configs.distillo import common  # noqa: E402


def get_config(arg="cpu"):
  return common.get_config("latent", arg)
