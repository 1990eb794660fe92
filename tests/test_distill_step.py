"""benchmarks/distill_step.py's FLOP counting, MFU and worker set-up.

The FLOPs come from XLA's cost analysis of the compiled step (the MFU the
benchmark prints on an accelerator divides them by the step time and the
devices' peak), so they are checked here on the CPU against counts written
out by hand, and against the teacher cache's promise: the cached step does
exactly the distill step's work minus the teacher's forward.
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)
import distill_step  # noqa: E402  pylint: disable=wrong-import-position

from kd_jax import data, train  # noqa: E402  pylint: disable=g-import-not-at-top
from tests.test_train import tiny_config  # noqa: E402


def _flops(fn, *args, compile_it=True):
  """FLOPs of the compiled program (what the benchmark reads), or of the
  lowered one (the same count before XLA's backend: no compile, faster)."""
  lowered = jax.jit(fn).lower(*args)
  return distill_step.cost_analysis_flops(
      lowered.compile() if compile_it else lowered)


def test_cost_analysis_counts_a_matmul():
  x, w = jnp.ones((8, 16)), jnp.ones((16, 32))
  assert _flops(jnp.dot, x, w) == 2 * 8 * 16 * 32


def test_cost_analysis_counts_a_convolution():
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1),
                           padding="VALID",
                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # 2 images × 6×6 outputs × 4 channels, each 3·3·3 multiply-adds.
  assert _flops(conv, x, w) == 2 * (2 * 6 * 6 * 4) * (3 * 3 * 3)


def test_mfu_and_peaks():
  assert distill_step.mfu(1e12, 0.5, 1e12, 4) == pytest.approx(0.5)
  assert distill_step.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert distill_step.peak_flops("NVIDIA H100 PCIe", "float32") == 378e12
  assert distill_step.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert distill_step.peak_flops("cpu", "float32") is None


def test_worker_labels_and_modes():
  args = distill_step.parse_args(["--devices=1,8", "--teacher_cache",
                                  "--variant=2:layers=flax"])
  assert distill_step._jax_configs(args) == [
      ("kd_jax jit, 1 device", 1, ""),
      ("kd_jax jit, 8 devices", 8, ""),
      ("kd_jax jit, 1 device, teacher cache", 1, "mode=cached"),
      ("kd_jax jit, 1 device, student only (CE + Dice)", 1, "mode=student"),
      ("kd_jax jit, 2 devices, layers=flax", 2, "layers=flax")]


@pytest.fixture(scope="module")
def steps():
  """FLOPs of the distill, cached and student-only steps and of the
  teacher's eval forward, on the tiny trainer config."""
  c = tiny_config()
  ds = data.build(c.data)
  batch = data.pipeline.train_batches(ds.train, batch_size=4, seed=0)[0]
  images = jnp.asarray(batch["image"])
  out = {}
  for mode, stage in (("distill", "distilled"), ("cached", "distilled"),
                      ("student", "baseline")):
    method, _ = train.build_method(c, stage, "", ds.num_classes,
                                   load_teacher=False)
    s = train.stage_config(c, stage)
    tx = train.make_optimizer(s["optimizer"], s["steps"])
    state = jax.eval_shape(functools.partial(
        train.init_state, method, tx, jax.random.key(0)), images[:1])
    frozen, b = {}, dict(batch)
    if stage == "distilled":
      frozen = jax.eval_shape(functools.partial(
          method.teacher.init, train=False), jax.random.key(1), images[:1])
      if mode == "cached":
        b["teacher"] = jax.eval_shape(method.teacher_outputs, frozen, images)
        out["teacher_forward"] = _flops(method.teacher_outputs, frozen,
                                        images, compile_it=False)
    step = train.make_train_step(method, tx)
    out[mode] = _flops(step, state, b, frozen, compile_it=False)
  return out


def test_cached_step_drops_exactly_the_teacher_forward(steps):
  assert steps["teacher_forward"] > 0
  np.testing.assert_allclose(steps["distill"] - steps["cached"],
                             steps["teacher_forward"], rtol=1e-3)


def test_cached_step_costs_the_student_step_plus_the_kd_term(steps):
  # kd_kl on 4×16×16×9 logits is a few elementwise FLOPs per logit.
  logits = 4 * 16 * 16 * 9
  extra = steps["cached"] - steps["student"]
  assert 0 < extra < 100 * logits
