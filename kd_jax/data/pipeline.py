"""grain pipelines: random-access source → shard → shuffle → transforms → batch.

Training batches come from an infinite `grain.MapDataset` indexed by step:
batch `s` is a pure function of (source, seed, s). The stream's position p
is example `epoch_order(seed, e)[p % n]` of epoch e = p // n, and its
augmented view a pure function of (seed, epoch, example index)
(`example_view`), so a stored teacher output can be matched to the exact
view it belongs to (`kd_jax.teacher_cache`). Resuming at step `s` is
therefore just `dataset[s:]`: an interrupted run sees exactly the batches an
uninterrupted one would.

With an unlabelled pool (semi-supervised distillation), batch `s` is the
labelled batch `s` of its own infinite MapDataset followed by the pool batch
`s` of another (shuffled per pool epoch with its own seed, since the two have
different lengths), so it is still a pure function of (sources, seed, s).

Feeding the step (`iterate`, `DevicePrefetch`): the batches are read by
threads sized to the host, or by `workers` grain worker processes (each
reads every `workers`-th batch, so the stream is the same batches in the
same order); each batch's image is cast to its transfer dtype (`encode`:
float32, bfloat16 or uint8) at the end of the host pipeline, copied to the
device two batches ahead of the step, and cast back inside the jitted step
(`decode`).
"""
import collections
import functools
import os
from typing import Callable, Iterator, Sequence

from absl import flags
import grain
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.data import device_augment


def _process_shard(ds, shard_index, shard_count):
  if shard_index is None:
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if len(ds) < shard_count:
    raise ValueError(f"data set of {len(ds)} examples cannot be split over "
                     f"{shard_count} processes")
  return ds[shard_index::shard_count], shard_count


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The example indices of epoch `epoch`, in stream order: a permutation
  of range(n) drawn from (seed, epoch) alone."""
  return _epoch_order(int(seed), int(epoch), int(n))


@functools.lru_cache(maxsize=4)
def _epoch_order(seed, epoch, n):
  order = np.random.default_rng(np.random.SeedSequence(
      [seed, 0, epoch])).permutation(n)
  order.flags.writeable = False
  return order


def view_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The generator the random transforms draw example `index`'s view of
  epoch `epoch` from (a stream of its own per (seed, epoch, index))."""
  return np.random.Generator(np.random.Philox(np.random.SeedSequence(
      [int(seed), 1, int(epoch), int(index)])))


def example_view(source, seed: int, epoch: int, index: int,
                 transforms: Sequence = ()) -> dict:
  """Example `index` of `source` as epoch `epoch` of a run with data seed
  `seed` sees it: the transforms in order, each RandomMap drawing from
  `view_rng(seed, epoch, index)`. What the training stream holds, whatever
  the step, the batch size or the number of processes."""
  example = source[int(index)]
  rng = None
  for t in transforms:
    if isinstance(t, grain.transforms.RandomMap):
      rng = view_rng(seed, epoch, index) if rng is None else rng
      example = t.random_map(example, rng)
    else:
      example = t.map(example)
  return example


def stream_position(position: int, n: int, seed: int) -> tuple[int, int]:
  """(epoch, example index) of position `position` of the training stream
  over a source of `n` examples."""
  epoch, j = divmod(int(position), n)
  return epoch, int(epoch_order(seed, epoch, n)[j])


def process_examples(n: int, seed: int, epoch: int, batch_size: int,
                     shard_index: int, shard_count: int) -> np.ndarray:
  """The example indices (sorted) whose epoch-`epoch` views process
  `shard_index` of `shard_count` reads from `train_batches` with this
  global `batch_size` (its pieces of the global batches, no pool)."""
  rows = batch_size // shard_count
  position = np.arange(epoch * n, (epoch + 1) * n)
  mine = (position // rows) % shard_count == shard_index
  return np.sort(epoch_order(seed, epoch, n)[mine])


def _epochs(source, seed, transforms):
  """The training stream: position p is example `epoch_order(seed, e)[p %
  n]` of epoch e = p // n, seen as `example_view(seed, e, i)`. Infinite."""
  n = len(source)

  def at(position, _):
    epoch, index = stream_position(position, n, seed)
    return example_view(source, seed, epoch, index, transforms)

  return grain.MapDataset.range(n).repeat(None).map_with_index(at)


def _add_teacher(read, n, seed, rows, step, batch):
  """Batch `step` of `rows` stream positions, with `read(epochs,
  indices)` (the teacher's outputs of those views) under "teacher"."""
  views = [stream_position(p, n, seed)
           for p in range(step * rows, (step + 1) * rows)]
  epochs, indices = (np.array(v) for v in zip(*views))
  return dict(batch, teacher=read(epochs, indices))


def _image_only(example):
  return {"image": example["image"]}


def _pool_seed(seed: int) -> int:
  # The pool's shuffles and augmentations are a stream of their own, not
  # the labelled set's order replayed on another length.
  return int(np.random.SeedSequence([int(seed), 1]).generate_state(1)[0])


def _add_pool(pool, step, batch):
  """Labelled batch `step`, then pool batch `step`. Pool examples carry
  zeros for every key the labelled ones carry (static shapes; never read
  as labels: "labelled" is False for them), but with their own draws
  under "augment" (`device_augment`), which warp their images in the step
  (and the zero placeholders with them, still never read)."""
  extra_batch = pool[step]
  extra = extra_batch["image"]
  image = batch["image"]
  if extra.shape[1:] != image.shape[1:] or extra.dtype != image.dtype:
    raise ValueError(f"unlabelled images are {extra.shape[1:]} "
                     f"{extra.dtype} after the transforms but labelled images "
                     f"are {image.shape[1:]} {image.dtype}; build the pool "
                     f"at the labelled images' size and channels")
  k = len(extra)
  out = {key: np.concatenate([v, np.zeros((k,) + v.shape[1:], v.dtype)])
         for key, v in ((key, np.asarray(v)) for key, v in batch.items()
                        if key != device_augment.KEY)}
  out["image"] = np.concatenate([image, extra])
  if device_augment.KEY in batch:
    out[device_augment.KEY] = jax.tree.map(
        lambda a, b: np.concatenate([a, b]), batch[device_augment.KEY],
        extra_batch[device_augment.KEY])
  out["labelled"] = np.arange(len(image) + k) < len(image)
  return out


def train_batches(source, *, batch_size: int, seed: int,
                  transforms: Sequence = (), shard_index=None,
                  shard_count=None, teacher_outputs=None, unlabelled=None,
                  unlabelled_per_batch: int = 0) -> grain.MapDataset:
  """Infinite MapDataset of this process's share of each global batch.

  `batch_size` is the global batch; each of `shard_count` processes gets
  its `batch_size // shard_count` rows of it: the global batches are the
  same for any number of processes.

  `teacher_outputs` (a teacher cache's batch reader, `(epochs, indices) ->
  pytree` of arrays with a leading batch axis, e.g.
  `kd_jax.teacher_cache.TeacherCache.batch_outputs`) puts the teacher's
  outputs for the views epoch e_j shows of example i_j (`example_view`)
  under the batch's key "teacher", read once per batch.

  `unlabelled` (a random-access source with "image", e.g.
  `Datasets.unlabelled`) mixes `unlabelled_per_batch` (k) pool examples into
  every global batch: each process gets (batch_size - k) / shard_count
  labelled examples then k / shard_count pool examples, all through
  `transforms`. Every example then carries
  "labelled" (bool); pool examples carry zeros for the labelled keys.
  Without a pool, batches have no "labelled" key.
  """
  if len(source) == 0:
    raise ValueError("the training source is empty; check the data path and "
                     "split in the config")
  k = unlabelled_per_batch
  if unlabelled is None and k:
    raise ValueError(f"unlabelled_per_batch={k!r} without an unlabelled "
                     f"pool; pass unlabelled= or 0")
  if unlabelled is not None and teacher_outputs is not None:
    raise ValueError("cached teacher outputs cover the labelled source only: "
                     "use no teacher cache with an unlabelled pool")
  ds = grain.MapDataset.source(source)
  if shard_index is None:
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if batch_size % shard_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by the "
                     f"{shard_count} processes")
  if unlabelled is not None:
    if (not isinstance(k, (int, np.integer)) or isinstance(k, bool)
        or not 1 <= k <= batch_size - 1):
      raise ValueError(f"unlabelled_per_batch={k!r}: expected an int in "
                       f"[1, {batch_size - 1}] for batch_size {batch_size}")
    if k % shard_count:
      raise ValueError(f"unlabelled_per_batch {k} is not divisible by the "
                       f"{shard_count} processes")
    if len(unlabelled) == 0:
      raise ValueError("the unlabelled pool is empty; check "
                       "data.unlabelled.sources")
  else:
    k = 0
  # One stream of examples for the whole run, cut into per-process pieces
  # of each global batch: process p reads pieces p, p + P, p + 2P, ..., so
  # global batch s is the stream's [s·B, (s+1)·B) whatever the number of
  # processes (and its augmentation the same, drawn per (epoch, example)).
  rows = (batch_size - k) // shard_count
  ds = _epochs(ds, seed, transforms).batch(rows, drop_remainder=True)
  if teacher_outputs is not None:
    ds = ds.map_with_index(functools.partial(
        _add_teacher, teacher_outputs, len(source), seed, rows))
  ds = ds[shard_index::shard_count] if shard_count > 1 else ds
  if unlabelled is None:
    return ds
  pool = grain.MapDataset.source(unlabelled).map(_image_only)
  pool = _epochs(pool, _pool_seed(seed), transforms).batch(
      k // shard_count, drop_remainder=True)
  pool = pool[shard_index::shard_count] if shard_count > 1 else pool
  return ds.map_with_index(functools.partial(_add_pool, pool))


def eval_batches(source, *, batch_size: int, transforms: Sequence = (),
                 shard_index=None, shard_count=None):
  """Yields fixed-shape batches over one pass of this process's shard.

  The last batch is padded by repeating its last example; the key "valid"
  (bool (B,)) marks the real examples, so shapes stay static under jit.
  Every process yields as many batches as the largest shard needs, so the
  collective eval steps match across processes.
  """
  ds = grain.MapDataset.source(source)
  total = len(ds)
  ds, shard_count = _process_shard(ds, shard_index, shard_count)
  for t in transforms:
    ds = ds.map(t)
  per_process = batch_size // shard_count
  # Every process yields the same number of batches (each one a collective
  # step): that of the largest shard; a shorter shard ends with a batch of
  # padding alone.
  num_batches = -(-(-(-total // shard_count)) // per_process)
  it = iter(ds.batch(per_process).to_iter_dataset(
      _read_options(host_threads())))
  last = None
  for _ in range(num_batches):
    batch = next(it, None)
    n = 0 if batch is None else len(batch["image"])
    batch = last if batch is None else batch
    pad = per_process - n
    out = {k: np.concatenate([v[:n], np.repeat(v[-1:], pad, axis=0)])
           if pad else v for k, v in batch.items()}
    out["valid"] = np.arange(per_process) < n
    last = out
    yield out


# `data.transfer_dtype`: the image's dtype from the end of the host pipeline
# to the device. uint8 (a quarter of float32's bytes) holds images in [0, 1]
# quantised to 1/255; bfloat16 (half) keeps 8 bits of mantissa.
TRANSFER_DTYPES = ("float32", "bfloat16", "uint8")
# An image value further than this outside [0, 1] does not round into
# 0..255: refused for uint8.
_UINT8_SLACK = 0.5 / 255


def check_transfer_dtype(name) -> None:
  if name not in TRANSFER_DTYPES:
    raise ValueError(f"data.transfer_dtype={name!r}: choose one of "
                     f"{list(TRANSFER_DTYPES)}")


def check_workers(workers) -> None:
  if (isinstance(workers, bool) or not isinstance(workers, (int, np.integer))
      or workers < 0):
    raise ValueError(f"data.workers={workers!r}: expected 0 (threads in this "
                     "process) or a number of grain worker processes")


def check_uint8_range(image, where: str = "the training images") -> None:
  """Raises one line when `image` is not in [0, 1] (z-scored MRI, CT in
  Hounsfield units): such images cannot travel as uint8."""
  lo, hi = float(np.min(image)), float(np.max(image))
  if lo < -_UINT8_SLACK or hi > 1 + _UINT8_SLACK:
    raise ValueError(f"data.transfer_dtype='uint8' quantises images in [0, 1]"
                     f", but {where} span [{lo:.3g}, {hi:.3g}]: set "
                     f"--config.data.transfer_dtype=bfloat16 (or float32)")


def encode(batch: dict, dtype: str) -> dict:
  """The batch with its image cast to the transfer dtype `dtype`; uint8 is
  round(255 · image), for images in [0, 1] only (`check_uint8_range`)."""
  image = batch["image"]
  if dtype == "float32":
    return batch
  if dtype == "uint8":
    check_uint8_range(image, "the images of a training batch")
    image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
  else:
    image = np.asarray(image).astype(jnp.bfloat16)
  return {**batch, "image": image}


def decode(batch: dict) -> dict:
  """Inverse of `encode`, inside the jitted step: the image as float32
  (uint8 x as x · float32(1/255)), whatever dtype it travelled in, and
  cached teacher outputs stored in float16 / bfloat16 as float32."""
  if "teacher" in batch:
    batch = {**batch, "teacher": jax.tree.map(
        lambda x: x.astype(jnp.float32), batch["teacher"])}
  image = batch["image"]
  if image.dtype == jnp.float32:
    return batch
  image = image.astype(jnp.float32)
  if batch["image"].dtype == jnp.uint8:
    # A product (XLA turns x / 255 into one anyway): the same bits as the
    # host's float32 x · (1/255).
    image = image * np.float32(1 / 255)
  return {**batch, "image": image}


def host_threads(workers: int = 0) -> int:
  """Reader threads per process: the cores this process may use (at most
  16: more threads of Python augmentation mostly wait for the GIL; worker
  processes scale further), shared among the `workers` processes."""
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count() or 1)
  return max(1, min(cores, 16) // max(workers, 1))


def _read_options(threads: int) -> grain.ReadOptions:
  # Room for every thread's batch and as many waiting.
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(2 * threads, 4))


def iterate(ds: grain.MapDataset, start: int = 0,
            num_threads: int | None = None, *, workers: int = 0,
            transfer_dtype: str = "float32") -> Iterator[dict]:
  """Iterator over `ds[start:]` with background prefetching: `num_threads`
  threads (default `host_threads`) in this process, or, with `workers`,
  in each of that many grain worker processes (started by spawn: the
  entry script's code must sit under `if __name__ == "__main__"`; they
  read absl flags, marked parsed here when nothing parsed them). Either
  way batch `start + i` is the i-th item, bit for bit. Each batch's image
  leaves in `transfer_dtype` (`encode`). Close it when done: it stops the
  threads and processes."""
  check_transfer_dtype(transfer_dtype)
  check_workers(workers)
  ds = ds[start:]
  if transfer_dtype != "float32":
    ds = ds.map(functools.partial(encode, dtype=transfer_dtype))
  threads = host_threads(workers) if num_threads is None else num_threads
  it = ds.to_iter_dataset(_read_options(threads))
  if workers:
    if not flags.FLAGS.is_parsed():
      # grain hands its absl flags to the workers; outside `absl.app.run`
      # (a notebook, a test) they keep their defaults.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(workers), per_worker_buffer_size=2))
  return iter(it)


class DevicePrefetch:
  """`put(batch)` for each batch of `batches`, `size` of them ahead of the
  one returned: `put` (e.g. `kd_jax.train.to_global`) starts an
  asynchronous host-to-device copy, so the copies of the next batches run
  while the step on this one does. Item i is still batch i of `batches`.
  `close` drops the batches on the device and closes `batches`."""

  def __init__(self, batches: Iterator, put: Callable, size: int = 2):
    self.batches, self.put, self.size = batches, put, size
    self.queue = collections.deque()

  def __iter__(self):
    return self

  def __next__(self):
    while len(self.queue) <= self.size:
      batch = next(self.batches, None)
      if batch is None:
        break
      self.queue.append(self.put(batch))
    if not self.queue:
      raise StopIteration
    return self.queue.popleft()

  def close(self):
    self.queue.clear()
    close = getattr(self.batches, "close", None)
    if close is not None:
      close()
