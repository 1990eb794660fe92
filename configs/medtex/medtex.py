"""MED-TEX (Nguyen-Duc et al., ISBI 2022) and its baselines on PALM,
pathologic myopia or not (binary), or on IDRiD, referable diabetic
retinopathy or not (binary), with less data.

    python -m kd_jax.study --config=configs/medtex/medtex.py:cpu,0.25 \
        --workdir=runs/medtex_palm_25     # every arm, 3 seeds, one table
    python -m kd_jax.main --config=configs/medtex/medtex.py:cpu,1.0 \
        --workdir=runs/medtex_palm_100    # one seed, report.md
    python -m kd_jax.study --config=configs/medtex/medtex.py:cpu,0.25,idrid \
        --workdir=runs/medtex_idrid_25    # referable DR on IDRiD
    python -m kd_jax.study --config=configs/medtex/medtex.py:cpu,all,idrid \
        --workdir=runs/medtex_idrid       # every fraction: the whole study

The stages (`medtex_*` models; `kd_jax.methods.explain`):

  teacher  medtex_teacher on the labels (cross-entropy): the frozen model
           the others learn from
  student  medtex_student on the labels alone (the baseline)
  kd       the student on X against the teacher's soft targets alone
           (soft cross-entropy, τ = 1: Hinton KD without labels, as MED-TEX
           trains without them)
  vid      kd + λ·VID on the four block pairs (learned variance)
  med_ex   explainer + student on X' = Θ ⊙ X, soft CE only (the paper's
           ablation without VID)
  med_tex  med_ex + λ·VID on the four block pairs: MED-TEX
  attention  the explanation baseline "soft attention": the student behind
           a learnt sigmoid input mask (medtex_attention_student), as kd
  l2x      the baseline L2X: the student on K hard-selected 8×8 patches
           (medtex_l2x_student; Gumbel-softmax top-K in training), as kd

On IDRiD the study also scores the explanations against the lesion masks
(`study.lesion_iou`: Θ of med_ex / med_tex, the masks of attention / l2x,
the teacher's saliency and Grad-CAM; top-K overlap per k, mean ± std over
seeds, in study.md and lesion_iou.png); `python -m
kd_jax.evaluate.lesion_iou` does the same for one run.

λ = 0.01 and Adam 1e-3 for every trained group, as the paper. The teacher
trains on all of the train split; the other stages on `data.train_fraction`
of it (a fixed, seeded, class-stratified prefix: 0.25 ⊂ 0.5 ⊂ 1), the
less-data regimes. Val (a stratified 20 % of the 400 PALM images) never
changes, and is what the study reports: the official test images are not
in the shared data.

The arg is `<preset>[,<fraction>][,<data>]`:
  cpu   (default) 112×112 input, the teacher at half width (16, 32, 64, 128),
        the paper's student (4, 8, 8, 9), an explainer of width 8 and depth
        3; batch 16, 30 epochs of the 320 training images.
  full  the paper's setting: 224×224, the teacher of the paper's size
        (~390 k parameters), batch 64, 100 epochs: for a GPU/TPU.
  fraction  0.25, 0.5 or 1.0 (default) of the training split, or all:
        the study runs once per fraction (`study.fractions`), in
        <workdir>/fraction0.25, fraction0.5, fraction1, with one study.md
        over all three (`kd_jax.main` trains the 1.0 stages).
  data  palm (default): PALM's 400 images, pathologic myopia or not;
        idrid: IDRiD grading's 413 images (data set "idrid_referable"),
        referable DR (grade >= 2: moderate NPDR or worse, the usual referral
        threshold) or not, 330 train / 83 val stratified by grade. 42 of the
        54 lesion-mask images (IDRiD part A, used for the top-K IoU) are also
        grading images (`kd_jax.evaluate.lesion_iou.part_overlap`).
"""
import ml_collections

PRESETS = ("cpu", "full")
FRACTIONS = (0.25, 0.5, 1.0)
DATA = ("palm", "idrid")
USAGE = "<preset>[,<fraction>][,<data>]"
# The feature pairs VID distils: every block, teacher and student alike.
BLOCKS = ("block1", "block2", "block3", "block4")
LAMBDA = 0.01
# The training images of each data choice (the file less the stratified
# 20 % val split): PALM 400 -> 320, IDRiD grading 413 -> 330.
TRAIN_IMAGES = {"palm": 320, "idrid": 330}


def parse_arg(arg) -> tuple[str, float | str, str]:
  parts = [p.strip() for p in (arg or "cpu").split(",")]
  preset = parts[0] or "cpu"
  try:
    fraction = float(parts[1]) if len(parts) > 1 and parts[1] else 1.0
  except ValueError:
    fraction = "all" if parts[1] == "all" else None
  name = parts[2] if len(parts) > 2 else "palm"
  if (preset not in PRESETS or fraction not in (*FRACTIONS, "all")
      or name not in DATA or len(parts) > 3):
    raise ValueError(f"config arg {arg!r}: expected {USAGE} with preset in "
                     f"{', '.join(PRESETS)}, fraction in "
                     f"{', '.join(map(str, FRACTIONS))} or all and data in "
                     f"{', '.join(DATA)}, e.g. "
                     "configs/medtex/medtex.py:cpu,0.25,idrid")
  return preset, fraction, name


def _data(name: str, size: int) -> dict:
  if name == "idrid":
    return dict(name="idrid_referable", image_size=size, augment=False)
  return dict(name="palm", num_classes=2, image_size=size, augment=False)


def _vid_terms():
  return {f"vid_{b}": dict(fn="vid", weight=LAMBDA, student=b, teacher=b)
          for b in BLOCKS}


def get_config(arg=None):
  preset, fraction, name = parse_arg(arg)
  full = preset == "full"
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.compute_dtype = "bfloat16" if full else "float32"
  config.layers = "flax"
  config.batch_size = 64 if full else 16
  epochs = 100 if full else 30
  config.steps = epochs * TRAIN_IMAGES[name] // config.batch_size
  config.log_every = 20
  config.eval_every = 100
  config.checkpoint_every = 100
  config.on_nonfinite = "stop"
  config.max_skipped_steps = 10
  # "auto" or a folder: the teacher's outputs from kd_jax.teacher_cache.
  config.teacher_cache = ml_collections.config_dict.placeholder(str)
  config.teacher_cache_dtype = "float32"
  config.teacher_cache_top_k = 0
  # Adam 1e-3 (the paper), no decay of the weights.
  config.optimizer = dict(name="adamw", lr=1e-3, weight_decay=0.0,
                          momentum=0.9, warmup_steps=0, grad_clip=0.0)
  size = 224 if full else 112
  config.data = _data(name, size)
  # How the batches reach the device (docs/usage.md); on a GPU host e.g.
  # --config.data.workers=8 --config.data.transfer_dtype=uint8.
  config.data.workers = 0
  config.data.transfer_dtype = "float32"
  # True: the augmentation runs batched in the jitted step.
  config.data.augment_on_device = False

  teacher = dict(name="medtex_teacher") if full else dict(
      name="medtex_teacher", widths=(16, 32, 64, 128))
  student = dict(name="medtex_student")
  explainer = dict(name="medtex_explainer", width=16 if full else 8,
                   depth=3)
  frozen = dict(model=teacher, stage="teacher")
  soft = dict(soft_ce=dict(fn="soft_cross_entropy", temperature=1.0))
  # "all": the stages at 1.0; the study moves them through FRACTIONS.
  sweep = fraction == "all"
  less = dict(train_fraction=1.0 if sweep else fraction)
  config.stages = dict(
      teacher=dict(method="supervised", model=teacher,
                   losses=dict(ce=dict(fn="cross_entropy"))),
      student=dict(method="supervised", model=student,
                   losses=dict(ce=dict(fn="cross_entropy")), data=less),
      kd=dict(method="distill", model=student, teacher=frozen, losses=soft,
              data=less),
      vid=dict(method="distill", model=student, teacher=frozen,
               losses=dict(soft, **_vid_terms()), data=less),
      med_ex=dict(method="explain", model=student,
                  explainer=dict(model=explainer), teacher=frozen,
                  losses=soft, data=less),
      med_tex=dict(method="explain", model=student,
                   explainer=dict(model=explainer), teacher=frozen,
                   losses=dict(soft, **_vid_terms()), data=less),
  )
  # The explanation baselines: students that learn their own input mask,
  # distilled from the teacher as kd is (L2X keeps the share of the image
  # of MED-TEX's top-K at k = 1: 16 8×8 patches of 224², 4 of 112²).
  config.stages.attention = dict(
      method="distill", teacher=frozen, losses=soft, data=less,
      model=dict(name="medtex_attention_student", attention_width=8))
  config.stages.l2x = dict(
      method="distill", teacher=frozen, losses=soft, data=less,
      model=dict(name="medtex_l2x_student", patch=8,
                 num_patches=16 if full else 4))
  config.stage_order = ("teacher", "student", "kd", "vid", "med_ex",
                        "med_tex", "attention", "l2x")
  # Post-hoc fidelity to the teacher (MED-TEX's read-out; the table shows
  # the positive-class F1 and the macro F1, study.json has both) beside
  # each stage's own accuracy / F1 / AUC against the labels.
  # On IDRiD the study also scores every stage's explanation against the
  # lesion masks (`kd_jax.evaluate.lesion_iou.study`).
  config.study = dict(
      seeds=(0, 1, 2), fidelity="teacher", lesion_iou=name == "idrid",
      fractions=FRACTIONS if sweep else (),
      columns=("fidelity_accuracy", "fidelity_f1_positive", "fidelity_f1",
               "accuracy", "f1_positive", "macro_f1", "auc"))
  return config
