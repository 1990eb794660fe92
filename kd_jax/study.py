"""A study: every stage of a config, for several seeds, in one table.

    python -m kd_jax.study --config=configs/distillo.py:study,cpu \
        --workdir=runs/distillo

For each seed of `config.study.seeds` the stages of `config.stage_order`
train in `<workdir>/seed<k>/<stage>` through `train.train_stage` (the
teacher once per seed, before the stages that distil from it); a finished
stage is reused and an interrupted one resumes, so rerunning the command
continues the study. Each stage's deployable model (and the peer of a
mutual-learning stage, as "<stage>_peer") is then evaluated volume by
volume on the data set's `volumes` (ACDC: the validation volumes; Synapse:
the test volumes): per-class and mean Dice, IoU and HD95 of each 3D volume
(`kd_jax.evaluate.metrics`, strict empty-mask convention, voxel spacing when
the data has it), averaged over volumes; the result is cached beside the
checkpoint in `volume_eval.json`. Outputs in `<workdir>`:

  study.md / study.json  mean ± sample std (ddof 1) over seeds of every
                         score, parameters and GFLOPs per model
                         (`models.summary`, batch 1), the fraction of the
                         teacher–student gap in mean Dice each distilled
                         stage closes, wall times of the stages trained now
  predictions.png        one slice of each of a few volumes: image,
                         ground truth, every stage's prediction (seed 0)
  explanations.png       the same slices: saliency and Grad-CAM of
                         `config.study.cam_class` for the stages of
                         `config.study.explain_stages` (seed 0)

Segmentation data without volumes (DRIVE) is scored image by image, each
validation image a one-slice volume.

`config.study` keys: seeds; optional cam_class (name or index, default 1:
the first foreground class), cam_feature ("" = each model's default map),
num_figure_examples (default 4), explain_stages (default none); for runs
whose heads are not one segmentation map (`run_heads`), `columns`: the
scores in the table (default: every head's headline scores; study.json
has them all), and `fidelity` (optional, a stage name, one classifier
head): every other stage's post-hoc fidelity to that stage's predictions
(`metrics.fidelity`: fidelity_accuracy, fidelity_f1 macro,
fidelity_f1_positive) and, for a binary task, each stage's own
positive-class F1 against the labels (f1_positive) (MED-TEX's read-out);
`lesion_iou` (optional, a run on IDRiD's images): the top-K overlap of
every stage's explanation with the lesion masks, mean ± std over seeds, in
study.md and lesion_iou.png (`kd_jax.evaluate.lesion_iou.study`);
`fractions` (optional): the study once per less-data fraction
(`run_fractions`).

A study's seeds can run apart (on two machines, or one seed a day) and be
tabulated together: run each part with its own `--config.study.seeds`,
then the same config with `--merge=<part>/study.json,...` writes the table
over all their seeds, training nothing (`merge`; each study.json records
the date, code commit, devices and command of its run).
"""
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kd_jax import data, models, record, tasks, train
from kd_jax.data import sources
from kd_jax.evaluate import metrics

TEACHER, STUDENT = "teacher", "student"


# ----------------------------------------------------------------------------
# Volume-wise evaluation.


def volume_iou(pred: np.ndarray, label: np.ndarray,
               num_classes: int) -> np.ndarray:
  """(C,) IoU per class of one volume, background included; classes absent
  from both prediction and ground truth are NaN (nothing to score)."""
  iou = np.full(num_classes, np.nan)
  for c in range(num_classes):
    p, g = pred == c, label == c
    union = np.logical_or(p, g).sum()
    if union:
      iou[c] = np.logical_and(p, g).sum() / union
  return iou


def evaluate_volumes(predict_fn, volumes, num_classes: int, input_size,
                     batch_size: int) -> dict:
  """Per-volume and averaged Dice, IoU and HD95 of a 2D model run slice by
  slice over every volume of `volumes` (a `VolumeSource`)."""
  # Batches no larger than the deepest volume: one-slice "volumes" (DRIVE's
  # images) are not padded to a batch of blank slices, 8× the windows.
  if None not in volumes.depths:
    batch_size = min(batch_size, max(volumes.depths))
  per_volume = []
  for i in range(len(volumes)):
    vol = volumes[i]
    scores = metrics.evaluate_volume(
        predict_fn, vol["image"], vol["label"], num_classes,
        input_size=input_size, spacing=vol.get("spacing"),
        batch_size=batch_size)
    pred = scores.pop("pred")
    iou = volume_iou(pred, vol["label"], num_classes)
    per_volume.append(dict(name=vol["name"], dice=scores["dice"],
                           hd95=scores["hd95"], iou=iou,
                           pixel_accuracy=float(np.mean(pred == vol["label"]))))
  summary = metrics.summarize_volumes(per_volume)
  # IoU averaged as summarize_volumes averages Dice: over volumes per class,
  # then over the classes, NaN (nothing to score) left out: the foreground
  # classes (mean_iou, as mean Dice) and every class with the background
  # (mean_iou_all, Structured KD's mIoU).
  iou = _nanmean(np.stack([r["iou"] for r in per_volume]), axis=0)
  summary.update(iou=iou, mean_iou=_nanmean(iou[1:]),
                 mean_iou_all=_nanmean(iou),
                 pixel_accuracy=float(np.mean([r["pixel_accuracy"]
                                               for r in per_volume])))
  return dict(summary=_jsonable(summary), per_volume=_jsonable(per_volume))


def _nanmean(x, axis=None):
  x = np.asarray(x, np.float64)
  n = (~np.isnan(x)).sum(axis=axis)
  total = np.where(np.isnan(x), 0.0, x).sum(axis=axis)
  return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _jsonable(x):
  """numpy → JSON values, NaN → None."""
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (float, np.floating)):
    return None if np.isnan(x) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def _cached_eval(path: str, step: int, compute, window: int = 0) -> dict:
  """`compute()`'s scores of the checkpoint at `step`, kept in `path` and
  reused while the step and the evaluation's window (`eval_window`; files
  from before it existed were whole-image, 0) are the same."""
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get("step") == step and cached.get("eval_window", 0) == window:
      return cached
  result = dict(compute(), step=step)
  if window:  # Absent = whole images, as in files from before windows.
    result["eval_window"] = window
  with open(path, "w") as f:
    json.dump(result, f)
  return result


# ----------------------------------------------------------------------------
# Aggregation over seeds (pure; tested against numpy).


def mean_std(values) -> dict:
  """Mean and sample std (ddof 1) of the non-missing values (None/NaN are
  left out); std is None with fewer than two values, mean None with none."""
  v = np.asarray([x for x in values if x is not None and not np.isnan(x)],
                 np.float64)
  return dict(mean=float(v.mean()) if len(v) else None,
              std=float(v.std(ddof=1)) if len(v) > 1 else None, n=len(v))


def flat_scores(summary: dict, class_names) -> dict:
  """A volume-eval summary as flat named scores: mean_dice, mean_iou
  (foreground), mean_iou_all (background too), pixel_accuracy, mean_hd95,
  dice/<class> and hd95/<class> (foreground), iou/<class> (every class)."""
  out = {k: summary.get(k) for k in ("mean_dice", "mean_iou", "mean_iou_all",
                                     "pixel_accuracy", "mean_hd95")}
  for metric in ("dice", "iou", "hd95"):
    for c, name in enumerate(class_names):
      if c or metric == "iou":
        out[f"{metric}/{name}"] = summary[metric][c]
  return out


def aggregate(per_seed: dict) -> dict:
  """{seed: {stage: flat scores}} → {stage: {score: mean_std}} over the
  seeds that have the stage."""
  stages = []
  for by_stage in per_seed.values():
    stages += [s for s in by_stage if s not in stages]
  table = {}
  for stage in stages:
    runs = [by_stage[stage] for by_stage in per_seed.values()
            if stage in by_stage]
    keys = list(runs[0])
    table[stage] = {k: mean_std([r.get(k) for r in runs]) for k in keys}
  return table


def gap_closed(teacher: float, student: float, distilled: float):
  """(distilled − student) / (teacher − student): the fraction of the
  teacher–student gap closed; None when the teacher is not better."""
  if None in (teacher, student, distilled) or teacher <= student:
    return None
  return (distilled - student) / (teacher - student)


# ----------------------------------------------------------------------------
# The report.


def _pm(s, digits=3) -> str:
  if s["mean"] is None:
    return "–"
  if s["std"] is None:
    return f"{s['mean']:.{digits}f}"
  return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown_table(table: dict, model_info: dict, class_names) -> list[str]:
  """The study's main table: one row per stage."""
  fg = list(class_names[1:])
  lines = [
      "| stage | model | params | GFLOPs | mean Dice | "
      + " | ".join(f"Dice {c}" for c in fg)
      + " | mIoU (fg) | mIoU (all) | pixel acc. | mean HD95 |",
      "|---|---|---:|---:|---:|" + "---:|" * len(fg) + "---:|" * 4]
  for stage, scores in table.items():
    info = model_info.get(stage, {})
    params = f"{info['params']:,}" if "params" in info else "–"
    gflops = f"{info['gflops']:.3f}" if "gflops" in info else "–"
    lines.append(
        f"| {stage} | {info.get('model', '–')} | {params} | {gflops} | "
        f"{_pm(scores['mean_dice'])} | "
        + " | ".join(_pm(scores[f"dice/{c}"]) for c in fg)
        + f" | {_pm(scores['mean_iou'])} | {_pm(scores['mean_iou_all'])} | "
        f"{_pm(scores['pixel_accuracy'])} | {_pm(scores['mean_hd95'], 2)} |")
  return lines


def _describe_model(model_cfg: dict) -> str:
  cfg = dict(model_cfg)
  name = cfg.pop("name")
  return name + (" (" + ", ".join(f"{k}={v}" for k, v in cfg.items()) + ")"
                 if cfg else "")


def _steps_text(config, num_train: int) -> str:
  steps = {n: train.stage_config(config, n)["steps"]
           for n in config.stage_order}
  epochs = lambda n: f"{n} ({n * config.batch_size / num_train:.2g} epochs)"
  if len(set(steps.values())) == 1:
    return epochs(next(iter(steps.values())))
  return ", ".join(f"{k} {epochs(v)}" for k, v in steps.items())


def provenance() -> dict:
  """Where and from which code this run's results come (study.json)."""
  device = jax.devices()[0]
  try:  # The code's commit, "-dirty" with uncommitted changes.
    code = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True,
        text=True, timeout=10, check=True,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    code = None
  return dict(date=datetime.date.today().isoformat(),
              devices=f"{jax.device_count()} × {device.platform} "
              f"({device.device_kind})",
              command=_command(sys.argv), code=code)


def _command(argv) -> str:
  """`argv` as a shell line to paste: a module run by `python -m` (whose
  argv[0] is its file) written so, the arguments quoted where a shell needs
  it (`--config.study.seeds='(0,)'`)."""
  if not argv:
    return ""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  head, path = list(argv[:1]), os.path.abspath(argv[0])
  if path.endswith(".py") and path.startswith(
      os.path.join(root, "kd_jax") + os.sep):
    module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    head = ["python", "-m", module.removesuffix(".__main__")]
  return shlex.join(head + list(argv[1:]))


def _header(p: dict, merged_from=None) -> list[str]:
  """study.md's first lines from `p` (`provenance()`, computed once per
  report for the page and study.json alike)."""
  lines = ["# Study report", "", f"- date: {p['date']}",
           f"- command: `{p['command']}`", f"- code: {p['code'] or '–'}"]
  if not merged_from:
    return lines + [f"- devices: {p['devices']}"]
  lines.append("- merged (`--merge`), nothing trained now; the seeds come "
               "from:")
  return lines + [f"  - seeds {src['seeds']}: {src['path']} ({src.get('date')}"
                  f", code {src.get('code') or '–'}, {src.get('devices')}, "
                  f"`{src.get('command')}`)" for src in merged_from]


def write_report(workdir, config, datasets, table, model_info, gaps,
                 per_seed, timings, figures_written, merged_from=None) -> dict:
  vols = datasets.volumes
  spacing = "mm (the volumes' spacing)" if vols.spacing is not None else (
      "pixels of the original slices (the data has no voxel spacing)")
  seeds = sorted(per_seed)
  p = provenance()
  lines = _header(p, merged_from) + [
      f"- data: {config.data.name}, {len(datasets.train)} training slices at "
      f"{config.data.image_size}²; evaluated on the {len(vols)} "
      + (f"{datasets.volumes_split} images, image by image (2-D data)"
         if set(vols.depths) == {1} else
         f"{datasets.volumes_split} volumes, whole 3D volumes")
      + (f", each slice on {config.eval_window}² sliding windows "
         "(`eval_window`)" if config.get("eval_window") else ""),
      f"- seeds: {seeds}; steps of batch {config.batch_size} per stage: "
      f"{_steps_text(config, len(datasets.train))}; optimizer {config.optimizer.name}, lr "
      f"{config.optimizer.lr}", "",
      "Mean ± sample standard deviation over seeds (ddof 1; no ± with one "
      "seed). Per volume: Dice, IoU and HD95 of each foreground class "
      "(strict convention: a class absent from the ground truth and the "
      "prediction is left out; missed or spurious classes score Dice 0 and "
      "HD95 the volume diagonal), then averaged over volumes, then over "
      f"classes. HD95 in {spacing}. Params and GFLOPs of the deployable "
      "model at batch 1 (XLA cost analysis, a multiply-add = 2 FLOPs).", "",
  ]
  lines += markdown_table(table, model_info, datasets.class_names)
  names = list(datasets.class_names)
  lines += ["", "IoU per class, background included (mIoU (all) is their "
            "mean; mIoU (fg) leaves out the background):", "",
            "| stage | " + " | ".join(f"IoU {c}" for c in names) + " |",
            "|---|" + "---:|" * len(names)]
  lines += [f"| {stage} | " + " | ".join(_pm(scores[f"iou/{c}"])
                                         for c in names) + " |"
            for stage, scores in table.items()]
  if gaps:
    lines += ["", "Fraction of the teacher–student gap in mean Dice closed "
              "by each distilled stage, (stage − student) / (teacher − "
              "student), on the means over seeds:", ""]
    for stage, g in gaps.items():
      t, s = table[TEACHER]["mean_dice"]["mean"], table[STUDENT][
          "mean_dice"]["mean"]
      d = table[stage]["mean_dice"]["mean"]
      lines.append(f"- {stage}: " + ("teacher not better than the student: "
                                     "no gap to close" if g is None else
                                     f"{100 * g:.0f} % ({s:.3f} → {d:.3f}, "
                                     f"teacher {t:.3f})"))
  if timings:
    lines += ["", "Wall time of the stages trained in this run (s): "
              + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
  if figures_written:
    lines += ["", f"Seed {seeds[0]}, one slice (the one with the most "
              f"{figures_written['class']}) of each of a few volumes spread "
              "over the set: image, ground truth, each stage's prediction.",
              "",
              "![predictions](predictions.png)", "",
              f"Saliency and Grad-CAM of class {figures_written['class']!r} "
              "(white: its ground-truth outline).", "",
              "![explanations](explanations.png)"]
  with open(os.path.join(workdir, "study.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  result = dict(
      data=config.data.name, volumes_split=datasets.volumes_split,
      class_names=list(datasets.class_names), seeds=seeds,
      table=table, models=model_info, gap_closed=gaps,
      per_seed={str(k): v for k, v in per_seed.items()},
      timings_s=timings, config=json.loads(config.to_json_best_effort()),
      **_origin(p, seeds, merged_from))
  with open(os.path.join(workdir, "study.json"), "w") as f:
    json.dump(_jsonable(result), f, indent=1)
  return result


# ----------------------------------------------------------------------------
# Running it.


def seed_config(config, seed: int):
  """The config of one seed of the study: the run seed, and every stage
  seed of its own (ensemble members) moved with it, `stage seed + 1000 ·
  seed`, so that the members differ from each other and from seed to seed."""
  c = copy.deepcopy(config)
  c.seed = int(seed)
  for name in c.stages:
    if c.stages[name].get("seed") is not None:
      c.stages[name].seed = int(c.stages[name].seed) + 1000 * int(seed)
  return c


def latest_step(stage_dir: str):
  folder = os.path.join(stage_dir, "checkpoints")
  steps = [int(d) for d in os.listdir(folder) if d.isdigit()] \
      if os.path.isdir(folder) else []
  return max(steps) if steps else None


def _variables(state, key):
  return {"params": state.params[key], "batch_stats": state.batch_stats[key]}


def _figure_slices(volumes, target: int, count: int, size):
  """For `count` volumes spread evenly over the source (so, on ACDC,
  different patients rather than two frames of one), the slice with the
  most `target` pixels, resized to `size`: (images, labels)."""
  from kd_jax.data import transforms
  images, labels = [], []
  count = min(count, len(volumes))
  for v in np.unique(np.linspace(0, len(volumes) - 1, count).round()):
    v = int(v)
    label = volumes[v]["label"]
    z = int(np.argmax((label == target).sum(axis=(1, 2))))
    ex = transforms.resize(volumes.get_slice(v, z), size)
    images.append(ex["image"])
    labels.append(ex["label"])
  return np.stack(images), np.stack(labels)


def _class_index(cam_class, class_names) -> int:
  names = list(class_names)
  if isinstance(cam_class, str) and not cam_class.isdigit():
    if cam_class not in names:
      raise ValueError(f"study.cam_class {cam_class!r}: choose one of "
                       f"{names} or an index")
    return names.index(cam_class)
  return int(cam_class)


def _trained_stages(config, workdir, datasets, mesh, timings, records):
  """Trains (or reuses) every stage of every seed of the study, in order;
  yields (seed index, seed, seed config, stage, stage folder, method,
  state) and records in `timings` the wall time of the stages trained now.
  `records` (restart, allow_config_change) goes to `kd_jax.record.resolve`:
  every seed's stages are compared with their run records before the
  first one trains."""
  cache = {}
  seeds = [(seed, seed_config(config, seed),
            os.path.join(workdir, f"seed{seed}"))
           for seed in config.study.seeds]
  for i, (_, cfg, seed_dir) in enumerate(seeds):
    if i == 0:
      train.validate(cfg, seed_dir, datasets, cache)
    record.resolve(cfg, seed_dir, dry_run=True, **records)
  for i, (seed, cfg, seed_dir) in enumerate(seeds):
    with contextlib.ExitStack() as locks:
      for stage in cfg.stage_order:
        locks.enter_context(train.stage_lock(os.path.join(seed_dir, stage),
                                             seed_dir))
      record.resolve(cfg, seed_dir, **records)
    for stage in cfg.stage_order:
      stage_dir = os.path.join(seed_dir, stage)
      done = (latest_step(stage_dir) or 0) >= int(
          train.stage_config(cfg, stage)["steps"])
      t = time.perf_counter()
      method, state = train.train_stage(
          cfg, stage, seed_dir,
          train.stage_datasets(cfg, stage, datasets, cache), mesh)
      if not done:
        timings[f"seed{seed}/{stage}"] = time.perf_counter() - t
      yield i, seed, cfg, stage, stage_dir, method, state


def fraction_config(config, fraction: float):
  """The study at one less-data `fraction`: every stage whose data sets a
  `train_fraction` (those that learn from the subset; the teacher, which
  trains on all of train, sets none) trains on `fraction` instead."""
  c = copy.deepcopy(config)
  for name in c.stages:
    stage_data = c.stages[name].get("data")
    if stage_data is not None and "train_fraction" in stage_data:
      stage_data.train_fraction = float(fraction)
  c.study.fractions = ()
  return c


def run_fractions(config, workdir: str, **records) -> dict:
  """`study.fractions`: the whole study at each less-data fraction, in
  `<workdir>/fraction<f>/` (each with its own study.md and figures), and
  `<workdir>/study.md` with every fraction's table in one page. A stage
  that trains alike at every fraction (the teacher, on all of train) trains
  at the first and is copied to the others (`_reuse_stages`)."""
  fractions = [float(f) for f in config.study.fractions]
  if not fractions or any(not 0 < f <= 1 for f in fractions):
    raise train.ConfigError(f"study.fractions={fractions}: fractions in "
                            "(0, 1] of the training split, or () for one")
  if not any("train_fraction" in (config.stages[n].get("data") or {})
             for n in config.stage_order):
    raise train.ConfigError("study.fractions: no stage sets "
                            "data.train_fraction, so every fraction would "
                            "train the same study; set it on the stages "
                            "that learn from the subset")
  results, done = {}, []
  for f in fractions:
    sub, cfg = os.path.join(workdir, f"fraction{f:g}"), fraction_config(
        config, f)
    for earlier, earlier_dir in done:
      _reuse_stages(earlier, earlier_dir, cfg, sub)
    results[f] = run(cfg, sub, **records)
    done.append((cfg, sub))
  _fractions_page(workdir, fractions)
  return results


def _reuse_stages(done_config, done_dir, config, workdir) -> None:
  """Copies into `workdir` every finished stage of the study in `done_dir`
  that `config` would train identically (equal `record.defining` for that
  seed: the teacher, which trains on all of train at every fraction), so a
  sweep trains it once. A stage already in `workdir` is left as it is."""
  for seed in config.study.seeds:
    old, new = seed_config(done_config, seed), seed_config(config, seed)
    for stage in config.stage_order:
      src = os.path.join(done_dir, f"seed{seed}", stage)
      dst = os.path.join(workdir, f"seed{seed}", stage)
      if (os.path.exists(dst) or stage not in old.stages
          or (latest_step(src) or 0) < int(
              train.stage_config(new, stage)["steps"])
          or record.defining(old, stage) != record.defining(new, stage)):
        continue
      logging.info("seed %d %s: the same stage as %s, copied (not trained "
                   "again)", seed, stage, src)
      shutil.copytree(src, dst, ignore=shutil.ignore_patterns(
          train.LOCK_FILE))


def _fractions_page(workdir: str, fractions) -> None:
  """`<workdir>/study.md`: every fraction's tables in one page."""
  lines = ["# Study over data fractions", ""]
  for f in fractions:
    sub = os.path.join(workdir, f"fraction{f:g}")
    with open(os.path.join(sub, "study.md")) as page:
      body = page.read().splitlines()
    # From the first table on: the tables and their notes, not the header.
    table = body[next((i for i, l in enumerate(body) if l.startswith("|")),
                      len(body)):]
    lines += [f"## {f:g} of the training split ({sub}/study.md)", "",
              *table, ""]
  with open(os.path.join(workdir, "study.md"), "w") as page:
    page.write("\n".join(lines))


def run(config, workdir: str, **records) -> dict:
  """Trains (or reuses) every stage for every seed, evaluates, reports.
  `records`: `restart` / `allow_config_change` (`kd_jax.record.resolve`)."""
  from kd_jax.evaluate import explain, figures  # matplotlib only here

  if config.study.get("fractions"):
    return run_fractions(config, workdir, **records)

  try:
    datasets = data.build(config.data)
  except (ValueError, FileNotFoundError) as e:
    raise train.ConfigError(f"data: {e}") from None
  heads = train.run_heads(config, datasets)
  if not tasks.is_segmentation(heads):
    return run_heads(config, workdir, datasets, heads, **records)
  datasets = _with_volumes(config, datasets)
  study = config.study
  try:
    target = _class_index(study.get("cam_class", 1), datasets.class_names)
  except ValueError as e:
    raise train.ConfigError(str(e)) from None
  seeds = list(study.seeds)
  if not seeds:
    raise train.ConfigError("study.seeds is empty")
  mesh = train.mesh_from_config(config)
  size = (int(config.data.image_size),) * 2
  input_shape = (1, *size, datasets.train[0]["image"].shape[-1])
  os.makedirs(workdir, exist_ok=True)
  per_seed, timings, model_info, fig_models = {}, {}, {}, {}
  for i, seed, cfg, stage, stage_dir, method, state in _trained_stages(
      config, workdir, datasets, mesh, timings, records):
    per_seed.setdefault(seed, {})
    predictors = {stage: (train.eval_predict(method.predict, cfg),
                          method.model)}
    if hasattr(method, "predict_peer"):
      predictors[f"{stage}_peer"] = (train.eval_predict(method.predict_peer,
                                                        cfg), method.peer)
    for name, (predict, model) in predictors.items():
      fn = jax.jit(predict)
      predict_fn = lambda x, f=fn, s=state: jnp.argmax(
          f(s.params, s.batch_stats, x), -1)
      result = _cached_eval(
          os.path.join(stage_dir, "volume_eval.json" if name == stage
                       else f"volume_eval_{name}.json"), int(state.step),
          lambda p=predict_fn: evaluate_volumes(
              p, datasets.volumes, datasets.num_classes, size,
              cfg.batch_size), int(cfg.get("eval_window", 0)))
      per_seed[seed][name] = flat_scores(result["summary"],
                                         datasets.class_names)
      mean_dice = result["summary"]["mean_dice"]
      logging.info("seed %d %s: mean Dice %s over %d volumes", seed, name,
                   "–" if mean_dice is None else f"{mean_dice:.4f}",
                   len(result["per_volume"]))
      if name not in model_info:
        s = models.summary(model, input_shape)
        model_cfg = (cfg.stages[stage].model if name == stage
                     else cfg.stages[stage].peer).to_dict()
        model_info[name] = dict(model=_describe_model(model_cfg),
                                params=int(s["params"]),
                                gflops=float(s["flops"]) / 1e9)
      if i == 0:
        key = method.model_key if name == stage else "peer"
        fig_models[name] = (model, _variables(state, key), predict_fn)

  table = aggregate(per_seed)
  gaps = _gaps(table)

  figures_written = {}
  if study.get("num_figure_examples", 4) > 0:
    images, labels = _figure_slices(datasets.volumes, target,
                                    study.get("num_figure_examples", 4), size)
    figures.segmentation_grid(
        os.path.join(workdir, "predictions.png"), images, labels,
        {n: np.asarray(p(images)) for n, (_, _, p) in fig_models.items()},
        datasets.num_classes, class_names=datasets.class_names)
    maps = {}
    class_name = datasets.class_names[target]
    for name in study.get("explain_stages", ()):
      if name not in fig_models:
        continue
      model, variables, _ = fig_models[name]
      feature = explain.model_cam_feature(model, images.shape,
                                          study.get("cam_feature", ""))
      sal, cam = explain.explainer(model, feature, target)(variables, images)
      maps[f"{name}\nsaliency"] = np.asarray(sal)
      maps[f"{name}\nGrad-CAM {feature}"] = np.asarray(cam)
    if maps:
      figures.explanation_grid(os.path.join(workdir, "explanations.png"),
                               images, maps, masks=labels == target)
    figures_written = {"class": class_name}
  return write_report(workdir, config, datasets, table, model_info, gaps,
                      per_seed, timings, figures_written)


def _with_volumes(config, datasets):
  """`datasets`, with each validation image a one-slice volume where the
  data has no volumes (2-D data: DRIVE)."""
  if datasets.volumes is not None:
    return datasets
  return dataclasses.replace(datasets, volumes_split="val",
                             volumes=sources.images_as_volumes(
                                 datasets.val, datasets.num_classes,
                                 class_names=datasets.class_names,
                                 name=f"{config.data.name} val"))


def _gaps(table: dict) -> dict:
  """The gap in mean Dice each distilled stage closes (`gap_closed`)."""
  if TEACHER not in table or STUDENT not in table:
    return {}
  t = table[TEACHER]["mean_dice"]["mean"]
  s = table[STUDENT]["mean_dice"]["mean"]
  # The distilled students only (a mutual peer is the teacher's model).
  return {k: gap_closed(t, s, v["mean_dice"]["mean"])
          for k, v in table.items()
          if k not in (TEACHER, STUDENT) and not k.endswith("_peer")}


def run_heads(config, workdir: str, datasets, heads, **records) -> dict:
  """The study of a run whose heads are not one segmentation map (the
  multi-task fundus recipe): every stage of every seed trained (or reused),
  scored on the test split by `kd_jax.tasks` (cached beside the checkpoint
  in `head_eval.json`), mean ± std over seeds of every scalar score."""
  seeds = list(config.study.seeds)
  if not seeds:
    raise train.ConfigError("study.seeds is empty")
  reference = config.study.get("fidelity")
  if reference and (reference not in config.stage_order
                    or not tasks.is_single(heads)):
    raise train.ConfigError(
        f"study.fidelity={reference!r}: name a stage of stage_order "
        f"{list(config.stage_order)} (the one the others are scored against) "
        "in a run with one classifier head, or drop it")
  mesh = train.mesh_from_config(config)
  example = datasets.train[0]["image"]
  os.makedirs(workdir, exist_ok=True)
  per_seed, timings, model_info, references = {}, {}, {}, {}
  for _, seed, cfg, stage, stage_dir, method, state in _trained_stages(
      config, workdir, datasets, mesh, timings, records):
    per_seed.setdefault(seed, {})
    step = train.make_eval_step(method, heads, mesh)
    result = _cached_eval(
        os.path.join(stage_dir, "head_eval.json"), int(state.step),
        lambda st=state, e=step: _jsonable(train.evaluate(
            e, st, datasets.test, cfg.batch_size, mesh, heads)))
    per_seed[seed][stage] = {k: v for k, v in result.items()
                             if k != "step" and not isinstance(v, list)}
    if config.study.get("fidelity"):  # Post-hoc fidelity to a stage.
      per_seed[seed][stage].update(_fidelity(
          config.study.fidelity, stage, method, state, datasets.test,
          cfg.batch_size, datasets.num_classes,
          references.setdefault(seed, {})))
    logging.info("seed %d %s: %s", seed, stage,
                 tasks.headline(heads, {k: np.nan if v is None else v
                                        for k, v in per_seed[seed][
                                            stage].items()}))
    if stage not in model_info:
      # What is deployed: an explain stage's explainer + student together.
      deployed = getattr(method, "deployed", method.model)
      summ = models.summary(deployed, (1,) + example.shape)
      name = _describe_model(cfg.stages[stage].model.to_dict())
      if deployed is not method.model:
        explainer = cfg.stages[stage].get("explainer") or {}
        name = (_describe_model(dict(explainer.get("model") or dict(
            name="medtex_explainer"))) + " + " + name)
      model_info[stage] = dict(model=name, params=int(summ["params"]),
                               gflops=float(summ["flops"]) / 1e9)
  table = aggregate(per_seed)
  lesions = None
  if config.study.get("lesion_iou"):  # MED-TEX's explanation read-out.
    from kd_jax.evaluate import lesion_iou  # pylint: disable=g-import-not-at-top
    lesions = lesion_iou.study(config, workdir, seeds)
  return write_heads_report(workdir, config, datasets, heads, table,
                            model_info, per_seed, timings, lesions)


def _origin(p: dict, seeds, merged_from) -> dict:
  """study.json's record of where its seeds were run: this run's
  provenance `p`, or the sources of a merge."""
  if merged_from:
    return dict(merged_from=merged_from)
  return dict(provenance=dict(p, seeds=list(seeds)))


def _comparable(config_json: dict) -> dict:
  """A saved config with what may differ between the parts of one study
  left out: the run seed and the seeds of the study."""
  flat = {}
  record._flatten(config_json, "", flat)  # pylint: disable=protected-access
  return {k: v for k, v in flat.items()
          if k not in ("seed", "study.seeds")}


def _load_study(path: str) -> dict:
  if os.path.isdir(path):
    path = os.path.join(path, "study.json")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise train.ConfigError(f"--merge {path}: not a readable study.json "
                            f"({type(e).__name__}); name the study.json of "
                            "a finished study (or its folder)") from None
  if "per_seed" not in saved or "config" not in saved:
    raise train.ConfigError(f"--merge {path}: no per_seed / config: not a "
                            "study.json written by kd_jax.study")
  saved["path"] = path
  return saved


def _merge_one(config, workdir: str, studies) -> dict:
  want = _comparable(json.loads(config.to_json_best_effort()))
  owner, merged_from = {}, []
  for saved in studies:
    got = _comparable(saved["config"])
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff:
      raise train.ConfigError(
          f"--merge {saved['path']}: not a run of this config (config."
          f"{diff[0]}: {got.get(diff[0])!r} there, {want.get(diff[0])!r} "
          f"here; {len(diff)} key(s) differ); merge only the seeds of one "
          "study")
    for seed in saved["per_seed"]:
      if seed in owner:
        raise train.ConfigError(
            f"--merge: seed {seed} is in both {owner[seed]} and "
            f"{saved['path']}; give each seed once")
      owner[seed] = saved["path"]
    # A merged study.json names its own sources: keep them.
    merged_from += saved.get("merged_from") or [
        dict(saved.get("provenance", {}), path=saved["path"],
             seeds=sorted(int(k) for k in saved["per_seed"]))]
  per_seed = {int(k): v for saved in studies
              for k, v in saved["per_seed"].items()}
  per_seed = dict(sorted(per_seed.items()))
  model_info = {}
  for saved in studies:
    for stage, info in saved["models"].items():
      model_info.setdefault(stage, info)
  table = aggregate(per_seed)
  os.makedirs(workdir, exist_ok=True)
  try:
    datasets = data.build(config.data)
  except (ValueError, FileNotFoundError) as e:
    raise train.ConfigError(f"data: {e}") from None
  heads = train.run_heads(config, datasets)
  if tasks.is_segmentation(heads):
    return write_report(workdir, config, _with_volumes(config, datasets),
                        table, model_info, _gaps(table), per_seed, {}, {},
                        merged_from=merged_from)
  lesions = None
  if config.study.get("lesion_iou"):
    from kd_jax.evaluate import lesion_iou  # pylint: disable=g-import-not-at-top
    parts = []
    for saved in studies:
      got = saved.get("lesion_iou") or {}
      if "per_seed" not in got:
        raise train.ConfigError(f"--merge {saved['path']}: no per-seed "
                                "lesion scores (study.lesion_iou): rerun "
                                "that study's command to write them")
      # The overlays stay in the part's folder: point there.
      overlays = os.path.join(os.path.dirname(saved["path"]),
                              got["figures"]["overlays"])
      parts += [(int(k), dict(got, scores=v, overlays=overlays))
                for k, v in got["per_seed"].items()]
    parts.sort(key=lambda p: p[0])
    lesions = lesion_iou.write_combined(config, workdir,
                                        [k for k, _ in parts],
                                        [r for _, r in parts])
  return write_heads_report(workdir, config, datasets, heads, table,
                            model_info, per_seed, {}, lesions,
                            merged_from=merged_from)


def merge(config, workdir: str, paths) -> dict:
  """`kd_jax.study --merge`: the table of one study whose seeds ran apart
  (other machines, other days), from their study.json files; nothing is
  trained. Each must be a run of `config` (equal but for `seed` and
  `study.seeds`), each seed in one file only. With `study.fractions`, each
  file is matched to its fraction and every fraction merged in
  `<workdir>/fraction<f>/`. study.md / study.json name every source (its
  path, seeds, date, code, devices and command). lesion_iou.png is redrawn
  over all seeds; predictions.png and explanations.png are not (the
  sources have them)."""
  studies = [_load_study(p) for p in paths]
  if not studies:
    raise train.ConfigError("--merge: name at least one study.json")
  own = os.path.join(workdir, "study.json")
  if os.path.isfile(own):
    with open(own) as f:
      merged_before = "merged_from" in json.load(f)
    if not merged_before:  # A study's own report: never overwritten.
      raise train.ConfigError(f"--workdir {workdir} holds a study's own "
                              "study.json; merge into a new folder")
  fractions = [float(f) for f in config.study.get("fractions") or ()]
  if not fractions:
    return _merge_one(config, workdir, studies)
  wants = {f: _comparable(json.loads(
      fraction_config(config, f).to_json_best_effort())) for f in fractions}
  match = [next((f for f in fractions if _comparable(s["config"]) == wants[f]),
                None) for s in studies]
  if None in match:
    raise train.ConfigError(
        f"--merge {studies[match.index(None)]['path']}: a run of none of "
        f"the fractions {fractions} of this config")
  results = {}
  for f in fractions:
    mine = [s for s, m in zip(studies, match) if m == f]
    if mine:
      results[f] = _merge_one(fraction_config(config, f),
                              os.path.join(workdir, f"fraction{f:g}"), mine)
  _fractions_page(workdir, list(results))
  return results


def predictions(method, state, source, batch_size: int):
  """(predicted class, label) over `source` of a one-classifier run: the
  argmax of `method.predict` (an explain stage: the student on Θ ⊙ X)."""
  predict = jax.jit(method.predict)
  pred, label = [], []
  for i in range(0, len(source), batch_size):
    batch = [source[j] for j in range(i, min(i + batch_size, len(source)))]
    logits = predict(state.params, state.batch_stats,
                     jnp.asarray(np.stack([e["image"] for e in batch])))
    pred.append(np.asarray(jnp.argmax(logits, -1)))
    label.append(np.asarray([e["label"] for e in batch]))
  return np.concatenate(pred), np.concatenate(label)


def _fidelity(reference: str, stage: str, method, state, source,
              batch_size: int, num_classes: int, seen: dict) -> dict:
  """`stage`'s post-hoc fidelity to the `reference` stage (MED-TEX's
  post-hoc accuracy / F1, `metrics.fidelity`; its predictions kept in
  `seen`, as the reference trains first) and, for a binary task, its own
  positive-class F1 against the labels ("f1_positive")."""
  pred, label = predictions(method, state, source, batch_size)
  out = {}
  if num_classes == 2:
    out["f1_positive"] = float(metrics.f1_scores(pred, label, 2)[1])
  if stage == reference:
    seen[reference] = pred
  else:
    out.update(metrics.fidelity(pred, seen[reference], num_classes))
  return out


def _fidelity_text(config) -> str:
  reference = config.study.get("fidelity")
  if not reference:
    return ""
  return (f" fidelity_*: post-hoc agreement of each stage's predictions "
          f"(an explain stage: the student on Θ ⊙ X) with the "
          f"{reference!r} stage's on the same images (MED-TEX's post-hoc "
          "accuracy / F1): fidelity_f1_positive is the F1 of the positive "
          "class (1), fidelity_f1 the macro F1 over both classes; "
          "f1_positive is the stage's own positive-class F1 against the "
          "labels.")


def _lesion_lines(lesions) -> list[str]:
  """study.md's top-K lesion overlap section (`lesion_iou.study`)."""
  ks = lesions["k"]
  lines = ["", "Top-K overlap of each explanation with IDRiD's lesion masks "
           f"(MA ∪ HE ∪ EX ∪ SE; {lesions['num_images']} lesion images, "
           f"{lesions['also_grading_images']} of them also grading images), "
           "mean ± sample std over seeds; K = k·32·32 pixels of 224² scaled "
           f"to the input ({', '.join(map(str, lesions['num_pixels']))} "
           "pixels); bars: lesion_iou.png."]
  for form, text in lesions["forms"].items():
    lines += ["", f"{form}: {text}", "",
              "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
              "|---|" + "---:|" * len(ks)]
    for method, scores in lesions["scores"].items():
      s = scores[form]
      lines.append(f"| {method} | " + " | ".join(
          _pm(dict(mean=m, std=d))
          for m, d in zip(s["mean"], s["std"])) + " |")
  return lines


def write_heads_report(workdir, config, datasets, heads, table, model_info,
                       per_seed, timings, lesions=None,
                       merged_from=None) -> dict:
  """study.md / study.json of `run_heads`."""
  seeds = sorted(per_seed)
  columns = list(config.study.get("columns") or
                 [h.key(k) for h in heads.values()
                  for k in tasks.HEADLINE[h.kind]])
  split = ("val split (the data set has no separate test split here)"
           if datasets.test_is_val else "test split")
  p = provenance()
  lines = _header(p, merged_from) + [
      f"- data: {datasets.description}",
      f"- evaluated on the {len(datasets.test)} images of the {split}",
      f"- seeds: {seeds}; steps of batch {config.batch_size} per stage: "
      f"{_steps_text(config, len(datasets.train))}; optimizer "
      f"{config.optimizer.name}, lr {config.optimizer.lr}", "",
      "Mean ± sample standard deviation over seeds (ddof 1; no ± with one "
      "seed). Classification heads: accuracy, macro F1, one-vs-rest AUC, "
      "quadratic-weighted kappa; landmark heads: mean and median error in "
      "pixels of the original image. Params and GFLOPs of the deployable "
      "model at batch 1 (XLA cost analysis, a multiply-add = 2 FLOPs)."
      + _fidelity_text(config), "",
      "| stage | model | params | GFLOPs | " + " | ".join(columns) + " |",
      "|---|---|---:|---:|" + "---:|" * len(columns)]
  for stage, scores in table.items():
    info = model_info.get(stage, {})
    lines.append(
        f"| {stage} | {info.get('model', '–')} | {info.get('params', 0):,} | "
        f"{info.get('gflops', 0):.3f} | " + " | ".join(
            _pm(scores[c], 1 if c.endswith("_px") else 3)
            if c in scores else "–" for c in columns) + " |")
  if lesions:
    lines += _lesion_lines(lesions)
  if timings:
    lines += ["", "Wall time of the stages trained in this run (s): "
              + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
  with open(os.path.join(workdir, "study.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  result = dict(
      data=config.data.name, heads={str(n): h.kind for n, h in heads.items()},
      seeds=seeds, table=table, models=model_info,
      per_seed={str(k): v for k, v in per_seed.items()}, timings_s=timings,
      lesion_iou=lesions,
      config=json.loads(config.to_json_best_effort()),
      **_origin(p, seeds, merged_from))
  with open(os.path.join(workdir, "study.json"), "w") as f:
    json.dump(_jsonable(result), f, indent=1)
  return result


def main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  if "study" not in config:
    sys.exit("error: the config has no `study` section (seeds, figures); "
             "use configs/distillo.py:study,<preset> or add one")
  try:
    paths = getattr(flags.FLAGS, "merge", None)
    if paths:
      merge(config, flags.FLAGS.workdir, paths)
    else:
      run(config, flags.FLAGS.workdir, restart=flags.FLAGS.restart,
          allow_config_change=flags.FLAGS.allow_config_change)
  except (train.ConfigError, train.TrainingDiverged) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {os.path.join(flags.FLAGS.workdir, 'study.md')}")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_list(
      "merge", None, "study.json files (or their folders) of runs of this "
      "config with other seeds: write the table over all their seeds in "
      "--workdir, training nothing (`merge`).")
  # --config (with --config.<key> overrides) and --workdir exactly as
  # training defines and parses them.
  from kd_jax import main as train_main
  app.run(main, flags_parser=train_main.parse_flags)
