"""Explanations: vanilla saliency, Grad-CAM, and top-K IoU against lesions.

Every function takes `apply_fn(x) -> (logits, features)`, the model contract
with the variables bound, e.g.
`functools.partial(model.apply, variables, train=False)`.

The explained score is one class's logit: for a classifier (logits (N, K))
`logits[:, c]`; for a segmenter (logits (N, H, W, K)) the mean of
`logits[..., c]` over a region (a (N, H, W) mask; all pixels by default).
`target_class` is an int or one class per example.

How Grad-CAM reaches an intermediate feature. Grad-CAM needs ∂score/∂A for
a feature map A inside the network, but a model only returns A in its
`features` dict. Rather than asking every model to split its `__call__` or to
call `self.perturb`, `feature_gradient` traces `apply_fn` to a jaxpr (with
nested `jit`s inlined), finds the variable that is returned as
`features[name]`, and re-evaluates the jaxpr with a zero tensor added to
that variable where it is defined; the gradient w.r.t. the zero tensor is
∂score/∂A as the rest of the network consumes it. This works for any model
that follows the contract, provided the returned array is the one the
network goes on to use (a dtype cast of it is followed back to its source)
and is not produced inside a `remat`/`scan` region; otherwise a ValueError
says so. The functions are traceable: wrap them in `jax.jit` with
`apply_fn` and `feature` fixed; `target_class` may be a traced int32
(`explainer` does so, one compile for every class).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

Array = Any
ApplyFn = Callable[[jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


# --------------------------------------------------------------------------
# Scores.


def class_score(logits: jax.Array, target_class,
                region: jax.Array | None = None) -> jax.Array:
  """(N,) score of `target_class` per example (see module docstring)."""
  n, k = logits.shape[0], logits.shape[-1]
  target = jnp.broadcast_to(jnp.asarray(target_class, jnp.int32), (n,))
  onehot = jax.nn.one_hot(target, k, dtype=logits.dtype)
  if logits.ndim == 2:
    return (logits * onehot).sum(-1)
  per_pixel = (logits * onehot.reshape((n,) + (1,) * (logits.ndim - 2) + (k,))
               ).sum(-1)
  axes = tuple(range(1, per_pixel.ndim))
  if region is None:
    return per_pixel.mean(axes)
  region = jnp.broadcast_to(jnp.asarray(region, per_pixel.dtype),
                            per_pixel.shape)
  return (per_pixel * region).sum(axes) / jnp.maximum(region.sum(axes), 1)


# --------------------------------------------------------------------------
# Saliency.


def saliency(apply_fn: ApplyFn, x: jax.Array, target_class,
             region: jax.Array | None = None,
             reduce: str | None = "max") -> jax.Array:
  """Vanilla gradient saliency |∂score/∂x| (Simonyan et al., 2014).

  Returns (N, H, W) — the max (or "mean") over channels of the absolute
  input gradient — or (N, H, W, C) with `reduce=None`.
  """
  def total(x):
    return class_score(apply_fn(x)[0], target_class, region).sum()

  grad = jnp.abs(jax.grad(total)(x))
  if reduce is None:
    return grad
  if reduce == "max":
    return grad.max(-1)
  if reduce == "mean":
    return grad.mean(-1)
  raise ValueError(f"reduce must be 'max', 'mean' or None, got {reduce!r}")


# --------------------------------------------------------------------------
# Gradients with respect to a named feature.


def _trace(apply_fn: ApplyFn, x: jax.Array, feature: str):
  def forward(x):
    logits, features = apply_fn(x)
    if feature not in features:
      raise ValueError(f"feature {feature!r} is not in the model's features; "
                       f"choose from {sorted(features)}")
    return logits, features[feature]

  with jax.disable_jit():  # Inline nested jits so the feature is top level.
    closed, out_shape = jax.make_jaxpr(forward, return_shape=True)(x)
  return closed, out_shape


def _locate(jaxpr, feature: str):
  """The jaxpr variable the network consumes as `features[feature]`."""
  target = jaxpr.outvars[-1]
  if isinstance(target, jex_core.Literal):
    raise ValueError(f"feature {feature!r} is a constant; Grad-CAM needs a "
                     "map computed from the input")
  producers = {id(v): e for e in jaxpr.eqns for v in e.outvars}
  # A returned cast (or copy) of the map: walk back to the array the network
  # consumes, as long as nothing but the cast chain uses the current one.
  via = None
  while not _users(jaxpr, target, exclude=via):
    eqn = producers.get(id(target))
    if (eqn is None or eqn.primitive.name not in _CASTS
        or isinstance(eqn.invars[0], jex_core.Literal)):
      raise ValueError(
          f"feature {feature!r} is not used by the rest of the computation "
          "at the top level (it is a copy the model does not consume, or it "
          "is computed inside a remat/scan region), so its gradient cannot "
          "be taken. Return the array the network itself goes on to use.")
    via, target = eqn, eqn.invars[0]
  return target


_CASTS = ("convert_element_type", "copy", "copy_p")


def _users(jaxpr, var, exclude=None) -> list:
  """Equations other than `exclude` that read `var`."""
  return [e for e in jaxpr.eqns if e is not exclude and any(
      v is var for v in e.invars if not isinstance(v, jex_core.Literal))]


def _eval_with_delta(jaxpr, consts, args, target, delta):
  """Evaluates `jaxpr`, adding `delta` to `target` where it is defined."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[id(v)]

  def write(v, value):
    if isinstance(v, jex_core.DropVar):
      return
    env[id(v)] = value + delta if v is target else value

  for v, c in zip(jaxpr.constvars, consts):
    write(v, c)
  for v, a in zip(jaxpr.invars, args):
    write(v, a)
  for eqn in jaxpr.eqns:
    params = eqn.primitive.get_bind_params(eqn.params)
    # Older jax returned (subfuns, params); newer returns params only.
    subfuns, params = params if isinstance(params, tuple) else ([], params)
    outs = eqn.primitive.bind(*subfuns, *map(read, eqn.invars), **params)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, out in zip(eqn.outvars, outs):
      write(v, out)
  return [read(v) for v in jaxpr.outvars], read(target)


def feature_gradient(apply_fn: ApplyFn, x: jax.Array, feature: str,
                     target_class, region: jax.Array | None = None,
                     check_shape: Callable[[tuple[int, ...]], None] | None
                     = None) -> tuple[jax.Array, jax.Array]:
  """(A, ∂score/∂A) for A = `features[feature]` (see module docstring).

  `check_shape(shape)` may reject the feature's shape before any work.
  """
  closed, out_shape = _trace(apply_fn, x, feature)
  if check_shape is not None:
    check_shape(out_shape[1].shape)
  jaxpr = closed.jaxpr
  target = _locate(jaxpr, feature)
  treedef = jax.tree_util.tree_structure(out_shape)

  def total(delta):
    outs, value = _eval_with_delta(jaxpr, closed.consts, [x], target, delta)
    logits, _ = jax.tree_util.tree_unflatten(treedef, outs)
    return class_score(logits, target_class, region).sum(), value

  zero = jnp.zeros(target.aval.shape, target.aval.dtype)
  grad, value = jax.grad(total, has_aux=True)(zero)
  return value, grad


def _grid(shape: tuple[int, ...], name: str) -> tuple[int, int]:
  """(tokens to drop, grid side) for NLD tokens; (0, 0) for NHWC maps."""
  if len(shape) == 4:
    return 0, 0
  if len(shape) == 3:
    for drop in (0, 1):  # a leading class token is dropped when L = s² + 1
      side = int(round(np.sqrt(shape[1] - drop)))
      if side > 0 and side * side == shape[1] - drop:
        return drop, side
  raise ValueError(f"feature {name!r} has shape {shape}; Grad-CAM needs an "
                   "NHWC map or NLD tokens on a square grid")


def _as_map(a: jax.Array, name: str) -> jax.Array:
  """NHWC stays; NLD tokens become an (N, s, s, D) grid."""
  drop, side = _grid(a.shape, name)
  if a.ndim == 4:
    return a
  return a[:, drop:].reshape(a.shape[0], side, side, a.shape[-1])


def grad_cam(apply_fn: ApplyFn, x: jax.Array, feature: str, target_class,
             region: jax.Array | None = None, upsample: bool = True,
             normalize: bool = True) -> jax.Array:
  """Grad-CAM (Selvaraju et al., 2017) on `features[feature]`.

  weights α_k = spatial mean of ∂score/∂A_k; map = ReLU(Σ_k α_k A_k). For a
  segmenter the score is the class's mean logit over `region` (Vinogradova
  et al., 2020). Returns (N, H, W) float32 resized (bilinear) to the input
  when `upsample`, else at the feature's resolution; each map divided by its
  max when `normalize` (an all-zero map stays zero).
  """
  value, grad = feature_gradient(apply_fn, x, feature, target_class, region,
                                 check_shape=lambda s: _grid(s, feature))
  value = _as_map(value.astype(jnp.float32), feature)
  grad = _as_map(grad.astype(jnp.float32), feature)
  weights = grad.mean(axis=(1, 2), keepdims=True)
  cam = jax.nn.relu((weights * value).sum(-1))
  if upsample and cam.shape[1:] != x.shape[1:3]:
    cam = jax.image.resize(cam, (cam.shape[0],) + tuple(x.shape[1:3]),
                           "bilinear")
    cam = jax.nn.relu(cam)
  if normalize:
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1), 0)
  return cam


def default_cam_feature(logits_shape, feature_shapes: dict) -> str:
  """The feature map Grad-CAM weighs when none is named.

  A segmenter's (4-D logits) is its highest-resolution decoder map, where the
  class evidence has been assembled ("dec1" of the UNets, "decoder.block3" of
  TransUNet); a classifier's is its last, lowest-resolution map, as in the
  Grad-CAM paper. Ties go to the name sorted last; maps whose name starts
  with "dec" win over encoder maps of the same size. Side outputs named
  "*logits" (PSPNet's "aux_logits") are left out: nothing in the network
  consumes them, so they have no Grad-CAM.
  """
  maps = {k: s for k, s in feature_shapes.items()
          if len(s) == 4 and not k.endswith("logits")}
  if not maps:
    raise ValueError("the model returns no NHWC feature map for Grad-CAM; "
                     f"its features: {sorted(feature_shapes)}")
  if len(logits_shape) == 4:
    key = lambda k: (maps[k][1] * maps[k][2], k.startswith("dec"), k)
  else:
    key = lambda k: (-maps[k][1] * maps[k][2], k)
  return max(maps, key=key)


def model_cam_feature(model, image_shape, feature: str = "") -> str:
  """`feature` checked against the features `model` (the contract's linen
  module) returns for images of `image_shape`; its default
  (`default_cam_feature`) when `feature` is empty."""
  logits, feats = jax.eval_shape(
      functools.partial(model.init_with_output, train=False),
      jax.random.key(0), jax.ShapeDtypeStruct(tuple(image_shape),
                                              jnp.float32))[0]
  shapes = {k: v.shape for k, v in feats.items()}
  if not feature:
    return default_cam_feature(logits.shape, shapes)
  if feature not in feats:
    raise ValueError(f"its model has no feature {feature!r} for Grad-CAM; "
                     f"pass --cam_feature=<one of {sorted(feats)}>")
  return feature


def default_class(labels, num_classes: int) -> int:
  """The foreground class with the most ground-truth pixels in `labels`
  (ignored labels outside [0, num_classes) left out)."""
  labels = np.asarray(labels).ravel()
  labels = labels[(labels >= 0) & (labels < num_classes)]
  counts = np.bincount(labels, minlength=num_classes)
  return int(np.argmax(counts[1:])) + 1


def _explain(model, feature: str, variables, images, target_class):
  apply_fn = functools.partial(model.apply, variables, train=False)
  return (saliency(apply_fn, images, target_class),
          grad_cam(apply_fn, images, feature, target_class))


# The class is a traced int32 argument, so one compile per (model, feature,
# input shapes) serves every class: a report's figure and a notebook's own
# cell for another class reuse it. Linen modules hash by their fields.
_explain_jit = jax.jit(_explain, static_argnums=(0, 1))


def explainer(model, feature: str, target_class):
  """(variables, images) -> (saliency, Grad-CAM), each (N, H, W), of
  `model` (the contract's linen module) for `target_class` (an int or one
  per example), jitted once per model and feature for all classes."""
  target = np.asarray(target_class, np.int32)
  try:
    hash(model)
    fn = functools.partial(_explain_jit, model, feature)
  except TypeError:  # a module with unhashable fields: a jit of its own
    fn = jax.jit(functools.partial(_explain, model, feature))
  return lambda variables, images: fn(variables, images, target)


# --------------------------------------------------------------------------
# Agreement with lesion masks (numpy).


def topk_mask(saliency_map: Array, num_pixels: int) -> np.ndarray:
  """Boolean mask of the `num_pixels` highest values of each (H, W) map
  (ties broken by position, first wins)."""
  s = np.asarray(saliency_map, np.float64)
  flat = s.reshape(-1, s.shape[-2] * s.shape[-1])
  k = int(min(max(num_pixels, 0), flat.shape[1]))
  out = np.zeros(flat.shape, bool)
  if k:
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    np.put_along_axis(out, order, True, axis=1)
  return out.reshape(s.shape)


TOPK_FORMS = ("jaccard", "dice")


def topk_iou(saliency_map: Array, mask: Array, k: int = 1,
             num_pixels: int | None = None,
             form: str = "jaccard") -> np.ndarray | float:
  """Overlap between the top-K pixels A of an explanation and a lesion mask B.

  form="jaccard" (default): |A ∩ B| / |A ∪ B|, the intersection over union.
  form="dice": 2|A ∩ B| / (|A| + |B|), the overlap MED-TEX's paper prints
  for its top-K "IoU" (Nguyen-Duc et al., ISBI 2022); it is
  2J / (1 + J) of the Jaccard index J, so never smaller.

  K = k·32·32 pixels, as in MED-TEX (k = 1…6 on 224×224 images);
  `num_pixels` overrides it. Works on one (H, W) map (returns a float) or a
  batch (N, H, W) (returns (N,)); NaN where both A and B are empty.
  """
  if form not in TOPK_FORMS:
    raise ValueError(f"topk_iou form={form!r}: choose one of {TOPK_FORMS}")
  n = k * 32 * 32 if num_pixels is None else num_pixels
  top = topk_mask(saliency_map, n)
  mask = np.asarray(mask) > 0
  if mask.shape != top.shape:
    raise ValueError(f"mask shape {mask.shape} != saliency shape {top.shape}")
  axes = (-2, -1)
  inter = (top & mask).sum(axes)
  if form == "jaccard":
    num, den = inter, (top | mask).sum(axes)
  else:
    num, den = 2 * inter, top.sum(axes) + mask.sum(axes)
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(den > 0, num / np.maximum(den, 1), np.nan)
  return float(iou) if iou.ndim == 0 else iou
