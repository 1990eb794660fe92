"""Tasks: a model's heads, the labels they read, and how each is scored.

A model returns one output (an array) or a dict of named outputs, its heads.
`config.heads` names them and the label key of the batch each one reads; the
kind of a head (and its classes) comes from the data set's `targets`
(`kd_jax.data.targets`):

    config.heads = dict(dr_grade={}, dme_risk={}, fovea={},
                        optic_disc=dict(label="optic_disc"))

Without `config.heads`, the model has one output that reads the key "label"
(every segmentation recipe). Kinds and their evaluation:

    segmentation    (B, H, W, C) logits; Dice, IoU, pixel accuracy from the
                    summed confusion matrix (per volume in kd_jax.study);
                    mean_iou over the foreground classes, mean_iou_all
                    over every class, background included
    classification  (B, C) logits; accuracy, macro F1, one-vs-rest AUC,
                    quadratic-weighted kappa (ordinal grades), confusion
    landmark        (B, 2) (u, v) in image units (kd_jax.data.targets);
                    mean and median error in original pixels and the
                    fraction within a few radii
    embedding       (B, D): the one output of a run on unlabelled images (a
                    data set that declares no targets: image_folder,
                    shared_images); it reads no label and has no scores
                    (read it out with `python -m kd_jax.probe`); only
                    feature terms train it

Scores are one flat dict: a single unnamed head's keys as they are
(`mean_dice`), a named head's as `<head>/<key>` (`dr_grade/kappa`).
"""
from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kd_jax import sharding
from kd_jax.evaluate import metrics as metrics_lib

KINDS = ("segmentation", "classification", "landmark", "embedding")
# The scalars logged under val/ while training, per kind.
HEADLINE = {
    "segmentation": ("mean_dice", "mean_iou", "mean_iou_all",
                     "pixel_accuracy"),
    "classification": ("accuracy", "macro_f1", "auc", "kappa"),
    "landmark": ("mean_error_px", "median_error_px"),
    "embedding": (),
}
# Losses that regress coordinates, and those that read class logits.
REGRESSION_LOSSES = ("mse", "l1", "smooth_l1", "ensemble_l2")
_HEAD_KEYS = ("label",)


@dataclasses.dataclass(frozen=True)
class Head:
  """One model output: its name (None: the model returns one array), the
  batch key of its label, its kind and its classes."""
  name: Optional[str]
  label: str
  kind: str
  num_classes: Optional[int] = None
  class_names: Optional[tuple] = None
  ordinal: bool = False

  def key(self, metric: str) -> str:
    """The flat score key of `metric` for this head."""
    return metric if self.name is None else f"{self.name}/{metric}"


Heads = Mapping[Optional[str], Head]


def from_config(spec, targets: Mapping[str, Any]) -> dict:
  """{head name: Head} from `config.heads` and the data set's targets.

  `spec` empty or None: one unnamed head reading "label", or, when the
  data declares no targets (unlabelled images), one embedding head reading
  nothing. Raises ValueError (one line) for a label key the data lacks or
  a kind without evaluation.
  """
  spec = spec.to_dict() if hasattr(spec, "to_dict") else spec
  if not targets:
    if spec:
      raise ValueError(f"config.heads names {sorted(spec)}, but the data "
                       "set carries no labels (unlabelled images): drop "
                       "config.heads")
    return {None: Head(name=None, label=None, kind="embedding")}
  items = list(spec.items()) if spec else [(None, {})]
  heads = {}
  for name, h in items:
    h = dict(h or {})
    where = "the model's output" if name is None else f"heads.{name}"
    unknown = sorted(set(h) - set(_HEAD_KEYS))
    if unknown:
      raise ValueError(f"{where}: unknown key {unknown[0]!r}; a head takes "
                       f"{list(_HEAD_KEYS)} (its kind comes from the data)")
    label = h.get("label", "label" if name is None else name)
    if label not in targets:
      fix = (" set config.heads to name the model's outputs"
             if name is None else f" set heads.{name}.label to one of them")
      raise ValueError(f"{where} reads label key {label!r}, which the data "
                       f"set does not carry; its targets are "
                       f"{sorted(targets)}:{fix}")
    t = targets[label]
    if t.kind not in KINDS:
      raise ValueError(f"{where}: label {label!r} is a {t.kind} target; "
                       f"heads can be {list(KINDS)}")
    heads[name] = Head(name=name, label=label, kind=t.kind,
                       num_classes=t.num_classes, class_names=t.class_names,
                       ordinal=t.ordinal)
  return heads


def is_single(heads: Heads) -> bool:
  return heads is None or list(heads) == [None]


def is_segmentation(heads: Heads) -> bool:
  """True for the one-output segmentation runs (volume evaluation, label-map
  figures and Grad-CAM apply to them only)."""
  return is_single(heads) and (heads is None
                               or heads[None].kind == "segmentation")


def labels(heads: Optional[Heads], batch):
  """The labels the loss terms read: an array for a single head (None: one
  output reading "label"), else {head: array}."""
  if heads is None:
    return batch["label"]
  if is_single(heads):
    h = heads[None]
    return None if h.kind == "embedding" else batch[h.label]
  return {name: batch[h.label] for name, h in heads.items()
          if h.kind != "embedding"}


def as_float32(outputs):
  return jax.tree.map(lambda x: x.astype(jnp.float32), outputs)


def objective_inputs(heads: Heads, outputs, batch, features=None) -> dict:
  """The inputs of `losses.objective` that every method shares: the
  outputs, the labels, the per-example "labelled" flag when the batch
  mixes in unlabelled images, and the model's features as the extra
  outputs a term may read with `output=` (PSPNet's "aux_logits")."""
  out = {"logits": as_float32(outputs), "labels": labels(heads, batch),
         "labelled": batch.get("labelled")}
  if features:
    out["outputs"] = features
  return out


def _describe(out) -> str:
  if isinstance(out, collections.abc.Mapping):
    return "{" + ", ".join(f"{k}: {tuple(v.shape)}"
                           for k, v in sorted(out.items())) + "}"
  return f"one array {tuple(out.shape)}"


def check_outputs(heads: Heads, out, where: str = "the model") -> None:
  """Raises ValueError (one line) unless the model's output `out` (arrays or
  shapes) has the heads: one array for a single head, else a dict holding
  every named head, each of its kind's shape."""
  if is_single(heads):
    if isinstance(out, collections.abc.Mapping):
      raise ValueError(f"{where} returns heads {sorted(out)}; name those the "
                       "run trains in config.heads (e.g. heads=dict("
                       f"{next(iter(sorted(out)))}={{}}))")
    outs = {None: out}
  else:
    if not isinstance(out, collections.abc.Mapping):
      raise ValueError(f"config.heads names {sorted(heads)}, but {where} "
                       f"returns {_describe(out)}; drop config.heads or pick "
                       "a multi-head model")
    missing = [n for n in heads if n not in out]
    if missing:
      raise ValueError(f"config.heads names {missing[0]!r}, which {where} "
                       f"lacks; its heads: {sorted(out)}")
    outs = {n: out[n] for n in heads}
  for name, h in heads.items():
    shape = tuple(outs[name].shape)
    what = ("the output" + ("" if name is None else f" {name!r}")
            + f" of {where}")
    if h.kind == "embedding":
      ok, want = len(shape) == 2, "(B, D)"
    elif h.kind == "landmark":
      ok, want = len(shape) == 2 and shape[-1] == 2, "(B, 2)"
    elif h.kind == "classification":
      ok = len(shape) == 2 and shape[-1] == h.num_classes
      want = f"(B, {h.num_classes})"
    else:
      ok = len(shape) == 4 and shape[-1] == h.num_classes
      want = f"(B, H, W, {h.num_classes})"
    if not ok:
      raise ValueError(f"{what} is {shape}, but label {h.label!r} is a "
                       f"{h.kind} target that needs {want}; set the model's "
                       "number of classes to the data's")


def check_terms(heads: Heads, terms, where: str = "loss term") -> None:
  """Raises ValueError (one line) for a term naming a head the run lacks, a
  regression loss on a class head or a class loss on a landmark head."""
  from kd_jax import losses  # The registry, for each term's kind.
  for i, term in enumerate(terms):
    fn, name = term.get("fn"), term.get("name", term.get("fn"))
    spec = losses.REGISTRY.get(fn)
    if spec is None or spec.kind not in ("task", "logits"):
      continue
    head = term.get("head")
    if is_single(heads):
      if head is not None:
        raise ValueError(f"{where} {name!r} names head {head!r}, but the run "
                         "has one output (no config.heads); drop head=")
      h = heads[None]
    else:
      if head not in heads:
        raise ValueError(f"{where} {name!r}: head={head!r}; name one of the "
                         f"run's heads {sorted(heads)}")
      h = heads[head]
    if h.kind == "embedding":
      raise ValueError(f"{where} {name!r}: {fn} needs labels or class "
                       "logits, but the data is unlabelled (an embedding "
                       "output); match features instead (embedding_cosine, "
                       "embedding_l2, feature_map_cosine, hint_l2)")
    regression = fn in REGRESSION_LOSSES
    if regression and h.kind != "landmark":
      raise ValueError(f"{where} {name!r}: {fn} regresses coordinates, but "
                       f"head {h.name or h.label!r} is a {h.kind} head; use "
                       "cross_entropy (or kd_kl / ensemble_kd) there")
    if not regression and h.kind == "landmark":
      raise ValueError(f"{where} {name!r}: {fn} reads class logits, but head "
                       f"{h.name!r} is a landmark head; use mse, l1, "
                       "smooth_l1 or ensemble_l2")


# ----------------------------------------------------------------------------
# Evaluation: a jitted step gives per-batch pieces (a confusion matrix for
# segmentation, the outputs themselves for the small heads), the host sums
# or gathers them and scores once at the end.


def _outputs_by_head(heads: Heads, out) -> dict:
  return {None: out} if is_single(heads) else {n: out[n] for n in heads}


def make_eval_step(predict, heads: Heads, mesh):
  """Jitted (params, batch_stats, batch) -> {head: piece}: the (C, C)
  confusion matrix of a segmentation head, the float32 outputs of the
  others (gathered on the host)."""

  def eval_step(params, batch_stats, batch):
    outs = _outputs_by_head(heads, predict(params, batch_stats,
                                           batch["image"]))
    pieces = {}
    for name, h in heads.items():
      if h.kind == "embedding":
        continue  # Nothing to score without labels.
      if h.kind == "segmentation":
        label = batch[h.label]
        valid = batch["valid"].reshape((-1,) + (1,) * (label.ndim - 1))
        pieces[name] = metrics_lib.confusion_matrix(
            jnp.argmax(outs[name], -1), label, h.num_classes, mask=valid)
      else:
        pieces[name] = outs[name].astype(jnp.float32)
    return pieces

  rep = NamedSharding(mesh, P())
  split = sharding.batch_sharding(mesh)
  # Parameters where they lie: replicated, or sliced over `fsdp`.
  return jax.jit(eval_step, in_shardings=(None, None, split),
                 out_shardings={n: rep if h.kind == "segmentation" else split
                                for n, h in heads.items()
                                if h.kind != "embedding"})


def score(heads: Heads, pieces: Mapping, batches: Mapping) -> dict:
  """Flat scores from the summed / gathered pieces. `batches` holds, per
  head, the host arrays the scores need beside the outputs ("label", and
  "orig_hw" for landmarks), valid examples only."""
  scores = {}
  for name, h in heads.items():
    if h.kind == "embedding":
      continue
    if h.kind == "segmentation":
      s = metrics_lib.segmentation_scores(pieces[name])
    elif h.kind == "classification":
      s = metrics_lib.classification_scores(pieces[name],
                                            batches[name]["label"],
                                            h.num_classes)
    else:
      s = metrics_lib.landmark_scores(pieces[name], batches[name]["label"],
                                      batches[name]["orig_hw"])
    scores.update({h.key(k): v for k, v in s.items()})
  return scores


def _gather(x) -> np.ndarray:
  """All processes' rows of `x` (a jax array sharded on its leading axis, or
  this process's host rows), in process order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(eval_step, params, batch_stats, source, batch_size, mesh,
             heads: Heads, to_global) -> dict:
  """Every head's scores over a whole source (one pass, fixed-shape
  batches; padding examples are left out)."""
  from kd_jax import data  # grain, only to evaluate.
  heads = {n: h for n, h in heads.items() if h.kind != "embedding"}
  if not heads:
    return {}  # An embedding output alone: nothing to score, no pass run.
  sums, outs, host = {}, {n: [] for n in heads}, {n: [] for n in heads}
  valid_all = []
  for batch in data.pipeline.eval_batches(source, batch_size=batch_size):
    pieces = eval_step(params, batch_stats, to_global(batch, mesh))
    for name, h in heads.items():
      if h.kind == "segmentation":
        sums[name] = pieces[name] + sums.get(name, 0)
      else:
        outs[name].append(_gather(pieces[name]))
        keep = {"label": batch[h.label]}
        if h.kind == "landmark":
          keep["orig_hw"] = batch["orig_hw"]
        host[name].append({k: _gather(v) for k, v in keep.items()})
    valid_all.append(_gather(batch["valid"]))
  valid = np.concatenate(valid_all) if valid_all else np.zeros(0, bool)
  pieces, gathered = {}, {}
  for name, h in heads.items():
    if h.kind == "segmentation":
      pieces[name] = jax.device_get(sums[name])
    else:
      pieces[name] = np.concatenate(outs[name])[valid]
      gathered[name] = {k: np.concatenate([b[k] for b in host[name]])[valid]
                        for k in host[name][0]}
  return jax.device_get(score(heads, pieces, gathered))


def headline(heads: Heads, scores: Mapping) -> dict:
  """The scalar scores logged while training (val/<key>)."""
  return {h.key(k): float(scores[h.key(k)]) for h in heads.values()
          for k in HEADLINE[h.kind] if h.key(k) in scores}
