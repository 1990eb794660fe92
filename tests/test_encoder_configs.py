"""configs/encoder/distill.py: every preset builds, the cpu presets
validate (teacher checkpoint and shared data present), the paper preset's
arms are wired (abstractly: no ViT-L/16 weights here)."""
import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from kd_jax import checkpoint, data, methods, models, train
from kd_jax.data import sources

ROOT = Path(__file__).parents[1]
DATA = Path(os.environ.get(sources.DATA_ENV, ROOT.parent / "shared" / "data"))
PATH = ROOT / "configs" / "encoder" / "distill.py"


def _module():
  spec = importlib.util.spec_from_file_location("encoder_distill", PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


CFG = _module()


def test_presets_build_with_every_arm():
  for arg in ("cpu", "paper", "paper,b1"):
    c = CFG.get_config(arg)
    assert tuple(c.stage_order) == CFG.ARMS
    assert tuple(c.study.seeds) == ((0, 1) if arg == "cpu" else (0, 1, 2))
    assert c.data.name == "shared_images"
    for arm in CFG.ARMS:
      stage = c.stages[arm]
      assert stage.method == "distill" and stage.model.num_classes == 0
      # No task term: the data has no labels.
      assert all(t.fn.startswith(("embedding_", "feature_map"))
                 for t in stage.losses.values())
  cpu = CFG.get_config("cpu")
  assert cpu.layers == "cpu" and cpu.steps == 300
  paper = CFG.get_config("paper,b1")
  assert paper.layers == "flax"
  assert paper.compute_dtype == "bfloat16" and paper.data.image_size == 224
  assert paper.stages.global_cos.teacher.model.name == "vit_l16"
  assert paper.stages.dense_attn.model.name == "efficientvit_b1"
  assert tuple(paper.stages.dense_attn.losses.dense.connector.grid) == (14,
                                                                        14)
  with pytest.raises(ValueError, match="expected <preset>"):
    CFG.get_config("gpu")


def test_one_override_sets_every_arms_teacher_folder():
  c = CFG.get_config("cpu")
  c.stages.dense_attn.teacher.checkpoint = "/elsewhere"
  assert {c.stages[a].teacher.checkpoint for a in CFG.ARMS} == {"/elsewhere"}


def test_the_cpu_teacher_is_the_teacher_cpu_stage_model():
  trained = CFG.get_config("teacher_cpu").stages.teacher.model.to_dict()
  for arm in CFG.ARMS:
    assert CFG.get_config("cpu").stages[arm].teacher.model.to_dict() == trained


@pytest.fixture(scope="module")
def cpu_teacher(tmp_path_factory):
  """A folder holding a checkpoint of the cpu teacher's shapes."""
  cfg = CFG.get_config("teacher_cpu").stages.teacher.model.to_dict()
  model = models.build(cfg.pop("name"), **cfg)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x,
                                                  train=False),
                             jnp.zeros((1, 64, 64, 3)))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        variables["params"])
  folder = str(tmp_path_factory.mktemp("teacher"))
  with checkpoint.manager(os.path.join(folder, "checkpoints"),
                          save_every=1) as mngr:
    checkpoint.save(mngr, 0, {"params": {"model": params},
                              "batch_stats": {"model": {}}}, force=True)
    mngr.wait_until_finished()
  return folder


@pytest.mark.skipif(not DATA.is_dir(), reason="shared data folder absent")
def test_cpu_presets_validate(cpu_teacher, tmp_path):
  teacher = CFG.get_config("teacher_cpu")
  train.validate(teacher, str(tmp_path), data.build(teacher.data))
  c = CFG.get_config("cpu")
  c.stages.global_cos.teacher.checkpoint = cpu_teacher
  ds = data.build(c.data)
  assert ds.targets == {} and ds.train[0]["image"].shape == (64, 64, 3)
  # The two arms that hold every connector and loss but embedding_l2 (its
  # pair is global_cos's): validating all five takes minutes on 2 cores.
  c.stage_order = ("global_dense", "dense_interp")
  train.validate(c, str(tmp_path), ds)


def test_paper_arms_are_wired():
  # global_dense holds both pairs; init checks each connector's output
  # against the teacher feature's shape (7×7 map → 14×14×1024 tokens).
  c = CFG.get_config("paper")
  s = train.stage_config(c, "global_dense")
  ctx = train.build_context(c, "global_dense", "/nowhere", 0,
                            load_frozen=False, heads=None)
  method, _ = methods.from_config(s, ctx)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(method.init, jax.random.key(0), x)
  conn = variables["params"]["connectors"]
  assert conn["dense"]["proj_out"]["kernel"].shape == (128, 1024)
  assert conn["emb"]["dense"]["kernel"].shape == (1280, 1024)
