"""Multi-task fundus distillation from a teacher ensemble (Chelaramani et
al., WACV 2021) on IDRiD grading.

    python -m kd_jax.study --config=configs/fundus_mtl.py:cpu \
        --workdir=runs/fundus_mtl        # every arm, 3 seeds, one table
    python -m kd_jax.main --config=configs/fundus_mtl.py:cpu \
        --workdir=runs/fundus_mtl_seed0  # one seed, report.md

Four heads on a shared trunk (`multitask_*` models): DR grade 0–4
(ordinal), DME risk 0–2, fovea (u, v), optic disc (u, v). The stages:

  teacher0..2   the ensemble members: one architecture, each its own seed,
                trained on the labelled images (CE on the grades, L1 on the
                coordinates)
  student       the small model alone, labelled images only (the baseline)
  kd_one        the student ← teacher0: the task loss plus ensemble_kd
                (KL to the tempered probabilities) on both grade heads and
                ensemble_l2 on both landmark heads, with one member
  kd_ensemble   the same terms from all three members (the mean of their
                tempered probabilities, the mean of their coordinates)
  kd_unlabelled kd_ensemble, with a quarter of every batch drawn from unlabelled
                fundus images (PALM, IDRiD's lesion-segmentation images,
                DRIVE): the distillation terms see them, the task terms
                never do

The arg is `<preset>[,<data>]`:
  cpu   (default) 128×128 input; ResNet-18 trunks at half width (32 stem
        channels) as teachers, quarter width as the student: ResNet-50
        teachers at the paper's size take minutes a step on 2 cores.
        AdamW with cosine decay.
  full  the paper's setting: 448×448 input, ResNet-50 teachers, a ResNet-18
        student, SGD with Nesterov momentum and the learning rate cut by 10×
        when the training loss stops improving (reduce-on-plateau): for a
        GPU/TPU.
  data  idrid (default: IDRiD grading from `data.root`, "" = $KD_JAX_DATA or
        ../shared/data; 413 training images, a stratified 20 % of them the
        val split, which is also what the study reports: the official test
        images are not used) or synthetic (generated fundus images with the
        same four targets, `kd_jax.data.synthetic`: runs anywhere, for
        demos and tests).
"""
import ml_collections

PRESETS = ("cpu", "full")
DATASETS = ("idrid", "synthetic")
HEADS = ("dr_grade", "dme_risk", "fovea", "optic_disc")
UNLABELLED = ("palm", "idrid_lesions", "drive")
USAGE = "<preset>[,<data>]"


def parse_arg(arg) -> tuple[str, str]:
  parts = [p.strip() for p in (arg or "cpu").split(",")]
  preset = parts[0] or "cpu"
  dataset = parts[1] if len(parts) > 1 else "idrid"
  if preset not in PRESETS or dataset not in DATASETS or len(parts) > 2:
    raise ValueError(f"config arg {arg!r}: expected {USAGE} with preset in "
                     f"{', '.join(PRESETS)} and data in "
                     f"{', '.join(DATASETS)}, e.g. configs/fundus_mtl.py:cpu")
  return preset, dataset


def _task_losses(landmark_weight):
  # L1 on (u, v): its gradient does not vanish as the error shrinks, and in
  # image units an error of 0.05 (a few disc radii) weighs like a CE of ~1
  # at the weight 5 used here.
  losses = {h: dict(fn="cross_entropy", head=h) for h in HEADS[:2]}
  losses.update({h: dict(fn="l1", head=h, weight=landmark_weight)
                 for h in HEADS[2:]})
  return losses


def _kd_losses(landmark_weight, temperature):
  losses = _task_losses(landmark_weight)
  losses.update({f"kd_{h}": dict(fn="ensemble_kd", head=h,
                                 temperature=temperature)
                 for h in HEADS[:2]})
  # Squared error to the members' mean coordinates, scaled like the L1
  # task term at an error of ~0.05 (0.05² · 100 ≈ 0.05 · 5 / 2).
  losses.update({f"kd_{h}": dict(fn="ensemble_l2", head=h,
                                 weight=20 * landmark_weight)
                 for h in HEADS[2:]})
  return losses


def get_config(arg=None):
  preset, dataset = parse_arg(arg)
  full = preset == "full"
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.compute_dtype = "bfloat16" if full else "float32"
  config.layers = "flax"
  config.batch_size = 32 if full else 16
  # IDRiD: 330 training images after the 20 % val split; steps = epochs of
  # those (the synthetic set has 512).
  train_images = 330 if dataset == "idrid" else 512
  config.epochs = 60 if full else 30
  config.steps = config.epochs * train_images // config.batch_size
  config.log_every = 20
  config.on_nonfinite = "stop"  # or "skip" (max_skipped_steps times)
  config.max_skipped_steps = 10
  config.eval_every = 200
  config.checkpoint_every = 200
  if full:
    config.optimizer = dict(name="sgd", lr=0.01, weight_decay=1e-4,
                            momentum=0.9, nesterov=True, warmup_steps=0,
                            grad_clip=0.0, schedule="plateau",
                            plateau=dict(factor=0.1, patience=5,
                                         epoch_steps=train_images
                                         // config.batch_size))
  else:
    config.optimizer = dict(name="adamw", lr=1e-3, weight_decay=1e-4,
                            momentum=0.9, warmup_steps=20, grad_clip=1.0)
  size = 448 if full else 128
  if dataset == "idrid":
    config.data = dict(name="idrid_grading", image_size=size, augment=True)
  else:
    config.data = dict(name="synthetic_fundus", image_size=size,
                       num_train=512, num_val=64, num_test=128, augment=True)
  # How the batches reach the device (docs/usage.md); on a GPU host e.g.
  # --config.data.workers=8 --config.data.transfer_dtype=uint8.
  config.data.workers = 0
  config.data.transfer_dtype = "float32"
  # True: the augmentation runs batched in the jitted step.
  config.data.augment_on_device = False
  # "auto" or a folder: the members' stacked outputs from
  # kd_jax.teacher_cache (refused by the idrid preset's kd_unlabelled
  # stage: its unlabelled pool is not cached).
  config.teacher_cache = ml_collections.config_dict.placeholder(str)
  config.teacher_cache_dtype = "float32"
  config.teacher_cache_top_k = 0
  config.heads = {h: {} for h in HEADS}

  if full:
    teacher = dict(name="multitask_resnet50")
    student = dict(name="multitask_resnet18")
  else:
    teacher = dict(name="multitask_resnet18", width=0.5)
    student = dict(name="multitask_resnet18", width=0.25)
  task = _task_losses(landmark_weight=5.0)
  kd = _kd_losses(landmark_weight=5.0, temperature=2.0)
  members = [dict(model=teacher, stage=f"teacher{i}") for i in range(3)]
  config.stages = {
      f"teacher{i}": dict(method="supervised", model=teacher, losses=task,
                          seed=i + 1)
      for i in range(3)}
  config.stages.update(
      student=dict(method="supervised", model=student, losses=task),
      kd_one=dict(method="distill", model=student, teachers=members[:1],
                  losses=kd),
      kd_ensemble=dict(method="distill", model=student, teachers=members,
                       losses=kd),
  )
  config.stage_order = ("teacher0", "teacher1", "teacher2", "student",
                        "kd_one", "kd_ensemble")
  if dataset == "idrid":
    # The unlabelled pool is read from the shared data; the synthetic
    # preset has none.
    config.stages.kd_unlabelled = dict(
        method="distill", model=student, teachers=members, losses=kd,
        data=dict(unlabelled=dict(sources=UNLABELLED,
                                  per_batch=config.batch_size // 4)))
    config.stage_order += ("kd_unlabelled",)
  config.study = dict(seeds=(0, 1, 2), columns=(
      "dr_grade/accuracy", "dr_grade/kappa", "dme_risk/accuracy",
      "fovea/mean_error_px", "optic_disc/mean_error_px"))
  return config
