"""MED-TEX (Nguyen-Duc et al., ISBI 2022) and its baselines on PALM,
pathologic myopia or not (binary), with less data.

    python -m kd_jax.study --config=configs/medtex/medtex.py:cpu,0.25 \
        --workdir=runs/medtex_palm_25     # every arm, 3 seeds, one table
    python -m kd_jax.main --config=configs/medtex/medtex.py:cpu,1.0 \
        --workdir=runs/medtex_palm_100    # one seed, report.md

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

λ = 0.01 and Adam 1e-3 for every trained group, as the paper. The teacher
trains on all of the train split; the other stages on `data.train_fraction`
of it (a fixed, seeded, class-stratified prefix: 0.25 ⊂ 0.5 ⊂ 1), the
less-data regimes. Val (a stratified 20 % of the 400 PALM images) never
changes, and is what the study reports: the official test images are not
in the shared data.

The arg is `<preset>[,<fraction>]`:
  cpu   (default) 112×112 input, the teacher at half width (16, 32, 64, 128),
        the paper's student (4, 8, 8, 9), an explainer of width 8 and depth
        3; batch 16, 30 epochs of the 320 training images.
  full  the paper's setting: 224×224, the teacher of the paper's size
        (~390 k parameters), batch 64, 100 epochs: for a GPU/TPU.
  fraction  0.25, 0.5 or 1.0 (default) of the training split.
"""
import ml_collections

PRESETS = ("cpu", "full")
FRACTIONS = (0.25, 0.5, 1.0)
USAGE = "<preset>[,<fraction>]"
# The feature pairs VID distils: every block, teacher and student alike.
BLOCKS = ("block1", "block2", "block3", "block4")
LAMBDA = 0.01
# PALM's 400 images less the stratified 20 % val split.
TRAIN_IMAGES = 320


def parse_arg(arg) -> tuple[str, float]:
  parts = [p.strip() for p in (arg or "cpu").split(",")]
  preset = parts[0] or "cpu"
  try:
    fraction = float(parts[1]) if len(parts) > 1 else 1.0
  except ValueError:
    fraction = None
  if preset not in PRESETS or fraction not in FRACTIONS or len(parts) > 2:
    raise ValueError(f"config arg {arg!r}: expected {USAGE} with preset in "
                     f"{', '.join(PRESETS)} and fraction in "
                     f"{', '.join(map(str, FRACTIONS))}, e.g. "
                     "configs/medtex/medtex.py:cpu,0.25")
  return preset, fraction


def _vid_terms():
  return {f"vid_{b}": dict(fn="vid", weight=LAMBDA, student=b, teacher=b)
          for b in BLOCKS}


def get_config(arg=None):
  preset, fraction = parse_arg(arg)
  full = preset == "full"
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.compute_dtype = "bfloat16" if full else "float32"
  config.layers = "flax"
  config.batch_size = 64 if full else 16
  epochs = 100 if full else 30
  config.steps = epochs * TRAIN_IMAGES // config.batch_size
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
  config.data = dict(name="palm", num_classes=2, image_size=size,
                     augment=False)

  teacher = dict(name="medtex_teacher") if full else dict(
      name="medtex_teacher", widths=(16, 32, 64, 128))
  student = dict(name="medtex_student")
  explainer = dict(name="medtex_explainer", width=16 if full else 8,
                   depth=3)
  frozen = dict(model=teacher, stage="teacher")
  soft = dict(soft_ce=dict(fn="soft_cross_entropy", temperature=1.0))
  less = dict(train_fraction=fraction)
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
  config.stage_order = ("teacher", "student", "kd", "vid", "med_ex",
                        "med_tex")
  config.study = dict(seeds=(0, 1, 2),
                      columns=("accuracy", "macro_f1", "auc"))
  return config
