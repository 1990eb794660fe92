"""Which accelerator this machine has, and whether JAX is using it.

A machine with a GPU and a CPU-only jaxlib (or a CUDA jaxlib whose libraries
did not load) makes JAX fall back to the CPU with one warning among many:
training then runs 50-100x slower and nothing else says why.
`cpu_instead_of_accelerator` decides this from facts passed in, so every
case can be tested on a machine without one; `check` gathers the facts of
this machine. Nothing here changes the process on import.
"""
import glob
import os
from typing import Iterable, Mapping, Optional

import jax

# An NVIDIA GPU's device files: the first GPU, and the control file that
# Docker and Kubernetes mount with any GPU.
NVIDIA_FILES = ("/dev/nvidia0", "/dev/nvidiactl")
# TPU v4 and later chips appear as /dev/accel<N>.
TPU_FILES = ("/dev/accel0",)
# Google's PCI vendor id and its TPU chips' device ids (v3 to TPU7x). The
# vendor id alone would also match the virtual NIC of every GCE machine.
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062",
                             "0x0063", "0x006f", "0x0076"})
# Set by GKE and Cloud TPU launchers on a TPU host.
TPU_ENV = "TPU_ACCELERATOR_TYPE"
# Lets a user who means the CPU train there anyway.
ALLOW_ENV = "KD_JAX_ALLOW_CPU"


def cpu_instead_of_accelerator(backend: str, device_files: Iterable[str],
                               pci_devices: Iterable[tuple[str, str]],
                               env: Mapping[str, str]) -> Optional[str]:
  """One line saying which accelerator is visible while JAX runs on the
  CPU, and the fix; None when JAX is on an accelerator, none is visible, or
  the environment already asks for the CPU.

  Args:
    backend: `jax.default_backend()`.
    device_files: those of NVIDIA_FILES and TPU_FILES that exist.
    pci_devices: (vendor, device) ids of the PCI devices.
    env: the process environment.
  """
  if backend != "cpu":
    return None
  platforms = {p.strip() for p in env.get("JAX_PLATFORMS", "").split(",")}
  if platforms == {"cpu"}:
    return None  # The user asked JAX for the CPU.
  device_files = set(device_files)
  gpu = [f for f in NVIDIA_FILES if f in device_files]
  # An empty or -1 CUDA_VISIBLE_DEVICES hides the GPUs on purpose.
  if gpu and env.get("CUDA_VISIBLE_DEVICES") not in ("", "-1"):
    return (f"a GPU is visible ({gpu[0]}) but JAX runs on the CPU: install "
            f"JAX for CUDA with `pip install -e \".[cuda12]\"` (if it is "
            f"installed, JAX's warning above says why CUDA did not load), or "
            f"pass --allow_cpu (or set {ALLOW_ENV}=1) to train on the CPU")
  tpu = ([f for f in TPU_FILES if f in device_files]
         + [f"PCI device {d}" for v, d in pci_devices
            if v == GOOGLE_PCI_VENDOR and d in TPU_PCI_DEVICES])
  if env.get(TPU_ENV):
    tpu.append(f"{TPU_ENV}={env[TPU_ENV]}")
  if tpu:
    return (f"a TPU is visible ({tpu[0]}) but JAX runs on the CPU: install "
            f"JAX for TPUs with `pip install -e \".[tpu]\"`, or pass "
            f"--allow_cpu (or set {ALLOW_ENV}=1) to train on the CPU")
  return None


def _pci_devices() -> list[tuple[str, str]]:
  """(vendor, device) ids from sysfs; none where it is absent or unreadable
  (macOS, some containers)."""
  ids = []
  for vendor_path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor_path, encoding="ascii") as f:
        vendor = f.read().strip()
      if vendor != GOOGLE_PCI_VENDOR:
        continue  # Only Google's devices are read further.
      with open(os.path.join(os.path.dirname(vendor_path), "device"),
                encoding="ascii") as f:
        ids.append((vendor, f.read().strip()))
    except OSError:
      continue
  return ids


def check(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
  """`cpu_instead_of_accelerator` for this machine and process; None when
  KD_JAX_ALLOW_CPU (`--allow_cpu`'s twin) is set to anything but 0."""
  env = os.environ if env is None else env
  if env.get(ALLOW_ENV, "") not in ("", "0"):
    return None
  files = [f for f in NVIDIA_FILES + TPU_FILES if os.path.exists(f)]
  return cpu_instead_of_accelerator(jax.default_backend(), files,
                                    _pci_devices(), env)


def use_partitionable_random() -> bool:
  """Turns on jax's partitionable threefry where it is off (jax < 0.5's
  default, or JAX_THREEFRY_PARTITIONABLE=0); returns whether it changed.

  With it, each device generates only its shard of a sharded random array;
  without it, every device generates the whole global array and keeps its
  slice. It is turned on for one device too, so a run draws the same
  numbers whatever the device count.
  """
  if jax.config.jax_threefry_partitionable:
    return False
  jax.config.update("jax_threefry_partitionable", True)
  return True
