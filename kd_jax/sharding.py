"""The device mesh and where each array of a stage lives on it.

The mesh has two axes, `data` and `fsdp` (`config.mesh = dict(fsdp=N)`;
`data` takes the rest of the devices). A batch is split over both, so
every device sees its own examples whatever N is. A parameter-like array
is either replicated or, FSDP-style, cut into N slices along one axis over
`fsdp` and kept whole on none of them: the frozen teacher always when
N > 1, the student's parameters, BatchNorm statistics and optimizer state
too with `config.shard_student`. The jitted step gathers what it needs
(XLA inserts the all-gathers and reduce-scatters); what is kept between
steps, and saved, is the slices.

`SHARD_MIN_SIZE` keeps small arrays (biases, norm scales) replicated: a
slice of them saves less memory than the collective to gather it costs.
"""
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
# Arrays of fewer elements stay replicated (4 KiB of float32).
SHARD_MIN_SIZE = 1024
MESH_KEYS = frozenset({"fsdp"})


def make_mesh(devices=None, fsdp: int = 1) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default all); `fsdp` must divide
  their count (ValueError otherwise)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  n = devices.size
  if isinstance(fsdp, bool) or not isinstance(fsdp, (int, np.integer)) or (
      fsdp < 1 or n % fsdp):
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    raise ValueError(f"config.mesh.fsdp={fsdp!r} must divide the {n} "
                     f"devices: choose one of {divisors}")
  # Consecutive devices form an fsdp group: one process's devices (which
  # jax lists together) hold all the slices of an array between them.
  return Mesh(devices.reshape(n // fsdp, fsdp), (DATA, FSDP))


def mesh_options(config) -> dict:
  """`config.mesh` as a dict, checked for unknown keys (ValueError)."""
  options = config.get("mesh") or {}
  if isinstance(options, ml_collections.ConfigDict):
    options = options.to_dict()
  if not isinstance(options, dict):
    raise ValueError(f"config.mesh={options!r}: give dict(fsdp=<devices per "
                     "fsdp group>)")
  unknown = sorted(set(options) - MESH_KEYS)
  if unknown:
    raise ValueError(f"config.mesh has unknown keys {unknown}; allowed: "
                     f"{sorted(MESH_KEYS)}")
  return options


def mesh_from_config(config, devices=None) -> Mesh:
  """The run's mesh: `config.mesh.fsdp` (default 1) devices per group."""
  return make_mesh(devices, fsdp=mesh_options(config).get("fsdp", 1))


def fsdp_size(mesh: Mesh) -> int:
  return dict(mesh.shape).get(FSDP, 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """A batch's leading axis split over every device of the mesh."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, size: int) -> P:
  """The axis to slice an array of `shape` over `size` devices: the largest
  one `size` divides (the first of equals); none (replicated) for an array
  of fewer than SHARD_MIN_SIZE elements, for `size` 1, or when no axis
  divides."""
  if size == 1 or math.prod(shape) < SHARD_MIN_SIZE:
    return P()
  axes = [i for i, d in enumerate(shape) if d % size == 0]
  if not axes:
    return P()
  axis = max(axes, key=lambda i: (shape[i], -i))
  return P(*([None] * axis + [FSDP]))


def fsdp_shardings(tree, mesh: Mesh) -> Any:
  """`fsdp_spec`'s sharding for every array (or ShapeDtypeStruct) of
  `tree`."""
  size = fsdp_size(mesh)
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), size)), tree)


def state_shardings(abstract_state, mesh: Mesh, shard_student: bool) -> Any:
  """The shardings of a `train.TrainState`: params, batch_stats and
  opt_state by `fsdp_spec` with `shard_student` (optax's states hold arrays
  of the parameters' shapes, so each moment lands beside its parameter),
  everything replicated without."""
  rep = replicated(mesh)
  everything = jax.tree.map(lambda _: rep, abstract_state)
  if not shard_student:
    return everything
  return everything.replace(
      params=fsdp_shardings(abstract_state.params, mesh),
      batch_stats=fsdp_shardings(abstract_state.batch_stats, mesh),
      opt_state=fsdp_shardings(abstract_state.opt_state, mesh))


def with_shardings(abstract, shardings) -> Any:
  """ShapeDtypeStructs of `abstract` carrying `shardings` (what Orbax
  restores onto)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)
