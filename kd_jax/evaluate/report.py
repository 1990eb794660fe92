"""The run report: `report.md`, `results.json` and its figures."""
import datetime
import json
import os

import jax
import numpy as np

from kd_jax import tasks
from kd_jax.evaluate import explain, figures


def _fmt(x, digits=3):
  return "–" if x is None or np.isnan(x) else f"{x:.{digits}f}"


def write(workdir, config, datasets, results, num_figure_examples=4,
          heads=None):
  """Writes `<workdir>/report.md` comparing every stage on the test split.

  `results[stage]` holds "scores" (`kd_jax.tasks` scores of the test
  split), "summary" (params, flops) and "images_per_s"; for a segmentation
  run also "predict" (numpy images → numpy label maps), "explain" ((numpy
  images, class) → numpy (saliency, Grad-CAM) maps) and "cam_feature" (the
  feature map Grad-CAM weighs). `heads` (`kd_jax.tasks.from_config`; None:
  one segmentation output) decides what the report shows: the segmentation
  report below, or a table of every head's scores (`write_heads`).
  """
  if not tasks.is_segmentation(heads):
    return write_heads(workdir, config, datasets, results, heads)
  names = list(results)
  stages = config.stages
  rows = {}
  for name in names:
    r = results[name]
    rows[name] = dict(
        method=stages[name].method, model=stages[name].model.to_dict(),
        params=int(r["summary"]["params"]),
        gflops=float(r["summary"]["flops"]) / 1e9,
        mean_dice=float(r["scores"]["mean_dice"]),
        mean_iou=float(r["scores"]["mean_iou"]),
        mean_iou_all=float(r["scores"]["mean_iou_all"]),
        pixel_accuracy=float(r["scores"]["pixel_accuracy"]),
        dice=[float(v) for v in r["scores"]["dice"]],
        iou=[float(v) for v in r["scores"]["iou"]],
        images_per_s=float(r["images_per_s"]))

  idx = list(range(min(num_figure_examples, len(datasets.test))))
  examples = [datasets.test[i] for i in idx]
  images = np.stack([e["image"] for e in examples])
  fig_path = os.path.join(workdir, "predictions.png")
  figures.segmentation_grid(
      fig_path, images, np.stack([e["label"] for e in examples]),
      {name: results[name]["predict"](images) for name in names},
      num_classes=datasets.num_classes, class_names=datasets.class_names)

  labels = np.stack([e["label"] for e in examples])
  target = explain.default_class(labels, datasets.num_classes)
  maps = {}
  for name in names:
    saliency, cam = results[name]["explain"](images, target)
    maps[f"{name}\nsaliency"] = saliency
    maps[f"{name}\nGrad-CAM {results[name]['cam_feature']}"] = cam
  figures.explanation_grid(os.path.join(workdir, "explanations.png"), images,
                           maps, masks=labels == target)

  from kd_jax import train  # the report is written by train; no cycle at import
  curves = {}
  for name in names:
    hist = train.read_history(os.path.join(workdir, name))
    for key in ("train/loss", "val/mean_dice"):
      if key in hist:
        curves[f"{name}/{key}"] = hist[key]
  if curves:
    figures.training_curves(os.path.join(workdir, "curves.png"), curves)

  lines = _header(config, datasets) + [
      "Scores on the test split, from the confusion matrix of all its "
      "pixels: mean Dice and mIoU (fg) average the foreground classes "
      "present (TransUNet / Synapse), mIoU (all) every class present, "
      "background included (Structured KD, VOC / Cityscapes); pixel "
      "accuracy over all pixels; images/s of the jitted eval forward at "
      f"batch {config.batch_size}, compile excluded.", "",
      "| stage | method | model | params | GFLOPs/image | mean Dice | "
      "mIoU (fg) | mIoU (all) | pixel acc. | images/s |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, r in rows.items():
    model = ", ".join(f"{k}={v}" for k, v in r["model"].items())
    lines.append(
        f"| {name} | {r['method']} | {model} | {r['params']:,} | "
        f"{r['gflops']:.3f} | {_fmt(r['mean_dice'])} | {_fmt(r['mean_iou'])} "
        f"| {_fmt(r['mean_iou_all'])} | {_fmt(r['pixel_accuracy'])} | "
        f"{r['images_per_s']:.0f} |")
  classes = datasets.class_names
  lines += ["", "Per-class Dice:", "",
            "| stage | " + " | ".join(classes[1:]) + " |",
            "|---|" + "---:|" * (len(classes) - 1)]
  for name, r in rows.items():
    lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in r["dice"][1:])
                 + " |")
  lines += ["", "Per-class IoU (– : the class is in neither the prediction "
            "nor the ground truth):", "",
            "| stage | " + " | ".join(classes) + " |",
            "|---|" + "---:|" * len(classes)]
  for name, r in rows.items():
    lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in r["iou"])
                 + " |")
  if {"teacher", "baseline", "distilled"} <= set(rows):
    t, b, d = (rows[k]["mean_dice"] for k in ("teacher", "baseline",
                                                "distilled"))
    if t > b:
      lines += ["", f"Distillation closes {100 * (d - b) / (t - b):.0f} % of "
                f"the teacher–baseline gap in mean Dice ({b:.3f} → {d:.3f}, "
                f"teacher {t:.3f})."]
  lines += ["", "Test examples: image, ground truth, then each stage's "
            "prediction.", "", "![predictions](predictions.png)", "",
            f"What each stage looks at for {datasets.class_names[target]} "
            f"(class {target}, the most frequent foreground class in these "
            "images; its ground truth outlined): vanilla saliency "
            "|∂score/∂x| and Grad-CAM on the named feature map, the score "
            "being the class's mean logit over the image "
            "(`kd_jax.evaluate.explain`).", "",
            "![explanations](explanations.png)", ""]
  if curves:
    lines += ["Training loss and validation mean Dice per stage.", "",
              "![curves](curves.png)", ""]
  _save(workdir, lines, rows)
  return rows


def _header(config, datasets) -> list[str]:
  device = jax.devices()[0]
  return [
      "# kd_jax run report", "",
      f"- date: {datetime.date.today().isoformat()}",
      f"- devices: {jax.device_count()} × {device.platform} "
      f"({device.device_kind})",
      f"- data: {config.data.name}, {len(datasets.train)} train / "
      f"{len(datasets.val)} val / {len(datasets.test)} test examples"
      + (" (no separate test split: test is val)" if datasets.test_is_val
         else "") + ", "
      # Only generated data has a data seed; real data sets are fixed files.
      + (f"data seed {config.data.seed}; " if "seed" in config.data else "")
      + f"run seed {config.seed}",
      f"- batch {config.batch_size}, compute dtype {config.compute_dtype}",
      ""]


def _save(workdir, lines, rows):
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)


def _jsonable(v):
  return np.asarray(v).tolist() if np.ndim(v) else float(v)


def write_heads(workdir, config, datasets, results, heads):
  """The report of a run whose heads are not one segmentation map: each
  head's headline scores per stage (`kd_jax.tasks.HEADLINE`), and in
  results.json every score (confusion matrices included)."""
  names = list(results)
  rows = {}
  for name in names:
    r = results[name]
    rows[name] = dict(
        method=config.stages[name].method,
        model=config.stages[name].model.to_dict(),
        params=int(r["summary"]["params"]),
        gflops=float(r["summary"]["flops"]) / 1e9,
        images_per_s=float(r["images_per_s"]),
        scores={k: _jsonable(v) for k, v in r["scores"].items()})
  columns = [h.key(k) for h in heads.values() for k in tasks.HEADLINE[h.kind]]
  lines = _header(config, datasets) + [
      "Scores on the test split per head (classification: accuracy, macro "
      "F1, one-vs-rest AUC, quadratic-weighted kappa; landmarks: error in "
      "pixels of the original image); images/s of the jitted eval forward at "
      f"batch {config.batch_size}, compile excluded.", "",
      "| stage | method | model | params | GFLOPs/image | "
      + " | ".join(columns) + " | images/s |",
      "|---|---|---|---:|---:|" + "---:|" * len(columns) + "---:|"]
  for name, r in rows.items():
    model = ", ".join(f"{k}={v}" for k, v in r["model"].items())
    cells = [_fmt(r["scores"].get(c), 1 if c.endswith("_px") else 3)
             for c in columns]
    lines.append(f"| {name} | {r['method']} | {model} | {r['params']:,} | "
                 f"{r['gflops']:.3f} | " + " | ".join(cells)
                 + f" | {r['images_per_s']:.0f} |")
  from kd_jax import train  # the report is written by train; no cycle at import
  # An embedding output (unlabelled images) has no validation score.
  first = f"val/{columns[0]}" if columns else None
  curves = {}
  for name in names:
    hist = train.read_history(os.path.join(workdir, name))
    for key in ("train/loss", first):
      if key in hist:
        curves[f"{name}/{key}"] = hist[key]
  if curves:
    figures.training_curves(os.path.join(workdir, "curves.png"), curves)
    lines += ["", "Training loss" + (f" and validation {columns[0]}"
                                     if columns else "") + " per stage.",
              "", "![curves](curves.png)", ""]
  _save(workdir, lines, rows)
  return rows
