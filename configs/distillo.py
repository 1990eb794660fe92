"""The "Distillo, ergo sum" study: TransUNet → SqueezeU-Net.

One file for every arm; the config arg (after the colon) names the arm:

    python -m kd_jax.main --config=configs/distillo.py:kd,cpu \
        --workdir=runs/distillo_kd
    python -m kd_jax.study --config=configs/distillo.py:study,cpu \
        --workdir=runs/distillo [--config.study.seeds="(0,1,2)"]

The arms share every hyper-parameter of a preset (data, input size, batch,
epochs, optimizer, task loss); they differ only in what they train and the
extra loss term:

  teacher  TransUNet alone                     α·CE + β·Dice
  student  SqueezeU-Net alone (the baseline)   α·CE + β·Dice
  kd       SqueezeU-Net ← frozen teacher       α·CE + β·Dice + δ·KL(T)
  latent   SqueezeU-Net ← frozen teacher       α·CE + β·Dice + δ·L1 between
           the student's "bottleneck" (1/16 side, 16·width ch) through a
           learned 1×1 conv and the teacher's "bottleneck" (its ViT tokens as
           a 1/16-side map, hidden ch)
  dml      SqueezeU-Net and TransUNet trained together from scratch (Deep
           Mutual Learning), each with α·CE + β·Dice + δ·KL to the other
  study    every arm above, for kd_jax.study (several seeds, one table)

The arg is `<arm>[,[<data>_]<preset>][,teacher=<stage dir>]`, e.g. `kd`,
`kd,full`, `study,synapse`, `kd,synapse_full,teacher=runs/x/seed0/teacher`:

  cpu   (default) 64×64 input, transunet_tiny teacher, 12 epochs at batch
        16, AdamW: sized for a CPU. 12 epochs because with fewer the
        TransUNet teacher is not yet better than the student alone, and
        there is nothing to distil.
  full  224×224 input, transunet_b16 teacher, 40 epochs at batch 24, SGD
        0.01 with momentum 0.9 (TransUNet's optimizer): for a GPU/TPU
  data  acdc (default; `data.root` holds acdc/, "" = $KD_JAX_DATA or
        ../shared/data) or synapse (9 classes, the TransUNet npz/h5 layout
        under `data.root`). `synapse` alone is the CPU preset on Synapse,
        `synapse_full` the seed's own setting (224×224).
  teacher=<dir>  kd/latent only: distil from that trained teacher stage
        (a stage workdir such as runs/distillo/seed0/teacher) instead of
        training the teacher first in the same workdir.

Steps are `epochs · train slices // batch_size` (FieldReferences: an
override of --config.epochs or --config.batch_size updates them).
"""
import ml_collections

ARMS = ("teacher", "student", "kd", "latent", "dml")
# The arg's first item: one arm, or "study" for all of them.
CHOICES = ARMS + ("study",)
DATASETS = ("acdc", "synapse")
PRESETS = ("cpu", "full")

# Training slices per data set: ACDC's train_slices_256.npz, and TransUNet's
# Synapse training list (18 cases, 2211 slices). Only used to turn epochs
# into steps.
TRAIN_SLICES = {"acdc": 1312, "synapse": 2211}
# The class whose saliency and Grad-CAM the study shows.
CAM_CLASS = {"acdc": "left_ventricle", "synapse": "liver"}

USAGE = "<arm>[,[<data>_]<preset>][,teacher=<dir>]"


def parse_arg(arg) -> dict:
  """`<arm>[,[<data>_]<preset>][,teacher=<dir>]` → dict(arm, dataset,
  preset, teacher); a one-line ValueError naming the choices otherwise."""
  arm, *rest = [p.strip() for p in (arg or "").split(",")]
  if arm not in CHOICES:
    raise ValueError(
        f"config arg {arg or ''!r}: expected {USAGE} with arm in "
        f"{', '.join(CHOICES)}, e.g. configs/distillo.py:kd,cpu")
  # The preset is the item without "=" (options are key=value); cpu if none.
  head = rest.pop(0) if rest and "=" not in rest[0] else ""
  parts = head.split("_") if head else ["cpu"]
  dataset = parts.pop(0) if parts[0] in DATASETS else "acdc"
  preset = parts.pop(0) if parts else "cpu"
  if parts or preset not in PRESETS:
    raise ValueError(
        f"config arg {arg!r}: expected {USAGE} with data in "
        f"{', '.join(DATASETS)} and preset in {', '.join(PRESETS)}, e.g. "
        f"'{arm},cpu', '{arm},full', '{arm},synapse', '{arm},synapse_full'")
  out = dict(arm=arm, dataset=dataset, preset=preset, teacher="")
  for option in rest:
    key, _, value = option.partition("=")
    if key != "teacher" or not value:
      raise ValueError(f"config arg {arg!r}: unknown option {option!r}; the "
                       "only option is teacher=<trained teacher stage dir>")
    if arm not in ("kd", "latent"):
      raise ValueError(f"config arg {arg!r}: teacher=<dir> applies to the "
                       f"kd and latent arms, not {arm!r}")
    out["teacher"] = value
  return out


def _preset(preset: str) -> dict:
  if preset == "cpu":
    size = 64
    return dict(
        image_size=size, batch_size=16, epochs=12,
        teacher=dict(name="transunet_tiny", image_size=size),
        optimizer=dict(name="adamw", lr=2e-3, weight_decay=1e-4,
                       momentum=0.9, warmup_steps=20, grad_clip=1.0),
        log_every=20, eval_every=100, checkpoint_every=100)
  size = 224
  return dict(
      image_size=size, batch_size=24, epochs=40,
      teacher=dict(name="transunet_b16", image_size=size),
      optimizer=dict(name="sgd", lr=0.01, weight_decay=1e-4, momentum=0.9,
                     warmup_steps=0, grad_clip=0.0),
      log_every=50, eval_every=500, checkpoint_every=500)


def _data(dataset: str, image_size: int) -> dict:
  if dataset == "acdc":
    return dict(name="acdc", root="", image_size=image_size, augment=True,
                max_train=0, max_volumes=0)
  return dict(name="synapse", root="", list_dir="", image_size=image_size,
              augment=True, num_val_cases=2, num_classes=9)


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The config of one arm, or with `study` every arm (for kd_jax.study)."""
  opts = parse_arg(arg)
  arm = opts["arm"]
  p = _preset(opts["preset"])
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.compute_dtype = "float32" if opts["preset"] == "cpu" else "bfloat16"
  # The CPU preset trains with kd_jax.cpu_layers' forms (flax's elsewhere).
  config.layers = "cpu" if opts["preset"] == "cpu" else "flax"
  config.batch_size = p["batch_size"]
  config.epochs = p["epochs"]
  config.steps = (config.get_ref("epochs") * TRAIN_SLICES[opts["dataset"]]
                  // config.get_ref("batch_size"))
  config.log_every = p["log_every"]
  config.on_nonfinite = "stop"  # or "skip" (max_skipped_steps times)
  config.max_skipped_steps = 10
  config.eval_every = p["eval_every"]
  # 0: evaluate on whole images; N: on N² sliding windows (models trained
  # on N² crops, docs/usage.md).
  config.eval_window = 0
  config.checkpoint_every = p["checkpoint_every"]
  config.optimizer = p["optimizer"]
  config.data = _data(opts["dataset"], p["image_size"])
  # How the batches reach the device (docs/usage.md); on a GPU host e.g.
  # --config.data.workers=8 --config.data.transfer_dtype=bfloat16 (not
  # uint8: ACDC's slices are z-scored).
  config.data.workers = 0
  config.data.transfer_dtype = "float32"
  # True: the augmentation runs batched in the jitted step.
  config.data.augment_on_device = False
  # "auto" or a folder: the teacher's outputs from kd_jax.teacher_cache.
  config.teacher_cache = ml_collections.config_dict.placeholder(str)
  config.teacher_cache_dtype = "float32"
  config.teacher_cache_top_k = 0

  teacher = p["teacher"]
  student = dict(name="squeeze_unet", width=24)
  # α·CE + β·Dice, TransUNet's 0.5 / 0.5, for every model of every arm.
  task = dict(ce=dict(fn="cross_entropy", weight=0.5),
              dice=dict(fn="dice", weight=0.5))
  if opts["teacher"]:
    teacher_ref = dict(model=teacher, stage="", checkpoint=opts["teacher"])
  else:
    teacher_ref = dict(model=teacher, stage="teacher", checkpoint="")
  # Every arm's config holds every stage, so that one arm's run and the
  # study's train the same stage the same way.
  config.stages = dict(
      teacher=dict(method="supervised", model=teacher, losses=task),
      student=dict(method="supervised", model=student, losses=task),
      kd=dict(method="distill", model=student, teacher=teacher_ref,
              losses=dict(task, kd=dict(fn="kd_kl", weight=1.0,
                                        temperature=1.0))),
      latent=dict(method="distill", model=student, teacher=teacher_ref,
                  losses=dict(task, latent=dict(
                      fn="hint_l1", weight=1.0, student="bottleneck",
                      teacher="bottleneck", connector="conv1x1"))),
      dml=dict(method="mutual", model=student, peer=teacher,
               losses=dict(task, kl=dict(fn="kd_kl", weight=1.0,
                                         temperature=1.0))),
  )
  if arm == "study":
    config.stage_order = ARMS
  elif arm in ("kd", "latent") and not opts["teacher"]:
    config.stage_order = ("teacher", arm)  # The teacher trains first.
  else:
    config.stage_order = (arm,)
  if arm == "study":
    # Read by kd_jax.study only: seeds, and the figures' class and slices.
    config.study = dict(
        seeds=(0, 1, 2), cam_class=CAM_CLASS[opts["dataset"]],
        cam_feature="", num_figure_examples=4,
        explain_stages=("teacher", "student", "kd"),
        dataset=opts["dataset"], preset=opts["preset"])
  return config
