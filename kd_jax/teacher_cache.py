"""The teacher cache: a frozen teacher's outputs, computed once, on disk.

A distillation step needs the teacher's outputs for the exact view of each
example it trains on. Views are a pure function of (data seed, epoch,
example index) (`kd_jax.data.pipeline.example_view`), so the outputs of
`method.teacher_outputs` for every example's epoch-e view can be computed
once, stored, and replayed by every later run, arm and seed that asks the
same thing; a step fed from the cache runs the student alone.

    python -m kd_jax.teacher_cache --config=configs/x.py --workdir=runs/x
    python -m kd_jax.main ... --config.teacher_cache=auto

`config.teacher_cache`: unset (None or "": the teacher runs in every step),
"auto" (the folder `$KD_JAX_CACHE/<teacher>-<key>`, or
`<workdir>/teacher_cache/<teacher>-<key>` without that variable; <key>
hashes the manifest but for its outputs, so every stage of one teacher,
data, transforms and seed shares one folder), or a folder path (refused if
it holds a cache built for anything else).

A cache holds the union of the outputs that the run's stages of one teacher,
data and seed read (`stage_outputs`: logits for one arm, a feature for
another, both written by the first build), and serves any stage whose
outputs are among them. A stage asking for outputs that an existing cache
lacks is refused for a folder path; "auto" then gives it a folder of its
own (`<teacher>-<key>-<outputs key>`). An ensemble's cache holds its
members' logits stacked per example.

A loss term whose teacher side starts with a reduction of its own (AT's
attention map, the pair-wise nodes, a pooled embedding, a `pool=k` map)
reads it as a teacher view, `views.<feature>@<view>[-<args hash>]`
(`losses.LossSpec.view`, `Distill.view_table`): the cache stores the view,
not the feature, and the manifest's `views` says what each is.

`config.teacher_cache_dtype` ("float32", "bfloat16" or "float16") is the
stored type (a batch keeps it on its way to the device and is cast to
float32 in the step, `data.pipeline.decode`); `config.teacher_cache_top_k`
(0 = dense) keeps only the k largest logits of classification heads.

Layout of a cache folder:

    manifest.json                 what the outputs are of (`manifest`)
    shard-<p>-of-<P>/epoch-<e>/   process p's examples of epoch e, complete:
        index.npy                 their example indices (sorted)
        <output>.npy              one row per example (`.npy`, memory-mapped)

An epoch is written into a temporary folder, every file fsynced, then
renamed into place: an `epoch-<e>` folder is complete by construction, a
killed build leaves only a temporary folder (removed and redone by the next
build), and a reader opens complete epochs only. A cache grows: a later run
that trains for more epochs adds the epochs it lacks.

Several processes build a cache together on the run's mesh (the teacher
sliced as training slices it, `kd_jax.sharding`): each computes and writes
its own shard only (the examples its rows of the global batches hold), they
first agree on the epochs missing from any shard (all redo those, so a
build killed between two processes' renames is completed), and none returns
before every shard is written. The manifest records the layout, so a folder
built by another number of processes (or rows per process) is refused.

Top-k logits (`teacher_cache_top_k=k`, leaves of "logits" shaped (C,) per
example with C > k) store the k largest logits, their class indices and the
logsumexp of all C logits. They are read back as dense logits: the k stored
values at their classes and, at every other class, the one value c that
gives those classes together the probability the teacher's softmax gave
them, (C - k)·exp(c - lse) = 1 - Σ_topk exp(z_j - lse) (TinyViT's scheme:
the remaining mass spread evenly). At temperature 1 the target
probabilities of the top-k classes are then the teacher's own and the
others their mean; at T ≠ 1 this is an approximation, so a top-k cache
changes the loss, and only a dense cache replays the live teacher exactly.
"""
import functools
import hashlib
import json
import os
import shutil
import socket
import threading
import uuid

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from kd_jax import data, sharding, train

FORMAT = 1
DTYPES = {"float32": np.float32, "float16": np.float16,
          "bfloat16": ml_dtypes.bfloat16}
# The smallest probability mass left to the classes outside the top k (so
# their logit stays finite when the teacher put all its mass on the top k).
MIN_REST = 1e-12

# Epochs whose files a reader keeps open at once.
OPEN_EPOCHS = 3

# Examples the teacher has been run on by `TeacherCache.build` in this
# process (read by tests and benchmarks to count teacher forwards).
forwards = 0


def _plain(tree):
  """JSON's view of `tree` (tuples → lists, numpy scalars → numbers), so a
  manifest compares equal to itself read back."""
  def default(x):
    if isinstance(x, np.ndarray):
      return x.tolist()
    if isinstance(x, (np.integer, np.floating, np.bool_)):
      return x.item()
    return repr(x)
  return json.loads(json.dumps(tree, sort_keys=True, default=default))


def _whole(x) -> np.ndarray:
  """The whole value of `x` on this host: a numpy copy of an array of this
  process, assembled from this process's slices of an array over several
  (the teacher's FSDP groups lie within one process's devices,
  `sharding.make_mesh`), gathered from the others only where they do not
  cover it."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  out = np.empty(x.shape, x.dtype)
  covered = np.zeros(x.shape, bool)
  for s in x.addressable_shards:
    out[s.index] = np.asarray(s.data)
    covered[s.index] = True
  if covered.all():
    return out
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def variables_digest(variables) -> str:
  """sha256 of a variables pytree: every leaf's path, dtype, shape, bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    leaf = _whole(leaf)
    h.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}"
             .encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def transform_spec(transforms) -> list:
  """The transforms in order, each its class and settings (a
  `DeviceAugment`: the transforms it moves to the device)."""
  def one(t):
    if isinstance(t, data.device_augment.DeviceAugment):
      return {"class": type(t).__name__,
              "transforms": transform_spec(t.transforms)}
    return dict(vars(t), **{"class": type(t).__name__})
  return _plain([one(t) for t in transforms])


def _names(spec) -> list[str]:
  return [jax.tree_util.keystr(p, simple=True, separator=".")
          for p, _ in jax.tree_util.tree_flatten_with_path(spec)[0]]


def _is_top_k(name, shape, top_k) -> bool:
  """Whether output `name` of per-example `shape` is stored as top-k."""
  return bool(top_k) and name.split(".")[0] == "logits" and (
      len(shape) == 1 and shape[0] > top_k)


def _stored(name, shape, dtype, top_k) -> dict:
  """{file stem: (per-example shape, numpy dtype on disk)} of output `name`
  of per-example `shape` (bfloat16 is stored as its uint16 bits)."""
  dtype = np.uint16 if dtype == "bfloat16" else DTYPES[dtype]
  if _is_top_k(name, shape, top_k):
    index = np.int16 if shape[0] <= np.iinfo(np.int16).max else np.int32
    return {f"{name}.values": ((top_k,), dtype),
            f"{name}.indices": ((top_k,), index),
            f"{name}.lse": ((), np.float32)}
  return {name: (tuple(shape), dtype)}


def manifest(*, teacher_model, teacher_variables, data_options, examples,
             transforms, input_shape, seed, outputs, dtype="float32",
             top_k=0, shard_count=1, rows_per_process=None,
             views=None) -> dict:
  """What a cache holds, as JSON: the teacher (its model config and the
  digest of its variables), the data (options, number of examples, the
  transforms with their settings, the input shape), the data seed, the
  outputs the loss reads (name → per-example shape) with what each teacher
  view among them is (`views`: key → dict(feature, view, args), the
  method's `view_table`), the stored dtype and top-k, and the per-process
  layout (several processes: each stores the examples it reads, which
  depend on its rows of the global batch)."""
  if dtype not in DTYPES:
    raise ValueError(f"teacher_cache_dtype={dtype!r}; choose one of "
                     f"{sorted(DTYPES)}")
  if (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool)
      or top_k < 0):
    raise ValueError(f"teacher_cache_top_k={top_k!r}; expected an int >= 0 "
                     "(0 stores dense logits)")
  shapes = {n: list(x.shape[1:]) for n, x in zip(
      _names(outputs), jax.tree.leaves(outputs))}
  keys = [n.partition(".")[2] for n in shapes if n.startswith("views.")]
  missing = sorted(set(keys) - set(views or {}))
  if missing:
    raise ValueError(f"teacher outputs views.{missing[0]}: pass views= "
                     "(the method's view_table) to describe it")
  return _plain(dict(
      views={k: views[k] for k in keys},
      format=FORMAT,
      teacher=dict(model=teacher_model,
                   variables=variables_digest(teacher_variables)),
      data=dict(options=data_options, examples=int(examples),
                transforms=transform_spec(transforms),
                input_shape=list(input_shape)),
      seed=int(seed), outputs=shapes, dtype=dtype, top_k=int(top_k),
      layout=dict(shards=int(shard_count),
                  rows_per_process=(None if shard_count == 1
                                    else int(rows_per_process)))))


def manifest_key(m: dict) -> str:
  return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()


def _but_outputs(m: dict) -> dict:
  return {k: v for k, v in m.items() if k not in ("outputs", "views")}


def refusal(m: dict, stored: dict) -> list[str]:
  """What keeps a cache of manifest `stored` from serving request `m`: the
  fields that differ (outputs aside) and each requested output it lacks or
  holds in another shape or as another view; [] when it serves `m`."""
  out = _differences(_but_outputs(m), _but_outputs(stored))
  views, held = m.get("views", {}), stored.get("views", {})
  return out + [f"outputs.{n}" for n, shape in m["outputs"].items()
                if stored["outputs"].get(n) != shape or (
                    n.startswith("views.")
                    and held.get(n[6:]) != views.get(n[6:]))]


def _whole_features(m: dict, stored: dict) -> str:
  """The refusal's note on the views that `m` asks and `stored` lacks
  while holding their features whole (a cache of the layout before
  teacher views), or ""."""
  views = m.get("views", {})
  whole = sorted({f"features.{v['feature']}" for k, v in views.items()
                  if f"views.{k}" not in stored["outputs"]
                  and f"features.{v['feature']}" in stored["outputs"]})
  if not whole:
    return ""
  return (f" (it stores {', '.join(whole)} at full size; the loss terms "
          "read their reduced teacher views now)")


def _read_manifest(folder):
  path = os.path.join(folder, "manifest.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def auto_folder(m: dict, workdir: str) -> str:
  """The folder of `teacher_cache="auto"`: under `$KD_JAX_CACHE`, else
  `<workdir>/teacher_cache`, named by the teacher and the key of the
  manifest but for its outputs; the first such folder (or one of its
  `-<outputs key>` siblings) that serves `m`, else a new one."""
  root = os.environ.get("KD_JAX_CACHE") or os.path.join(workdir,
                                                        "teacher_cache")
  name = str(m["teacher"]["model"].get("name", "teacher"))
  base = os.path.join(root, f"{name}-{manifest_key(_but_outputs(m))[:16]}")
  own = f"{base}-{manifest_key(m['outputs'])[:8]}"
  siblings = sorted(os.path.join(root, f) for f in (
      os.listdir(root) if os.path.isdir(root) else ())
                    if os.path.join(root, f).startswith(base + "-"))
  for folder in [base] + siblings:
    stored = _read_manifest(folder)
    if stored is not None and not refusal(m, stored):
      return folder
  return base if _read_manifest(base) is None else own


def _differences(a, b, prefix="") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      if a.get(k) != b.get(k):
        out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [prefix.rstrip(".")]


def _fsync(path):
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_atomic(path, text):
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync(os.path.dirname(path))


def _layout(m: dict) -> str:
  layout = m["layout"]
  if layout["shards"] == 1:
    return "1 process"
  return (f"{layout['shards']} processes of {layout['rows_per_process']} "
          "rows each")


def _place(tree, shardings):
  """`tree` on `shardings` (a no-op for arrays already there). With
  several processes a host array, or one on this process's devices, is
  sliced from its host copy (the same in every process)."""
  def put(x, s):
    if jax.process_count() == 1 or (isinstance(x, jax.Array)
                                    and not x.is_fully_addressable):
      return jax.device_put(x, s)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda i: x[i])
  return jax.tree.map(put, tree, shardings)


def _local_rows(x) -> np.ndarray:
  """This process's rows of `x` (split on its leading axis over the
  mesh), in order: what it fed in."""
  if x.is_fully_addressable:
    return np.asarray(x)
  pieces = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(pieces[k]) for k in sorted(pieces)])


def _teacher_forward(method, frozen, mesh: Mesh):
  """(forward, its jitted function, the teacher placed on `mesh`):
  `forward(images)` runs `method.teacher_outputs` on this process's
  `images` (numpy, a multiple of its devices) split over the mesh's
  devices, with the teacher FSDP-sliced as in training
  (`sharding.fsdp_shardings`), and returns its rows of the outputs (numpy).
  """
  frozen_shardings = sharding.fsdp_shardings(frozen, mesh)
  frozen = _place(frozen, frozen_shardings)
  rows = sharding.batch_sharding(mesh)
  fn = jax.jit(method.teacher_outputs, in_shardings=(frozen_shardings, rows),
               out_shardings=rows)

  def forward(images):
    out = fn(frozen, jax.make_array_from_process_local_data(rows, images))
    return jax.tree.map(_local_rows, out)

  return forward, fn, frozen


def _views(source, seed, epoch, rows, transforms, batch_size):
  """The teacher's inputs for examples `rows` of epoch `epoch`, padded to
  `batch_size` (one shape: one compile). With `data.augment_on_device`
  the views are warped as the step warps them
  (`data.device_augment.apply_images`), so the cache replays the student's
  exact inputs."""
  views = [data.pipeline.example_view(source, seed, epoch, i, transforms)
           for i in rows]
  pad = batch_size - len(views)
  views += views[-1:] * pad
  images = np.stack([v["image"] for v in views])
  key = data.device_augment.KEY
  if key in views[0]:
    params = jax.tree.map(lambda *x: np.stack(x), *[v[key] for v in views])
    images = np.asarray(data.device_augment.apply_images(images, params))
  return images


class TeacherCache:
  """One cache folder, for process `shard_index` of `shard_count`."""

  def __init__(self, folder: str, m: dict, shard_index: int = 0):
    """Opens (or starts) the cache at `folder` for manifest `m`. A folder
    whose manifest equals `m` but for holding more outputs serves `m`'s
    (`self.manifest` is the stored one, `self.served` the outputs read
    back); any other is refused (ValueError, one line naming the fields
    that differ)."""
    stored = _read_manifest(folder)
    if stored is not None:
      differ = refusal(m, stored)
      if differ and all(d.startswith("layout") for d in differ):
        # The same outputs, cut into other per-process shards.
        raise ValueError(
            f"teacher cache {folder} was built by {_layout(stored)} and "
            f"this run is {_layout(m)}: run with "
            f"{stored['layout']['shards']} process(es) at that batch size,"
            " or set --config.teacher_cache=auto or another folder (a "
            "cache per process layout)")
      if differ:
        raise ValueError(
            f"teacher cache {folder} was built for another "
            f"{', '.join(differ)} (its manifest.json differs there"
            f"{_whole_features(m, stored)}): set "
            "--config.teacher_cache=auto, another folder, or delete that "
            "one")
    else:
      os.makedirs(folder, exist_ok=True)
      _write_atomic(os.path.join(folder, "manifest.json"),
                    json.dumps(m, indent=1, sort_keys=True))
      stored = m
    self.folder, self.manifest = folder, stored
    self.served = dict(m["outputs"])
    self.shard_index = int(shard_index)
    self.shard_count = stored["layout"]["shards"]
    self.shard = os.path.join(
        folder, f"shard-{self.shard_index}-of-{self.shard_count}")
    os.makedirs(self.shard, exist_ok=True)
    self._lock = threading.Lock()
    self._open = {}

  # -- layout ----------------------------------------------------------------

  def epoch_folder(self, epoch: int) -> str:
    return os.path.join(self.shard, f"epoch-{int(epoch)}")

  def complete(self, epoch: int) -> bool:
    return os.path.isdir(self.epoch_folder(epoch))

  def missing(self, epochs: int) -> list[int]:
    """The epochs of range(epochs) not yet complete in this shard."""
    return [e for e in range(epochs) if not self.complete(e)]

  def examples(self, epoch: int, shard: int | None = None) -> np.ndarray:
    """The example indices process `shard` (default: this one) reads in
    `epoch` (sorted)."""
    m = self.manifest
    n = m["data"]["examples"]
    if self.shard_count == 1:
      return np.arange(n)
    rows = m["layout"]["rows_per_process"]
    return data.pipeline.process_examples(
        n, m["seed"], epoch, rows * self.shard_count,
        self.shard_index if shard is None else shard, self.shard_count)

  # -- writing ---------------------------------------------------------------

  def build(self, method, frozen, source, transforms, epochs: int, *,
            mesh: Mesh | None = None, batch_size: int = 32, log=None) -> int:
    """Computes and stores every missing epoch of range(epochs); returns
    the number of epochs it wrote. `frozen` is the teacher's variables
    (host arrays, or arrays on `mesh`).

    `mesh` is the run's (data, fsdp) mesh (default: every device, fsdp 1):
    the teacher is placed on it as training places it (`kd_jax.sharding`:
    FSDP slices when fsdp > 1, kept sliced in the forward) and each jitted
    forward's batch, `batch_size` examples of this process (rounded up to
    a multiple of its devices), is split over its devices. A mesh over
    several processes makes the build collective: every process calls it
    at once, for its own shard; they write the epochs missing from any
    shard, run as many forwards each, and return once all are written."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    several = len({d.process_index for d in mesh.devices.flat}) > 1
    if several and (self.shard_index, self.shard_count) != (
        jax.process_index(), jax.process_count()):
      raise ValueError(
          f"teacher cache {self.folder}: shard {self.shard_index} of "
          f"{self.shard_count} built by process {jax.process_index()} of "
          f"{jax.process_count()}; open it with shard_index="
          "jax.process_index() and a manifest of jax.process_count() shards")
    self._clean()
    todo = self._missing_anywhere(epochs, several)
    if not todo:
      return 0
    local = len(mesh.local_devices)
    batch_size = -(-batch_size // local) * local
    forward = functools.partial(self._forward,
                                _teacher_forward(method, frozen, mesh)[0])
    for epoch in todo:
      shards = range(self.shard_count) if several else [self.shard_index]
      # As many forwards in every process: each is one collective step.
      calls = max(-(-len(self.examples(epoch, p)) // batch_size)
                  for p in shards)
      self._write_epoch(epoch, source, transforms, batch_size, forward,
                        calls)
      if log:
        log(f"teacher cache: epoch {epoch + 1}/{epochs} of shard "
            f"{self.shard_index} written to {self.folder}")
    if several:  # No process trains before every shard is complete.
      multihost_utils.sync_global_devices("kd_jax teacher cache built")
    return len(todo)

  def _missing_anywhere(self, epochs, several) -> list[int]:
    """The epochs of range(epochs) missing from this shard or, with
    several processes, from any process's shard (each process sees its
    own: the folder need not be shared). A build killed between two
    processes' renames is redone by all, so every process writes (or
    finds) the same epochs."""
    missing = np.array([not self.complete(e) for e in range(epochs)], bool)
    if several and epochs:
      missing = np.asarray(multihost_utils.process_allgather(missing)).any(0)
    return [e for e in range(epochs) if missing[e]]

  def _forward(self, forward, images):
    global forwards
    forwards += len(images)
    return forward(images)

  def _write_epoch(self, epoch, source, transforms, batch_size, forward,
                   calls):
    m = self.manifest
    names = list(m["outputs"])
    index = self.examples(epoch)
    tmp = (f"{self.epoch_folder(epoch)}.tmp-{socket.gethostname()}-"
           f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
      arrays = {}
      for name in names:
        for stem, (shape, dtype) in _stored(name, m["outputs"][name],
                                            m["dtype"], m["top_k"]).items():
          arrays[stem] = np.lib.format.open_memmap(
              os.path.join(tmp, f"{stem}.npy"), mode="w+", dtype=dtype,
              shape=(len(index),) + tuple(shape))
      for start in range(0, calls * batch_size, batch_size):
        rows = index[start:start + batch_size]
        # A process with fewer examples than the others runs on a view of
        # example 0 (discarded) to join their forwards.
        images = _views(source, m["seed"], epoch,
                        rows if len(rows) else [0], transforms, batch_size)
        out = forward(images)
        if not len(rows):
          continue
        for name, leaf in zip(_names(out), jax.tree.leaves(out)):
          self._store(arrays, name, leaf[:len(rows)],
                      slice(start, start + len(rows)))
      for a in arrays.values():
        a.flush()
      del arrays
      np.save(os.path.join(tmp, "index.npy"), index.astype(np.int64))
      for f in os.listdir(tmp):
        _fsync(os.path.join(tmp, f))
      _fsync(tmp)
      try:
        os.rename(tmp, self.epoch_folder(epoch))
      except OSError:
        if not self.complete(epoch):  # Not another build that finished first.
          raise
      _fsync(self.shard)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)

  def _clean(self):
    """Removes the temporary folders of killed builds on this host (their
    process is gone; a live build's are left alone)."""
    host = socket.gethostname()
    for f in os.listdir(self.shard):
      tag = f.partition(".tmp-")[2].rsplit("-", 2)
      if len(tag) == 3 and tag[0] == host and not _alive(int(tag[1])):
        shutil.rmtree(os.path.join(self.shard, f), ignore_errors=True)

  def _store(self, arrays, name, leaf, rows):
    shape = tuple(self.manifest["outputs"][name])
    k = self.manifest["top_k"]
    leaf = np.asarray(leaf, np.float32)
    if leaf.shape[1:] != shape:
      raise ValueError(f"teacher output {name} is {leaf.shape[1:]}, the "
                       f"cache's manifest says {shape}")
    if _is_top_k(name, shape, k):
      top = np.argsort(-leaf, axis=-1, kind="stable")[:, :k]
      values = np.take_along_axis(leaf, top, -1)
      peak = leaf.max(-1, keepdims=True)
      lse = peak[:, 0] + np.log(np.exp(leaf - peak).sum(-1))
      self._put(arrays[f"{name}.values"], rows, values)
      arrays[f"{name}.indices"][rows] = top
      arrays[f"{name}.lse"][rows] = lse
    else:
      self._put(arrays[name], rows, leaf)

  def _put(self, array, rows, values):
    if self.manifest["dtype"] == "bfloat16":
      array[rows] = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    else:
      array[rows] = values.astype(array.dtype)

  # -- reading ---------------------------------------------------------------

  def _epoch(self, epoch):
    with self._lock:
      if epoch not in self._open:
        folder = self.epoch_folder(epoch)
        if not os.path.isdir(folder):
          raise FileNotFoundError(
              f"teacher cache {self.folder} has no complete epoch {epoch} "
              f"for process {self.shard_index}: build it first "
              "(python -m kd_jax.teacher_cache)")
        self._open[epoch] = {
            f[:-4]: np.load(os.path.join(folder, f), mmap_mode="r")
            for f in os.listdir(folder) if f.endswith(".npy")}
        # Each open memory map holds a file descriptor: only the epochs the
        # stream is reading now (a batch may straddle two) stay open.
        while len(self._open) > OPEN_EPOCHS:
          del self._open[next(iter(self._open))]
      return self._open[epoch]

  def batch_outputs(self, epochs, indices):
    """The teacher outputs of examples `indices`, each for its view of
    epoch `epochs[i]`, stacked on a leading axis in the pytree of
    `method.teacher_outputs` (a batch reader for
    `data.pipeline.train_batches`): one fancy-index per stored array and
    epoch. Dense outputs keep the stored dtype, so float16 and bfloat16
    travel to the device as such and are cast there
    (`data.pipeline.decode`); top-k logits come back dense, float32."""
    epochs = np.asarray(epochs, np.int64)
    indices = np.asarray(indices, np.int64)
    flat = {}
    parts = np.unique(epochs)
    for epoch in parts:
      mine = np.flatnonzero(epochs == epoch)
      files = self._epoch(int(epoch))
      rows = self._rows(files, indices[mine], epoch)
      for name, shape in self.served.items():
        part = (self._dense_top_k(files, name, shape[0], rows)
                if _is_top_k(name, shape, self.manifest["top_k"])
                else self._read(files[name], rows))
        if len(parts) == 1:  # The whole batch in one gather.
          flat[name] = part
          continue
        if name not in flat:
          flat[name] = np.empty((len(indices),) + part.shape[1:], part.dtype)
        flat[name][mine] = part
    out = {}
    for name, value in flat.items():
      node = out
      *parents, leaf = name.split(".")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = value
    return out

  def _rows(self, files, indices, epoch):
    """The rows of examples `indices` in an epoch's files."""
    stored = files["index"]
    rows = np.searchsorted(stored, indices)
    found = stored[np.minimum(rows, len(stored) - 1)] == indices
    if not found.all():
      raise KeyError(f"teacher cache {self.folder}: example "
                     f"{indices[~found][0]} of epoch {epoch} is not in "
                     f"process {self.shard_index}'s shard")
    return rows

  def _read(self, array, rows):
    # A copy of those rows out of the memory map (a plain ndarray: numpy's
    # memmap subclass costs more per call than the copy itself).
    out = np.asarray(array)[rows]
    if self.manifest["dtype"] == "bfloat16":
      out = out.view(ml_dtypes.bfloat16)
    return out

  def _dense_top_k(self, files, name, classes, rows):
    values = self._read(files[f"{name}.values"], rows).astype(np.float32)
    lse = np.asarray(files[f"{name}.lse"][rows], np.float64)
    kept = np.exp(values.astype(np.float64) - lse[:, None]).sum(-1)
    rest = np.maximum(1.0 - kept, MIN_REST)
    fill = lse + np.log(rest) - np.log(classes - values.shape[1])
    dense = np.repeat(fill.astype(np.float32)[:, None], classes, axis=1)
    np.put_along_axis(dense, np.asarray(files[f"{name}.indices"][rows],
                                        np.int64), values, axis=1)
    return dense


def bytes_per_example(m: dict) -> int:
  """Bytes one example's outputs take on disk for one epoch (index incl.)."""
  total = 8  # Its entry in index.npy.
  for name, shape in m["outputs"].items():
    for shape_, dtype in _stored(name, shape, m["dtype"],
                                 m["top_k"]).values():
      total += int(np.prod(shape_, dtype=np.int64)) * np.dtype(dtype).itemsize
  return total


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


# ----------------------------------------------------------------------------
# A stage's cache (`config.teacher_cache`).


def wanted(config, method) -> bool:
  """Whether the stage of `method` reads its teacher from a cache (its
  method names the teacher outputs it reads and computes any of them:
  `teacher_output_names`, `teacher_outputs(frozen, images, outputs)`)."""
  return bool(config.get("teacher_cache")) and hasattr(
      method, "teacher_output_names")


def check(config, name, method, datasets) -> None:
  """Raises train.ConfigError when stage `name` cannot use the cache."""
  setting = config.get("teacher_cache")
  if not isinstance(setting, str) or setting.lower() in (
      "true", "false", "yes", "no", "1", "0", "none"):
    raise train.ConfigError(
        f"teacher_cache={setting!r}: set --config.teacher_cache=auto (a "
        "folder shared by every stage asking the same thing) or a folder "
        "path, or leave it unset (no cache)")
  if datasets.unlabelled is not None:
    raise train.ConfigError(
        f"stage {name!r}: teacher_cache covers the labelled training set "
        "only, and this stage mixes in an unlabelled pool; "
        "leave --config.teacher_cache unset")
  try:
    manifest(outputs={}, teacher_model={}, teacher_variables={},
             data_options={}, examples=0, transforms=(), input_shape=(),
             seed=0, dtype=config.get("teacher_cache_dtype", "float32"),
             top_k=config.get("teacher_cache_top_k", 0))
  except ValueError as e:
    raise train.ConfigError(f"stage {name!r}: {e}") from None


def epochs_needed(steps: int, batch_size: int, examples: int) -> int:
  """Epochs of the stream that `steps` global batches reach into."""
  return -(-steps * batch_size // examples)


def _shared_by(s) -> tuple:
  """What stages reading one cache have in common: the teacher (its model
  and where its variables come from), the data and the seed."""
  return (s.get("teacher"), s.get("teachers"), s["data"], s["seed"])


def stage_outputs(config, name, method, datasets) -> tuple[list[str], dict]:
  """The outputs stage `name`'s cache holds and the views among them
  (`Distill.view_table`'s form): the union of those that the stages of
  `config.stage_order` distilling the same teacher on the same data with
  the same seed read (one build serves them all)."""
  names = set(method.teacher_output_names())
  views = dict(getattr(method, "view_table", {}))
  shared = _shared_by(train.stage_config(config, name))
  heads = train.run_heads(config, datasets)
  for other in config.stage_order:
    if other == name or _shared_by(train.stage_config(config, other)) != (
        shared):
      continue
    peer, _ = train.build_method(config, other, "", datasets.num_classes,
                                 load_teacher=False, heads=heads)
    names |= set(getattr(peer, "teacher_output_names", list)())
    views.update(getattr(peer, "view_table", {}))
  return sorted(names), views


def _teacher_model(s) -> dict:
  """The teacher's model config (an ensemble's: its members')."""
  if s.get("teachers"):
    members = [_plain(t["model"]) for t in s["teachers"]]
    return dict(name=f"ensemble-{members[0].get('name', 'teacher')}",
                members=members)
  return _plain(s["teacher"]["model"])


def _group(name: str) -> str:
  """The `teacher_outputs` name ("logits", "features.<name>") of a stored
  output ("logits.<head>" for a head of several)."""
  parts = name.split(".")
  return "logits" if parts[0] == "logits" else ".".join(parts[:2])


class _Outputs:
  """A method's teacher giving the outputs `names` (a cache's), the views
  among them described by `views`."""

  def __init__(self, method, names, views):
    self.method, self.names, self.views = method, list(names), dict(views)

  def teacher_outputs(self, frozen, images):
    if not self.views:  # Methods without views take no views=.
      return self.method.teacher_outputs(frozen, images, outputs=self.names)
    return self.method.teacher_outputs(frozen, images, outputs=self.names,
                                       views=self.views)


def stage_manifest(config, name, method, frozen, datasets) -> dict:
  """The manifest of stage `name`'s cache (`frozen`: the teacher's
  variables), its outputs those of `stage_outputs`."""
  s = train.stage_config(config, name)
  source, transforms = datasets.train, datasets.train_transforms
  image = np.asarray(data.pipeline.example_view(
      source, s["seed"], 0, 0, transforms)["image"])
  forward = _Outputs(method, *stage_outputs(config, name, method, datasets))
  outputs = jax.eval_shape(forward.teacher_outputs, frozen,
                           jax.ShapeDtypeStruct((1,) + image.shape,
                                                image.dtype))
  shards = jax.process_count()
  return manifest(
      teacher_model=dict(_teacher_model(s),
                         compute_dtype=config.get("compute_dtype"),
                         layers=config.get("layers")),
      teacher_variables=frozen,
      # `augment_on_device` is in the transforms' spec (a DeviceAugment):
      # left out here, so adding the key at False keeps every cache's key.
      data_options={k: v for k, v in train.stage_data(config, name).items()
                    if k != "augment_on_device"}, examples=len(source),
      transforms=transforms, input_shape=image.shape + (str(image.dtype),),
      seed=s["seed"], outputs=outputs,
      dtype=config.get("teacher_cache_dtype", "float32"),
      top_k=config.get("teacher_cache_top_k", 0), shard_count=shards,
      rows_per_process=config.batch_size // shards, views=forward.views)


def for_stage(config, name, workdir, method, frozen, datasets, log=None,
              mesh=None) -> TeacherCache:
  """Stage `name`'s cache with every epoch its steps read, built where
  missing on the run's `mesh` (default `config.mesh`'s) (`frozen`: the
  teacher's variables); its reader gives the outputs `method` reads. With
  several processes every process calls it: each builds and reads its own
  shard."""
  m = stage_manifest(config, name, method, frozen, datasets)
  setting = config.teacher_cache
  folder = auto_folder(m, workdir) if setting == "auto" else setting
  try:
    cache = TeacherCache(folder, m, jax.process_index())
  except ValueError as e:
    raise train.ConfigError(f"stage {name!r}: {e}") from None
  reads = set(method.teacher_output_names())
  cache.served = {n: shape for n, shape in m["outputs"].items()
                  if _group(n) in reads}
  steps = train.stage_config(config, name)["steps"]
  # Epochs are built with every output the folder holds (maybe more than
  # this run's stages read: an earlier run's union).
  cache.build(_Outputs(method, sorted({_group(n) for n in cache.manifest[
      "outputs"]}), cache.manifest.get("views", {})), frozen,
              datasets.train, datasets.train_transforms,
              epochs_needed(steps, config.batch_size, len(datasets.train)),
              mesh=train.mesh_from_config(config) if mesh is None else mesh,
              batch_size=config.batch_size // jax.process_count(), log=log)
  return cache


def build_for_run(config, workdir, stages=None, log=print) -> dict:
  """Builds the cache of every distill stage of `config` (or of `stages`)
  whose teacher is trained: {stage: cache folder}. An unset
  `config.teacher_cache` builds the "auto" folder."""
  if not config.get("teacher_cache"):
    with config.unlocked():
      config.teacher_cache = "auto"
  try:
    datasets = data.build(config.data)
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    raise train.ConfigError(f"data: {e}") from None
  cache = {}
  train.validate(config, workdir, datasets, cache)
  order = list(config.stage_order)
  for name in stages or order:
    if name not in order:
      raise train.ConfigError(f"--stage={name}: not a stage of stage_order "
                              f"{order}")
  done = {}
  for name in stages or order:
    ds = train.stage_datasets(config, name, datasets, cache)
    method, _ = train.build_method(config, name, workdir, ds.num_classes,
                                   load_teacher=False,
                                   heads=train.run_heads(config, ds))
    if not wanted(config, method):
      continue
    try:
      method, frozen = train.build_method(config, name, workdir,
                                          ds.num_classes,
                                          heads=train.run_heads(config, ds))
    except FileNotFoundError as e:
      if stages:
        raise train.ConfigError(f"stage {name!r}: {e}") from None
      log(f"stage {name}: its teacher is not trained yet ({e}); skipped")
      continue
    done[name] = for_stage(config, name, workdir, method, frozen, ds,
                           log=log).folder
    log(f"stage {name}: teacher cache complete in {done[name]}")
  return done


def _command():
  """`python -m kd_jax.teacher_cache --config=... --workdir=...
  [--stage=name]`: the caches of a run's distill stages, built ahead of
  training (the flags of `kd_jax.main`)."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from kd_jax import main  # pylint: disable=g-import-not-at-top
  flags.DEFINE_multi_string("stage", None, "Only these stages (default: "
                            "every distill stage whose teacher is trained).")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    main.quiet_console()
    try:
      train.initialize_processes()
      build_for_run(main.FLAGS.config, main.FLAGS.workdir,
                    main.FLAGS.stage)
    except train.ConfigError as e:
      raise SystemExit(f"error: {e}") from None

  app.run(run, flags_parser=main.parse_flags)


if __name__ == "__main__":
  _command()
