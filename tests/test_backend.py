"""kd_jax.accelerator: a visible GPU or TPU while JAX runs on the CPU stops
`python -m kd_jax.main` with one line naming the fix, unless the user asks
for the CPU; partitionable threefry is turned on where it is off.

The decision function gets every case's facts as arguments (no GPU here);
the command runs in this process through `main.parse_flags` and
`main.main`, with the real probe of this machine, which has no accelerator.
"""
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from kd_jax import accelerator, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.py")
GPU_FIX = 'pip install -e ".[cuda12]"'
TPU_FIX = 'pip install -e ".[tpu]"'

# (id, backend, device files, PCI (vendor, device) ids, env, what the line
# names, or None where nothing must be said)
CASES = [
    ("on_gpu", "gpu", ["/dev/nvidia0"], [], {}, None),
    ("on_tpu", "tpu", ["/dev/accel0"], [], {}, None),
    ("cpu_only_machine", "cpu", [], [("0x8086", "0x1237")], {}, None),
    ("nvidia0", "cpu", ["/dev/nvidia0"], [], {}, [GPU_FIX, "/dev/nvidia0"]),
    ("nvidiactl_in_docker", "cpu", ["/dev/nvidiactl"], [], {},
     [GPU_FIX, "/dev/nvidiactl"]),
    ("gpus_hidden_empty", "cpu", ["/dev/nvidia0"], [],
     {"CUDA_VISIBLE_DEVICES": ""}, None),
    ("gpus_hidden_minus_one", "cpu", ["/dev/nvidia0"], [],
     {"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ("one_gpu_chosen", "cpu", ["/dev/nvidia0"], [],
     {"CUDA_VISIBLE_DEVICES": "1"}, [GPU_FIX]),
    ("jax_platforms_cpu", "cpu", ["/dev/nvidia0"], [],
     {"JAX_PLATFORMS": "cpu"}, None),
    ("jax_platforms_cuda_then_cpu", "cpu", ["/dev/nvidia0"], [],
     {"JAX_PLATFORMS": "cuda,cpu"}, [GPU_FIX]),
    ("accel0", "cpu", ["/dev/accel0"], [], {}, [TPU_FIX, "/dev/accel0"]),
    ("tpu_v5e_on_pci", "cpu", [], [("0x1ae0", "0x0063")], {},
     [TPU_FIX, "PCI device 0x0063"]),
    # Google's virtual NIC on any GCE machine: Google's vendor id, no TPU.
    ("gce_nic", "cpu", [], [("0x1ae0", "0x0042")], {}, None),
    # A TPU's device id under another vendor is not a TPU.
    ("other_vendor", "cpu", [], [("0x10de", "0x0063")], {}, None),
    ("tpu_env", "cpu", [], [], {"TPU_ACCELERATOR_TYPE": "v4-8"},
     [TPU_FIX, "TPU_ACCELERATOR_TYPE=v4-8"]),
    ("gpu_before_tpu", "cpu", ["/dev/nvidia0", "/dev/accel0"], [], {},
     [GPU_FIX]),
]


@pytest.mark.parametrize("backend,files,pci,env,names",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cpu_instead_of_accelerator(backend, files, pci, env, names):
  line = accelerator.cpu_instead_of_accelerator(backend, files, pci, env)
  if names is None:
    assert line is None, line
    return
  assert "\n" not in line and "runs on the CPU" in line, line
  assert "--allow_cpu" in line and "KD_JAX_ALLOW_CPU=1" in line, line
  for name in names:
    assert name in line, line
  other = TPU_FIX if GPU_FIX in names else GPU_FIX
  assert other not in line, line


def test_check_is_silent_on_this_machine():
  # No accelerator here (CI neither); on a GPU machine JAX must run there.
  assert accelerator.check() is None


# A simulated TPU host needs JAX on the CPU, as here and in CI.
on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu",
                            reason="JAX runs on an accelerator")


@on_cpu
def test_check_reads_the_environment_and_its_override():
  tpu = {"TPU_ACCELERATOR_TYPE": "v5litepod-8"}
  assert TPU_FIX in accelerator.check(tpu)
  assert TPU_FIX in accelerator.check(tpu | {"KD_JAX_ALLOW_CPU": "0"})
  assert accelerator.check(tpu | {"KD_JAX_ALLOW_CPU": "1"}) is None


def run_main(monkeypatch, workdir, extra=()):
  """The command's exit: 0, or the SystemExit code (its message). The
  config's lr=0 stops it in validation, after the accelerator check."""
  monkeypatch.setattr(main, "quiet_console", lambda: None)
  argv = ["kd_jax.main", f"--config={DEFAULT}", f"--workdir={workdir}",
          "--config.optimizer.lr=0", *extra]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads overrides here.
  main.FLAGS.unparse_flags()
  for name in [n for n in main.FLAGS if n.startswith("config.")]:
    delattr(main.FLAGS, name)  # Each parse defines the overrides anew.
  try:
    main.main(main.parse_flags(argv))
  except SystemExit as e:
    return e.code
  return 0


def test_main_goes_on_to_validation_on_this_cpu(monkeypatch, tmp_path):
  for name in ("TPU_ACCELERATOR_TYPE", "KD_JAX_ALLOW_CPU"):
    monkeypatch.delenv(name, raising=False)
  code = run_main(monkeypatch, tmp_path / "run")
  assert isinstance(code, str) and "optimizer.lr=0.0" in code, code


@on_cpu
def test_main_stops_when_a_tpu_host_runs_jax_on_the_cpu(monkeypatch,
                                                         tmp_path):
  monkeypatch.delenv("KD_JAX_ALLOW_CPU", raising=False)
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v4-8")
  code = run_main(monkeypatch, tmp_path / "run")
  assert isinstance(code, str) and code.startswith("error: ") \
      and "\n" not in code, code
  assert TPU_FIX in code and "--allow_cpu" in code, code
  assert not (tmp_path / "run").exists()  # Stopped before anything ran.


@on_cpu
@pytest.mark.parametrize("extra,env", [(["--allow_cpu"], {}),
                                       ([], {"KD_JAX_ALLOW_CPU": "1"})],
                         ids=["flag", "env"])
def test_main_allow_cpu_goes_on(monkeypatch, tmp_path, extra, env):
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v4-8")
  monkeypatch.delenv("KD_JAX_ALLOW_CPU", raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  code = run_main(monkeypatch, tmp_path / "run", extra)
  assert isinstance(code, str) and "optimizer.lr=0.0" in code, code


_THREEFRY = textwrap.dedent("""
    import jax
    from kd_jax import accelerator
    before = jax.config.jax_threefry_partitionable
    changed = accelerator.use_partitionable_random()
    print(before, changed, jax.config.jax_threefry_partitionable,
          accelerator.use_partitionable_random())
""")


@pytest.mark.parametrize("setting,expected", [
    ("0", "False True True False"),   # Off (jax < 0.5's default): on.
    ("1", "True False True False"),   # Already on: left alone.
])
def test_use_partitionable_random(setting, expected):
  env = dict(os.environ, JAX_THREEFRY_PARTITIONABLE=setting,
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _THREEFRY], env=env,
                       capture_output=True, text=True, check=True, cwd=ROOT)
  assert out.stdout.split() == expected.split(), out.stderr
