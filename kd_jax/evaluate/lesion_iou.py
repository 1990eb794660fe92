"""Top-K overlap of explanations with IDRiD's lesion masks (MED-TEX's
read-out), and the overlap of IDRiD's two image sets.

    python -m kd_jax.evaluate.lesion_iou \
        --config=configs/medtex/medtex.py:cpu,0.25,idrid \
        --workdir=runs/medtex_idrid_25/seed0 [--stages=teacher,med_tex]

For each chosen stage (default: every stage with a checkpoint) of a run of
a classifier, the explanation maps of IDRiD part A's 54 lesion images
(segmentation_512_train.npz, resized from 512² to the model's input size):

  a stage whose deployed model       its feature "mask" (mean over
  returns a "mask" (MED-TEX, MED-EX, channels): Θ, or the attention /
  attention, L2X)                    selection mask ("theta" in the JSON);
  any other stage (the teacher, ...)  vanilla saliency and Grad-CAM of the
                                      positive class (class 1) on its last
                                      feature map (`kd_jax.evaluate.explain`).

The lesion mask is the union of MA, HE, EX and SE (the optic disc is
anatomy, not a lesion). The overlap of the top-K pixels of each map with it
is scored in both forms (`explain.topk_iou`): "jaccard" |A∩B|/|A∪B| and
"dice" 2|A∩B|/(|A|+|B|), the one MED-TEX's paper prints as its "IoU". K is
the paper's k·32·32 pixels of a 224×224 image, k = 1…6, scaled by the
input's area: K = round(k·32·32·H·W / 224²), so K covers the same share of
the image at every input size (2.0 % … 12.2 %). Scores are averaged over
the lesion images with a non-empty mask. "chance/random" scores a uniform
random map (seed 0): the overlap of K pixels drawn at random, the level an
explanation must beat to say anything about the lesions.

Outputs, in `<workdir>/lesion_iou/`: lesion_iou.json (per method and form,
the mean per k; K in pixels; which lesion images are also grading images),
lesion_iou.png (grouped bars per k, one bar per method; both forms) and
overlays.png (a few lesion images: each map over the image with the lesion
outline).

Overlap of the two parts. IDRiD's parts A (segmentation) and B (grading) are
released as separate sets, but the shared files are not disjoint:
`part_overlap` finds, for 42 of part A's 54 images, a grading image with the
same crop box whose 32×32 block means differ by 0.04–0.33 grey levels on
average (the next-nearest grading image differs by 3 or more; unrelated
fundus images by ~19): the same photographs, resampled. So a referable-DR
model trained on IDRiD grading has seen most lesion images in training (the
ones in its train split), and its explanation IoU there is not on unseen
images; `lesion_iou.json` lists them. Models trained on PALM saw none.
"""
from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import data, export, train
from kd_jax.data import sources
from kd_jax.evaluate import explain, figures

KS = (1, 2, 3, 4, 5, 6)
PAPER_SIZE = 224
LESIONS = ("MA", "HE", "EX", "SE")
POSITIVE = 1
# The chance reference: a uniform random map of this seed ("chance/random").
CHANCE = "chance/random"
CHANCE_SEED = 0
# lesion_iou.json's layout; `study` scores a seed again when it differs.
FORMAT = 2
# Mean absolute difference (grey levels, 0-255) of 32×32 block means below
# which two fundus images count as one photograph.
SAME_PHOTO_TOL = 1.0


def num_pixels(k: int, hw) -> int:
  """K of MED-TEX's k·32·32 on 224², scaled to an (H, W) map's area."""
  return int(round(k * 32 * 32 * hw[0] * hw[1] / PAPER_SIZE ** 2))


def topk_scores(maps: np.ndarray, lesions: np.ndarray, ks=KS) -> dict:
  """{form: [mean over images with a lesion of the top-K overlap, per k]}
  of (N, H, W) `maps` against (N, H, W) boolean `lesions`."""
  maps, lesions = np.asarray(maps), np.asarray(lesions) > 0
  if maps.shape != lesions.shape:
    raise ValueError(f"maps {maps.shape} and lesion masks {lesions.shape} "
                     "differ in shape")
  keep = lesions.any(axis=(1, 2))
  if not keep.any():
    raise ValueError("no lesion mask has a lesion pixel: nothing to score")
  return {form: [float(np.mean(explain.topk_iou(
      maps[keep], lesions[keep], num_pixels=num_pixels(k, maps.shape[1:]),
      form=form))) for k in ks] for form in explain.TOPK_FORMS}


def _block_means(images: np.ndarray, side: int = 32) -> np.ndarray:
  n, h, w, c = images.shape
  f = h // side
  x = images[:, :f * side, :f * side].reshape(n, side, f, side, f, c)
  return x.mean((2, 4), dtype=np.float64).reshape(n, -1)


def part_overlap(data_dir=None, tol: float = SAME_PHOTO_TOL) -> np.ndarray:
  """(54,) index of the IDRiD grading image that is the same photograph as
  each lesion image (part A), or -1: the one whose 32×32 block means differ
  from it by less than `tol` grey levels on average."""
  root = sources.resolve_data_dir(data_dir) / "idrid"
  a = sources.load_npz(root / "segmentation_512_train.npz",
                       ["train_images"])["train_images"]
  b = sources.load_npz(root / "grading_256_train.npz",
                       ["train_images"])["train_images"]
  return match_images(a, b, tol)


def match_images(a: np.ndarray, b: np.ndarray,
                 tol: float = SAME_PHOTO_TOL) -> np.ndarray:
  """For each uint8 image of `a` (N, H, W, C), the index of the image of
  `b` whose 32×32 block means are within `tol` (mean absolute difference),
  or -1."""
  ma, mb = _block_means(a), _block_means(b)
  dist = np.stack([np.abs(mb - row).mean(-1) for row in ma])
  best = dist.argmin(-1)
  return np.where(dist[np.arange(len(a)), best] < tol, best, -1)


def _batched(fn, images: np.ndarray, batch: int):
  """`fn` over fixed-size batches (the last padded): one compile."""
  out = []
  for i in range(0, len(images), batch):
    chunk = images[i:i + batch]
    pad = batch - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    got = jax.device_get(fn(jnp.asarray(chunk)))
    out.append(jax.tree.map(lambda a: np.asarray(a)[:batch - pad], got))
  return jax.tree.map(lambda *a: np.concatenate(a), *out)


def stage_maps(method, variables, images: np.ndarray, batch: int = 16,
               cam_feature: str = "") -> dict:
  """{method name: (N, H, W) explanation} of one restored stage: its
  feature "mask" (Θ of an explain stage, the mask of the attention and L2X
  students) when its deployed model returns one, else saliency and Grad-CAM
  of class 1."""
  module = export.deployed_module(method)
  features = jax.eval_shape(lambda x: module.apply(variables, x,
                                                   train=False)[1],
                            images[:1])
  if "mask" in features:
    fn = jax.jit(lambda x: module.apply(variables, x, train=False)[1][
        "mask"].astype(jnp.float32).mean(-1))
    return {"theta": _batched(fn, images, batch)}
  feature = explain.model_cam_feature(module, (1,) + images.shape[1:],
                                      cam_feature)
  fn = explain.explainer(module, feature, POSITIVE)
  sal, cam = _batched(lambda x: fn(variables, x), images, batch)
  return {"saliency": sal, "grad_cam": cam}


@functools.lru_cache(maxsize=2)
def lesion_set(root, hw: tuple, max_images: int = 0):
  """(images float (N, H, W, 3) at `hw`, lesion masks bool (N, H, W),
  chance scores, the number of them that are also grading images or None)
  of IDRiD part A. Cached: the seeds of a study share one load (treat the
  arrays as read-only)."""
  src = sources.idrid_lesions(root, lesions=LESIONS, image_size=hw,
                              max_examples=max_images or None)
  examples = [src[i] for i in range(len(src))]
  images = np.stack([e["image"] for e in examples]).astype(np.float32)
  masks = np.stack([e["label"] for e in examples]) > 0
  # What K pixels drawn at random overlap, to read the others against.
  chance = topk_scores(
      np.random.default_rng(CHANCE_SEED).random(masks.shape), masks)
  overlap = part_overlap(root) if not max_images else None
  also = None if overlap is None else int((overlap >= 0).sum())
  return images, masks, chance, also


def evaluate(config, workdir: str, stages=None, max_images: int = 0,
             num_figure_examples: int = 4) -> dict:
  """Writes `<workdir>/lesion_iou/` (module docstring); returns the JSON."""
  from kd_jax.evaluate import __main__ as cli
  from kd_jax import study  # pylint: disable=g-import-not-at-top
  names = cli._stages(config, workdir, stages)  # pylint: disable=protected-access
  steps = {n: study.latest_step(os.path.join(workdir, n)) for n in names}
  datasets = data.build(config.data)
  shape = np.asarray(datasets.val[0]["image"]).shape
  if shape[-1] != 3:
    raise ValueError(f"the run's images have {shape[-1]} channels; "
                     "the lesion images are RGB: use an RGB run")
  images, lesions, chance, also = lesion_set(
      config.data.get("root") or None, tuple(shape[:2]), max_images)
  heads = train.run_heads(config, datasets)
  maps = {}
  for name in names:
    method, variables = export.restore_stage(config, workdir, name, datasets,
                                             heads)
    for kind, m in stage_maps(method, variables, images,
                              config.batch_size).items():
      maps[f"{name}/{kind}"] = m
  scores = {k: topk_scores(m, lesions) for k, m in maps.items()}
  scores[CHANCE] = chance
  out_dir = os.path.join(workdir, "lesion_iou")
  os.makedirs(out_dir, exist_ok=True)
  figures.topk_bars(os.path.join(out_dir, "lesion_iou.png"), KS, scores)
  shown = slice(0, num_figure_examples)
  figures.explanation_grid(os.path.join(out_dir, "overlays.png"),
                           images[shown], {k: m[shown]
                                           for k, m in maps.items()},
                           masks=lesions[shown])
  report = dict(
      format=FORMAT, workdir=os.path.abspath(workdir),
      lesions=list(LESIONS),
      num_images=int(lesions.any(axis=(1, 2)).sum()),
      input_hw=list(images.shape[1:3]), k=list(KS),
      num_pixels=[num_pixels(k, images.shape[1:3]) for k in KS],
      forms=dict(jaccard="|A∩B| / |A∪B|",
                 dice="2|A∩B| / (|A|+|B|) (MED-TEX's printed 'IoU')"),
      scores=scores, steps=steps,
      also_grading_images=also,
      figures=dict(bars="lesion_iou.png", overlays="overlays.png"))
  with open(os.path.join(out_dir, "lesion_iou.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report


def combine(reports) -> dict:
  """{method: {form: {"mean", "std"}: per k}} over the `reports` of several
  seeds (`evaluate`'s JSON), each value by `kd_jax.study.mean_std` (sample
  std, None for one seed); methods present in every report."""
  from kd_jax import study as study_lib  # pylint: disable=g-import-not-at-top
  methods = [m for m in reports[0]["scores"]
             if all(m in r["scores"] for r in reports)]
  out = {}
  for m in methods:
    out[m] = {}
    for form in reports[0]["scores"][m]:
      per_k = [study_lib.mean_std(v) for v in
               zip(*(r["scores"][m][form] for r in reports))]
      out[m][form] = {key: [s[key] for s in per_k] for key in ("mean", "std")}
  return out


def study(config, workdir: str, seeds) -> dict:
  """The read-out over a study's seeds (`kd_jax.study` with
  `study.lesion_iou`): `evaluate` in every `<workdir>/seed<k>` (its JSON
  reused while every stage's checkpoint step is the one it scored), then
  mean ± std over seeds (`combine`) in `<workdir>/lesion_iou.json` and
  `lesion_iou.png` (bars with ± 1 std: the `study.fidelity` reference's
  maps, every stage's own mask and chance). Returns that JSON."""
  from kd_jax import study as study_lib  # pylint: disable=g-import-not-at-top
  reports = []
  for seed in seeds:
    seed_dir = os.path.join(workdir, f"seed{seed}")
    path = os.path.join(seed_dir, "lesion_iou", "lesion_iou.json")
    report = None
    if os.path.isfile(path):
      with open(path) as f:
        report = json.load(f)
      steps = report.get("steps")
      if report.get("format") != FORMAT or not steps or any(
          study_lib.latest_step(os.path.join(seed_dir, n)) != s
          for n, s in steps.items()):
        report = None  # A stage trained on since: score it again.
    reports.append(report or evaluate(study_lib.seed_config(config, seed),
                                      seed_dir))
  return write_combined(config, workdir, seeds, reports)


def write_combined(config, workdir: str, seeds, reports) -> dict:
  """`<workdir>/lesion_iou.json` and `lesion_iou.png` over the seeds'
  `reports` (`evaluate`'s JSONs; `kd_jax.study --merge` passes those a
  study kept in its `per_seed`); returns the JSON."""
  combined = combine(reports)
  # The bars: the reference stage's saliency and Grad-CAM (MED-TEX's
  # baselines), every learnt mask and chance; study.md tabulates them all.
  reference = config.study.get("fidelity")
  bars = {m: c for m, c in combined.items()
          if not reference or m.startswith(f"{reference}/")
          or m.endswith("/theta") or m == CHANCE}
  figures.topk_bars(
      os.path.join(workdir, "lesion_iou.png"), KS,
      {m: {f: v["mean"] for f, v in c.items()} for m, c in bars.items()},
      errors=None if len(reports) < 2 else {
          m: {f: v["std"] for f, v in c.items()} for m, c in bars.items()})
  first = reports[0]
  result = dict(seeds=list(seeds), k=list(KS),
                num_pixels=first["num_pixels"], input_hw=first["input_hw"],
                num_images=first["num_images"],
                also_grading_images=first["also_grading_images"],
                forms=first["forms"], scores=combined,
                per_seed={str(s): r["scores"] for s, r in zip(seeds, reports)},
                figures=dict(bars="lesion_iou.png", overlays=first.get(
                    "overlays", os.path.join(f"seed{seeds[0]}", "lesion_iou",
                                             "overlays.png"))))
  with open(os.path.join(workdir, "lesion_iou.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


def main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    report = evaluate(f.config, f.workdir, stages=f.stages,
                      max_images=f.max_images)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  for name, s in report["scores"].items():
    print(f"{name:24s} dice " + " ".join(f"{v:.3f}" for v in s["dice"])
          + "  jaccard " + " ".join(f"{v:.3f}" for v in s["jaccard"]))
  print(f"wrote {os.path.join(f.workdir, 'lesion_iou')}/"
        "{lesion_iou.json,lesion_iou.png,overlays.png}")


if __name__ == "__main__":
  from absl import app, flags
  from kd_jax import main as train_main
  flags.DEFINE_list("stages", None, "Stages to explain (default: those of "
                    "config.stage_order with a checkpoint).")
  flags.DEFINE_integer("max_images", 0, "The first N lesion images only "
                       "(0 = all 54).")
  app.run(main, flags_parser=train_main.parse_flags)
