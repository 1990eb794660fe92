"""kd_jax.data.device_augment: the training augmentation drawn on the host,
applied in the jitted step.

The device's view must equal the host transforms' (the scipy reference
path) for the same draw: images to float32 round-off, label maps exactly
(but at half-pixel ties, where scipy's float64 and the device's float32 may
round either way: only there), landmarks to round-off. The shipped draws
must be the same with threads and worker processes, a short training run
must give the host run's losses, and the teacher cache must hold the
outputs of the views the step warps.
"""
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from kd_jax import data, teacher_cache, train
from kd_jax.data import device_augment, pipeline, synthetic, transforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.test_train import tiny_config  # noqa: E402

# Each recipe's augmentation (registry: TransUNet's, the fundus sets' with
# colour jitter, Structured KD's scale-crop with an ignore-index pad).
RECIPES = {
    "transunet": [transforms.SegmentationAugment(max_rotation_deg=20.0)],
    "fundus": [transforms.SegmentationAugment(rot90=False,
                                              max_rotation_deg=15.0),
               transforms.ColorJitter()],
    "scale_crop": [transforms.RandomScaleCrop(scale_range=(0.5, 2.0),
                                              pad_label=255)],
}
N = 32  # Draws per recipe, one batch.


def _example(rs, size=20):
  return {"image": rs.random((size, size, 3)).astype(np.float32),
          "label": rs.integers(0, 5, (size, size)).astype(np.int32),
          "fovea": rs.uniform(0.2, 0.8, 2).astype(np.float32),
          "disc_xy": rs.uniform(3, 16, 2).astype(np.float32)}


def _source_coordinates(p, hw):
  """float64 source (row, col) of every output pixel, from the shipped
  draw (an independent evaluation of the map, for the tie mask)."""
  r, c = np.meshgrid(np.arange(hw[0]), np.arange(hw[1]), indexing="ij")
  warp = p["warp"].astype(np.float64)
  m, o = warp[:4].reshape(2, 2), warp[4:6]
  return m[0, 0] * r + m[0, 1] * c + o[0], m[1, 0] * r + m[1, 1] * c + o[1]


@pytest.fixture(scope="module", params=sorted(RECIPES))
def host_and_device(request):
  rs = np.random.default_rng(0)
  examples = [_example(rs) for _ in range(N)]
  aug = RECIPES[request.param]
  # Each example through its own generator, as the stream draws it.
  host = [pipeline.example_view(examples, 7, 0, i, aug) for i in range(N)]
  shipped = [pipeline.example_view(examples, 7, 0, i,
                                   device_augment.wrap(aug))
             for i in range(N)]
  batch = jax.tree.map(lambda *x: np.stack(x), *shipped)
  device = jax.device_get(jax.jit(device_augment.apply)(batch))
  return request.param, examples, host, batch, device


def test_device_views_equal_the_host_transforms(host_and_device):
  name, examples, host, batch, device = host_and_device
  assert "augment" not in device
  want = np.stack([h["image"] for h in host])
  np.testing.assert_allclose(device["image"], want, atol=1e-5, rtol=0)
  for key in ("fovea", "disc_xy"):
    np.testing.assert_allclose(device[key], np.stack([h[key] for h in host]),
                               atol=1e-4)
  labels = np.stack([h["label"] for h in host])
  params = batch["augment"]
  matrix = params["warp"][:, :4].reshape(-1, 2, 2)
  offset = params["warp"][:, 4:6]
  ties = np.zeros(labels.shape, bool)
  for i in range(N):
    p = jax.tree.map(lambda x, i=i: x[i], params)
    for coordinate in _source_coordinates(p, labels.shape[1:]):
      ties[i] |= np.abs(coordinate - np.floor(coordinate) - 0.5) < 1e-4
  differ = device["label"] != labels
  assert not (differ & ~ties).any()  # Exact away from half-pixel ties.
  if name != "scale_crop":  # Rotations never met a tie in these draws.
    assert not differ.any()
  # The draws reach every branch: identity, flips / turns, rotations.
  m = matrix
  identity = (m == np.eye(2)).all((1, 2)) & (offset == 0).all(1)
  integer = (m == np.round(m)).all((1, 2))
  if name != "scale_crop":
    assert identity.any() and (integer & ~identity).any()
    assert (~integer).any()
  else:
    assert (labels == 255).any() and (device["label"] == 255).any()
    assert (matrix[:, 1, 1] < 0).any()  # Some flipped.


def test_draws_are_the_host_transforms_own():
  """One draw function for both paths: the draws of `SegmentationAugment`
  replayed from a fresh generator give the flips and turns of numpy."""
  aug = transforms.SegmentationAugment(max_rotation_deg=0.0)
  image = np.arange(3 * 3, dtype=np.float32).reshape(3, 3, 1)
  for seed in range(12):
    p = aug.draw((3, 3), np.random.default_rng(seed))
    want = image
    if p["k"] is not None:
      want = np.rot90(want, p["k"], axes=(0, 1))
    if p["axis"] is not None:
      want = np.flip(want, p["axis"])
    got = aug.random_map({"image": image}, np.random.default_rng(seed))
    np.testing.assert_array_equal(got["image"], want)
    warp = aug.geometry((3, 3), p)
    r, c = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
    src = np.einsum("ij,jrc->irc", warp.matrix, np.stack([r, c]))
    src += warp.offset[:, None, None]
    np.testing.assert_array_equal(
        image[src[0].astype(int), src[1].astype(int)], want)


def _device_batches():
  src = synthetic.SyntheticCT(12, size=16, seed=0)
  return src, pipeline.train_batches(
      src, batch_size=4, seed=5,
      transforms=device_augment.wrap(RECIPES["transunet"]))


def _first(ds, k, start=0, **kw):
  it = pipeline.iterate(ds, start, **kw)
  # Copies: a worker's batch lives in shared memory freed on close.
  out = [jax.tree.map(np.array, next(it)) for _ in range(k)]
  it.close()
  return out


@pytest.mark.slow  # Two worker processes take ~20 s to start here.
def test_shipped_draws_are_the_same_with_threads_and_workers():
  _, ds = _device_batches()
  for a, b in zip(_first(ds, 4), _first(ds, 4, workers=2)):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_shipped_draws_are_a_function_of_the_step():
  """Threads reading ahead, a resume at step 3 and batches read in reverse
  (as workers each read every k-th batch) ship the same bits; the images
  travel untouched (the host skipped the pixel work)."""
  src, ds = _device_batches()
  threads = _first(ds, 6, num_threads=3)
  resumed = _first(ds, 3, start=3, num_threads=1)
  for i in reversed(range(6)):
    jax.tree.map(np.testing.assert_array_equal, threads[i], ds[i])
  for a, b in zip(threads[3:], resumed):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  assert len({b["augment"]["warp"].tobytes() for b in threads}) == 6
  first_batch = [src[int(i)]["image"] for i in pipeline.epoch_order(5, 0,
                                                                    12)[:4]]
  np.testing.assert_array_equal(threads[0]["image"], np.stack(first_batch))


def _stage(augment_on_device):
  c = tiny_config(steps=3)
  c.data.augment_on_device = augment_on_device
  ds = data.build(c.data)
  s = train.stage_config(c, "teacher")
  return c, ds, s, pipeline.train_batches(
      ds.train, batch_size=c.batch_size, seed=s["seed"],
      transforms=ds.train_transforms)


def test_the_step_sees_the_host_batches():
  """What the trainer's step computes on: `decode` then `apply` of the
  device run's batches is the host run's batches (uint8 too, within the
  quantisation: the device warps the quantised image)."""
  _, ds, _, host = _stage(False)
  _, ds_device, _, device = _stage(True)
  assert device_augment.on_device(ds_device.train_transforms)
  assert not device_augment.on_device(ds.train_transforms)
  prepare = jax.jit(lambda b: device_augment.apply(pipeline.decode(b)))
  for step in range(3):
    want = host[step]
    for dtype, atol in (("float32", 1e-5), ("uint8", 1 / 255)):
      got = prepare(pipeline.encode(device[step], dtype))
      assert sorted(got) == sorted(want)
      np.testing.assert_allclose(got["image"], want["image"], atol=atol)
      np.testing.assert_array_equal(got["label"], want["label"])


def _losses(augment_on_device, steps=3):
  c, ds, s, batches = _stage(augment_on_device)
  method, frozen = train.build_method(c, "teacher", "", ds.num_classes,
                                      heads=train.run_heads(c, ds))
  tx = train.make_optimizers(method, s)
  example = jnp.asarray(ds.train[0]["image"][None])
  state = train.init_state(method, tx, jax.random.key(s["seed"]), example)
  step = jax.jit(train.make_train_step(method, tx))
  out = []
  for i in range(steps):
    state, m = step(state, batches[i], frozen)
    out.append(float(m["loss"]))
  return out


@pytest.mark.slow  # Two compiles of a UNet step (~90 s here).
def test_training_with_device_augmentation_gives_the_host_losses():
  np.testing.assert_allclose(_losses(True), _losses(False), rtol=1e-5,
                             atol=1e-6)


class _Linear:

  def teacher_outputs(self, frozen, images):
    return {"logits": images.reshape(images.shape[0], -1) @ frozen["w"]}


def test_teacher_cache_holds_the_views_the_step_warps(tmp_path):
  source = synthetic.SyntheticCT(6, size=16, seed=0)
  frozen = {"w": np.random.default_rng(0).normal(
      size=(256, 5)).astype(np.float32)}
  host_aug = RECIPES["scale_crop"]
  aug = device_augment.wrap(host_aug)
  method = _Linear()

  def manifest(t):
    return teacher_cache.manifest(
        teacher_model={"name": "linear"}, teacher_variables=frozen,
        data_options={"name": "synthetic"}, examples=6, transforms=t,
        input_shape=(16, 16, 1), seed=2, outputs=jax.eval_shape(
            method.teacher_outputs, frozen, jnp.zeros((1, 16, 16, 1))))

  m = manifest(aug)
  assert teacher_cache.manifest_key(m) != teacher_cache.manifest_key(
      manifest(host_aug))
  cache = teacher_cache.TeacherCache(str(tmp_path / "dev"), m)
  cache.build(method, frozen, source, aug, 1, batch_size=4)
  for index in range(6):
    view = pipeline.example_view(source, 2, 0, index, aug)
    warped = device_augment.apply_images(
        view["image"][None], jax.tree.map(lambda x: x[None], view["augment"]))
    want = method.teacher_outputs(frozen, np.asarray(warped))["logits"][0]
    np.testing.assert_allclose(cache.batch_outputs([0], [index])["logits"][0],
                               want, rtol=1e-6, atol=1e-5)
    # And within round-off of the host-augmented view's.
    host = pipeline.example_view(source, 2, 0, index, host_aug)["image"]
    np.testing.assert_allclose(warped[0], host, atol=1e-5)
  # A host-augmented cache's folder is refused for the device run.
  teacher_cache.TeacherCache(str(tmp_path / "host"), manifest(host_aug))
  with pytest.raises(ValueError, match="transforms"):
    teacher_cache.TeacherCache(str(tmp_path / "host"), m)


def test_bad_settings_are_one_line_config_errors(tmp_path):
  c = tiny_config(steps=1)
  # A data dict of a config's own (the shipped ones type the key bool).
  c.data = ml_collections.ConfigDict({**c.data.to_dict(),
                                      "augment_on_device": "yes"})
  with pytest.raises(train.ConfigError, match="^data: data.augment_on_device"
                     "='yes': expected True") as e:
    train.train_and_evaluate(c, str(tmp_path))
  assert "\n" not in str(e.value)


def test_unsupported_transforms_are_refused():
  aug = device_augment.DeviceAugment([transforms.RandomResizedCrop((8, 8))])
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="changes the image size"):
    aug.random_map({"image": np.zeros((16, 16, 1), np.float32)}, rng)
  with pytest.raises(ValueError, match="moves the image only.*'label'"):
    aug.random_map({"image": np.zeros((8, 8, 1), np.float32),
                    "label": np.zeros((8, 8), np.int32)}, rng)
  with pytest.raises(ValueError, match=r"crop_size=None\) only"):
    device_augment.DeviceAugment([transforms.RandomScaleCrop((8, 8))])
  with pytest.raises(ValueError, match="ColorJitter', 'SegmentationAug"):
    device_augment.DeviceAugment([transforms.ColorJitter(),
                                  transforms.SegmentationAugment()])


def test_the_run_record_counts_the_switch_only_when_on():
  from kd_jax import record  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  before = record.defining(c, "teacher")
  assert "data.augment_on_device" not in before  # At its default: quiet.
  c.data.augment_on_device = True
  assert record.differences(before, record.defining(c, "teacher")) == {
      "data.augment_on_device": ("<unset>", True)}


@pytest.mark.slow  # Three compiles of a UNet pair (~25 s here).
def test_step_from_a_device_augmented_cache_equals_the_live_teacher(
    tmp_path):
  """The distill loss on a scale-cropped batch crossing into epoch 2, with
  the teacher live in the step (it sees the step's warp) and from a cache
  the builder warped with `apply_images`: equal to float32 round-off."""
  from tests import test_teacher_cache as tc  # pylint: disable=g-import-not-at-top
  c = tc.cache_config(None)
  ds = data.build(c.data)
  method, _ = train.build_method(c, "distilled", "", ds.num_classes,
                                 load_teacher=False)
  example = ds.train[0]["image"][None]
  rng = np.random.default_rng(2)
  variables = tc._random_like(jax.eval_shape(  # pylint: disable=protected-access
      method.init, jax.random.key(0), example), rng)
  frozen = tc._random_like(jax.eval_shape(  # pylint: disable=protected-access
      lambda x: method.teacher.init(jax.random.key(2), x, train=False),
      example), rng)

  @jax.jit
  def loss(frozen, batch):  # As the train step: decode, then warp.
    batch = device_augment.apply(pipeline.decode(batch))
    return method.loss_fn(variables["params"], variables["batch_stats"],
                          frozen, batch, jax.random.key(1))[0]

  aug = device_augment.wrap(RECIPES["scale_crop"])
  m = teacher_cache.manifest(
      teacher_model={"name": "unet"}, teacher_variables=frozen,
      data_options={"name": "synthetic"}, examples=len(ds.train),
      transforms=aug, input_shape=(16, 16, 1), seed=5,
      outputs=jax.eval_shape(method.teacher_outputs, frozen,
                             jnp.zeros((1, 16, 16, 1))),
      views=method.view_table)
  cache = teacher_cache.TeacherCache(str(tmp_path), m)
  cache.build(method, frozen, ds.train, aug, 2, batch_size=5)
  live = pipeline.train_batches(ds.train, batch_size=8, seed=5,
                                transforms=aug)[1]
  cached = pipeline.train_batches(ds.train, batch_size=8, seed=5,
                                  transforms=aug,
                                  teacher_outputs=cache.batch_outputs)[1]
  np.testing.assert_allclose(loss(frozen, cached), loss(frozen, live),
                             rtol=1e-5)


# ----------------------------------------------------------------------------
# The encoder recipe's `dino_augment` and unlabelled pools.


def _dino_reference(image, size, seed):
  """`RandomResizedCrop` then `ColorJitter`'s first draw, in the generator
  order the host transform has always used (torchvision's box search, then
  the flip), resized by scipy directly: the draws must not move."""
  rng = np.random.default_rng(seed)
  crop = transforms.RandomResizedCrop(size)
  top, left, ch, cw = crop.box(*image.shape[:2], rng)
  flipped = rng.random() < 0.5
  region = image[top:top + ch, left:left + cw].astype(np.float32)
  out = ndimage.zoom(region, (size[0] / ch, size[1] / cw, 1), order=1,
                     mode="nearest", grid_mode=True)
  return (out[:, ::-1] if flipped else out), rng


def test_resized_crop_draws_what_it_always_drew():
  crop = transforms.RandomResizedCrop((12, 12))
  rs = np.random.default_rng(1)
  for seed in range(8):
    image = rs.random((12, 12, 3)).astype(np.float32)
    want, rng = _dino_reference(image, (12, 12), seed)
    got_rng = np.random.default_rng(seed)
    got = crop.random_map({"image": image}, got_rng)["image"]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got_rng.random() == rng.random()  # Same numbers consumed.


def test_dino_augment_device_views_equal_the_host_ones():
  size = (16, 16)
  rs = np.random.default_rng(0)
  examples = [{"image": rs.random(size + (3,)).astype(np.float32)}
              for _ in range(N)]
  aug = transforms.dino_augment(size)
  host = np.stack([pipeline.example_view(examples, 7, 0, i, aug)["image"]
                   for i in range(N)])
  shipped = [pipeline.example_view(examples, 7, 0, i,
                                   device_augment.wrap(aug))
             for i in range(N)]
  batch = jax.tree.map(lambda *x: np.stack(x), *shipped)
  device = np.asarray(device_augment.apply_images(batch["image"],
                                                  batch["augment"]))
  # Bilinear without antialiasing on both sides: float32 round-off.
  np.testing.assert_allclose(device, host, atol=1e-5, rtol=0)
  warp = batch["augment"]["warp"]
  limits = warp[:, 18:22]
  # The branches: flipped and not, crops smaller than the image (so the
  # clamp to the crop's own edge matters) away from its top-left corner.
  assert (warp[:, 3] < 0).any() and (warp[:, 3] > 0).any()
  assert (warp[:, 0] < 1).any() and (limits[:, 0] > 0).any()
  assert (limits[:, 2] > 0).any() and (limits[:, 1] < size[0] - 1).any()
  assert (batch["augment"]["colour"][:, 3] > 0).all()  # Saturation drawn.


class _Images:
  """Images only (an unlabelled set's examples)."""

  def __init__(self, n, channels, seed):
    rs = np.random.default_rng(seed)
    self.images = rs.random((n, 16, 16, channels)).astype(np.float32)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i]}


# The labelled set with its recipe, the pool's images: the segmentation
# recipe with label maps, and the encoder recipe on unlabelled images.
POOLED = {
    "transunet": (lambda: synthetic.SyntheticCT(12, size=16, seed=0), 1,
                  RECIPES["transunet"]),
    "dino": (lambda: _Images(12, 3, 0), 3, transforms.dino_augment((16, 16))),
}


@pytest.mark.parametrize("name", sorted(POOLED))
def test_an_unlabelled_pool_batch_on_the_device_equals_the_host_one(name):
  """The pool rows go through the same draws (their own, from the pool's
  stream) and the step's batch is the host one."""
  make, channels, aug = POOLED[name]
  labelled, pool = make(), _Images(10, channels, 1)

  def batches(t):
    ds = pipeline.train_batches(labelled, batch_size=6, seed=3, transforms=t,
                                unlabelled=pool, unlabelled_per_batch=2)
    return [ds[i] for i in range(2)]

  apply = jax.jit(device_augment.apply)
  for host, shipped in zip(batches(aug), batches(device_augment.wrap(aug))):
    warp = shipped["augment"]["warp"]
    assert warp.shape == (6, 22)
    assert len({w.tobytes() for w in warp}) > 1  # Each row its own draw.
    got = jax.device_get(apply(shipped))
    assert sorted(got) == sorted(host)
    np.testing.assert_allclose(got["image"], host["image"], atol=1e-5)
    for key in set(host) - {"image"}:  # Labels, "labelled": exact.
      np.testing.assert_array_equal(got[key], host[key])
    np.testing.assert_array_equal(host["labelled"], np.arange(6) < 4)
