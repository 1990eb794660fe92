"""Distillation on unlabelled images: the `image_folder` source (any image
size, read on access), DINO-style crops, the embedding head, and a few steps
of a distill stage with no task loss that never reads a label."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from kd_jax import checkpoint, data, models, tasks, train
from kd_jax.data import sources, transforms

SIZE = 32
TEACHER = dict(name="vit_tiny", width=16, depth=1, num_heads=2, patch=8,
               image_size=SIZE, num_classes=0)
# A ViT student compiles in a fraction of an EfficientViT's time; the
# stage's wiring is the same (tests/test_encoder_configs.py builds the
# configured EfficientViT arms).
STUDENT = dict(name="vit_tiny", width=8, depth=1, num_heads=2, patch=16,
               image_size=SIZE, num_classes=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Seven images of seven sizes, RGB and grey, in nested folders."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for i, (h, w) in enumerate([(40, 50), (33, 33), (64, 20), (17, 90),
                              (45, 45), (30, 60), (100, 70)]):
    sub = root / ("a" if i % 2 else "b")
    sub.mkdir(exist_ok=True)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(pixels if i != 3 else pixels[..., 0])
    image.save(sub / f"{i}.png")
  (root / "notes.txt").write_text("not an image")
  return str(root)


def test_image_folder_reads_every_image_at_one_size_without_labels(folder):
  src = sources.ImageFolderSource(folder, image_size=(SIZE, SIZE))
  assert len(src) == 7
  for i in range(len(src)):
    example = src[i]
    assert set(example) == {"image"}
    assert example["image"].shape == (SIZE, SIZE, 3)
    assert example["image"].dtype == np.float32
  # A file read back equals Pillow's pixels / 255, resized.
  path = src.image_paths[1]  # a/1.png, 33×33
  raw = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255
  np.testing.assert_allclose(src[1]["image"],
                             transforms.resize_image(raw, (SIZE, SIZE)),
                             atol=1e-6)


def test_image_folder_data_set_has_no_targets_and_an_embedding_head(folder):
  ds = data.build(dict(name="image_folder", image_dir=folder,
                       image_size=SIZE, val_fraction=0.3))
  assert (len(ds.train), len(ds.val), ds.targets) == (5, 2, {})
  heads = tasks.from_config(None, ds.targets)
  assert heads[None].kind == "embedding" and heads[None].label is None
  assert tasks.labels(heads, {"image": 0}) is None
  with pytest.raises(ValueError, match="unlabelled"):
    tasks.check_terms(heads, [dict(fn="cross_entropy")])
  with pytest.raises(ValueError, match="carries no labels"):
    tasks.from_config({"grade": {}}, ds.targets)


def test_random_resized_crop_boxes_fit_and_views_have_the_size():
  crop = transforms.RandomResizedCrop((16, 16), scale=(0.2, 0.5))
  rng = np.random.default_rng(0)
  for h, w in [(40, 50), (17, 90), (100, 7)]:
    for _ in range(20):
      top, left, ch, cw = crop.box(h, w, rng)
      assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
  image = np.random.default_rng(1).random((40, 50, 3)).astype(np.float32)
  view = crop.random_map({"image": image}, np.random.default_rng(2))
  assert view["image"].shape == (16, 16, 3)
  # The view is the drawn box resized (and maybe mirrored): same stream.
  rng = np.random.default_rng(2)
  top, left, ch, cw = crop.box(40, 50, rng)
  want = transforms.resize_image(image[top:top + ch, left:left + cw],
                                 (16, 16))
  if rng.random() < 0.5:
    want = want[:, ::-1]
  np.testing.assert_allclose(view["image"], want)


def _teacher_folder(path):
  cfg = dict(TEACHER)
  model = models.build(cfg.pop("name"), **cfg)
  # One jitted init: eager init compiles every op on its own.
  variables = jax.jit(lambda x: model.init(jax.random.key(1), x,
                                           train=False))(
                                               jnp.zeros((1, SIZE, SIZE, 3)))
  state = {"params": {"model": variables["params"]},
           "batch_stats": {"model": {}}}
  with checkpoint.manager(os.path.join(path, "checkpoints"),
                          save_every=1) as mngr:
    checkpoint.save(mngr, 0, state, force=True)
    mngr.wait_until_finished()
  return path


def _config(folder, teacher, steps):
  c = ml_collections.ConfigDict()
  c.seed, c.compute_dtype, c.layers = 0, "float32", "flax"
  c.batch_size, c.steps = 4, steps
  c.log_every = c.eval_every = c.checkpoint_every = steps
  c.optimizer = dict(name="adamw", lr=1e-3, weight_decay=0.0, momentum=0.9,
                     warmup_steps=0, grad_clip=1.0)
  c.data = dict(name="image_folder", image_dir=folder, image_size=SIZE,
                val_fraction=0.3)
  grid = (SIZE // 8,) * 2
  c.stages = dict(arm=dict(
      method="distill", model=STUDENT,
      teacher=dict(model=TEACHER, checkpoint=teacher),
      losses=dict(
          emb=dict(fn="embedding_cosine", student="embedding",
                   teacher="embedding", connector="linear"),
          dense=dict(fn="feature_map_cosine", student="patch_map",
                     teacher="patch_map",
                     connector=dict(kind="attention_pool", grid=grid,
                                    hidden=16, num_heads=2)))))
  c.stage_order = ("arm",)
  return c


class _NoLabels:
  """The folder's training split, with every attribute a labelled source
  has (labels, targets, num_classes) raising when read."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    return self._source[i]

  def __getattr__(self, name):
    raise AssertionError(f"the unlabelled stage read the source's {name!r}")


def test_a_distill_stage_on_unlabelled_images_steps_without_labels(
    folder, tmp_path):
  c = _config(folder, _teacher_folder(str(tmp_path / "teacher")), 2)
  train.validate(c, str(tmp_path), data.build(c.data))
  ds = data.build(c.data)
  heads = train.run_heads(c, ds)
  method, frozen = train.build_method(c, "arm", str(tmp_path),
                                      ds.num_classes, heads=heads)
  stage = train.stage_config(c, "arm")
  tx = train.make_optimizers(method, stage)
  batches = data.pipeline.train_batches(
      _NoLabels(ds.train), batch_size=4, seed=0,
      transforms=ds.train_transforms)
  first = batches[0]
  assert set(first) == {"image"} and first["image"].shape == (4, SIZE, SIZE,
                                                               3)
  state = jax.jit(functools.partial(train.init_state, method, tx,
                                    jax.random.key(0)))(
                                        jnp.asarray(first["image"][:1]))
  step = jax.jit(train.make_train_step(method, tx))
  before = state.params["student"]["norm"]["scale"]
  losses = []
  for s in range(2):
    state, metrics = step(state, batches[s], frozen)
    losses.append(float(metrics["loss"]))
    assert {"emb", "dense"} <= set(metrics)
  assert np.all(np.isfinite(losses)) and int(state.step) == 2
  assert not np.allclose(before, state.params["student"]["norm"]["scale"])


@pytest.mark.slow
def test_a_distill_stage_on_unlabelled_images_runs_end_to_end(folder,
                                                              tmp_path):
  c = _config(folder, _teacher_folder(str(tmp_path / "teacher")), 3)
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(c, workdir)
  assert results["arm"]["scores"] == {}
  with open(os.path.join(workdir, "arm", "history.jsonl")) as f:
    rows = [json.loads(line) for line in f if "train/loss" in line]
  assert rows[-1]["step"] == 3 and {"train/emb", "train/dense"} <= set(
      rows[-1])
  assert os.path.isdir(os.path.join(workdir, "arm", "checkpoints", "3"))
  assert os.path.isfile(os.path.join(workdir, "report.md"))
