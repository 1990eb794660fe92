"""FSDP on 8 virtual CPU devices: the frozen teacher (and, with
shard_student, the student and its optimizer state) sliced over `fsdp`
give the replicated run's losses; each device holds 1/8 of every sliced
array, and the compiled step's per-device argument size falls by what the
slices say. Also: a replicated checkpoint restores onto the fsdp mesh
(config.remat: tests/test_remat.py).

One subprocess (this file run as a script, with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax starts)
runs every check and prints one JSON line; the tests assert on it.
"""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
STEPS = 3


def _config():
  sys.path.insert(0, ROOT)
  from tests.test_train import tiny_config  # pylint: disable=import-outside-toplevel
  c = tiny_config()
  c.batch_size = 16
  # Teacher kernels of 16-32 channels (above SHARD_MIN_SIZE), student of
  # 8-16: most of the bytes are sliced, a few small arrays are not.
  c.stages.distilled.teacher.model.width = 16
  c.stages.distilled.model.width = 8
  return c


def _pieces():
  """(method, tx, host batch, host state, host frozen variables) of the
  distill stage, the variables drawn by numpy (flax's jitted init takes over
  a minute to compile on a busy 2-core CPU)."""
  import jax  # pylint: disable=import-outside-toplevel
  from kd_jax import data, train  # pylint: disable=import-outside-toplevel

  c = _config()  # (puts the checkout on sys.path)
  from tests.numpy_init import draw  # pylint: disable=import-outside-toplevel
  ds = data.build(c.data)
  method, _ = train.build_method(c, "distilled", "", ds.num_classes,
                                 load_teacher=False)
  tx = train.make_optimizers(method, train.stage_config(c, "distilled"))
  batch = data.pipeline.train_batches(ds.train, batch_size=c.batch_size,
                                      seed=0)[0]
  example = batch["image"][:1]
  # Traced once for the shapes (a distill method builds its connectors).
  variables = draw(jax.eval_shape(method.init, jax.random.key(0), example))
  params = variables["params"]
  state = train.TrainState(
      step=np.zeros((), np.int32), params=params,
      batch_stats=variables["batch_stats"],
      opt_state=jax.device_get(jax.jit(tx.init)(params)),
      rng=np.asarray(jax.random.key_data(jax.random.key(1))))
  frozen = draw(jax.eval_shape(
      lambda x: method.teacher.init(jax.random.key(5), x, train=False),
      example), seed=5)
  return method, tx, batch, state, frozen


def _run(pieces, mesh_shape, shard_student, export=False):
  """Losses of STEPS distill steps on a (data, fsdp) mesh, and what the
  arrays and the compiled step look like on it."""
  import jax  # pylint: disable=import-outside-toplevel
  from kd_jax import sharding, train  # pylint: disable=import-outside-toplevel

  method, tx, batch, state, frozen = pieces
  mesh = train.make_mesh(fsdp=mesh_shape[1])
  assert dict(mesh.shape) == {"data": mesh_shape[0], "fsdp": mesh_shape[1]}
  frozen_sh = sharding.fsdp_shardings(frozen, mesh)
  frozen = jax.device_put(frozen, frozen_sh)
  state_sh = sharding.state_shardings(state, mesh, shard_student)
  state = jax.device_put(state, state_sh)
  step = train.jit_train_step(train.make_train_step(method, tx), mesh,
                              state_sh, frozen_sh)
  gbatch = train.to_global(batch, mesh)
  compiled = step.lower(state, gbatch, frozen).compile()
  memory = compiled.memory_analysis()

  def per_device_bytes(tree):
    """Bytes of device 0's shards, and of the whole arrays."""
    leaves = jax.tree.leaves(tree)
    return (sum(x.addressable_shards[0].data.nbytes for x in leaves),
            sum(x.nbytes for x in leaves))

  frozen_leaves = [
      dict(shape=list(x.shape), spec=list(sh.spec),
           shards=[list(d.data.shape) for d in x.addressable_shards])
      for x, sh in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_sh))]
  student_leaves = [
      dict(shape=list(x.shape),
           shards=[list(d.data.shape) for d in x.addressable_shards])
      for x in jax.tree.leaves((state.params, state.opt_state))]
  sizes = dict(frozen_bytes=per_device_bytes(frozen),
               state_bytes=per_device_bytes(state),
               arg_bytes=per_device_bytes((state, gbatch, frozen)))
  if export:  # The sliced step's CUDA and TPU lowering, as test_lowering's.
    text = jax.export.export(step, platforms=("cuda", "tpu"))(
        state, gbatch, frozen).mlir_module()
    sizes["custom_calls"] = sorted(set(re.findall(r"custom_call\s*@(\w+)",
                                                  text)))
    sizes["custom_call"] = "stablehlo.custom_call" in text
    sizes["f64"] = bool(re.search(r"\bf64\b", text))
  losses = []
  for _ in range(STEPS):
    state, m = compiled(state, gbatch, frozen)
    losses.append(float(m["loss"]))
  return dict(losses=losses, frozen=frozen_leaves, student=student_leaves,
              argument_size=memory.argument_size_in_bytes,
              temp_size=memory.temp_size_in_bytes, **sizes)


def _restore_onto_fsdp(pieces, tmp):
  """A checkpoint saved replicated on (8, 1), restored onto (1, 8) with
  shard_student: same values, sliced shards."""
  import jax  # pylint: disable=import-outside-toplevel
  from kd_jax import checkpoint, sharding, train  # pylint: disable=import-outside-toplevel

  state = pieces[3]
  replicated = train.make_mesh(fsdp=1)
  saved = jax.device_put(state, sharding.state_shardings(state, replicated,
                                                         False))
  mngr = checkpoint.manager(tmp, save_every=1)
  checkpoint.save(mngr, 1, saved, force=True)
  mngr.wait_until_finished()
  abstract = jax.eval_shape(lambda s: s, state)
  target = sharding.with_shardings(abstract, sharding.state_shardings(
      abstract, train.make_mesh(fsdp=DEVICES), True))
  restored = checkpoint.restore(mngr, target)
  mngr.close()
  equal = all(jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
      state, restored)))
  sliced = sum(x.addressable_shards[0].data.size < x.size
               for x in jax.tree.leaves(restored.params))
  return dict(equal=equal, sliced_params=int(sliced),
              params=len(jax.tree.leaves(restored.params)))


def main(parts):
  import tempfile  # pylint: disable=import-outside-toplevel
  pieces = _pieces()
  results = {}
  if "ci" in parts:
    results["replicated"] = _run(pieces, (DEVICES, 1), False)
    results["fsdp"] = _run(pieces, (1, DEVICES), True, export=True)
    with tempfile.TemporaryDirectory() as tmp:
      results["restore"] = _restore_onto_fsdp(pieces,
                                              os.path.join(tmp, "ckpt"))
  if "2x4" in parts:
    results["replicated"] = _run(pieces, (DEVICES, 1), False)
    results["fsdp_2x4"] = _run(pieces, (2, 4), False)
  if "stage" in parts:
    with tempfile.TemporaryDirectory() as tmp:
      results["stage"] = _stages_on_fsdp(tmp)
  print(json.dumps(results))


def _stages_on_fsdp(workdir):
  """The teacher stage, then the distilled stage loading it, trained by
  `train.train_stage` on the (1, 8) mesh with shard_student; the student
  state as it ends, sliced, and the stage's logged losses."""
  import jax  # pylint: disable=import-outside-toplevel
  from kd_jax import data, train  # pylint: disable=import-outside-toplevel

  c = _config()
  c.steps = c.stages.teacher.steps = 2
  c.log_every = c.eval_every = c.checkpoint_every = 2
  c.mesh = dict(fsdp=DEVICES)
  c.shard_student = True
  ds = data.build(c.data)
  out = {}
  for name in ("teacher", "distilled"):
    _, state = train.train_stage(c, name, workdir, ds)
    leaves = jax.tree.leaves(state.params)
    out[name] = dict(
        step=int(state.step),
        sliced=sum(x.addressable_shards[0].data.size < x.size
                   for x in leaves),
        params=len(leaves),
        loss=train.read_history(os.path.join(workdir, name))[
            "train/loss"][1])
  return out


def _subprocess(part):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, os.path.abspath(__file__), part],
                       env=env, capture_output=True, text=True, cwd=ROOT,
                       check=False, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results():
  return _subprocess("ci")


@pytest.fixture(scope="module")
def results_2x4():
  return _subprocess("2x4")


def _spec_axis(spec):
  return next((i for i, a in enumerate(spec) if a == "fsdp"), None)


def _check_sliced_teacher(leaves, size):
  for x in leaves:
    axis = _spec_axis(x["spec"])
    want = list(x["shape"])
    if axis is not None:
      assert want[axis] % size == 0
      want[axis] //= size
    assert all(s == want for s in x["shards"]), x
  # The rule slices every array of >= 1024 elements here (each has an axis
  # of 16 or 32 channels); those hold most of the teacher's bytes.
  sliced = [x for x in leaves if _spec_axis(x["spec"]) is not None]
  big = [x for x in leaves if math.prod(x["shape"]) >= 1024]
  assert big and len(sliced) == len(big)
  sliced_elems = sum(math.prod(x["shape"]) for x in sliced)
  assert sliced_elems > 0.9 * sum(math.prod(x["shape"]) for x in leaves)


def _check_argument_size(r):
  # XLA's per-device argument size is the sum of device 0's shards (a
  # little alignment padding allowed).
  per_device = r["arg_bytes"][0]
  assert per_device <= r["argument_size"] <= 1.05 * per_device + 4096


def test_sliced_teacher_leaves_hold_one_eighth_on_each_device(results):
  _check_sliced_teacher(results["fsdp"]["frozen"], DEVICES)


def test_replicated_teacher_is_whole_on_every_device(results):
  for x in results["replicated"]["frozen"]:
    assert all(s == x["shape"] for s in x["shards"])


def test_student_and_optimizer_state_are_sliced_with_shard_student(results):
  leaves = results["fsdp"]["student"]
  for x in leaves:
    size = math.prod(x["shape"])
    # The rule: >= 1024 elements and an axis that 8 divides.
    if size >= 1024 and any(d % DEVICES == 0 for d in x["shape"]):
      assert all(math.prod(s) * DEVICES == size for s in x["shards"]), x
    else:
      assert all(s == x["shape"] for s in x["shards"]), x
  sliced = [x for x in leaves if x["shards"][0] != x["shape"]]
  # Adam's two moments beside each sliced parameter, and most bytes.
  assert len(sliced) % 3 == 0 and sliced
  assert (sum(math.prod(x["shape"]) for x in sliced)
          > 0.5 * sum(math.prod(x["shape"]) for x in leaves))


def test_sliced_step_lowers_without_custom_call_or_float64(results):
  assert results["fsdp"]["custom_calls"] == []
  assert not results["fsdp"]["custom_call"]
  assert not results["fsdp"]["f64"]


def test_losses_equal_the_replicated_run(results):
  ref = results["replicated"]["losses"]
  assert len(ref) == STEPS and len(set(ref)) > 1  # It trains.
  np.testing.assert_allclose(results["fsdp"]["losses"], ref, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("run", ["replicated", "fsdp"])
def test_argument_size_is_what_each_device_holds(results, run):
  _check_argument_size(results[run])


def test_fsdp_argument_size_falls_by_the_sliced_bytes(results):
  rep, fsdp = results["replicated"], results["fsdp"]
  # Teacher and state: whole on each device replicated; sliced bytes / 8
  # plus the unsliced rest with fsdp.
  rep_bytes = rep["frozen_bytes"][0] + rep["state_bytes"][0]
  fsdp_bytes = fsdp["frozen_bytes"][0] + fsdp["state_bytes"][0]
  assert fsdp_bytes < 0.25 * rep_bytes  # Most bytes are sliced 8 ways.
  batch = rep["arg_bytes"][0] - rep_bytes  # Its rows: the same per device.
  expected = (fsdp_bytes + batch) / (rep_bytes + batch)
  ratio = fsdp["argument_size"] / rep["argument_size"]
  assert 0.95 * expected <= ratio <= 1.05 * expected
  assert ratio < 0.4


@pytest.mark.slow
def test_2x4_mesh_slices_the_teacher_four_ways_with_the_same_losses(
    results_2x4):
  r = results_2x4["fsdp_2x4"]
  _check_sliced_teacher(r["frozen"], 4)
  for x in r["student"]:  # No shard_student: whole on every device.
    assert all(s == x["shape"] for s in x["shards"])
  np.testing.assert_allclose(r["losses"], results_2x4["replicated"]["losses"],
                             rtol=1e-5, atol=1e-5)
  _check_argument_size(r)


@pytest.mark.slow
def test_stages_train_on_the_fsdp_mesh_through_the_trainer():
  r = _subprocess("stage")["stage"]
  for name in ("teacher", "distilled"):
    assert r[name]["step"] == 2
    assert 0 < r[name]["sliced"] < r[name]["params"]
    assert np.all(np.isfinite(r[name]["loss"]))


@pytest.mark.parametrize("shape,size,spec", [
    ((3, 3, 16, 32), 8, (None, None, None, "fsdp")),  # The largest axis.
    ((3, 3, 32, 32), 8, (None, None, "fsdp")),  # The first of equals.
    ((3, 3, 32, 12), 8, (None, None, "fsdp")),  # The largest 8 divides.
    ((3, 3, 36, 12), 8, ()),  # No axis 8 divides.
    ((1000,), 8, ()),  # Below SHARD_MIN_SIZE.
    ((1024,), 8, ("fsdp",)),
    ((64, 64), 1, ()),  # fsdp 1: replicated.
])
def test_fsdp_spec_rule(shape, size, spec):
  from kd_jax import sharding  # pylint: disable=import-outside-toplevel
  assert tuple(sharding.fsdp_spec(shape, size)) == spec


@pytest.mark.parametrize("key,value,match", [
    ("mesh", dict(fsdp=3), r"config.mesh.fsdp=3 must divide the \d+ "
     r"devices: choose one of \[1"),
    ("mesh", dict(fsdp=0), "config.mesh.fsdp=0 must divide"),
    ("mesh", dict(fdsp=2), r"config.mesh has unknown keys \['fdsp'\]"),
    ("remat", "dots", r"config.remat='dots': give False, True or one of"),
])
def test_bad_scaling_settings_are_one_line_config_errors(key, value, match):
  import ml_collections  # pylint: disable=import-outside-toplevel
  from kd_jax import train  # pylint: disable=import-outside-toplevel
  c = ml_collections.ConfigDict({key: value})
  with pytest.raises(train.ConfigError, match=match):
    train.mesh_from_config(c)
    train.remat_policy(c)


def test_replicated_checkpoint_restores_onto_the_fsdp_mesh(results):
  r = results["restore"]
  assert r["equal"]
  assert 0 < r["sliced_params"] < r["params"]


if __name__ == "__main__":
  main(sys.argv[1:])
