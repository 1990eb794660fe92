"""A frozen teacher distilled into a trainable student (plus connectors).

The objective is composed from the stage's loss terms (`kd_jax.losses`):
task terms see the student's logits and the labels, logit terms the student's
and the teacher's logits, and feature terms a (student, teacher) pair of
named features, the student's passed through a learned connector first:

    dict(fn="hint_l1", weight=1.0, student="bottleneck", teacher="enc4",
         connector="conv1x1")            # connector defaults to "conv1x1"
    dict(..., connector=dict(kind="attention_pool", grid=(14, 14)))
    dict(fn="attention_transfer", ..., connector="none")  # raw features,
        # for losses that compare widths-free summaries (AT, SP, RKD, ...)

Feature names and shapes are checked when the method is initialised, before
the first step, with a message that lists the names each model offers.

The teacher's part is `teacher_outputs` (float32, eval mode, only what the
terms read). A batch may carry them precomputed under the key "teacher"
(`config.teacher_cache`, see `kd_jax.teacher_cache`); the loss
then reads them instead of running the teacher: one code path either way.
"""
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp

from kd_jax import losses, models, tasks
from kd_jax.methods import common
from kd_jax.models import connectors


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def _describe(features):
  return ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(features.items()))


def view_key(feature: str, view: str, args: dict) -> str:
  """The name of teacher `feature`'s `view` with `args` ("<feature>@<view>",
  "-<hash of args>" when it has any): a file stem of the teacher cache."""
  if not args:
    return f"{feature}@{view}"
  digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode())
  return f"{feature}@{view}-{digest.hexdigest()[:8]}"


# Logit losses that read a stack of teachers (E, ...).
ENSEMBLE_LOSSES = ("ensemble_kd", "ensemble_l2")


class Distill:
  model_key = "student"
  # teacher=dict(model=dict(name=...), stage=<earlier stage>) or
  # teacher=dict(model=..., checkpoint=<a trained stage's folder>); or an
  # ensemble, teachers=[<such dicts>, ...] (each its own architecture).
  stage_keys = frozenset({"teacher", "teachers"})

  @staticmethod
  def _teacher_configs(stage) -> tuple[list, bool]:
    """([member config, ...], is_ensemble) from `teacher` or `teachers`."""
    one, many = stage.get("teacher"), stage.get("teachers")
    if one and many:
      raise ValueError("a distill stage takes teacher=dict(...) or "
                       "teachers=[dict(...), ...], not both")
    members = list(many) if many else [one]
    for i, t in enumerate(members):
      where = f"teachers[{i}]" if many else "teacher"
      if not isinstance(t, dict) or not t.get("model"):
        raise ValueError(f"a distill stage needs {where}=dict(model=dict("
                         "name=...), stage=<earlier stage> or checkpoint="
                         f"<folder>); got {where}={t!r}")
    return members, bool(many)

  @classmethod
  def check(cls, stage, ctx):
    """Each teacher comes from an earlier stage or an existing folder."""
    members, many = cls._teacher_configs(stage)
    for i, t in enumerate(members):
      where = f"teachers[{i}]" if many else "teacher"
      if t.get("stage"):
        if t["stage"] not in ctx.earlier_stages:
          raise ValueError(
              f"{where}.stage {t['stage']!r} must be an earlier stage in "
              f"stage_order; the stages before {ctx.stage!r}: "
              f"{list(ctx.earlier_stages)}")
      elif not os.path.isdir(t.get("checkpoint") or ""):
        raise ValueError(
            f"{where}.checkpoint {t.get('checkpoint')!r} is not a folder; "
            "give a trained stage's workdir, or stage=<earlier stage>")

  @classmethod
  def from_config(cls, stage, ctx):
    """(method, teacher variables) from `dict(method="distill", model=...,
    teacher=... or teachers=[...], losses=...)`; the variables (a list, one
    per member, for an ensemble) are None without `ctx.load_frozen`."""
    members, many = cls._teacher_configs(stage)
    model = ctx.build_model(stage["model"])
    teachers = []
    for i, t in enumerate(members):
      try:
        teachers.append(ctx.build_model(t["model"]))
      except (ValueError, TypeError) as e:
        where = f"teachers[{i}]" if many else "teacher"
        raise ValueError(f"{where}.model: {e}") from None
    method = cls(model=model, teacher=teachers if many else teachers[0],
                 loss_terms=stage["losses"], heads=ctx.heads,
                 **cls._more_modules(stage, ctx))
    if not ctx.load_frozen:
      return method, None
    from kd_jax import checkpoint  # Orbax, only to load a teacher.
    frozen = [checkpoint.load_model_variables(
        os.path.join(ctx.workdir, t["stage"]) if t.get("stage")
        else t.get("checkpoint")) for t in members]
    return method, frozen if many else frozen[0]

  @classmethod
  def _more_modules(cls, stage, ctx) -> dict:
    """Constructor arguments a subclass builds from its own stage keys."""
    del stage, ctx
    return {}

  @staticmethod
  def _module_config(stage, key, example, defaults=None) -> dict:
    """`stage[key]`, a trained module of a subclass (a critic, an
    explainer): dict(model=dict(name=...), <keys of defaults>), defaults
    filled in; a missing model or an unknown key is one line."""
    defaults = defaults or {}
    part = stage.get(key)
    if not isinstance(part, dict) or not isinstance(
        part.get("model"), dict) or not part["model"].get("name"):
      raise ValueError(
          f"an {stage['method']} stage needs {key}=dict(model=dict(name="
          f"{example!r}, ...)); got {key}={part!r}; models: "
          f"{', '.join(models.names())}")
    unknown = sorted(set(part) - {"model"} - set(defaults))
    if unknown:
      raise ValueError(f"{key}.{unknown[0]}: unknown key; {key} takes "
                       f"{', '.join(['model', *defaults])}")
    return dict(defaults, **part)

  @staticmethod
  def _build_module(ctx, key, part):
    """The flax module of `part` (`_module_config`), errors named by key."""
    try:
      return ctx.build_model(part["model"])
    except (ValueError, TypeError) as e:
      raise ValueError(f"{key}.model: {e}") from None

  def __init__(self, model, teacher, loss_terms, heads=None):
    """`teacher`: one flax module, or a list of them (an ensemble, whose
    stacked outputs feed ensemble_kd / ensemble_l2)."""
    self.model = model
    self.heads = heads  # kd_jax.tasks heads; None: one output, "label".
    self.ensemble = isinstance(teacher, (list, tuple))
    self.teachers = list(teacher) if self.ensemble else [teacher]
    if not self.teachers:
      raise ValueError("teachers=[] is empty; give at least one member")
    self.teacher = self.teachers[0]
    self._check_terms_against_teachers(loss_terms)
    self.objective = losses.objective(loss_terms)  # Validates the terms.
    kinds = [losses.REGISTRY[t["fn"]].kind for t in loss_terms]
    self.uses_teacher_logits = "logits" in kinds
    self.feature_terms = []
    for name, term, kind in zip(losses.term_names(loss_terms), loss_terms,
                                kinds):
      if kind != "features":
        continue
      for side in ("student", "teacher"):
        if side not in term:
          raise ValueError(
              f"loss term {name!r} ({term['fn']}) matches features: give "
              f"{side}=<feature name>")
      conn = term.get("connector", "conv1x1")
      conn = dict(conn) if not isinstance(conn, str) else {"kind": conn}
      self.feature_terms.append((name, term["student"], term["teacher"], conn,
                                 term["fn"] == "vid"))
    # Terms that read a teacher view: {term: view key}, and {view key:
    # dict(feature, view, args)} (what `teacher_outputs` computes).
    self.term_views, self.view_table = {}, {}
    t_names = {n: t for n, _, t, _, _ in self.feature_terms}
    for name, (view, args) in losses.teacher_views(loss_terms).items():
      key = view_key(t_names[name], view, args)
      self.term_views[name] = key
      self.view_table[key] = dict(feature=t_names[name], view=view,
                                  args=args)
    self.connectors = None  # Built by init, once the teacher's shapes are known.

  def _check_terms_against_teachers(self, loss_terms):
    for term in loss_terms:
      if term.get("fn") == "wgan_generator":
        raise ValueError(
            f"loss term {term.get('name', term['fn'])!r} (wgan_generator) is "
            "scored by a critic: set method='adversarial' and critic=dict("
            "model=dict(name='sagan_discriminator'))")
    for name, term in zip(losses.term_names(loss_terms), loss_terms):
      kind = losses.REGISTRY[term["fn"]].kind
      if self.ensemble and kind == "features":
        raise ValueError(
            f"loss term {name!r} ({term['fn']}) matches one teacher's "
            "features; with teachers=[...] distil the ensemble's outputs "
            "(ensemble_kd, ensemble_l2)")
      if self.ensemble and kind == "logits" and (
          term["fn"] not in ENSEMBLE_LOSSES):
        raise ValueError(
            f"loss term {name!r} ({term['fn']}) reads one teacher; with "
            f"teachers=[...] use {' or '.join(ENSEMBLE_LOSSES)}")
      if not self.ensemble and term["fn"] in ENSEMBLE_LOSSES:
        raise ValueError(
            f"loss term {name!r} ({term['fn']}) averages an ensemble: give "
            "teachers=[...] (for one teacher use kd_kl, or mse on a "
            "coordinate head)")

  def _check_and_build(self, rng, images):
    (s_logits, s_feats), _ = jax.eval_shape(
        functools.partial(self.model.init_with_output, train=False), rng,
        images)
    outputs = [jax.eval_shape(functools.partial(m.init_with_output,
                                                train=False), rng, images)[0]
               for m in self.teachers]
    for i, (t_logits, _) in enumerate(outputs):
      who = f"teachers[{i}]" if self.ensemble else "teacher"
      if self.uses_teacher_logits and _shapes(s_logits) != _shapes(t_logits):
        raise ValueError(
            f"logit distillation needs student and teacher outputs of one "
            f"shape (the same heads); student gives {_shapes(s_logits)}, "
            f"{who} {_shapes(t_logits)}: set the same heads, num_classes and "
            "output size for both models")
    t_feats = outputs[0][1]
    self.connectors = {}
    for name, s_name, t_name, conn, learns_variance in self.feature_terms:
      for side, feats, fname in (("student", s_feats, s_name),
                                 ("teacher", t_feats, t_name)):
        if fname not in feats:
          raise ValueError(
              f"loss term {name!r}: the {side} has no feature {fname!r}; it "
              f"offers: {_describe(feats)}")
      if name in self.term_views:  # The view's own checks, before a step.
        view = self.view_table[self.term_views[name]]
        try:
          jax.eval_shape(functools.partial(
              losses.teacher_view, view["view"], args=view["args"]),
                         t_feats[t_name])
        except ValueError as e:
          raise ValueError(f"loss term {name!r}, teacher {t_name!r} "
                           f"{t_feats[t_name].shape}: {e}") from None
      if conn["kind"] == "none":
        self.connectors[name] = (None, s_name, t_name, None)
        continue
      kw = {k: v for k, v in conn.items() if k != "kind"}
      module = connectors.build_connector(conn["kind"],
                                          t_feats[t_name].shape[-1], **kw)
      out = jax.eval_shape(
          functools.partial(module.init_with_output, train=False), rng,
          jax.ShapeDtypeStruct(s_feats[s_name].shape, jnp.float32))[0]
      if out.shape != t_feats[t_name].shape:
        raise ValueError(
            f"loss term {name!r}: student {s_name!r} {s_feats[s_name].shape} "
            f"through connector {conn['kind']!r} gives {out.shape}, but "
            f"teacher {t_name!r} is {t_feats[t_name].shape}; pick features "
            "of the same grid size or connector='attention_pool' with "
            "grid=(h, w)")
      # VID's per-channel variance is a trainable parameter of the method.
      self.connectors[name] = (module, s_name, t_name,
                               t_feats[t_name].shape[-1] if learns_variance
                               else None)

  def init(self, rng, images):
    self._check_and_build(rng, images)
    s_rng, c_rng = jax.random.split(rng)
    variables = self.model.init(s_rng, images, train=False)
    params = {"student": variables["params"], "connectors": {}}
    stats = {"student": variables.get("batch_stats", {}), "connectors": {}}
    if self.connectors:
      _, s_feats = self.model.apply(variables, images, train=False)
      for i, (name, (module, s_name, _, vid_ch)) in enumerate(
          sorted(self.connectors.items())):
        if module is None:
          continue
        cv = module.init(jax.random.fold_in(c_rng, i), s_feats[s_name],
                         train=False)
        params["connectors"][name] = dict(cv["params"])
        if vid_ch:
          # softplus(alpha) + eps ≈ 1 at the start: a unit variance.
          params["connectors"][name]["vid_alpha"] = jnp.full(
              (vid_ch,), 0.5413, jnp.float32)
        stats["connectors"][name] = cv.get("batch_stats", {})
    return {"params": params, "batch_stats": stats}

  def teacher_output_names(self) -> list[str]:
    """The teacher outputs the objective reads: "logits" if a term distils
    logits, "features.<name>" for each teacher feature a term matches
    whole, "views.<key>" for each teacher view a term reads instead
    (`view_table[key]`: the feature, the view, its arguments)."""
    names = ["logits"] if self.uses_teacher_logits else []
    return names + sorted(
        {f"features.{t_name}" for name, _, t_name, _, _ in self.feature_terms
         if name not in self.term_views}
        | {f"views.{key}" for key in self.term_views.values()})

  def teacher_outputs(self, frozen, images, outputs=None, views=None):
    """The frozen teacher's outputs (eval mode, float32) named by `outputs`
    (default `teacher_output_names()`: what the objective reads) as a
    pytree, {"logits": ..., "features": {name: ...}, "views": {key: ...}};
    every array has the batch axis first (an ensemble's logits are (B, E,
    ...)). `views` describes view keys beyond this method's own
    (`view_table`'s form). Per example, this is what the teacher cache
    stores (which may hold the outputs of several stages' objectives:
    `outputs`, `views`)."""
    names = self.teacher_output_names() if outputs is None else list(outputs)
    table = dict(self.view_table, **(views or {}))
    if self.ensemble:
      if set(names) - {"logits"}:
        raise ValueError(f"an ensemble's cached outputs are its stacked "
                         f"logits only, not {sorted(set(names) - {'logits'})}")
      outs = [common.apply_eval(m, f["params"], f["batch_stats"], images)[0]
              for m, f in zip(self.teachers, frozen)]
      out = {}
      if names:
        # (B, E, ...) per head: the members' outputs stacked behind the
        # batch axis, so that every output is one row per example (what the
        # cache stores); `student_loss` moves E to the front.
        out["logits"] = tasks.as_float32(
            jax.tree.map(lambda *x: jnp.stack(x, axis=1), *outs))
      return jax.lax.stop_gradient(out)
    logits, feats = common.apply_eval(self.teacher, frozen["params"],
                                      frozen["batch_stats"], images)
    out = {}
    for name in names:
      if name == "logits":
        out["logits"] = tasks.as_float32(logits)
        continue
      group, _, key = name.partition(".")
      view = table.get(key) if group == "views" else None
      if group == "views" and view is None:
        raise ValueError(f"teacher output {name!r}: no such view; known "
                         f"views: {sorted(table)}")
      feature = view["feature"] if view else key
      if feature not in feats:
        raise ValueError(f"teacher output {name!r}: the teacher has no such "
                         f"feature; it offers: {_describe(feats)}")
      value = feats[feature].astype(jnp.float32)
      if view:
        value = losses.teacher_view(view["view"], value, view["args"])
      out.setdefault(group, {})[key] = value
    return jax.lax.stop_gradient(out)

  def loss_fn(self, params, batch_stats, frozen, batch, rng):
    loss, (new_stats, metrics, _, _) = self.student_loss(
        params, batch_stats, frozen, batch, rng)
    return loss, (new_stats, metrics)

  def student_loss(self, params, batch_stats, frozen, batch, rng):
    """The objective on the batch and what it saw: (loss, (new batch_stats,
    metrics, student outputs, teacher outputs))."""
    if self.connectors is None:
      raise RuntimeError("Distill.init must run before loss_fn")
    images = batch["image"]
    (logits, s_feats), new_student = common.apply_train(
        self.model, params["student"], batch_stats["student"], images, rng)
    # Cached teacher outputs come with the batch; otherwise run the teacher.
    teacher = batch.get("teacher")
    if teacher is None:
      teacher = self.teacher_outputs(frozen, images)
    t_feats, t_views = teacher.get("features", {}), teacher.get("views", {})
    pairs, new_conn = {}, {}
    for name, (module, s_name, t_name, vid_ch) in self.connectors.items():
      # A term with a view reads it, the same live as cached.
      t_value = (losses.Viewed(t_views[self.term_views[name]])
                 if name in self.term_views else t_feats[t_name])
      if module is None:
        pairs[name] = (s_feats[s_name].astype(jnp.float32), t_value)
        continue
      c_params = dict(params["connectors"][name])
      alpha = c_params.pop("vid_alpha", None)
      out, updates = module.apply(
          {"params": c_params,
           "batch_stats": batch_stats["connectors"][name]},
          s_feats[s_name], train=True, mutable=["batch_stats"])
      new_conn[name] = updates.get("batch_stats",
                                   batch_stats["connectors"][name])
      pairs[name] = (out.astype(jnp.float32), t_value)
      if vid_ch:
        pairs[name] += ({"alpha": alpha},)
    inputs = tasks.objective_inputs(self.heads, logits, batch, s_feats)
    t_logits = teacher.get("logits")
    if self.ensemble and t_logits is not None:
      # ensemble_kd / ensemble_l2 read (E, B, ...) stacks.
      t_logits = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), t_logits)
    inputs.update(teacher_logits=t_logits, features=pairs)
    loss, metrics = self.objective(inputs)
    return loss, ({"student": new_student, "connectors": new_conn}, metrics,
                  logits, teacher)

  def predict(self, params, batch_stats, images):
    return common.apply_eval(self.model, params["student"],
                             batch_stats["student"], images)[0]
