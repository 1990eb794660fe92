"""grain pipelines: random-access source → shard → shuffle → transforms → batch.

Training batches come from an infinite `grain.MapDataset` indexed by step:
batch `s` is a pure function of (source, seed, s), reshuffled every epoch and
augmented with a per-example random stream. Resuming at step `s` is therefore
just `dataset[s:]`: an interrupted run sees exactly the batches an
uninterrupted one would.
"""
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


def train_batches(source, *, batch_size: int, seed: int,
                  transforms: Sequence = (), shard_index=None,
                  shard_count=None, teacher_outputs=None) -> grain.MapDataset:
  """Infinite MapDataset of this process's share of each global batch.

  `batch_size` is the global batch; each of `shard_count` processes gets
  `batch_size // shard_count` examples from its own slice of the source.

  `teacher_outputs` (a teacher cache: a pytree of arrays whose leading axis
  runs over this process's slice of the source, in order, as
  `kd_jax.train.build_teacher_cache` makes them) puts example i's outputs
  under the key "teacher" of example i. They were computed on the
  transformed image, so the transforms must be deterministic: a RandomMap
  is refused.
  """
  if len(source) == 0:
    raise ValueError("the training source is empty; check the data path and "
                     "split in the config")
  ds = grain.MapDataset.source(source)
  ds, shard_count = _process_shard(ds, shard_index, shard_count)
  if batch_size % shard_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by the "
                     f"{shard_count} processes")
  if teacher_outputs is not None:
    if random_transforms(transforms):
      raise ValueError("cached teacher outputs need deterministic transforms:"
                       " a random augmentation gives each epoch another view")
    sizes = {len(x) for x in jax.tree.leaves(teacher_outputs)}
    if sizes != {len(ds)}:
      raise ValueError(f"teacher cache of {sorted(sizes)} examples for a "
                       f"source slice of {len(ds)}")
    # grain's repeat and shuffle index parents past their length (epoch e
    # reads i + e·n): the example is i mod n.
    n = len(ds)
    ds = ds.map_with_index(lambda i, ex: dict(ex, teacher=jax.tree.map(
        lambda x: x[i % n], teacher_outputs)))
  ds = ds.seed(seed).shuffle().repeat(None)
  for t in transforms:
    ds = ds.random_map(t) if isinstance(t, grain.transforms.RandomMap) \
        else ds.map(t)
  return ds.batch(batch_size // shard_count, drop_remainder=True)


def eval_batches(source, *, batch_size: int, transforms: Sequence = (),
                 shard_index=None, shard_count=None):
  """Yields fixed-shape batches over one pass of this process's shard.

  The last batch is padded by repeating its last example; the key "valid"
  (bool (B,)) marks the real examples, so shapes stay static under jit.
  """
  ds = grain.MapDataset.source(source)
  ds, shard_count = _process_shard(ds, shard_index, shard_count)
  for t in transforms:
    ds = ds.map(t)
  per_process = batch_size // shard_count
  it = iter(ds.batch(per_process).to_iter_dataset(
      grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)))
  for batch in it:
    n = len(batch["image"])
    pad = per_process - n
    out = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)])
           if pad else v for k, v in batch.items()}
    out["valid"] = np.arange(per_process) < n
    yield out


def iterate(ds: grain.MapDataset, start: int = 0, num_threads: int = 4):
  """Iterator over `ds[start:]` with background prefetching."""
  return iter(ds[start:].to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=8)))
