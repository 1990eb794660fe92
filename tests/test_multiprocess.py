"""Two local processes × 4 virtual CPU devices train one run together: the
same parameters as one process on 8 devices, a validation split that does
not divide evenly (17 examples), and a SIGTERM to one process stopping both
at the same step, from which a rerun resumes."""
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

from kd_jax import checkpoint

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


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(config, workdir, processes, devices):
  """`processes` × `devices` devices running `python -m kd_jax.main`."""
  port = _free_port()
  procs = []
  for i in range(processes):
    env = dict(os.environ, PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                 JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "kd_jax.main", f"--config={config}",
         f"--workdir={workdir}"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
  return procs


def _wait(procs, timeout=600):
  out = []
  for p in procs:
    try:
      text, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("a process hung (a collective one side never joined)")
    out.append((p.returncode, text))
  return out


def _params(workdir):
  return jax.device_get(checkpoint.load_model_variables(
      os.path.join(workdir, "teacher"))["params"])


def _config(tmp_path, steps, extra=""):
  path = tmp_path / f"config_{steps}.py"
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
  config = _config(tmp_path, 6, "c.mesh = dict(fsdp=8); "
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
