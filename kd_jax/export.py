"""The deployable model alone: export a trained stage, and load it back.

    python -m kd_jax.export --config=configs/default.py --workdir=runs/x \
        --stage=distilled --out=runs/x/export/distilled

`--config` (with the same `--config.<key>=` overrides as training) and
`--workdir` name the run; `--stage` defaults to the last stage of
`config.stage_order` and `--out` to `<workdir>/export/<stage>`. The folder
gets

  model.json   how to rebuild the module: {"format": 1, "model": {"name",
               "kwargs"}, "input_shape": [H, W, C] of one example, "dtype"
               (compute dtype), "stage", "method"} and what it outputs: for
               a run with one output (no `config.heads`), "num_classes" and
               "class_names" of that output; for a run with named heads,
               "heads": {name: {"kind", "label", "num_classes",
               "class_names"}} (null where a kind has no classes: landmarks)
  variables/   an Orbax checkpoint of {"params", "batch_stats"} of the
               stage's deployable model (the supervised model, the student
               of a distillation stage, explainer + student of an explain
               stage): no connectors, no optimizer state, no teacher.
  inference.jax          the same model's eval forward `(params, images) ->
               outputs` serialized with `jax.export` (StableHLO lowered for
               CPU, CUDA and TPU, any batch size)
  inference_params.npz   its `params`: the variables flattened to
               {"params/enc1/Conv_0/kernel": array, ...}

A method deploys the params keys `deployed_keys` (default its
`model_key`) as the module `deployed` (default its `model`). With several
keys (MED-TEX's explainer + student) "model" is {"module": the deployed
class in kd_jax.models, "parts": {key: {"name", "kwargs"}}}: each part's
model config (`model_key`'s is the stage's `model`, any other key's the
stage's `<key>.model`), rebuilt as `module(**{key: part})` (flax names a
field's submodule by the field, so its variables are {key: ...} per
collection). A method's `deployed_features` (MED-TEX: "mask") are listed
under "features" in model.json, and inference.jax returns `(outputs,
{name: feature})` instead of the outputs alone.

`load` gives the module back without the config or the training code:

    model, variables = kd_jax.export.load("runs/x/export/distilled")
    logits, features = model.apply(variables, images, train=False)

(`logits` is a dict {head: output} for a model with named heads.) The
serialized function needs neither kd_jax nor flax, only jax and numpy:

    exported = jax.export.deserialize(open(f"{out}/inference.jax", "rb").read())
    logits = exported.call(dict(np.load(f"{out}/inference_params.npz")),
                           images)  # float32 (N, H, W, C)
    # A folder with "features" (MED-TEX): logits, {"mask": Θ} = ...

`restore_stage` (a stage's model and its latest variables, checked against
the config) is shared with `python -m kd_jax.evaluate`.
"""
import functools
import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import flax
import orbax.checkpoint as ocp

from kd_jax import checkpoint, data, models, tasks, train

FORMAT = 1
INFERENCE = "inference.jax"
INFERENCE_PARAMS = "inference_params.npz"
# Lowered for every platform a user is likely to deploy on, so an artefact
# written on a CPU runs on a GPU or TPU as it is.
PLATFORMS = ("cpu", "cuda", "tpu")


def _shapes(tree) -> dict:
  """{"params/enc1/...": shape} of every leaf."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          tuple(leaf.shape) for path, leaf in flat}


def deployed_keys(method) -> tuple:
  """The top-level params keys `method` deploys (default its model's)."""
  return tuple(getattr(method, "deployed_keys", (method.model_key,)))


def deployed_module(method):
  """The module those keys' variables drive (default `method.model`)."""
  return getattr(method, "deployed", method.model)


def restore_stage(config, workdir: str, stage: str, datasets, heads=None):
  """(method, variables) of `stage`'s latest checkpoint under `workdir`.

  `method` is built as training builds it, with the run's heads (`heads`,
  default `train.run_heads(config, datasets)`): `deployed_module(method)` is
  the deployable module, its `.predict` the eval forward. `variables` are
  the numpy {"params", "batch_stats"} of that module alone
  (`checkpoint.load_model_variables` of `deployed_keys(method)`). Raises
  ValueError for
  a stage the config does not have, heads the data cannot feed, or a
  checkpoint that does not fit the config's model; FileNotFoundError when
  the stage has no checkpoint.
  """
  if stage not in config.stages:
    raise ValueError(f"unknown stage {stage!r}; the config's stages are "
                     f"{list(config.stage_order)}")
  stage_dir = os.path.join(workdir, stage)
  if not os.path.isdir(os.path.join(stage_dir, "checkpoints")):
    raise FileNotFoundError(
        f"stage {stage!r} has no checkpoint: {stage_dir}/checkpoints does not "
        f"exist; train it first (python -m kd_jax.main --config=... "
        f"--workdir={workdir})")
  if heads is None:
    heads = train.run_heads(config, datasets)
  method, _ = train.build_method(config, stage, workdir, datasets.num_classes,
                                 load_teacher=False, heads=heads)
  try:
    variables = checkpoint.load_model_variables(stage_dir,
                                                deployed_keys(method))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"stage {stage!r}: {e}") from None
  example = jax.ShapeDtypeStruct((1,) + datasets.test[0]["image"].shape,
                                 jnp.float32)
  expected = jax.eval_shape(
      functools.partial(deployed_module(method).init, train=False),
      jax.random.key(0), example)
  expected = {"params": expected["params"],
              "batch_stats": expected.get("batch_stats", {})}
  want, got = _shapes(expected), _shapes(variables)
  if want != got:
    diff = sorted(k for k in set(want) | set(got)
                  if want.get(k) != got.get(k))
    raise ValueError(
        f"stage {stage!r}: the checkpoint does not fit the config's model "
        f"{config.stages[stage].model.to_dict()}"
        + (f" (parts {list(deployed_keys(method))})"
           if len(deployed_keys(method)) > 1 else "")
        + "; it differs at "
        + ", ".join(f"{k} (checkpoint {got.get(k)}, model {want.get(k)})"
                    for k in diff[:3])
        + ". Pass the --config overrides the stage was trained with.")
  return method, variables


def _json_value(x):
  return [_json_value(v) for v in x] if isinstance(x, (list, tuple)) else x


def head_name(head) -> str:
  """A head's name in JSON: its own, or for the one unnamed output of a run
  without `config.heads`, the label key it reads."""
  return head.label if head.name is None else head.name


def describe_heads(heads) -> dict:
  """{name: {"kind", "label", "num_classes", "class_names"}} of the heads
  (`kd_jax.tasks.from_config`), JSON-ready."""
  return {head_name(h): dict(kind=h.kind, label=h.label,
                             num_classes=h.num_classes,
                             class_names=None if h.class_names is None
                             else list(h.class_names))
          for h in heads.values()}


def _part_spec(model_config, num_classes) -> dict:
  """{"name", "kwargs"} of one model config, JSON-ready."""
  kwargs = dict(model_config)
  name = kwargs.pop("name")
  # The class count is explicit in the file, as training defaults it: only
  # for constructors that take one (multi-head models size their heads by
  # their own fields, and `load` passes the kwargs on as they are).
  if models.accepts(name, "num_classes"):
    kwargs.setdefault("num_classes", num_classes)
  return dict(name=name, kwargs={k: _json_value(v) for k, v in kwargs.items()})


def _model_spec(method, stage_config, num_classes) -> dict:
  """model.json's "model": one model's config, or the deployed class and
  each deployed key's model config (see the module docstring)."""
  keys = deployed_keys(method)
  if len(keys) == 1:
    return _part_spec(stage_config.model.to_dict(), num_classes)
  parts = {}
  for key in keys:
    if key == method.model_key:
      parts[key] = _part_spec(stage_config.model.to_dict(), num_classes)
    else:
      parts[key] = _part_spec(stage_config[key].model.to_dict(), num_classes)
  cls = type(deployed_module(method))
  return dict(module=f"{cls.__module__}.{cls.__qualname__}", parts=parts)


def export(config, workdir: str, stage: str, out: str) -> str:
  """Writes `stage`'s deployable model to the folder `out` (see module
  docstring); returns the folder's absolute path."""
  out = os.path.abspath(out)
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f"{out} exists and is not empty; choose another "
                          "--out or remove it")
  datasets = data.build(config.data)
  heads = train.run_heads(config, datasets)
  method, variables = restore_stage(config, workdir, stage, datasets, heads)
  model_spec = _model_spec(method, config.stages[stage], datasets.num_classes)
  spec = dict(
      format=FORMAT, model=model_spec,
      input_shape=list(datasets.test[0]["image"].shape),
      dtype=jnp.dtype(config.compute_dtype).name,
      stage=stage, method=config.stages[stage].method)
  features = list(getattr(method, "deployed_features", ()))
  if features:
    spec["features"] = features
  if tasks.is_single(heads):
    head = heads[None]
    # The class count of the model that gives the outputs.
    main = model_spec.get("parts", {}).get(method.model_key, model_spec)
    classes = main["kwargs"].get("num_classes", head.num_classes)
    # A target without names of its own: the data set's, which describe
    # the "label" target this one output reads.
    names = (head.class_names if head.class_names is not None
             else None if head.kind == "landmark" else datasets.class_names)
    spec.update(num_classes=None if classes is None else int(classes),
                class_names=None if names is None else list(names))
  else:
    spec["heads"] = describe_heads(heads)
  os.makedirs(out, exist_ok=True)
  # Empty collections (a model without BatchNorm) are left out: `load`
  # restores onto the collections the rebuilt model has.
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out, "variables"),
               {k: v for k, v in variables.items() if v})
    ckptr.wait_until_finished()
  with open(os.path.join(out, "model.json"), "w") as f:
    json.dump(spec, f, indent=1)
  serialized, params = serialize_inference(_model(spec), variables,
                                           spec["input_shape"], features)
  with open(os.path.join(out, INFERENCE), "wb") as f:
    f.write(serialized)
  np.savez(os.path.join(out, INFERENCE_PARAMS), **params)
  return out


def serialize_inference(model, variables, input_shape,
                        features=()) -> tuple[bytes, dict]:
  """`model`'s eval forward as a `jax.export` artefact, and its parameters.

  Returns (bytes, params): `jax.export.deserialize(bytes).call(params,
  images)` gives `model.apply(variables, images, train=False)[0]` (the
  outputs; no features), or with `features` (names of the model's
  features) `(outputs, {name: feature})`, for float32 images of any batch
  size and one example of shape `input_shape`. `params` is `variables`
  flattened to
  {"collection/module/.../name": numpy array} (`np.savez` stores it as it
  is), so that loading needs no pytree of kd_jax's. Lowered for `PLATFORMS`.
  """
  params = {k: np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(variables, sep="/").items()}

  def infer(flat, images):
    outputs, feats = model.apply(
        flax.traverse_util.unflatten_dict(flat, sep="/"), images,
        train=False)
    return (outputs, {k: feats[k] for k in features}) if features else outputs

  batch, = jax.export.symbolic_shape("batch")
  exported = jax.export.export(jax.jit(infer), platforms=PLATFORMS)(
      {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()},
      jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32))
  return bytes(exported.serialize()), params


def _tuples(x):
  """JSON lists back to the tuples model configs use."""
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  return x


def _deployed_class(path: str):
  """The class `path` ("kd_jax.models.<module>.<Class>") names."""
  module, _, name = path.rpartition(".")
  # Only kd_jax's own models: the file names a class to import, and a
  # folder from elsewhere must not make `load` import arbitrary code.
  if not module.startswith("kd_jax.models."):
    raise ValueError(f"model.json: model.module {path!r} is not a class of "
                     "kd_jax.models; this folder was not written by "
                     "kd_jax.export")
  try:
    cls = getattr(importlib.import_module(module), name, None)
  except ImportError:
    cls = None
  if cls is None:
    raise ValueError(f"model.json: model.module {path!r} does not exist in "
                     "this kd_jax; load it with the kd_jax that wrote it")
  return cls


def _model(spec):
  """The module model.json describes (flax's own layers)."""
  dtype = jnp.dtype(spec["dtype"])
  build = lambda part: models.build(part["name"], dtype=dtype,  # noqa: E731
                                    **_tuples(part["kwargs"]))
  if "parts" in spec["model"]:
    return _deployed_class(spec["model"]["module"])(
        **{k: build(p) for k, p in spec["model"]["parts"].items()})
  return build(spec["model"])


def load(path: str):
  """(model, variables) from an `export` folder: the module rebuilt with
  `kd_jax.models.build` from model.json (with several parts, the deployed
  class over them), and its numpy variables."""
  path = os.path.abspath(path)
  spec_path = os.path.join(path, "model.json")
  if not os.path.isfile(spec_path):
    raise FileNotFoundError(f"{spec_path} not found: {path} is not a folder "
                            "written by kd_jax.export")
  with open(spec_path) as f:
    spec = json.load(f)
  if spec.get("format") != FORMAT:
    raise ValueError(f"{spec_path} has format {spec.get('format')!r}; this "
                     f"kd_jax reads format {FORMAT}")
  model = _model(spec)
  example = jax.ShapeDtypeStruct((1, *spec["input_shape"]), jnp.float32)
  abstract = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.key(0), example)
  # Numpy targets restore on the host, whatever devices saved them.
  target = jax.tree.map(lambda a: np.empty(a.shape, a.dtype), abstract)
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(os.path.join(path, "variables"), target)
  return model, {"params": variables["params"],
                 "batch_stats": variables.get("batch_stats", {})}


def main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = flags.FLAGS.config
  stage = flags.FLAGS.stage or cfg.stage_order[-1]
  out = flags.FLAGS.out or os.path.join(flags.FLAGS.workdir, "export", stage)
  try:
    out = export(cfg, flags.FLAGS.workdir, stage, out)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"error: {e}")
  print(f"exported stage {stage!r} to {out}")


if __name__ == "__main__":
  from absl import app, flags
  # --config (with --config.<key> overrides) and --workdir exactly as
  # training defines and parses them.
  from kd_jax import main as train_main
  flags.DEFINE_string("stage", None, "Stage to export (default: the last "
                      "of config.stage_order).")
  flags.DEFINE_string("out", None, "Output folder (default: "
                      "<workdir>/export/<stage>).")
  app.run(main, flags_parser=train_main.parse_flags)
