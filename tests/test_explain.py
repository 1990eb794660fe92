"""Tests for kd_jax.evaluate.explain with tiny Flax models defined here."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.evaluate import explain


class TinyNet(nn.Module):
  """Two convs and a head; `split` exposes encoder / head for references.

  features: "conv1" (N, H, W, 4), "conv2" (N, H/2, W/2, 6), "embedding",
  "unused" (a copy the network never consumes), "conv2_f32" (a cast).
  """

  segment: bool = False
  num_classes: int = 3

  def setup(self):
    self.conv1 = nn.Conv(4, (3, 3))
    self.conv2 = nn.Conv(6, (3, 3), strides=2)
    self.head = (nn.Conv(self.num_classes, (1, 1)) if self.segment
                 else nn.Dense(self.num_classes))

  def encode(self, x):
    a1 = nn.relu(self.conv1(x))
    return a1, jax.jit(nn.relu)(self.conv2(a1))  # a nested jit is inlined

  def decode(self, a2, size):
    if self.segment:
      logits = self.head(a2)
      return jax.image.resize(logits, (a2.shape[0],) + size + (
          self.num_classes,), "bilinear")
    return self.head(a2.mean((1, 2)))

  def __call__(self, x, *, train=False):
    a1, a2 = self.encode(x)
    logits = self.decode(a2, x.shape[1:3])
    return logits, {"conv1": a1, "conv2": a2, "embedding": a2.mean((1, 2)),
                    "unused": a2 * 2.0,
                    "conv2_f32": a2.astype(jnp.bfloat16).astype(jnp.float32)}


@pytest.fixture(scope="module", params=[False, True], ids=["cls", "seg"])
def model(request):
  net = TinyNet(segment=request.param)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 2))
  variables = net.init(jax.random.key(1), x)
  apply_fn = functools.partial(net.apply, variables, train=False)
  return net, variables, apply_fn, x


def _reference_feature_grad(net, variables, x, target, region=None):
  """∂score/∂conv2 by splitting the model by hand (encode, then decode)."""
  _, a2 = net.apply(variables, x, method=TinyNet.encode)

  def score(a2):
    logits = net.apply(variables, a2, x.shape[1:3], method=TinyNet.decode)
    return explain.class_score(logits, target, region).sum()

  return a2, jax.grad(score)(a2)


def test_feature_gradient_matches_split_model(model):
  net, variables, apply_fn, x = model
  region = (jnp.arange(64).reshape(1, 8, 8) % 3 == 0) if net.segment else None
  value, grad = explain.feature_gradient(apply_fn, x, "conv2", [0, 2], region)
  ref_value, ref_grad = _reference_feature_grad(net, variables, x,
                                                jnp.array([0, 2]), region)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
  assert np.abs(grad).sum() > 0


def test_grad_cam_formula_and_jit(model):
  net, variables, apply_fn, x = model
  a2, g = _reference_feature_grad(net, variables, x, jnp.array([1, 1]))
  cam = np.maximum((np.asarray(g).mean((1, 2), keepdims=True)
                    * np.asarray(a2)).sum(-1), 0)
  raw = explain.grad_cam(apply_fn, x, "conv2", 1, upsample=False,
                         normalize=False)
  np.testing.assert_allclose(raw, cam, rtol=1e-5, atol=1e-6)
  fn = jax.jit(functools.partial(explain.grad_cam, apply_fn,
                                 feature="conv2", target_class=1))
  out = fn(x)
  assert out.shape == (2, 8, 8) and out.dtype == jnp.float32
  assert float(out.min()) >= 0 and float(out.max()) <= 1 + 1e-6
  # A cast of the consumed map is followed back to it.
  cast = explain.grad_cam(apply_fn, x, "conv2_f32", 1, upsample=False,
                          normalize=False)
  np.testing.assert_allclose(cast, cam, rtol=1e-5, atol=1e-6)


def test_classifier_grad_cam_golden_linear_head():
  # For a global-average-pool + dense head, dy_c/dA_k = W[k, c] / (h w), so
  # alpha_k = W[k, c] / (h w) and the map is ReLU(sum_k alpha_k A_k).
  net = TinyNet(segment=False)
  x = jax.random.normal(jax.random.key(2), (1, 8, 8, 2))
  variables = net.init(jax.random.key(3), x)
  _, feats = net.apply(variables, x)
  a2 = np.asarray(feats["conv2"])
  w = np.asarray(variables["params"]["head"]["kernel"])
  expected = np.maximum((a2 * (w[:, 2] / 16.0)).sum(-1), 0)
  cam = explain.grad_cam(functools.partial(net.apply, variables), x, "conv2",
                         2, upsample=False, normalize=False)
  np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-7)


def test_feature_errors(model):
  _, _, apply_fn, x = model
  with pytest.raises(ValueError, match=r"not in the model's features.*conv1"):
    explain.grad_cam(apply_fn, x, "conv9", 0)
  with pytest.raises(ValueError, match="not used by the rest"):
    explain.grad_cam(apply_fn, x, "unused", 0)
  with pytest.raises(ValueError, match="NHWC map or NLD tokens"):
    explain.grad_cam(apply_fn, x, "embedding", 0)


def test_saliency_of_linear_model_is_abs_weight():
  w = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(4, 4, 3, 2) - 40
  apply_fn = lambda x: (jnp.einsum("nhwc,hwck->nk", x, w), {})
  x = jnp.ones((2, 4, 4, 3))
  sal = explain.saliency(apply_fn, x, 1, reduce=None)
  np.testing.assert_allclose(sal, jnp.broadcast_to(jnp.abs(w[..., 1]),
                                                   (2, 4, 4, 3)))
  np.testing.assert_allclose(explain.saliency(apply_fn, x, 1)[0],
                             jnp.abs(w[..., 1]).max(-1))
  with pytest.raises(ValueError, match="reduce"):
    explain.saliency(apply_fn, x, 1, reduce="sum")


def test_segmenter_saliency_respects_region(model):
  net, _, apply_fn, x = model
  if not net.segment:
    pytest.skip("segmenter only")
  region = jnp.zeros((2, 8, 8)).at[:, :2, :2].set(1)
  sal = explain.saliency(apply_fn, x, 0, region=region)
  assert sal.shape == (2, 8, 8)
  # Far from the region (beyond the receptive field) nothing matters.
  assert float(sal[:, 7, 7].max()) == 0.0 and float(sal[:, 0, 0].max()) > 0


def test_class_score_hand_computed():
  logits = jnp.arange(12.0).reshape(1, 2, 2, 3)
  assert float(explain.class_score(logits, 2)[0]) == (2 + 5 + 8 + 11) / 4
  region = jnp.array([[[1, 0], [0, 1]]])
  assert float(explain.class_score(logits, 1, region)[0]) == (1 + 10) / 2
  assert explain.class_score(jnp.eye(3), [0, 1, 0]).tolist() == [1, 1, 0]


def test_topk_iou_hand_computed():
  s = np.array([[0.9, 0.8, 0.1, 0.0],
                [0.7, 0.2, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.3]])
  mask = np.zeros((4, 4), int)
  mask[0, 0] = mask[1, 0] = mask[3, 3] = 1
  # Top 3 = {(0,0), (0,1), (1,0)}: intersection 2, union 4.
  assert explain.topk_iou(s, mask, num_pixels=3) == pytest.approx(0.5)
  batch = explain.topk_iou(np.stack([s, s]), np.stack([mask, 0 * mask]),
                           num_pixels=3)
  np.testing.assert_allclose(batch, [0.5, 0.0])
  assert np.isnan(explain.topk_iou(s, 0 * mask, num_pixels=0))
  # MED-TEX: K = k * 32 * 32 pixels.
  big = np.zeros((64, 64))
  big[:32, :32] = 1.0
  lesion = big > 0
  assert explain.topk_iou(big, lesion, k=1) == 1.0
  assert explain.topk_iou(big, lesion, k=2) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="mask shape"):
    explain.topk_iou(s, mask[:3])


def test_default_cam_feature_segmenter_and_classifier():
  feats = {"enc1": (1, 64, 64, 4), "dec1": (1, 64, 64, 4),
           "dec2": (1, 32, 32, 8), "bottleneck": (1, 8, 8, 32),
           "embedding": (1, 32), "encoder": (1, 16, 128)}
  # Segmenter: the full-resolution decoder map, not the encoder's twin.
  assert explain.default_cam_feature((1, 64, 64, 9), feats) == "dec1"
  # TransUNet's names: the decoder's last block is the largest map.
  assert explain.default_cam_feature(
      (1, 64, 64, 9), {"cnn.root": (1, 32, 32, 16),
                       "decoder.block3": (1, 64, 64, 8),
                       "decoder.block2": (1, 32, 32, 16)}) == "decoder.block3"
  # PSPNet: its auxiliary logits (full size, consumed by nothing) are not
  # a feature map; the largest map of the network is.
  assert explain.default_cam_feature(
      (1, 64, 64, 4), {"aux_logits": (1, 64, 64, 4), "stem": (1, 32, 32, 8),
                       "head": (1, 8, 8, 16)}) == "stem"
  # Classifier: the last, lowest-resolution map.
  assert explain.default_cam_feature((1, 5), feats) == "bottleneck"
  with pytest.raises(ValueError, match="no NHWC feature map.*embedding"):
    explain.default_cam_feature((1, 5), {"embedding": (1, 32)})


def test_default_class_counts_foreground_only():
  labels = np.array([[0, 0, 0, 0, 2], [1, 2, 2, 1, 255]])  # 255 ignored
  assert explain.default_class(labels, 3) == 2
  # Background is never chosen even when it dominates; ties go to the lower.
  assert explain.default_class(np.array([0, 0, 0, 1, 2]), 3) == 1


def test_explainer_equals_separate_calls(model):
  net, variables, apply_fn, x = model
  sal, cam = explain.explainer(net, "conv2", 1)(variables, x)
  np.testing.assert_allclose(sal, explain.saliency(apply_fn, x, 1), rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(cam, explain.grad_cam(apply_fn, x, "conv2", 1),
                             rtol=1e-5, atol=1e-6)


TRACES = []


class CountedNet(TinyNet):
  """TinyNet that records each Python run of its forward (a trace)."""

  def __call__(self, x, *, train=False):
    TRACES.append(x.shape)
    return super().__call__(x, train=train)


def test_explainer_traces_once_for_every_class():
  net = CountedNet(segment=True)
  x = jax.random.normal(jax.random.key(4), (2, 8, 8, 2))
  variables = net.init(jax.random.key(5), x)
  maps = {}
  for c in (1, 2):
    maps[c] = explain.explainer(net, "conv2", c)(variables, x)
    if c == 1:
      traced = len(TRACES)
  assert traced > 0
  # The second class reuses the first one's trace (and compile).
  assert len(TRACES) == traced
  for c, (sal, cam) in maps.items():
    # Saliency: |∂ mean logit_c / ∂x|, max over channels.
    def score(x, c=c):
      return net.apply(variables, x)[0][..., c].mean((1, 2)).sum()
    want_sal = np.abs(np.asarray(jax.grad(score)(x))).max(-1)
    np.testing.assert_allclose(sal, want_sal, rtol=1e-6, atol=1e-6)
    # Grad-CAM from the split model's feature gradient, resized, normalized.
    a2, g = _reference_feature_grad(net, variables, x, jnp.array([c, c]))
    raw = jax.nn.relu((g.mean((1, 2), keepdims=True) * a2).sum(-1))
    up = np.maximum(np.asarray(jax.image.resize(raw, (2, 8, 8), "bilinear")),
                    0)
    want_cam = up / up.max((1, 2), keepdims=True)
    np.testing.assert_allclose(cam, want_cam, rtol=1e-6, atol=1e-6)
  assert not np.allclose(maps[1][0], maps[2][0])
