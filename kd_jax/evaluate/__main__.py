"""Evaluates trained stages from their checkpoints: metrics and figures.

    python -m kd_jax.evaluate --config=configs/default.py --workdir=runs/x \
        [--stages=teacher,distilled] [--split=test|val] [--cam_class=liver] \
        [--cam_feature=dec1] [--num_examples=4] [--config.<key>=<value>]

`--config` (with the same `--config.<key>=` overrides as training) and
`--workdir` name the run. Each chosen stage (default: every stage of
`config.stage_order` with a checkpoint under `<workdir>/<stage>/checkpoints`)
is restored from its latest checkpoint — the deployable model only, as
`kd_jax.export` writes it (explainer + student of an explain stage) —
and evaluated on the whole split with the run's heads (`config.heads`;
without it, one segmentation output reading "label"). Outputs, in
`<workdir>/eval_<split>/`, for a segmentation run:

  metrics.json      per stage: mean Dice, mean IoU (foreground classes, a
                    class absent from prediction and ground truth left out),
                    pixel accuracy, and Dice and IoU per class name (null for
                    such an absent class); the conventions of
                    `kd_jax.evaluate.metrics`.
  segmentation.png  the split's first `num_examples` images: image, ground
                    truth, then each stage's prediction.
  explanations.png  the same images: for each stage, the vanilla saliency and
                    the Grad-CAM of one class, with the outline of that
                    class's ground truth.

The explained score is the class's mean logit over the image
(`kd_jax.evaluate.explain.class_score`). `--cam_class` is a class index or
name; by default the foreground class with the most ground-truth pixels in the
shown images (liver, 5, on the synthetic CT slices). `--cam_feature` is the
feature map Grad-CAM weighs; by default each model's own
(`explain.default_cam_feature`: a segmenter's highest-resolution decoder map,
"dec1" of "unet" and "squeeze_unet", "decoder.block3" of TransUNet). A name a
model lacks is an error that lists the names it offers.

For any other heads (classification, landmarks, several named heads):

  metrics.json      per stage: method, model and every score of
                    `kd_jax.tasks` under its flat key ("dr_grade/kappa",
                    "fovea/mean_error_px"; a single unnamed head's keys bare),
                    confusion matrices as nested lists (rows true class,
                    columns prediction), NaN as null; "heads": {name: {kind,
                    label, num_classes, class_names}} (the unnamed output
                    under its label key) and "headline", the keys of the
                    scores the printed table shows (`kd_jax.tasks.headline`).
  confusion.png     with a classification head: each stage's confusion
                    matrix per classification head.

`--cam_class` and `--cam_feature` explain a segmentation map: an error for
such a run.
"""
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kd_jax import data, export, tasks, train
from kd_jax.evaluate import explain, figures

SPLITS = ("test", "val")


def _stages(config, workdir, stages):
  """The stages to evaluate, checked; default those with a checkpoint."""
  if stages:
    unknown = [s for s in stages if s not in config.stages]
    if unknown:
      raise ValueError(f"unknown stage(s) {unknown}; the config's stages are "
                       f"{list(config.stage_order)}")
    return list(stages)
  found = [s for s in config.stage_order if os.path.isdir(
      os.path.join(workdir, s, "checkpoints"))]
  if not found:
    raise FileNotFoundError(
        f"no stage of {list(config.stage_order)} has a checkpoint under "
        f"{workdir}; train first (python -m kd_jax.main --config=... "
        f"--workdir={workdir}) or check --workdir")
  return found


def _class_index(cam_class, class_names, labels) -> int:
  """`cam_class` (index, name or None) → class index."""
  names = list(class_names)
  if cam_class is None or cam_class == "":
    return explain.default_class(labels, len(names))
  if isinstance(cam_class, str) and not cam_class.isdigit():
    if cam_class not in names:
      raise ValueError(f"cam_class {cam_class!r} is not a class name; "
                       f"choose from {names} or an index")
    return names.index(cam_class)
  index = int(cam_class)
  if not 0 <= index < len(names):
    raise ValueError(f"cam_class {index} is out of range: the data has "
                     f"{len(names)} classes {names}")
  return index


def _num(x):
  x = float(x)
  return None if np.isnan(x) else x  # JSON has no NaN


def _scores_json(scores, class_names) -> dict:
  return dict(
      mean_dice=_num(scores["mean_dice"]), mean_iou=_num(scores["mean_iou"]),
      pixel_accuracy=_num(scores["pixel_accuracy"]),
      dice={c: _num(v) for c, v in zip(class_names, scores["dice"])},
      iou={c: _num(v) for c, v in zip(class_names, scores["iou"])})


def _jsonable(v):
  """A score as JSON: arrays (confusion matrices) as nested lists, counts as
  ints, NaN as null."""
  if np.ndim(v):
    return [_jsonable(x) for x in v]
  v = np.asarray(v)
  if v.dtype == bool or np.issubdtype(v.dtype, np.integer):
    return int(v)
  return _num(v)


def _state(method, variables):
  """The `state` that `train.evaluate` and `method.predict` read: the
  deployed variables back under the method's params keys (the inverse of
  `checkpoint.load_model_variables`: one key's variables as they are,
  several keys' already nested under each)."""
  keys = export.deployed_keys(method)
  if len(keys) == 1:
    return types.SimpleNamespace(
        params={keys[0]: variables["params"]},
        batch_stats={keys[0]: variables["batch_stats"]})
  return types.SimpleNamespace(params=dict(variables["params"]),
                               batch_stats=dict(variables["batch_stats"]))


def evaluate_checkpoints(config, workdir: str, stages=None,
                         split: str = "test",
                         cam_feature: str = "",
                         cam_class=None, num_examples: int = 4) -> dict:
  """Writes `<workdir>/eval_<split>/` (see module docstring); returns the
  content of its metrics.json.

  Every argument, stage and checkpoint is checked before any evaluation:
  ValueError for an unknown split, stage, class or feature, or a checkpoint
  that does not fit the config; FileNotFoundError for a stage without one.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
  names = _stages(config, workdir, stages)
  datasets = data.build(config.data)
  heads = train.run_heads(config, datasets)
  if not tasks.is_segmentation(heads):
    if cam_feature or cam_class not in (None, ""):
      kinds = ", ".join(f"{n} ({h['kind']})" for n, h in
                        export.describe_heads(heads).items())
      raise ValueError(f"--cam_class and --cam_feature explain a "
                       f"segmentation map, but this run's heads are {kinds}; "
                       "drop them")
    return _evaluate_heads(config, workdir, names, split, datasets, heads)
  source = getattr(datasets, split)
  shown = [source[i] for i in range(min(num_examples, len(source)))]
  images = np.stack([e["image"] for e in shown])
  labels = np.stack([e["label"] for e in shown])
  target = _class_index(cam_class, datasets.class_names, labels)
  restored = {n: export.restore_stage(config, workdir, n, datasets, heads)
              for n in names}
  features = {}
  for name, (method, _) in restored.items():
    try:
      features[name] = explain.model_cam_feature(
          export.deployed_module(method), images.shape, cam_feature)
    except ValueError as e:
      raise ValueError(f"stage {name!r}: {e}") from None

  mesh = train.make_mesh()
  out_dir = os.path.join(workdir, f"eval_{split}")
  os.makedirs(out_dir, exist_ok=True)
  results, predictions, maps = {}, {}, {}
  for name, (method, variables) in restored.items():
    state = _state(method, variables)
    eval_step = train.make_eval_step(method, heads, mesh, config)
    scores = train.evaluate(eval_step, state, source, config.batch_size, mesh,
                            heads)
    results[name] = dict(method=config.stages[name].method,
                         model=config.stages[name].model.to_dict(),
                         **_scores_json(scores, datasets.class_names))
    logits = jax.jit(train.eval_predict(method.predict, config))(
        state.params, state.batch_stats, images)
    predictions[name] = np.asarray(jnp.argmax(logits, -1))
    # The deployed module, as `variables` are its own (an explain stage:
    # explainer + student, the saliency through the mask too).
    saliency, cam = explain.explainer(export.deployed_module(method),
                                      features[name], target)(
                                          variables, images)
    class_name = datasets.class_names[target]
    maps[f"{name}\nsaliency ({class_name})"] = np.asarray(saliency)
    maps[f"{name}\nGrad-CAM {features[name]}"] = np.asarray(cam)
    logging.info("%s on %s: mean Dice %s", name, split,
                 results[name]["mean_dice"])

  figures.segmentation_grid(os.path.join(out_dir, "segmentation.png"), images,
                            labels, predictions, datasets.num_classes,
                            class_names=datasets.class_names)
  figures.explanation_grid(os.path.join(out_dir, "explanations.png"), images,
                           maps, masks=labels == target)
  report = dict(
      split=split, num_images=len(source), workdir=os.path.abspath(workdir),
      class_names=list(datasets.class_names), stages=results,
      explanations=dict(class_index=target,
                        class_name=datasets.class_names[target],
                        features=features, num_images=len(shown)),
      figures=dict(segmentation="segmentation.png",
                   explanations="explanations.png"))
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report


def _evaluate_heads(config, workdir, names, split, datasets, heads) -> dict:
  """`evaluate_checkpoints` for heads other than one segmentation map:
  every stage's `kd_jax.tasks` scores, no segmentation field or figure."""
  source = getattr(datasets, split)
  # Every checkpoint is checked before the first evaluation.
  restored = {n: export.restore_stage(config, workdir, n, datasets, heads)
              for n in names}
  mesh = train.make_mesh()
  out_dir = os.path.join(workdir, f"eval_{split}")
  os.makedirs(out_dir, exist_ok=True)
  results, headline = {}, {}
  for name, (method, variables) in restored.items():
    eval_step = train.make_eval_step(method, heads, mesh)
    scores = train.evaluate(eval_step, _state(method, variables), source,
                            config.batch_size, mesh, heads)
    results[name] = dict(method=config.stages[name].method,
                         model=config.stages[name].model.to_dict(),
                         **{k: _jsonable(v) for k, v in scores.items()})
    # Ordered keys, the same for every stage (a dict as an ordered set).
    headline.update(dict.fromkeys(tasks.headline(heads, scores)))
    logging.info("%s on %s: %s", name, split, tasks.headline(heads, scores))
  report = dict(
      split=split, num_images=len(source), workdir=os.path.abspath(workdir),
      heads=export.describe_heads(heads), headline=list(headline),
      stages=results)
  classifiers = [h for h in heads.values() if h.kind == "classification"]
  if classifiers:
    _confusion_figure(os.path.join(out_dir, "confusion.png"), results,
                      classifiers)
    report["figures"] = dict(confusion="confusion.png")
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report


def _confusion_figure(path, results, classifiers) -> None:
  """One panel per stage (rows) and classification head (columns): the
  confusion matrix, rows true class, columns prediction, counts written."""
  # Drawn like kd_jax.evaluate.figures: the Agg canvas, no pyplot.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(2.8 * len(classifiers), 2.8 * len(results)))
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(results), len(classifiers), squeeze=False)
  for row, (stage, r) in enumerate(results.items()):
    for col, h in enumerate(classifiers):
      cm = np.asarray(r[h.key("confusion")])
      ax = axes[row, col]
      ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
      for (i, j), n in np.ndenumerate(cm):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                color="white" if n > cm.max() / 2 else "black")
      names = h.class_names or [str(k) for k in range(len(cm))]
      ax.set_xticks(range(len(cm)), names, rotation=90, fontsize=6)
      ax.set_yticks(range(len(cm)), names, fontsize=6)
      ax.set_title(f"{stage}: {export.head_name(h)}", fontsize=8)
      ax.set_xlabel("predicted", fontsize=7)
      ax.set_ylabel("true", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _cell(v, width) -> str:
  return f"{'-' if v is None else format(v, '.4f'):>{width}}"


def table(report) -> list:
  """The lines `python -m kd_jax.evaluate` prints for `report` (the content
  of metrics.json): mean Dice, IoU and pixel accuracy per stage for a
  segmentation run, else the headline scores of each head per stage."""
  if "headline" not in report:
    lines = [f"{'stage':<16} {'mean Dice':>9} {'mean IoU':>9} "
             f"{'pixel acc':>9}"]
    for name, r in report["stages"].items():
      lines.append(f"{name:<16} " + " ".join(
          _cell(v, 9)
          for v in (r["mean_dice"], r["mean_iou"], r["pixel_accuracy"])))
    return lines
  # One block per head ("" for a single unnamed head), its keys' metric
  # names as the columns.
  groups = {}
  for key in report["headline"]:
    head, _, metric = key.rpartition("/")
    groups.setdefault(head, []).append((key, metric))
  lines = []
  for head, columns in groups.items():
    if head:
      lines.append(f"{head} ({report['heads'][head]['kind']})")
    widths = [max(9, len(metric)) for _, metric in columns]
    lines.append(f"{'stage':<16} " + " ".join(
        f"{metric:>{w}}" for (_, metric), w in zip(columns, widths)))
    for name, r in report["stages"].items():
      lines.append(f"{name:<16} " + " ".join(
          _cell(r.get(key), w) for (key, _), w in zip(columns, widths)))
  return lines


def main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    report = evaluate_checkpoints(
        f.config, f.workdir, stages=f.stages, split=f.split,
        cam_feature=f.cam_feature, cam_class=f.cam_class,
        num_examples=f.num_examples)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print("\n".join(table(report)))
  files = ["metrics.json", *report.get("figures", {}).values()]
  print(f"wrote {os.path.join(f.workdir, 'eval_' + f.split)}/"
        + (files[0] if len(files) == 1 else "{" + ",".join(files) + "}"))


if __name__ == "__main__":
  from absl import app, flags
  # --config (with --config.<key> overrides) and --workdir exactly as
  # training defines and parses them.
  from kd_jax import main as train_main
  flags.DEFINE_list("stages", None, "Stages to evaluate (default: those of "
                    "config.stage_order with a checkpoint).")
  flags.DEFINE_string("split", "test", f"Split to evaluate: {SPLITS}.")
  flags.DEFINE_string("cam_feature", "", "Feature map for Grad-CAM "
                      "(default: each model's, see the module docstring).")
  flags.DEFINE_string("cam_class", None, "Class to explain, index or name "
                      "(default: the most frequent foreground class in the "
                      "shown images).")
  flags.DEFINE_integer("num_examples", 4, "Images in the figures.")
  app.run(main, flags_parser=train_main.parse_flags)
