"""Composition of registered losses into one objective.

    fn = objective([
        dict(fn="cross_entropy", weight=1.0, ignore_index=255),
        dict(fn="kd_kl", weight=0.5, temperature=4.0),
        dict(fn="hint_l1", weight=1.0, student="bottleneck",
             teacher="encoder", connector="conv1x1", name="latent"),
    ])
    total, metrics = fn(inputs)   # metrics: {"cross_entropy", "kd_kl",
                                  #           "latent", "total"}

A term is a mapping. Keys read here and never passed to the loss: `fn` (a
REGISTRY name), `weight` (default 1.0), `name` (default the fn name; repeated
names get `_1`, `_2`, ... in order), and the method-layer keys `student`,
`teacher`, `connector` (which features to take and how to project them; the
method uses them, this module ignores them), and `pool` (for a feature
term without a teacher view of its own, e.g. hint_l2: pool=k average-pools
both (B, H, W, C) maps over k x k windows before the loss, a change of the
loss that a teacher cache stores k² times smaller). Every other key is a
keyword argument of the loss, checked against its signature when
`objective` is called, so a bad config fails before the first step. The values are checked
then too (the losses themselves never look at values): temperature, p, eps
and delta > 0, smooth and gamma >= 0, scale in (0, 1], string options among
the accepted ones, flags True or False, other numeric keywords numbers.

`inputs`, the argument of the returned function, is a dict:
    "logits":          student logits (..., C)          task and logits terms
    "labels":          integer labels (...,)            task terms, dkd
    "teacher_logits":  teacher logits (..., C), a peer's logits for dml, or
                       an (E, ..., C) stack for ensemble_kd / ensemble_l2
    "features":        {term name: (student_array, teacher_array)} already
                       projected by the connectors; a third element, a dict
                       of extra arrays, supplies array arguments such as
                       vid's `alpha`: (mean, teacher, {"alpha": alpha})
    "mask":            optional validity mask (nonzero = valid), passed to
                       every term whose loss accepts `mask`
    "labelled":        optional (B,) per-example flag (nonzero = the example
                       has labels): task terms, and terms with
                       `labelled_only=True`, are masked with it, so an
                       unlabelled example contributes exactly zero to them
Only the keys the terms need are read; a missing one raises
`MissingInputError` (both a KeyError and a ValueError) naming it.

Models with several heads return a dict of outputs; then "logits",
"teacher_logits" and "labels" are dicts keyed by head name, and each term
names the head it reads with the term key `head` (`dict(fn="cross_entropy",
head="dr_grade")`): the term sees that head's entries as if they were the
whole inputs. A task term may instead read one of the model's extra
outputs, `inputs["outputs"]` (the model's named features, e.g. PSPNet's
auxiliary head), with the term key `output`: `dict(fn="cross_entropy",
weight=0.4, output="aux_logits")` is PSPNet's auxiliary loss.
"""

import collections.abc
import inspect
import numbers
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional
from typing import Sequence
from typing import Tuple

import jax
import jax.numpy as jnp

from kd_jax.losses import adversarial
from kd_jax.losses import features
from kd_jax.losses import logits
from kd_jax.losses import medtex
from kd_jax.losses import task

KINDS = ("task", "logits", "features", "custom")


class LossSpec(NamedTuple):
  """A registered loss: the function and how `objective` calls it.

  kind:
    "task":     fn(logits, labels, **kw)
    "logits":   fn(student_logits, teacher_logits, **kw)
    "features": fn(student_feature, teacher_feature, **kw)
    "custom":   called by methods directly; not composable by `objective`.
  view: a features loss that starts with a teacher-only reduction declares
    it: the name of its `TEACHER_VIEWS` function (teacher_view = view(
    teacher_feature, **the term's keywords that it takes)), and
  on_view: the loss of (student_feature, teacher_view, **kw), so that
    fn(s, t, **kw) == on_view(s, view(t), **kw) by construction. A method
    may hand the term `Viewed(teacher_view)` in place of the teacher's
    feature (what the teacher cache stores: the view, not the feature).
  """
  fn: Callable[..., jax.Array]
  kind: str
  view: Optional[str] = None
  on_view: Optional[Callable[..., jax.Array]] = None


class Viewed(NamedTuple):
  """A teacher feature already reduced by its term's view (`LossSpec`)."""
  value: jax.Array


# Teacher views by name: pure functions of (B, ...) arrays, row by row.
TEACHER_VIEWS: Dict[str, Callable[..., jax.Array]] = {
    "attention_map": features.attention_map,
    "pair_nodes": features.pair_nodes,
    "mean_pooled": features.mean_pooled,
    "average_pooled": features.average_pooled,
}


REGISTRY: Dict[str, LossSpec] = {
    # Task losses.
    "cross_entropy": LossSpec(task.cross_entropy, "task"),
    "dice": LossSpec(task.dice_loss, "task"),
    "focal": LossSpec(task.focal_loss, "task"),
    "mse": LossSpec(task.mse, "task"),
    "l1": LossSpec(task.l1, "task"),
    "smooth_l1": LossSpec(task.smooth_l1, "task"),
    # Logit distillation.
    "kd_kl": LossSpec(logits.kd_kl, "logits"),
    "pixelwise_kd": LossSpec(logits.pixelwise_kd, "logits"),
    "soft_cross_entropy": LossSpec(logits.soft_cross_entropy, "logits"),
    "dkd": LossSpec(logits.dkd, "logits"),
    "dist": LossSpec(logits.dist, "logits"),
    "cwd": LossSpec(logits.cwd, "logits"),
    "dml": LossSpec(logits.dml, "logits"),
    "ensemble_kd": LossSpec(logits.ensemble_kd, "logits"),
    "ensemble_l2": LossSpec(logits.ensemble_l2, "logits"),
    # Feature distillation.
    "hint_l1": LossSpec(features.hint_l1, "features"),
    "hint_l2": LossSpec(features.hint_l2, "features"),
    "cwd_features": LossSpec(logits.cwd, "features"),
    "attention_transfer": LossSpec(
        features.attention_transfer, "features", "attention_map",
        features.attention_transfer_from_view),
    "vid": LossSpec(features.vid, "features"),
    "pairwise_similarity": LossSpec(
        features.pairwise_similarity, "features", "pair_nodes",
        features.pairwise_similarity_from_view),
    "similarity_preserving": LossSpec(features.similarity_preserving,
                                      "features"),
    "pkt": LossSpec(features.pkt, "features"),
    "rkd_distance": LossSpec(features.rkd_distance, "features"),
    "rkd_angle": LossSpec(features.rkd_angle, "features"),
    "embedding_cosine": LossSpec(features.embedding_cosine, "features",
                                 "mean_pooled",
                                 features.embedding_cosine_from_view),
    "embedding_l2": LossSpec(features.embedding_l2, "features",
                             "mean_pooled", features.embedding_l2_from_view),
    "feature_map_cosine": LossSpec(features.feature_map_cosine, "features"),
    # Pieces called by methods directly.
    "wgan_critic": LossSpec(adversarial.wgan_critic_loss, "custom"),
    "wgan_generator": LossSpec(adversarial.wgan_generator_loss, "custom"),
    "gradient_penalty": LossSpec(adversarial.gradient_penalty, "custom"),
    "medtex": LossSpec(medtex.medtex_objective, "custom"),
}

# Keys of a term that are not keyword arguments of the loss.
_TERM_KEYS = ("fn", "weight", "name", "student", "teacher", "connector",
              "pool",
              "head", "labelled_only", "output")
# Inputs that hold one entry per head when the model has several.
_HEAD_INPUTS = ("logits", "teacher_logits", "labels")
# Parameters filled from `inputs`, never from the config.
_INPUT_PARAMS = {"labels": "labels", "mask": "mask"}
# The two leading array arguments of each kind, named by their inputs key.
_LEADING_INPUTS = {"task": ("logits", "labels"),
                   "logits": ("logits", "teacher_logits")}


# The losses never look at values (they stay pure functions under jit and
# grad), so the numeric hyperparameters of a config are checked here, once,
# when the objective is built: keyword name -> (condition, what it must be).
_NUMBER_RULES = {
    "temperature": (lambda v: v > 0, "a number > 0 (1.0 means no softening)"),
    "p": (lambda v: v > 0, "a number > 0"),
    "eps": (lambda v: v > 0, "a number > 0"),
    "delta": (lambda v: v > 0, "a number > 0"),
    "smooth": (lambda v: v >= 0, "a number >= 0"),
    "gamma": (lambda v: v >= 0, "a number >= 0"),
    "scale": (lambda v: 0 < v <= 1,
              "a number in (0, 1] (the node size as a fraction of the map)"),
}
# String options: (loss function, keyword) -> the accepted values.
_CHOICES = {
    (logits.kd_kl, "reduction"): logits.KD_REDUCTIONS,
    (features.attention_transfer, "form"): features.AT_FORMS,
    (task.dice_loss, "average"): task.DICE_AVERAGES,
    (logits.pixelwise_kd, "convention"): logits.PIXELWISE_CONVENTIONS,
    (features.pairwise_similarity, "convention"):
        features.PAIRWISE_CONVENTIONS,
}
# Options that must fit together, checked on a term's keywords at build time.
_OPTION_CHECKS = {
    features.pairwise_similarity: features.check_pairwise_options,
}


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_value(where: str, fn, param: inspect.Parameter, value) -> None:
  """Raises a ValueError when a config value cannot be right for `param`."""
  name, default = param.name, param.default
  if (fn, name) in _CHOICES:
    options = _CHOICES[(fn, name)]
    if isinstance(value, bool) or value not in options:
      raise ValueError(f"{where}: {name} must be one of "
                       f"{', '.join(map(repr, options))}, got {value!r}.")
  elif isinstance(default, bool):
    if not isinstance(value, bool):
      raise ValueError(f"{where}: {name} must be True or False, got "
                       f"{value!r}.")
  elif name in _NUMBER_RULES:
    condition, requirement = _NUMBER_RULES[name]
    # `not condition` also rejects NaN.
    if not _is_number(value) or not condition(value):
      raise ValueError(f"{where}: {name} must be {requirement}, got "
                       f"{value!r}.")
  elif _is_number(default) and not _is_number(value):
    raise ValueError(f"{where}: {name} must be a number, got {value!r}.")


class MissingInputError(KeyError, ValueError):
  """An input an objective term needs is absent from `inputs`."""

  def __str__(self):
    return str(self.args[0])


class _Term(NamedTuple):
  name: str
  fn_name: str
  spec: LossSpec
  weight: float
  kwargs: Dict[str, Any]
  takes_mask: bool
  takes_labels: bool  # Beyond the leading two arguments (e.g. dkd).
  array_params: Tuple[str, ...]  # Features-kind extra arrays (vid's alpha).
  head: Any = None  # The head it reads, for models with several.
  labelled_only: bool = False  # Masked with inputs["labelled"].
  output: Any = None  # An extra output it reads in place of "logits".
  pool: int = 1  # Both maps average-pooled by pool x pool first.


def _as_dict(term, index: int) -> Dict[str, Any]:
  if hasattr(term, "to_dict"):  # ml_collections.ConfigDict
    term = term.to_dict()
  if not isinstance(term, collections.abc.Mapping):
    raise ValueError(f"loss term #{index} must be a mapping like "
                     f"dict(fn='kd_kl', weight=0.5, temperature=4.0), got "
                     f"{term!r}.")
  return dict(term)


def _parse(term: Mapping[str, Any], index: int) -> _Term:
  if "fn" not in term:
    raise ValueError(f"loss term #{index} {term!r} has no 'fn' key; set it "
                     f"to one of: {', '.join(sorted(REGISTRY))}.")
  fn_name = term["fn"]
  if not isinstance(fn_name, str) or fn_name not in REGISTRY:
    raise ValueError(f"loss term #{index}: unknown fn {fn_name!r}; "
                     f"registered losses: {', '.join(sorted(REGISTRY))}.")
  spec = REGISTRY[fn_name]
  if spec.kind == "custom":
    composable = sorted(k for k, s in REGISTRY.items() if s.kind != "custom")
    raise ValueError(
        f"loss term #{index}: {fn_name!r} is a 'custom' loss (adversarial "
        f"or MED-TEX piece) that its method calls directly; it cannot be "
        f"composed by objective. Composable losses: "
        f"{', '.join(composable)}.")
  weight = term.get("weight", 1.0)
  if isinstance(weight, bool) or not isinstance(weight, (int, float)):
    raise ValueError(f"loss term #{index} ({fn_name}): weight must be a "
                     f"number, got {weight!r}.")
  name = term.get("name", fn_name)
  if not isinstance(name, str) or not name:
    raise ValueError(f"loss term #{index} ({fn_name}): name must be a "
                     f"non-empty string, got {name!r}.")

  params = inspect.signature(spec.fn).parameters
  positional = [p for p in params.values()
                if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
  configurable = [p.name for p in params.values()
                  if p.kind == inspect.Parameter.KEYWORD_ONLY
                  and p.name not in _INPUT_PARAMS]
  extra_positional = tuple(p.name for p in positional[2:])
  kwargs = {k: v for k, v in term.items() if k not in _TERM_KEYS}
  for key in kwargs:
    if key in _INPUT_PARAMS or key in extra_positional:
      raise ValueError(
          f"loss term #{index} ({fn_name}): {key!r} is an array input, not "
          f"a config key; pass it in the objective's inputs"
          f"{' features entry' if spec.kind == 'features' else ''}.")
    if key not in configurable:
      raise ValueError(
          f"loss term #{index} ({fn_name}): unknown keyword {key!r}; "
          f"{fn_name} accepts: {', '.join(configurable) or 'none'} (plus "
          f"the term keys {', '.join(_TERM_KEYS)}).")
  for key, value in kwargs.items():
    _check_value(f"loss term #{index} ({fn_name})", spec.fn, params[key],
                 value)
  if spec.fn in _OPTION_CHECKS:
    try:
      _OPTION_CHECKS[spec.fn](**kwargs)
    except ValueError as e:
      raise ValueError(f"loss term #{index} ({fn_name}): {e}") from None
  takes_labels = spec.kind != "task" and "labels" in extra_positional
  head = term.get("head")
  if head is not None and (not isinstance(head, str) or not head):
    raise ValueError(f"loss term #{index} ({fn_name}): head must be the name "
                     f"of a model output, got {head!r}.")
  output = term.get("output")
  if output is not None and (spec.kind != "task" or not isinstance(
      output, str) or not output):
    raise ValueError(f"loss term #{index} ({fn_name}): output= names an extra "
                     "output of the model (e.g. 'aux_logits') that a task "
                     f"loss reads; got output={output!r}.")
  reads_labels = spec.kind == "task" or takes_labels
  labelled_only = term.get("labelled_only", reads_labels)
  if not isinstance(labelled_only, bool):
    raise ValueError(f"loss term #{index} ({fn_name}): labelled_only must be "
                     f"True or False, got {labelled_only!r}.")
  if reads_labels and not labelled_only:
    raise ValueError(f"loss term #{index} ({fn_name}): a task loss reads "
                     "labels, so it always skips unlabelled examples; drop "
                     "labelled_only=False.")
  pool = term.get("pool", 1)
  if pool != 1 and (spec.kind != "features" or spec.view is not None):
    raise ValueError(
        f"loss term #{index} ({fn_name}): pool= average-pools the two maps "
        "of a dense feature term (hint_l1, hint_l2, feature_map_cosine, "
        f"vid, ...); {fn_name} "
        + ("reads logits" if spec.kind != "features" else
           "reduces the teacher's map itself (its teacher view)")
        + ": drop pool=.")
  if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
    raise ValueError(f"loss term #{index} ({fn_name}): pool must be a whole "
                     f"number >= 1 (the pooling window), got {pool!r}.")
  array_params = tuple(n for n in extra_positional if n != "labels")
  if array_params and spec.kind != "features":
    raise ValueError(f"{fn_name} has array arguments {array_params} that "
                     f"objective cannot supply for a {spec.kind} loss.")
  return _Term(name=name, fn_name=fn_name, spec=spec, weight=float(weight),
               kwargs=kwargs, takes_mask="mask" in params,
               takes_labels=takes_labels, array_params=array_params,
               head=head, labelled_only=labelled_only, output=output,
               pool=pool)


def _resolve(terms: Sequence[Mapping[str, Any]]) -> List[_Term]:
  if isinstance(terms, (str, bytes)) or not isinstance(
      terms, collections.abc.Sequence):
    raise ValueError(f"objective takes a sequence of loss terms (dicts), got "
                     f"{type(terms).__name__}.")
  if not terms:
    raise ValueError("objective needs at least one loss term, e.g. "
                     "[dict(fn='cross_entropy')].")
  parsed = [_parse(_as_dict(t, i), i) for i, t in enumerate(terms)]
  taken, out = set(), []
  for term in parsed:
    name, k = term.name, 0
    while name in taken:
      k += 1
      name = f"{term.name}_{k}"
    if name == "total":
      raise ValueError("'total' is reserved for the weighted sum; give the "
                       "term another name.")
    taken.add(name)
    out.append(term._replace(name=name))
  return out


def term_names(terms: Sequence[Mapping[str, Any]]) -> List[str]:
  """The resolved term names, in order (the keys of `inputs["features"]`
  for feature terms, and of the metrics besides "total")."""
  return [t.name for t in _resolve(terms)]


def teacher_views(terms: Sequence[Mapping[str, Any]]
                  ) -> Dict[str, Tuple[str, Dict[str, Any]]]:
  """{term name: (view name, its keywords)} of the terms whose loss
  declares a teacher view (`LossSpec.view`), and of the terms with pool=k
  ("average_pooled", {"size": k}); the keywords are the term's, defaults
  filled in (numbers of a float default as floats), so equal views compare
  equal whatever the config spells."""
  out = {}
  for term in _resolve(terms):
    if term.pool > 1:
      out[term.name] = ("average_pooled", {"size": term.pool})
      continue
    if term.spec.view is None:
      continue
    params = inspect.signature(TEACHER_VIEWS[term.spec.view]).parameters
    args = {}
    for p in params.values():
      if p.kind != inspect.Parameter.KEYWORD_ONLY:
        continue
      value = term.kwargs.get(p.name, p.default)
      if isinstance(p.default, float) and _is_number(value):
        value = float(value)
      args[p.name] = value
    out[term.name] = (term.spec.view, args)
  return out


def teacher_view(view: str, feature: jax.Array,
                 args: Mapping[str, Any]) -> jax.Array:
  """`TEACHER_VIEWS[view](feature, **args)`: what a term reads of the
  teacher's (B, ...) feature, row by row."""
  return TEACHER_VIEWS[view](feature, **args)


def _get(inputs, key: str, term: _Term):
  if not isinstance(inputs, collections.abc.Mapping):
    raise ValueError(f"objective inputs must be a dict, got "
                     f"{type(inputs).__name__}.")
  if key not in inputs or inputs[key] is None:
    raise MissingInputError(
        f"loss term {term.name!r} ({term.fn_name}) needs inputs[{key!r}], "
        f"which is missing; inputs has keys {sorted(inputs)}.")
  return inputs[key]


def _features(inputs, term: _Term):
  feats = _get(inputs, "features", term)
  if term.name not in feats:
    raise MissingInputError(
        f"loss term {term.name!r} ({term.fn_name}) needs "
        f"inputs['features'][{term.name!r}] = (student_array, "
        f"teacher_array); features has keys {sorted(feats)}.")
  entry = feats[term.name]
  if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
    raise ValueError(
        f"inputs['features'][{term.name!r}] must be (student_array, "
        f"teacher_array) or (student_array, teacher_array, extra_arrays), "
        f"got {type(entry).__name__} of length "
        f"{len(entry) if hasattr(entry, '__len__') else '?'}.")
  extra = dict(entry[2]) if len(entry) == 3 else {}
  for p in term.array_params:
    if p not in extra:
      raise MissingInputError(
          f"loss term {term.name!r} ({term.fn_name}) needs the array "
          f"{p!r}: pass inputs['features'][{term.name!r}] = (student, "
          f"teacher, {{{p!r}: array}}).")
  unknown = set(extra) - set(term.array_params)
  if unknown:
    raise ValueError(
        f"inputs['features'][{term.name!r}] has extra arrays "
        f"{sorted(unknown)} that {term.fn_name} does not take "
        f"(it takes {list(term.array_params) or 'none'}).")
  return entry[0], entry[1], extra


def _head_view(inputs, term: _Term):
  """`inputs` as term `term` sees them: its head's entries of the per-head
  inputs, and the "labelled" flag folded into "mask" where it applies."""
  if not isinstance(inputs, collections.abc.Mapping):
    raise ValueError(f"objective inputs must be a dict, got "
                     f"{type(inputs).__name__}.")
  view = dict(inputs)
  heads = inputs.get("logits")
  if isinstance(heads, collections.abc.Mapping):
    if term.head is None:
      raise ValueError(
          f"loss term {term.name!r} ({term.fn_name}): the model has heads "
          f"{sorted(heads)}; name the one this term reads with "
          f"head=<name>.")
    for key in _HEAD_INPUTS:
      entry = inputs.get(key)
      if entry is None:
        continue
      if not isinstance(entry, collections.abc.Mapping) or (
          term.head not in entry):
        raise MissingInputError(
            f"loss term {term.name!r} ({term.fn_name}) reads head "
            f"{term.head!r}, but inputs[{key!r}] has "
            f"{sorted(entry) if isinstance(entry, collections.abc.Mapping) else 'no heads'}.")
      view[key] = entry[term.head]
  elif term.head is not None and heads is not None:
    raise ValueError(f"loss term {term.name!r} ({term.fn_name}) names head "
                     f"{term.head!r}, but the model returns one output; "
                     "drop head=.")
  if term.output is not None:
    extra = inputs.get("outputs") or {}
    if term.output not in extra:
      raise MissingInputError(
          f"loss term {term.name!r} ({term.fn_name}) reads output "
          f"{term.output!r}; the model offers {sorted(extra)}.")
    view["logits"] = extra[term.output]
  labelled = inputs.get("labelled")
  if term.labelled_only and labelled is not None:
    if not term.takes_mask:
      raise ValueError(
          f"loss term {term.name!r} ({term.fn_name}) must skip unlabelled "
          "examples, but its loss takes no mask; train it on labelled "
          "data only (no unlabelled pool in this stage).")
    view["mask"] = _and_mask(view.get("mask"), labelled)
  return view


def _and_mask(mask, labelled):
  """(B,) `labelled` and a mask of any shape with leading axis B."""
  labelled = jnp.asarray(labelled) != 0
  if mask is None:
    return labelled
  mask = jnp.asarray(mask) != 0
  return mask & labelled.reshape(labelled.shape + (1,) * (mask.ndim - 1))


def _call(term: _Term, inputs) -> jax.Array:
  inputs = _head_view(inputs, term)
  kwargs = dict(term.kwargs)
  if term.takes_mask and inputs.get("mask") is not None:
    kwargs["mask"] = inputs["mask"]
  if term.spec.kind == "features":
    student, teacher, extra = _features(inputs, term)
    if term.pool > 1:
      # A change of the loss: it compares the two pooled maps.
      student = features.average_pooled(student, size=term.pool)
      teacher = (teacher.value if isinstance(teacher, Viewed) else
                 features.average_pooled(teacher, size=term.pool))
      return term.spec.fn(student, teacher, **extra, **kwargs)
    if isinstance(teacher, Viewed):
      if term.spec.on_view is None:
        raise ValueError(f"loss term {term.name!r} ({term.fn_name}) has no "
                         "teacher view; give it the teacher's feature.")
      return term.spec.on_view(student, teacher.value, **extra, **kwargs)
    return term.spec.fn(student, teacher, **extra, **kwargs)
  args = [_get(inputs, k, term) for k in _LEADING_INPUTS[term.spec.kind]]
  if term.takes_labels:
    args.append(_get(inputs, "labels", term))
  return term.spec.fn(*args, **kwargs)


def objective(terms: Sequence[Mapping[str, Any]]
              ) -> Callable[[Mapping[str, Any]],
                            Tuple[jax.Array, Dict[str, jax.Array]]]:
  """Composes loss terms into one pure function of the inputs.

  Args:
    terms: sequence of term mappings (see the module docstring), e.g.
      `config.losses`.

  Returns:
    `fn(inputs) -> (total, metrics)`: total = sum_k weight_k * term_k, and
    metrics = {name: unweighted term value, ..., "total": total}, all
    float32 scalars. `fn` is pure and can be jitted, differentiated and
    vmapped.

  Raises:
    ValueError: at construction, for an unknown fn (the message lists the
      registry), an unknown keyword (the message lists the accepted ones), a
      bad keyword value (e.g. temperature <= 0, an unknown option), a
      'custom' loss, a bad weight or name, or no terms.
  """
  resolved = _resolve(terms)

  def fn(inputs):
    metrics = {}
    total = jnp.zeros((), jnp.float32)
    for term in resolved:
      value = jnp.asarray(_call(term, inputs), jnp.float32)
      if value.shape != ():
        raise ValueError(f"loss term {term.name!r} returned shape "
                         f"{value.shape}, expected a scalar.")
      metrics[term.name] = value
      total = total + term.weight * value
    metrics["total"] = total
    return total, metrics

  return fn
