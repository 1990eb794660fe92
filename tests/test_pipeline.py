import jax
import numpy as np
import pytest

from kd_jax.data import pipeline, synthetic, transforms


@pytest.fixture(scope="module")
def source():
  return synthetic.SyntheticCT(10, size=32, seed=0)


def test_train_batches_shapes_and_epoch_coverage(source):
  ds = pipeline.train_batches(source, batch_size=5, seed=1)
  b = ds[0]
  assert b["image"].shape == (5, 32, 32, 1) and b["label"].shape == (5, 32, 32)
  # Two batches of 5 are one epoch of 10 distinct examples.
  firsts = {source[i]["image"].tobytes() for i in range(10)}
  seen = {x.tobytes() for k in (0, 1) for x in ds[k]["image"]}
  assert seen == firsts


def test_resume_sees_the_same_batches(source):
  aug = [transforms.SegmentationAugment(rot90=False, max_rotation_deg=15.0)]
  ds = pipeline.train_batches(source, batch_size=4, seed=7, transforms=aug)
  straight = [b["image"] for _, b in zip(range(6), pipeline.iterate(ds))]
  resumed = [b["image"] for _, b in zip(range(3), pipeline.iterate(ds, 3))]
  for a, b in zip(straight[3:], resumed):
    np.testing.assert_array_equal(a, b)


def test_epochs_are_reshuffled(source):
  ds = pipeline.train_batches(source, batch_size=10, seed=0)
  assert not np.array_equal(ds[0]["image"], ds[1]["image"])


@pytest.mark.parametrize("shards", [2, 4])
def test_global_batches_are_the_same_for_any_number_of_processes(source,
                                                                 shards):
  """Process p's rows of global batch s, concatenated in process order,
  are one process's batch s: same examples, same augmented views."""
  aug = [transforms.SegmentationAugment()]
  one = pipeline.train_batches(source, batch_size=8, seed=3, transforms=aug)
  parts = [pipeline.train_batches(source, batch_size=8, seed=3,
                                  transforms=aug, shard_index=i,
                                  shard_count=shards) for i in range(shards)]
  for step in (0, 1, 5):
    assert parts[0][step]["image"].shape[0] == 8 // shards
    for key in one[step]:
      np.testing.assert_array_equal(
          np.concatenate([p[step][key] for p in parts]), one[step][key])


def test_eval_batches_pad_and_mark_valid(source):
  batches = list(pipeline.eval_batches(source, batch_size=4))
  assert [b["valid"].sum() for b in batches] == [4, 4, 2]
  assert all(b["image"].shape == (4, 32, 32, 1) for b in batches)


def test_errors():
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.train_batches(synthetic.SyntheticCT(8, size=32), batch_size=5,
                           seed=0, shard_index=0, shard_count=2)
  with pytest.raises(ValueError, match="empty"):
    pipeline.train_batches([], batch_size=2, seed=0)


@pytest.mark.parametrize("shards", [2, 3, 4])
def test_eval_batches_are_as_many_on_every_process(shards):
  """17 examples over several processes: every process yields the same
  number of batches (each is a collective step), and the valid rows cover
  every example exactly once."""
  src = [{"image": np.full((2,), i, np.float32)} for i in range(17)]
  counts, seen = [], []
  for index in range(shards):
    batches = list(pipeline.eval_batches(src, batch_size=2 * shards,
                                         shard_index=index,
                                         shard_count=shards))
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (2, 2) and b["valid"].shape == (2,)
      seen += [int(v) for v in b["image"][b["valid"], 0]]
  assert len(set(counts)) == 1
  assert counts[0] == -(-(-(-17 // shards)) // 2)
  assert sorted(seen) == list(range(17))


# --------------------------------------------------------------------------
# Feeding the step: loader workers, transfer dtype, device prefetch.


def test_batches_are_the_same_with_threads_workers_and_after_a_resume():
  """The first batches read by threads in this process, by 2 grain worker
  processes, and from step 3 on (a resume), bit for bit. (One pool of
  workers: each costs seconds to start.)"""
  src = synthetic.SyntheticCT(12, size=16, seed=0)
  aug = [transforms.SegmentationAugment(max_rotation_deg=15.0)]
  ds = pipeline.train_batches(src, batch_size=4, seed=5, transforms=aug)

  def first(k, start=0, **kw):
    it = pipeline.iterate(ds, start, **kw)
    # Copies: a worker's batch lives in shared memory freed on close.
    out = [jax.tree.map(np.array, next(it)) for _ in range(k)]
    it.close()
    return out

  threads = first(8)
  workers = first(8, workers=2)
  resumed = first(5, 3)
  for a, b in zip(threads, workers):
    assert a.keys() == b.keys()
    for key in a:
      assert a[key].dtype == b[key].dtype
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(threads[3:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Four batches of 4 cover the 12 examples over two reshuffled epochs: the
  # workers did not all read the same batch.
  assert len({b["image"].tobytes() for b in workers}) == 8


def test_transfer_dtypes_shrink_the_batch_and_decode_to_the_image(source):
  batch = pipeline.train_batches(source, batch_size=4, seed=0)[0]
  image = batch["image"]
  assert image.min() >= 0 and image.max() <= 1
  u8 = pipeline.encode(batch, "uint8")
  bf16 = pipeline.encode(batch, "bfloat16")
  assert u8["image"].dtype == np.uint8
  assert image.nbytes == 4 * u8["image"].nbytes == 2 * bf16["image"].nbytes
  np.testing.assert_array_equal(u8["label"], batch["label"])
  # uint8 is round(255 x), decoded as its value / 255: within half a step.
  np.testing.assert_array_equal(
      u8["image"], np.floor(image.astype(np.float64) * 255 + 0.5))
  back = jax.jit(pipeline.decode)(u8)["image"]
  assert back.dtype == np.float32
  np.testing.assert_array_equal(
      np.asarray(back), u8["image"].astype(np.float32) * np.float32(1 / 255))
  assert np.abs(np.asarray(back) - image).max() <= 0.5 / 255 + 1e-7
  back = np.asarray(jax.jit(pipeline.decode)(bf16)["image"])
  np.testing.assert_allclose(back, image, rtol=2 ** -8, atol=0)
  assert pipeline.encode(batch, "float32") is batch


def test_uint8_refuses_images_outside_0_1_and_iterate_casts_at_the_end():
  zscored = {"image": np.array([[-0.7, 0.2], [1.5, 0.1]], np.float32)}
  with pytest.raises(ValueError, match=r"span \[-0\.7, 1\.5\].*bfloat16"):
    pipeline.encode(zscored, "uint8")
  with pytest.raises(ValueError, match="transfer_dtype='int8'"):
    pipeline.iterate(None, transfer_dtype="int8")
  with pytest.raises(ValueError, match="data.workers=-1"):
    pipeline.iterate(None, workers=-1)
  src = synthetic.SyntheticCT(8, size=16, seed=1)
  ds = pipeline.train_batches(src, batch_size=4, seed=0,
                              transforms=[transforms.SegmentationAugment()])
  it = pipeline.iterate(ds, 1, transfer_dtype="uint8")
  got = next(it)
  it.close()
  want = pipeline.encode(ds[1], "uint8")
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


def test_device_prefetch_keeps_two_batches_put_ahead():
  put = []
  prefetch = pipeline.DevicePrefetch(
      iter(range(5)), lambda b: put.append(b) or 10 * b, size=2)
  assert next(prefetch) == 0 and put == [0, 1, 2]
  assert next(prefetch) == 10 and put == [0, 1, 2, 3]
  assert list(prefetch) == [20, 30, 40] and put == list(range(5))
  closed = []

  class Batches:
    def __next__(self):
      return 1

    def close(self):
      closed.append(True)

  prefetch = pipeline.DevicePrefetch(Batches(), lambda b: b)
  next(prefetch)
  prefetch.close()
  assert closed == [True] and not prefetch.queue


def test_augmented_view_is_a_function_of_seed_epoch_and_example(source):
  """Every row of every batch is `example_view(seed, epoch, index)` of the
  example the stream puts there, whatever the batch size; epochs give
  other views of one example."""
  aug = [transforms.RandomScaleCrop(scale_range=(0.7, 1.4)),
         transforms.SegmentationAugment()]
  for batch_size in (2, 5):
    ds = pipeline.train_batches(source, batch_size=batch_size, seed=4,
                                transforms=aug)
    for step in range(7):  # Past the first epoch of 10 examples.
      for row in range(batch_size):
        p = step * batch_size + row
        epoch, index = pipeline.stream_position(p, 10, 4)
        assert epoch == p // 10
        assert sorted(pipeline.epoch_order(4, epoch, 10)) == list(range(10))
        want = pipeline.example_view(source, 4, epoch, index, aug)
        np.testing.assert_array_equal(ds[step]["image"][row], want["image"])
        np.testing.assert_array_equal(ds[step]["label"][row], want["label"])
  assert not np.array_equal(
      pipeline.example_view(source, 4, 0, 3, aug)["image"],
      pipeline.example_view(source, 4, 1, 3, aug)["image"])


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_process_examples_are_those_each_process_reads(source, shards):
  batch_size = 2 * shards
  for epoch in (0, 1, 2):
    got = []
    for p in range(shards):
      mine = pipeline.process_examples(10, 5, epoch, batch_size, p, shards)
      ds = pipeline.train_batches(source, batch_size=batch_size, seed=5,
                                  shard_index=p, shard_count=shards)
      rows = batch_size // shards
      read = set()
      for step in range(30 // batch_size + 1):
        for r in range(rows):
          position = (step * shards + p) * rows + r
          if position // 10 == epoch:
            read.add(pipeline.stream_position(position, 10, 5)[1])
            np.testing.assert_array_equal(
                ds[step]["image"][r],
                source[pipeline.stream_position(position, 10, 5)[1]]["image"])
      assert sorted(read) == list(mine)
      got += list(mine)
    assert sorted(got) == list(range(10))
