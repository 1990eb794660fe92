"""The "Distillo, ergo sum" study: TransUNet → SqueezeU-Net, shared config.

One arm per file in this folder (teacher.py, student.py, kd.py, latent.py,
dml.py, and study.py for all of them over several seeds); each is a few lines
calling `get_config(arm, arg)`. The arms share every hyper-parameter of a
preset (data, input size, batch, epochs, optimizer, task loss); they differ
only in what they train and the extra loss term:

  teacher  TransUNet alone                     α·CE + β·Dice
  student  SqueezeU-Net alone                  α·CE + β·Dice
  kd       SqueezeU-Net ← frozen teacher       α·CE + β·Dice + δ·KL(T)
  latent   SqueezeU-Net ← frozen teacher       α·CE + β·Dice + δ·L1 between
           the student's "bottleneck" (1/16 side, 16·width ch) through a
           learned 1×1 conv and the teacher's "bottleneck" (its ViT tokens as
           a 1/16-side map, hidden ch)
  dml      SqueezeU-Net and TransUNet trained together from scratch (Deep
           Mutual Learning), each with α·CE + β·Dice + δ·KL to the other

`arg` (after the colon: `--config=configs/distillo/kd.py:full`) is
`[<data>_]<preset>[,teacher=<stage dir>]`:

  cpu   (default) 64×64 input, transunet_tiny teacher, 12 epochs at batch
        16 (984 steps), AdamW: one arm trains in ~5 min on a 2-core CPU.
        At 4 epochs the TransUNet teacher was still worse than the student
        alone (ACDC val volumes, mean Dice 0.30 vs 0.41); at 12 its slice
        validation Dice reached 0.76 (2026-11-23)
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
DATASETS = ("acdc", "synapse")
PRESETS = ("cpu", "full")

# Training slices per data set: ACDC's train_slices_256.npz, and TransUNet's
# Synapse training list (18 cases, 2211 slices). Only used to turn epochs
# into steps.
TRAIN_SLICES = {"acdc": 1312, "synapse": 2211}
NUM_CLASSES = {"acdc": 4, "synapse": 9}
# The class whose saliency and Grad-CAM the study shows.
CAM_CLASS = {"acdc": "left_ventricle", "synapse": "liver"}


def parse_arg(arg: str) -> dict:
  """`[<data>_]<preset>[,teacher=<dir>]` → dict(dataset, preset, teacher)."""
  head, *options = [p.strip() for p in (arg or "cpu").split(",")]
  parts = head.split("_") if head else ["cpu"]
  dataset = parts.pop(0) if parts[0] in DATASETS else "acdc"
  preset = parts.pop(0) if parts else "cpu"
  if parts or preset not in PRESETS:
    raise ValueError(
        f"config arg {arg!r}: expected [<data>_]<preset>[,teacher=<dir>] "
        f"with data in {DATASETS} and preset in {PRESETS}, e.g. 'cpu', "
        "'full', 'synapse', 'synapse_full'")
  out = dict(dataset=dataset, preset=preset, teacher="")
  for option in options:
    key, _, value = option.partition("=")
    if key != "teacher" or not value:
      raise ValueError(f"config arg {arg!r}: unknown option {option!r}; the "
                       "only option is teacher=<trained teacher stage dir>")
    out["teacher"] = value
  return out


def _preset(preset: str, image_size_full: int = 224) -> dict:
  if preset == "cpu":
    size = 64
    return dict(
        image_size=size, batch_size=16, epochs=12,
        teacher=dict(name="transunet_tiny", image_size=size),
        optimizer=dict(name="adamw", lr=2e-3, weight_decay=1e-4,
                       momentum=0.9, warmup_steps=20, grad_clip=1.0),
        log_every=20, eval_every=100, checkpoint_every=100)
  size = image_size_full
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


def get_config(arm: str, arg: str = "cpu") -> ml_collections.ConfigDict:
  """The config of one arm (or "study": every arm, for kd_jax.study)."""
  if arm not in ARMS + ("study",):
    raise ValueError(f"arm {arm!r}: choose one of {ARMS + ('study',)}")
  opts = parse_arg(arg)
  p = _preset(opts["preset"])
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.compute_dtype = "float32" if opts["preset"] == "cpu" else "bfloat16"
  config.batch_size = p["batch_size"]
  config.epochs = p["epochs"]
  config.steps = (config.get_ref("epochs") * TRAIN_SLICES[opts["dataset"]]
                  // config.get_ref("batch_size"))
  config.log_every = p["log_every"]
  config.eval_every = p["eval_every"]
  config.checkpoint_every = p["checkpoint_every"]
  config.optimizer = p["optimizer"]
  config.data = _data(opts["dataset"], p["image_size"])

  teacher = p["teacher"]
  student = dict(name="squeeze_unet", width=24)
  # α·CE + β·Dice, TransUNet's 0.5 / 0.5, for every model of every arm.
  task = dict(ce=dict(fn="cross_entropy", weight=0.5),
              dice=dict(fn="dice", weight=0.5))
  if opts["teacher"]:
    teacher_ref = dict(model=teacher, stage="", checkpoint=opts["teacher"])
  else:
    teacher_ref = dict(model=teacher, stage="teacher", checkpoint="")
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
    if opts["teacher"] and arm not in ("kd", "latent"):
      raise ValueError(f"config arg {arg!r}: teacher=<dir> applies to the "
                       f"kd and latent arms, not {arm!r}")
    config.stage_order = (arm,)
  if arm == "study":
    # Read by kd_jax.study only: seeds, and the figures' class and slices.
    config.study = dict(
        seeds=(0, 1, 2), cam_class=CAM_CLASS[opts["dataset"]],
        cam_feature="", num_figure_examples=4,
        explain_stages=("teacher", "student", "kd"),
        dataset=opts["dataset"], preset=opts["preset"])
  return config
