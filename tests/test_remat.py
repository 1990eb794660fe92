"""Per-block rematerialisation (`remat` field of the models, set from
`config.remat`): the same variables, outputs and gradients with and without
it, and far less kept between the forward and the backward pass.

What the backward keeps is measured as the residuals of `jax.vjp` (the
arrays its backward function closes over), by `jax.eval_shape`: no compile,
and the same on every backend. XLA:CPU's `memory_analysis()` does not show
the saving (see `test_xla_cpu_temp_size_is_not_the_measure`), so it is not
the measure here.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kd_jax import models, train
from tests import numpy_init

# name -> (constructor fields, input shape): tiny members of each family.
# Tracing them costs no compile, so the inputs are 64² (activations, not
# the parameters, dominate what the backward keeps) and the batch is 6 (no
# parameter has a leading 6).
FAMILIES = {
    "unet": (dict(num_classes=3, width=8, depth=3), (6, 64, 64, 1)),
    "squeeze_unet": (dict(num_classes=3, width=8, depth=2), (6, 64, 64, 1)),
    "resnet18": (dict(num_classes=3, width=8), (6, 64, 64, 3)),
    "pspnet_resnet18": (dict(num_classes=3, width=8, head_channels=8,
                             aux_channels=8), (6, 64, 64, 3)),
    "multitask_resnet18": (dict(width=0.125), (6, 64, 64, 3)),
    "mobilenetv2_seg": (dict(num_classes=3, width=0.25, head_channels=8),
                        (6, 64, 64, 3)),
    "espnet_c": (dict(num_classes=3, p=1, q=1), (6, 64, 64, 3)),
    "vit_tiny": (dict(patch=8, image_size=64, num_classes=3,
                      dropout_rate=0.1), (6, 64, 64, 3)),
    "transunet_tiny": (dict(num_classes=3, image_size=64), (6, 64, 64, 1)),
    "efficientvit_b0": (dict(num_classes=3, head_widths=(16, 16)),
                        (6, 64, 64, 3)),
}
# Most of what the backward keeps of each at these sizes lies in its
# blocks, except: ResNet's stem (a 7×7 conv at half the input side) and
# PSPNet's pyramid pooling and heads, ESPNet's concatenations, BatchNorm and
# PReLU between its modules and its decoder.
MAX_KEPT = dict(resnet18=0.6, multitask_resnet18=0.6, pspnet_resnet18=0.65,
                espnet_c=0.8)
# Compiled for values (two compiles each, 10-40 s on a busy 2-core CPU):
# in CI a transformer with dropout (the recomputed block must draw the same
# masks), the rest slow.
COMPILED = ("vit_tiny",)


def _variables(model, shape):
  """Variables of `model` drawn by numpy (no init compile)."""
  return numpy_init.draw(jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jnp.zeros(shape)), bias_std=0.1)


def _objective(model, variables, x):
  """Mean square of every output and of every feature: a train-mode loss
  that reaches every block, and the new batch statistics."""

  def loss(params):
    (out, feats), upd = model.apply({**variables, "params": params}, x,
                                    train=True, mutable=["batch_stats"],
                                    rngs={"dropout": jax.random.key(2)})
    leaves = jax.tree.leaves((out, feats))
    return sum(jnp.mean(jnp.square(a.astype(jnp.float32)))
               for a in leaves), upd

  return loss


def _traced(name, remat):
  """(variables' shapes, bytes of the activations the backward pass of
  `_objective` keeps) of family `name`, traced without a compile. Kept
  activations: the residuals of `jax.vjp` with the batch's leading
  dimension (the others are parameters, kept either way)."""
  fields, shape = FAMILIES[name]
  model = models.build(name, remat=remat, **fields)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  backward = jax.eval_shape(
      lambda v, x: jax.vjp(_objective(model, v, x), v["params"],
                           has_aux=True)[1], variables, x)
  kept = sum(math.prod(a.shape) * a.dtype.itemsize
             for a in jax.tree.leaves(backward)
             if a.ndim > 1 and a.shape[0] == shape[0])
  return jax.tree.map(lambda a: (a.shape, a.dtype), variables), kept


# Traced in CI: the main families (the others only pass the field on, or
# are traced slowly).
TRACED = ("unet", "resnet18", "pspnet_resnet18", "vit_tiny", "transunet_tiny",
          "efficientvit_b0")


@pytest.fixture(scope="module", params=[
    n if n in TRACED else pytest.param(n, marks=pytest.mark.slow)
    for n in sorted(FAMILIES)])
def traced(request):
  return request.param, {r: _traced(request.param, r) for r in (False, True)}


def test_remat_keeps_the_variables(traced):
  _, t = traced
  assert t[False][0] == t[True][0]


def test_remat_keeps_less_for_the_backward_pass(traced):
  name, t = traced
  plain, remat = t[False][1], t[True][1]
  # Each block keeps its input alone.
  assert remat < MAX_KEPT.get(name, 0.5) * plain, (plain, remat)


def test_dots_saveable_keeps_between_nothing_and_everything():
  kept = [_traced("unet", r)[1]
          for r in (False, jax.checkpoint_policies.dots_saveable, True)]
  assert kept[0] > kept[1] > kept[2]


def _values(name, side):
  """(loss, gradients, new batch statistics) of family `name` at batch 2
  and `side`², without and with remat. (ResNet's and EfficientViT's
  deepest BatchNorms need 64² to see 8 values; over fewer their statistics
  amplify float rounding past 1e-6.)"""
  fields, shape = FAMILIES[name]
  shape = (2, side, side, shape[-1])
  if "image_size" in fields:
    fields = dict(fields, image_size=side)
  x = jnp.asarray(np.random.default_rng(1).standard_normal(shape),
                  jnp.float32)
  out = {}
  for remat in (False, True):
    model = models.build(name, remat=remat, **fields)
    variables = _variables(model, shape)
    (loss, stats), grads = jax.jit(lambda v, x, m=model: jax.value_and_grad(
        _objective(m, v, x), has_aux=True)(v["params"]))(variables, x)
    out[remat] = (loss, grads, stats)
  return out


def _check_equal(values, tol=1e-6):
  """Loss to `tol` relative; each gradient and statistics array to `tol`
  of its largest value (at least 1)."""
  (loss, grads, stats), (r_loss, r_grads, r_stats) = values[False], values[True]
  np.testing.assert_allclose(r_loss, loss, rtol=tol)
  assert float(optax.global_norm(grads)) > 0
  for tree, r_tree in ((grads, r_grads), (stats, r_stats)):
    assert jax.tree.structure(tree) == jax.tree.structure(r_tree)
    for a, b in zip(jax.tree.leaves(r_tree), jax.tree.leaves(tree)):
      np.testing.assert_allclose(
          a, b, rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("name", COMPILED)
def test_remat_gives_the_same_loss_gradients_and_statistics(name):
  _check_equal(_values(name, 32))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(FAMILIES) - set(COMPILED)))
def test_remat_gives_the_same_values_in_every_family(name):
  # Deeper nets whose BatchNorms see few values (8 at ResNet's last stage)
  # differ by float32 rounding of a few 1e-6 where XLA fuses the
  # recomputed blocks differently.
  _check_equal(_values(name, 64), tol=1e-5)


@pytest.mark.parametrize("value,field", [
    (False, False), (None, False), (True, True),
    ("dots_saveable", jax.checkpoint_policies.dots_saveable),
])
def test_config_remat_sets_the_model_field(value, field):
  c = ml_collections.ConfigDict({"remat": value})
  assert train.remat_policy(c) == field
  model = train._build_model(dict(name="unet", width=8), 3, jnp.float32,
                             remat=train.remat_policy(c))
  assert model.remat == field


def test_xla_cpu_temp_size_is_not_the_measure():
  """Why the residuals are measured: XLA:CPU schedules the recomputation
  of a checkpointed chain of dense layers as early as the plain one and
  reports no lower temporary memory (GPU and TPU schedule it late;
  benchmarks/gpu.sh measures it there). If this starts failing, XLA:CPU
  learnt to do the same and the tests above can use memory_analysis()."""

  def chain(layer):
    def loss(ws, x):
      for w in ws:
        x = layer(w, x)
      return jnp.sum(x**2)
    return loss

  def layer(w, x):
    for _ in range(4):
      x = jnp.tanh(x @ w)
    return x

  ws = [jnp.full((64, 64), 0.01)] * 4
  x = jnp.ones((256, 64))
  temp = [jax.jit(jax.grad(chain(f))).lower(ws, x).compile()
          .memory_analysis().temp_size_in_bytes
          for f in (layer, jax.checkpoint(layer))]
  assert temp[1] >= temp[0]



def test_remat_on_a_model_without_it_is_a_config_error():
  c = ml_collections.ConfigDict({"remat": True})
  train.check_remat(c, "unet")  # Offers it: no error.
  with pytest.raises(train.ConfigError,
                     match=r"config.remat=True: model 'medtex_student' has no "
                     r"per-block remat \(models with it: \[.*'unet'"):
    train.check_remat(c, "medtex_student")
  off = ml_collections.ConfigDict({"remat": False})
  train.check_remat(off, "medtex_student")
