"""Structured knowledge distillation (Liu et al., CVPR 2019): the ablation.

    python -m kd_jax.study --config=configs/skd/ablation.py:cpu,acdc \
        --workdir=runs/skd_acdc        # every arm, 3 seeds, one table
    python -m kd_jax.main --config=configs/skd/ablation.py:cpu,drive \
        --workdir=runs/skd_drive       # one seed, report.md

A PSPNet-ResNet101 teacher (dilated, output stride 8, auxiliary head on
layer3 with its cross-entropy weighted 0.4) and one student trained under
every arm of the paper's Table 1 plus its two comparison rows:

  teacher     PSPNet-ResNet101 alone: CE + 0.4 · CE(aux)
  student     the student alone (the baseline)
  pixel       + λ_pixel · pixel-wise distillation (pixelwise_kd, 10)
  pixel_pair  + λ_pair · pair-wise similarity of the maps before the
              classifier ("head", 1/8 size; scale 0.5 pooling), 1
  skd         + λ_hol · holistic distillation: a conditional WGAN-GP critic
              (sagan_discriminator) on image ⊕ class probabilities, trained
              in turn with the student (method 'adversarial'), 0.1
  mimic       + 1×1-conv feature matching of "head" (hint_l2, MIMIC)
  at          + attention transfer of "head" (Zagoruyko & Komodakis)

The arg is `<preset>[,<data>][,student=<name>]`:
  cpu    (default) 64×64 input (DRIVE: 512×512 images, trained on 64×64
         crops and evaluated on 64×64 sliding windows: vessels vanish at
         64²); the teacher at width 16 (4.4 M parameters instead of 70 M),
         PSPNet-ResNet18 at width 16 (0.8 M), the other students at their
         own size; AdamW with the poly schedule.
  paper  the paper's setting for a GPU/TPU: 512×512 crops of the scaled
         (0.5–2.0) and flipped images, 40k iterations at batch 8, SGD 0.01
         with momentum 0.9, weight decay 5e-4 and the poly schedule (power
         0.9), the critic SGD 4e-4 as the official code (at 5cb4e49) has
         it, bf16 compute.
  data   acdc (default; 4 classes, evaluated volume by volume) or drive
         (vessels, 2 classes); `data.root` as in configs/distillo.py.
  student=pspnet_resnet18 (default) | mobilenetv2_seg | espnet_c
The losses use the paper's conventions (`convention="official"`: the soft
cross-entropy summed over the batch and divided by H·W, the pair-wise
pooling kernel (int(0.5·H), int(0.5·W)) with ceil mode).
"""
import ml_collections

PRESETS = ("cpu", "paper")
DATASETS = ("acdc", "drive")
STUDENTS = ("pspnet_resnet18", "mobilenetv2_seg", "espnet_c")
ARMS = ("teacher", "student", "pixel", "pixel_pair", "skd", "mimic", "at")
USAGE = "<preset>[,<data>][,student=<name>]"
# Training images per data set, to turn epochs into steps (ACDC's training
# slices; DRIVE's 20 images less the val fifth).
TRAIN_IMAGES = {"acdc": 1312, "drive": 16}


def parse_arg(arg) -> dict:
  parts = [p.strip() for p in (arg or "cpu").split(",") if p.strip()]
  out = dict(preset="cpu", dataset="acdc", student=STUDENTS[0])
  for p in parts:
    if p.startswith("student="):
      out["student"] = p.split("=", 1)[1]
    elif p in PRESETS:
      out["preset"] = p
    elif p in DATASETS:
      out["dataset"] = p
    else:
      out = None
      break
  if out is None or out["student"] not in STUDENTS:
    raise ValueError(
        f"config arg {arg!r}: expected {USAGE} with preset in "
        f"{', '.join(PRESETS)}, data in {', '.join(DATASETS)} and student in "
        f"{', '.join(STUDENTS)}, e.g. configs/skd/ablation.py:cpu,acdc")
  return out


def get_config(arg=None):
  a = parse_arg(arg)
  paper = a["preset"] == "paper"
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.compute_dtype = "bfloat16" if paper else "float32"
  config.layers = "flax"
  config.batch_size = 8
  config.steps = 40000 if paper else 600
  config.log_every = 50
  config.eval_every = 4000 if paper else 300
  config.checkpoint_every = 2000 if paper else 300
  config.on_nonfinite = "stop"
  config.max_skipped_steps = 10
  # "auto" or a folder: the teacher's outputs from kd_jax.teacher_cache.
  config.teacher_cache = ml_collections.config_dict.placeholder(str)
  config.teacher_cache_dtype = "float32"
  config.teacher_cache_top_k = 0
  if paper:
    config.optimizer = dict(name="sgd", lr=0.01, momentum=0.9,
                            weight_decay=5e-4, warmup_steps=0, grad_clip=0.0,
                            schedule="poly", power=0.9)
    critic_opt = dict(name="sgd", lr=4e-4, momentum=0.9, weight_decay=1e-4)
  else:
    config.optimizer = dict(name="adamw", lr=2e-3, momentum=0.9,
                            weight_decay=1e-4, warmup_steps=20, grad_clip=1.0,
                            schedule="poly", power=0.9)
    critic_opt = dict(name="adamw", lr=4e-4, b1=0.5, b2=0.99,
                      weight_decay=0.0, grad_clip=0.0)
  size = 512 if paper else 64
  crop = 0  # Crops of the image's own size.
  if a["dataset"] == "drive" and not paper:
    # Vessels are 1-8 px wide at DRIVE's 565 px. At 256² the stride-8
    # PSPNets learn only the class prior (docs/skd/drive.md); at 512² they
    # learn vessels. Training on 64² crops keeps a step at the cost of
    # ACDC's 64² step; evaluation runs on 64² windows of the 512² images.
    size, crop = 512, 64
  # Models trained on crops are evaluated on windows of the crop size, as
  # the official code's sliding evaluation: PSPNet's pyramid pooling then
  # sees at test time the context it was trained on (docs/skd/drive.md).
  config.eval_window = crop
  # Random scale 0.5–2.0 + crop + flip, the paper's augmentation.
  config.data = dict(name=a["dataset"], image_size=size,
                     augment="scale_crop", scale_range=(0.5, 2.0),
                     crop_size=crop)
  # How the batches reach the device (docs/usage.md); on a GPU host e.g.
  # --config.data.workers=8 --config.data.transfer_dtype=bfloat16.
  config.data.workers = 0
  config.data.transfer_dtype = "float32"
  # True: the augmentation runs batched in the jitted step.
  config.data.augment_on_device = False

  teacher = dict(name="pspnet_resnet101")
  student = dict(name=a["student"])
  if not paper:
    # Width 16: 4.4 M parameters for the teacher; the ResNet-18 student at
    # width 16 (0.8 M) stays smaller than it, as at full width (13 M vs 70 M).
    teacher["width"] = 16
    if a["student"] == "pspnet_resnet18":
      student["width"] = 16
  has_aux = a["student"].startswith("pspnet")
  aux = dict(aux=dict(fn="cross_entropy", weight=0.4, output="aux_logits"))
  task = dict(ce=dict(fn="cross_entropy"))
  student_task = dict(task, **(aux if has_aux else {}))
  pixel = dict(pixel=dict(fn="pixelwise_kd", weight=10.0,
                          convention="official"))
  pair = dict(pair=dict(fn="pairwise_similarity", weight=1.0,
                        student="head", teacher="head", connector="none",
                        convention="official", scale=0.5))
  holistic = dict(holistic=dict(fn="wgan_generator", weight=0.1))
  from_teacher = dict(model=teacher, stage="teacher")

  def distill(losses, method="distill", **more):
    return dict(method=method, model=student, teacher=from_teacher,
                losses=dict(student_task, **losses), **more)

  config.stages = dict(
      teacher=dict(method="supervised", model=teacher,
                   losses=dict(task, **aux),
                   steps=config.steps * (1 if paper else 2)),
      student=dict(method="supervised", model=student, losses=student_task),
      pixel=distill(pixel),
      pixel_pair=distill(dict(pixel, **pair)),
      skd=distill(dict(pixel, **pair, **holistic), method="adversarial",
                  critic=dict(model=dict(name="sagan_discriminator",
                                         conv_dim=64 if paper else 16),
                              gp_weight=10.0, updates=1),
                  optimizers=dict(critic=critic_opt)),
      mimic=distill(dict(mimic=dict(fn="hint_l2", weight=1.0, student="head",
                                    teacher="head", connector="conv1x1"))),
      at=distill(dict(at=dict(fn="attention_transfer", weight=1.0,
                              student="head", teacher="head",
                              connector="none"))),
  )
  config.stage_order = ARMS
  config.study = dict(seeds=(0, 1, 2))
  return config
