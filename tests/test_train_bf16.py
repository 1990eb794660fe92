"""compute_dtype="bfloat16": bf16 compute, float32 parameters and loss.

The default pair (UNet teacher → UNet student, the default objective) at a tiny
size: one distill step in bf16 keeps every parameter, optimizer moment and
the loss in float32, computes in bf16 inside, and lands near the float32
step (bf16 has an 8-bit mantissa: agreement to about 1e-2, not 1e-5).
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import data, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.test_train import tiny_config  # noqa: E402


def _one_step(dtype):
  c = tiny_config()
  c.compute_dtype = dtype
  ds = data.build(c.data)
  method, _ = train.build_method(c, "distilled", "", ds.num_classes,
                                 load_teacher=False)
  s = train.stage_config(c, "distilled")
  tx = train.make_optimizer(s["optimizer"], s["steps"])
  batch = data.pipeline.train_batches(ds.train, batch_size=4, seed=0)[0]
  state = train.init_state(method, tx, jax.random.key(0), batch["image"][:1])
  frozen = method.teacher.init(jax.random.key(5), batch["image"][:1],
                               train=False)
  # Both runs start from the same float32 variables.
  frozen = jax.tree.map(lambda x: x.astype(jnp.float32), frozen)
  teacher = method.teacher_outputs(frozen, jnp.asarray(batch["image"]))
  mesh = train.make_mesh()
  step = train.jit_train_step(train.make_train_step(method, tx), mesh)
  new, metrics = step(state, train.to_global(batch, mesh), frozen)
  return method, jax.device_get(new), jax.device_get(metrics), teacher


@pytest.fixture(scope="module")
def steps():
  return {d: _one_step(d) for d in ("float32", "bfloat16")}


def test_bf16_computes_in_bf16(steps):
  method = steps["bfloat16"][0]
  assert method.model.dtype == jnp.bfloat16
  assert method.teacher.dtype == jnp.bfloat16


def test_bf16_keeps_float32_parameters_state_and_loss(steps):
  _, state, metrics, teacher = steps["bfloat16"]
  for tree in (state.params, state.opt_state, state.batch_stats, teacher):
    for leaf in jax.tree.leaves(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32
  for name, value in metrics.items():
    assert value.dtype == np.float32 and np.isfinite(value), name


def test_bf16_step_is_close_to_float32(steps):
  (_, s32, m32, t32), (_, s16, m16, t16) = steps["float32"], steps["bfloat16"]
  assert set(m16) == set(m32) and {"loss", "ce", "dice"} <= set(m32)
  for k in set(m32) - {"grad_norm"}:  # The loss and every term.
    np.testing.assert_allclose(m16[k], m32[k], rtol=3e-2, atol=1e-2,
                               err_msg=k)
  # Gradients go through bf16 activations in the backward pass too.
  np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=0.1)
  np.testing.assert_allclose(t16["logits"], t32["logits"], atol=0.1)
  # One AdamW step moves each parameter by about lr·(warm-up factor); both
  # precisions take it in float32 from the same start.
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                       s16.params, s32.params)
  assert max(jax.tree.leaves(diffs)) < 1e-2
