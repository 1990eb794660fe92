"""Two local processes × 4 virtual CPU devices train one run together: the
same parameters as one process on 8 devices, a validation split that does
not divide evenly (17 examples), and a SIGTERM to one process stopping both
at the same step, from which a rerun resumes. A teacher cache built by
`python -m kd_jax.teacher_cache` on 2 processes holds each process's shard,
with the outputs one process computes, and training on 2 processes from it
gives the live teacher's parameters."""
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from kd_jax import checkpoint, teacher_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = textwrap.dedent("""
    import ml_collections

    def get_config():
      c = ml_collections.ConfigDict()
      c.seed = 0
      c.compute_dtype = "float32"
      c.layers = "flax"
      c.batch_size = 8
      c.steps = {steps}
      c.log_every = 2
      c.eval_every = {steps}
      c.checkpoint_every = 2
      c.optimizer = dict(name="adamw", lr=1e-3, weight_decay=1e-4,
                         momentum=0.9, warmup_steps=1, grad_clip=1.0)
      # 17 validation and test examples: over 2 processes one shard has 9,
      # the other 8 -- as many eval batches each all the same.
      c.data = dict(name="synthetic", image_size=16, num_train=32,
                    num_val=17, num_test=17, seed=0, augment=True)
      c.teacher_cache = None
      c.stage_order = ("teacher",)
      c.stages = dict(teacher=dict(
          method="supervised", model=dict(name="unet", width=4, depth=2),
          losses=dict(ce=dict(fn="cross_entropy"), dice=dict(fn="dice"))))
    {extra}
      return c
""")

# The teacher above (trained by `one_process`) distilled into a narrower
# UNet through logit and feature terms: a teacher cache holds both kinds.
DISTILLED = """
  c.teacher_cache = {cache!r}
  c.stage_order = ("distilled",)
  c.stages = dict(distilled=dict(
      method="distill", model=dict(name="unet", width=2, depth=2),
      teacher=dict(model=dict(name="unet", width=4, depth=2), stage="",
                   checkpoint={teacher!r}),
      losses=dict(ce=dict(fn="cross_entropy"),
                  kd=dict(fn="kd_kl", temperature=4.0),
                  hint=dict(fn="hint_l2", student="bottleneck",
                            teacher="bottleneck"))))
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(config, workdir, processes, devices, module="kd_jax.main"):
  """`processes` × `devices` devices running `python -m <module>` (the
  flags of kd_jax.main)."""
  port = _free_port()
  procs = []
  for i in range(processes):
    # PYTHONFAULTHANDLER: a hung process killed by `_wait` with SIGABRT
    # prints every thread's Python stack into the failure message.
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONFAULTHANDLER="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                 JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", module, f"--config={config}",
         f"--workdir={workdir}"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
  return procs


def _wait(procs, timeout=600):
  out = []
  for p in procs:
    try:
      text, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      tails = []
      for i, q in enumerate(procs):
        if q.poll() is not None:
          continue
        q.send_signal(signal.SIGABRT)
        try:
          dump = q.communicate(timeout=30)[0]
          # The stacks, without faulthandler's list of extension modules.
          dump = dump[max(dump.rfind("Fatal Python error"), 0):]
          tails.append(f"process {i}:\n" + dump.split(
              "\nExtension modules:")[0])
        except subprocess.TimeoutExpired:
          q.kill()
          tails.append(f"process {i}: no stack")
      pytest.fail("a process hung (a collective one side never joined):\n"
                  + "\n".join(tails))
    out.append((p.returncode, text))
  return out


def _params(workdir, stage="teacher"):
  return jax.device_get(checkpoint.load_model_variables(
      os.path.join(workdir, stage))["params"])


def _config(tmp_path, steps, extra=""):
  path = tmp_path / f"config_{steps}_{len(extra)}.py"
  path.write_text(CONFIG.format(steps=steps, extra=extra))
  return str(path)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("one")
  workdir = str(tmp / "run")
  [(rc, text)] = _wait(_launch(_config(tmp, 6), workdir, 1, 8))
  assert rc == 0, text[-2000:]
  return workdir


def test_two_processes_equal_one_process_on_8_devices(one_process, tmp_path):
  workdir = str(tmp_path / "run")
  results = _wait(_launch(_config(tmp_path, 6), workdir, 2, 4))
  for rc, text in results:
    assert rc == 0, text[-2000:]
  assert "process 1 of 2" in results[1][1]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               _params(one_process), _params(workdir))
  # Files from process 0 alone: one report, one history line per log step.
  assert os.path.exists(os.path.join(workdir, "report.md"))
  with open(os.path.join(workdir, "teacher", "history.jsonl")) as f:
    steps = [line.count('"step"') for line in f]
  assert len(steps) == len(open(os.path.join(
      one_process, "teacher", "history.jsonl")).readlines())


def test_sigterm_to_one_process_stops_both_at_one_step(one_process,
                                                        tmp_path):
  config = _config(tmp_path, 6)
  workdir = str(tmp_path / "run")
  procs = _launch(config, workdir, 2, 4)
  # SIGTERM to process 1 once it has logged its first steps.
  deadline = time.time() + 600
  lines = []
  for line in procs[1].stdout:
    lines.append(line)
    if "step 2/6" in line:
      procs[1].send_signal(signal.SIGTERM)
      break
    assert time.time() < deadline, "no step logged"
  rest = procs[1].communicate(timeout=600)[0]
  rc0, text0 = _wait(procs[:1])[0]
  for rc, text in ((procs[1].returncode, "".join(lines) + rest),
                   (rc0, text0)):
    assert rc != 0 and "stopped by SIGTERM at step" in text, text[-2000:]
  stopped = [int(t.split("stopped by SIGTERM at step ")[1].split()[0])
             for t in ("".join(lines) + rest, text0)]
  assert stopped[0] == stopped[1] < 6
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "teacher",
                                                   "checkpoints"))
           if d.isdigit()]
  assert max(saved) == stopped[0]
  # The rerun resumes and ends where an uninterrupted run does.
  for rc, text in _wait(_launch(config, workdir, 2, 4)):
    assert rc == 0, text[-2000:]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               _params(one_process), _params(workdir))


@pytest.mark.slow
def test_student_sliced_over_both_processes_saves_and_resumes(one_process,
                                                              tmp_path):
  """shard_student on an fsdp axis of all 8 devices: each process holds
  half of every sliced array. Its checkpoints (written by both) hold the
  one-process run's parameters, and a rerun without the last one resumes
  from the sliced step-4 checkpoint to the same end."""
  config = _config(tmp_path, 6, "  c.mesh = dict(fsdp=8); "
                   "c.shard_student = True")
  workdir = str(tmp_path / "run")
  results = _wait(_launch(config, workdir, 2, 4))
  for rc, text in results:
    assert rc == 0, text[-2000:]
  sliced = results[0][1].split(" parameter arrays sliced over fsdp=8")[0]
  assert int(sliced.split()[-3]) > 0, sliced[-200:]
  check = lambda: jax.tree.map(  # noqa: E731
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      _params(one_process), _params(workdir))
  check()
  assert os.path.exists(os.path.join(workdir, "report.md"))
  folder = os.path.join(workdir, "teacher", "checkpoints")
  shutil.rmtree(os.path.join(folder, "6"))
  results = _wait(_launch(config, workdir, 2, 4))
  for rc, text in results:
    assert rc == 0 and "from step 4 of 6" in text, text[-2000:]
  check()


@pytest.fixture(scope="module")
def two_process_cache(one_process, tmp_path_factory):
  """(config, folder): `python -m kd_jax.teacher_cache` on 2 processes × 4
  devices, building the distill stage's cache into `folder` (6 steps of 8
  over 32 examples: 2 epochs)."""
  tmp = tmp_path_factory.mktemp("two_process_cache")
  folder = str(tmp / "cache")
  config = _config(tmp, 6, DISTILLED.format(
      cache=folder, teacher=os.path.join(one_process, "teacher")))
  results = _wait(_launch(config, str(tmp / "run"), 2, 4,
                          "kd_jax.teacher_cache"))
  for p, (rc, text) in enumerate(results):
    assert rc == 0, text[-2000:]
    assert f"epoch 2/2 of shard {p} written" in text, text[-2000:]
  return config, folder


def test_two_processes_build_the_cache_of_one_process(two_process_cache,
                                                       tmp_path):
  """Each process stores the examples its rows of the global batches hold
  (half of every epoch), with the outputs one process computes for them
  (built here, in this process, into another folder)."""
  config, folder = two_process_cache
  spec = importlib.util.spec_from_file_location("cached_config", config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.teacher_cache = str(tmp_path / "one")
  teacher_cache.build_for_run(c, str(tmp_path), ["distilled"], log=print)
  with open(os.path.join(folder, "manifest.json")) as f:
    assert json.load(f)["layout"] == {"shards": 2, "rows_per_process": 4}
  for epoch in (0, 1):
    one = _epoch_files(os.path.join(tmp_path, "one", "shard-0-of-1",
                                    f"epoch-{epoch}"))
    np.testing.assert_array_equal(one["index"], np.arange(32))
    held = []
    for p in (0, 1):
      two = _epoch_files(os.path.join(folder, f"shard-{p}-of-2",
                                      f"epoch-{epoch}"))
      assert set(two) == set(one)
      held.append(two["index"])
      for name in set(one) - {"index"}:
        np.testing.assert_allclose(two[name], one[name][two["index"]],
                                   rtol=1e-6, atol=1e-6, err_msg=name)
    assert len(held[0]) == len(held[1]) == 16
    np.testing.assert_array_equal(np.sort(np.concatenate(held)),
                                  np.arange(32))


def _epoch_files(folder):
  return {f[:-4]: np.load(os.path.join(folder, f)) for f in os.listdir(folder)}


@pytest.mark.slow  # Two runs more: ~4 min on the 2-core CPU.
def test_two_processes_train_from_the_cache_as_from_the_live_teacher(
    one_process, two_process_cache, tmp_path):
  """Training on 2 processes reads the cache the command built (no
  teacher forward) and ends with the parameters of 1 process on 8 devices
  running the live teacher."""
  config, _ = two_process_cache
  live = str(tmp_path / "live")
  [(rc, text)] = _wait(_launch(_config(tmp_path, 6, DISTILLED.format(
      cache=None, teacher=os.path.join(one_process, "teacher"))), live, 1,
                               8))
  assert rc == 0, text[-2000:]
  workdir = str(tmp_path / "cached")
  for rc, text in _wait(_launch(config, workdir, 2, 4)):
    assert rc == 0, text[-2000:]
    assert "teacher cache: epoch" not in text  # Nothing left to write.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               _params(live, "distilled"), _params(workdir, "distilled"))
