"""kd_jax.models.medtex_baselines: the soft-attention and L2X students'
shapes and ranges, L2X's relaxed and hard top-K against numpy, and
gradients reaching the attention branch and the selector."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models
from kd_jax.models import medtex_baselines as mb

SIZE = 16


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(0).uniform(size=(2, SIZE, SIZE,
                                                            3)), jnp.float32)


def _train_apply(model, v, x, rng):
  return model.apply(v, x, train=True, rngs={"dropout": rng},
                     mutable=["batch_stats"])[0]


@pytest.fixture(scope="module", params=["medtex_attention_student",
                                        "medtex_l2x_student"])
def built(request, images):
  """Everything a test reads of one model, from one jitted function (one
  compile per model): init, eval and train forwards, the parameter
  gradient of the train logits, the student alone on mask ⊙ X."""
  kw = dict(num_patches=3, patch=4) if "l2x" in request.param else {}
  model = models.build(request.param, num_classes=2, **kw)
  student = models.build("medtex_student", num_classes=2)

  @jax.jit
  def run(x):
    v = model.init({"params": jax.random.key(0),
                    "dropout": jax.random.key(1)}, x, train=False)
    logits, feats = model.apply(v, x, train=False)
    train_feats = _train_apply(model, v, x, jax.random.key(3))[1]
    grads = jax.grad(lambda p: _train_apply(
        model, dict(v, params=p), x, jax.random.key(2))[0].sum())(v["params"])
    alone = student.apply({"params": v["params"]["student"],
                           "batch_stats": v["batch_stats"]["student"]},
                          feats["mask"] * x, train=False)[0]
    return logits, feats["mask"], train_feats["mask"], grads, alone

  return request.param, jax.device_get(run(images))


# Building and differentiating each model compiles for ~1 min on the shared
# CPU: slow (run with -m slow).
@pytest.mark.slow
def test_outputs_and_mask_shapes_and_ranges(built):
  name, (logits, mask, train_mask, _, alone) = built
  assert logits.shape == (2, 2) and mask.shape == (2, SIZE, SIZE, 1)
  for m in (mask, train_mask):
    assert float(m.min()) >= 0 and float(m.max()) <= 1
  if "l2x" in name:
    # Eval: exactly 3 patches of 4×4 kept, {0, 1}; training: a soft subset.
    assert set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(mask.sum((1, 2, 3)), [3 * 16, 3 * 16])
    assert 0 < train_mask.sum() / 2 <= 3 * 16 + 1e-3
  # The student sees mask ⊙ X.
  np.testing.assert_allclose(alone, logits, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gradients_reach_the_mask_branch(built):
  name, (*_, g, _) = built
  head = "selector_head" if "l2x" in name else "attention_head"
  for part in (head, "branch1", "student"):
    norm = sum(float(np.abs(x).sum()) for x in jax.tree.leaves(g[part]))
    assert norm > 0, part


def test_relaxed_and_hard_top_k_against_numpy():
  logits = jnp.asarray([[0.3, 2.0, -1.0, 1.5, 0.0]])
  rng = jax.random.key(4)
  u = np.asarray(jax.random.uniform(rng, (2, 1, 5), minval=1e-20,
                                    maxval=1.0))
  z = (np.asarray(logits)[None] - np.log(-np.log(u))) / 0.5
  soft = np.exp(z - z.max(-1, keepdims=True))
  soft = (soft / soft.sum(-1, keepdims=True)).max(0)
  np.testing.assert_allclose(mb.relaxed_top_k(logits, 2, 0.5, rng), soft,
                             rtol=1e-5)
  np.testing.assert_array_equal(mb.hard_top_k(logits, 2), [[0, 1, 0, 1, 0]])


def test_bad_patch_settings_are_one_line(images):
  with pytest.raises(ValueError, match="num_patches=17: choose 1 to the 16"):
    models.build("medtex_l2x_student", num_classes=2, patch=4,
                 num_patches=17).init(jax.random.key(0), images, train=False)
  with pytest.raises(ValueError, match="patch=5"):
    models.build("medtex_l2x_student", num_classes=2, patch=5).init(
        jax.random.key(0), images, train=False)
