"""grain pipelines: random-access source → shard → shuffle → transforms → batch.

Training batches come from an infinite `grain.MapDataset` indexed by step:
batch `s` is a pure function of (source, seed, s), reshuffled every epoch and
augmented with a per-example random stream. Resuming at step `s` is therefore
just `dataset[s:]`: an interrupted run sees exactly the batches an
uninterrupted one would.

With an unlabelled pool (semi-supervised distillation), batch `s` is the
labelled batch `s` of its own infinite MapDataset followed by the pool batch
`s` of another (shuffled per pool epoch with its own seed, since the two have
different lengths), so it is still a pure function of (sources, seed, s).
"""
import functools
from typing import Sequence

import grain
import jax
import numpy as np


def _process_shard(ds, shard_index, shard_count):
  if shard_index is None:
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if len(ds) < shard_count:
    raise ValueError(f"data set of {len(ds)} examples cannot be split over "
                     f"{shard_count} processes")
  return ds[shard_index::shard_count], shard_count


def random_transforms(transforms: Sequence) -> list[str]:
  """Names of the transforms that draw random numbers (grain RandomMaps)."""
  return [type(t).__name__ for t in transforms
          if isinstance(t, grain.transforms.RandomMap)]


def _epochs(ds, seed, transforms):
  """Shuffled anew every epoch, repeated forever, then transformed."""
  ds = ds.seed(seed).shuffle().repeat(None)
  for t in transforms:
    ds = ds.random_map(t) if isinstance(t, grain.transforms.RandomMap) \
        else ds.map(t)
  return ds


def _image_only(example):
  return {"image": example["image"]}


def _pool_seed(seed: int) -> int:
  # The pool's shuffles and augmentations are a stream of their own, not
  # the labelled set's order replayed on another length.
  return int(np.random.SeedSequence([int(seed), 1]).generate_state(1)[0])


def _add_pool(pool, step, batch):
  """Labelled batch `step`, then pool batch `step`. Pool examples carry
  zeros for every key the labelled ones carry (static shapes; never read
  as labels: "labelled" is False for them)."""
  extra = pool[step]["image"]
  image = batch["image"]
  if extra.shape[1:] != image.shape[1:] or extra.dtype != image.dtype:
    raise ValueError(f"unlabelled images are {extra.shape[1:]} "
                     f"{extra.dtype} after the transforms but labelled images "
                     f"are {image.shape[1:]} {image.dtype}; build the pool "
                     f"at the labelled images' size and channels")
  k = len(extra)
  out = {key: np.concatenate([v, np.zeros((k,) + v.shape[1:], v.dtype)])
         for key, v in ((key, np.asarray(v)) for key, v in batch.items())}
  out["image"] = np.concatenate([image, extra])
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

  `teacher_outputs` (a teacher cache: a pytree of arrays whose leading axis
  runs over the source, in order, as
  `kd_jax.train.build_teacher_cache` makes them) puts example i's outputs
  under the key "teacher" of example i. They were computed on the
  transformed image, so the transforms must be deterministic: a RandomMap
  is refused.

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
  if teacher_outputs is not None:
    if random_transforms(transforms):
      raise ValueError("cached teacher outputs need deterministic transforms:"
                       " a random augmentation gives each epoch another view")
    sizes = {len(x) for x in jax.tree.leaves(teacher_outputs)}
    if sizes != {len(ds)}:
      raise ValueError(f"teacher cache of {sorted(sizes)} examples for a "
                       f"source of {len(ds)}")
    # grain's repeat and shuffle index parents past their length (epoch e
    # reads i + e·n): the example is i mod n.
    n = len(ds)
    ds = ds.map_with_index(lambda i, ex: dict(ex, teacher=jax.tree.map(
        lambda x: x[i % n], teacher_outputs)))
  # One stream of examples for the whole run, cut into per-process pieces
  # of each global batch: process p reads pieces p, p + P, p + 2P, ..., so
  # global batch s is the stream's [s·B, (s+1)·B) whatever the number of
  # processes (and its augmentation the same, drawn per stream position).
  ds = _epochs(ds, seed, transforms).batch(
      (batch_size - k) // shard_count, drop_remainder=True)
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
      grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)))
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


def iterate(ds: grain.MapDataset, start: int = 0, num_threads: int = 4):
  """Iterator over `ds[start:]` with background prefetching."""
  return iter(ds[start:].to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=8)))
