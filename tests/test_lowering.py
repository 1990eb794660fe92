"""Every recipe's train step lowers for CUDA and TPU (`jax.export`, on this
CPU) to StableHLO without a custom call and without float64: nothing in it
needs a vendor library call or a host round trip, and no array silently
doubles in width. Lowering only (no compile); tiny models, abstract
arguments from `jax.eval_shape`; flax's layers and bfloat16 compute, as a
run on an accelerator has them.
"""
import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
import pytest

from kd_jax import tasks, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import default, distillo  # noqa: E402
from configs.medtex import medtex  # noqa: E402
from configs.skd import ablation  # noqa: E402

BATCH = 2


def _default(stage):
  c = default.get_config()
  c.stages.teacher.model.update(width=8, depth=2)
  c.stages.distilled.model.update(width=4, depth=2)
  c.stages.distilled.teacher.model.update(width=8, depth=2)
  return c, stage, (16, 16, 1), "segmentation", 9


def _distillo(stage):
  c = distillo.get_config(f"{stage},cpu")
  teacher = dict(name="transunet_tiny", image_size=32, depth=1, hidden=32,
                 mlp_dim=64, num_heads=2, resnet_width=8, head_channels=16,
                 decoder_channels=(16, 8, 8, 4))
  student = dict(name="squeeze_unet", width=8)
  for s in c.stages.values():
    s.model = dict(student)
    if s.get("teacher"):
      s.teacher.model = dict(teacher)
    if s.get("peer"):
      s.peer = dict(teacher)
  return c, stage, (32, 32, 1), "segmentation", 4


def _skd(stage):
  c = ablation.get_config("cpu")
  for s in c.stages.values():
    s.model = dict(name="pspnet_resnet18", width=8)
    if s.get("teacher"):
      s.teacher.model = dict(name="pspnet_resnet18", width=8)
  c.stages.skd.critic.model.conv_dim = 8
  # The critic needs a 64² map at least.
  return c, stage, (64, 64, 3), "segmentation", 4


def _medtex(stage):
  c = medtex.get_config()
  for s in c.stages.values():
    s.model = dict(name="medtex_student", widths=(2, 3, 3, 4))
    if s.get("teacher"):
      s.teacher.model = dict(name="medtex_teacher", widths=(4, 4, 4, 4))
    if s.get("explainer"):
      s.explainer.model = dict(name="medtex_explainer", width=2, depth=2)
  return c, stage, (16, 16, 3), "classification", 2


def _encoder(stage):
  """Foundation-encoder distillation: ViT → EfficientViT, the embedding
  matched through a linear connector (benchmarks/distill_step.py's pair)."""
  c = default.get_config()
  s = c.stages[stage]
  s.model = dict(name="efficientvit_b0", widths=(4, 8, 8, 16, 16),
                 depths=(1, 1, 1, 1, 1), head_dim=8, head_widths=(16, 16))
  s.teacher.model = dict(name="vit_tiny", image_size=32, width=16,
                         num_heads=2, depth=1)
  s.losses = dict(embedding=dict(fn="embedding_cosine", student="embedding",
                                 teacher="embedding", connector="linear"))
  return c, stage, (32, 32, 3), "segmentation", 9


# recipe: (config builder, stage); the stage's method in the name. The
# distillo kd and latent stages are slow (TransUNet and SqueezeU-Net take
# ~10 s each to trace): the mutual stage trains both models, and the
# distill code path is the UNet's and the ViT's.
RECIPES = {
    "supervised_unet": (_default, "teacher"),
    "distill_unet": (_default, "distilled"),
    "mutual_squeeze_unet_transunet": (_distillo, "dml"),
    "adversarial_skd_pspnet": (_skd, "skd"),
    "explain_medtex": (_medtex, "med_tex"),
    "distill_vit_efficientvit": (_encoder, "distilled"),
}
SLOW = {
    "distill_transunet_squeeze_unet": (_distillo, "kd"),
    "distill_latent_transunet_squeeze_unet": (_distillo, "latent"),
}


def _abstract_step(build, stage):
  """(jitted step, abstract args) of `stage`'s train step."""
  c, stage, image, kind, num_classes = build(stage)
  c.layers = "flax"
  c.compute_dtype = "bfloat16"
  heads = {None: tasks.Head(None, "label", kind, num_classes)}
  method, _ = train.build_method(c, stage, "", num_classes,
                                 load_teacher=False, heads=heads)
  tx = train.make_optimizers(method, train.stage_config(c, stage))
  images = jax.ShapeDtypeStruct((BATCH,) + image, jnp.float32)
  label = (jax.ShapeDtypeStruct((BATCH,) + image[:2], jnp.int32)
           if kind == "segmentation"
           else jax.ShapeDtypeStruct((BATCH,), jnp.int32))
  batch = {"image": images, "label": label}
  example = jax.ShapeDtypeStruct((1,) + image, jnp.float32)
  state = jax.eval_shape(functools.partial(
      train.init_state, method, tx, jax.random.key(0)), example)
  frozen = {}
  teachers = getattr(method, "teacher", None)
  if teachers is not None:
    v = jax.eval_shape(functools.partial(
        teachers.init, jax.random.key(1), train=False), example)
    # As checkpoint.load_model_variables gives them (a ViT has no stats).
    frozen = {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
  step = train.jit_train_step(train.make_train_step(method, tx),
                              train.make_mesh(jax.devices()[:1]))
  return step, (state, batch, frozen)


@pytest.fixture(scope="module", params=sorted(RECIPES) + [
    pytest.param(n, marks=pytest.mark.slow) for n in sorted(SLOW)])
def lowered(request):
  step, args = _abstract_step(*{**RECIPES, **SLOW}[request.param])
  exported = jax.export.export(step, platforms=("cuda", "tpu"))(*args)
  return request.param, exported.mlir_module()


def test_no_custom_call(lowered):
  name, text = lowered
  calls = sorted(set(re.findall(r"custom_call\s*@(\w+)", text)))
  assert "stablehlo.custom_call" not in text, (name, calls)


def test_no_float64(lowered):
  name, text = lowered
  assert not re.search(r"\bf64\b", text), name
  assert "complex<f64>" not in text


def test_step_lowers_for_both_platforms(lowered):
  name, text = lowered
  # The step's update: a real function of the state, in bf16 compute.
  assert "stablehlo.convolution" in text or "stablehlo.dot_general" in text
  assert "bf16" in text, name
