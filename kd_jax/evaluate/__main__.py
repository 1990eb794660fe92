"""Evaluates trained stages from their checkpoints: metrics and figures.

    python -m kd_jax.evaluate --config=configs/default.py --workdir=runs/x \
        [--stages=teacher,distilled] [--split=test|val] [--cam_class=liver] \
        [--cam_feature=dec1] [--num_examples=4] [--config.<key>=<value>]

`--config` (with the same `--config.<key>=` overrides as training) and
`--workdir` name the run. Each chosen stage (default: every stage of
`config.stage_order` with a checkpoint under `<workdir>/<stage>/checkpoints`)
is restored from its latest checkpoint — the deployable model only, as
`kd_jax.export` writes it — and evaluated on the whole split. Outputs, in
`<workdir>/eval_<split>/`:

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
"""
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kd_jax import data, export, train
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


def _scores_json(scores, class_names) -> dict:
  def num(x):
    x = float(x)
    return None if np.isnan(x) else x  # JSON has no NaN

  return dict(
      mean_dice=num(scores["mean_dice"]), mean_iou=num(scores["mean_iou"]),
      pixel_accuracy=num(scores["pixel_accuracy"]),
      dice={c: num(v) for c, v in zip(class_names, scores["dice"])},
      iou={c: num(v) for c, v in zip(class_names, scores["iou"])})


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
  source = getattr(datasets, split)
  shown = [source[i] for i in range(min(num_examples, len(source)))]
  images = np.stack([e["image"] for e in shown])
  labels = np.stack([e["label"] for e in shown])
  target = _class_index(cam_class, datasets.class_names, labels)
  restored = {n: export.restore_stage(config, workdir, n, datasets)
              for n in names}
  features = {}
  for name, (method, _) in restored.items():
    try:
      features[name] = explain.model_cam_feature(method.model, images.shape,
                                                 cam_feature)
    except ValueError as e:
      raise ValueError(f"stage {name!r}: {e}") from None

  mesh = train.make_mesh()
  out_dir = os.path.join(workdir, f"eval_{split}")
  os.makedirs(out_dir, exist_ok=True)
  results, predictions, maps = {}, {}, {}
  for name, (method, variables) in restored.items():
    key = method.model_key  # The methods' predict reads params[model_key].
    state = types.SimpleNamespace(params={key: variables["params"]},
                                  batch_stats={key: variables["batch_stats"]})
    eval_step = train.make_eval_step(method, datasets.num_classes, mesh)
    scores = train.evaluate(eval_step, state, source, config.batch_size, mesh)
    results[name] = dict(method=config.stages[name].method,
                         model=config.stages[name].model.to_dict(),
                         **_scores_json(scores, datasets.class_names))
    logits = jax.jit(method.predict)(state.params, state.batch_stats, images)
    predictions[name] = np.asarray(jnp.argmax(logits, -1))
    saliency, cam = explain.explainer(method.model, features[name], target)(
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
  print(f"{'stage':<16} {'mean Dice':>9} {'mean IoU':>9} {'pixel acc':>9}")
  for name, r in report["stages"].items():
    print(f"{name:<16} " + " ".join(
        f"{'-' if v is None else format(v, '.4f'):>9}"
        for v in (r["mean_dice"], r["mean_iou"], r["pixel_accuracy"])))
  print(f"wrote {os.path.join(f.workdir, 'eval_' + f.split)}/"
        "{metrics.json,segmentation.png,explanations.png}")


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
