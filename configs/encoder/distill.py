"""Foundation-encoder distillation: a frozen ViT into EfficientViT on
unlabelled images, global vs dense matching; read out by `kd_jax.probe`.

    # cpu: first the teacher (a small ViT, supervised on PALM), then the arms
    python -m kd_jax.main --config=configs/encoder/distill.py:teacher_cpu \\
        --workdir=runs/encoder_teacher
    python -m kd_jax.main --config=configs/encoder/distill.py:cpu \\
        --config.stages.global_cos.teacher.checkpoint=runs/encoder_teacher/teacher \\
        --workdir=runs/encoder_cpu_s0
    python -m kd_jax.probe --image_size=64 --out=runs/encoder_cpu_s0/probe \\
        --encoders=teacher=runs/encoder_teacher/teacher,$(ls -d \\
        runs/encoder_cpu_s0/*/ | paste -sd,)

The arg is `<preset>[,<student>]`:

  teacher_cpu  the cpu preset's teacher, which can be obtained here: a
               ViT (width 96, depth 4, 3 heads, 8×8 patches, LayerScale,
               8×8 tokens at 64×64 input, 473,475 parameters with its
               3-class head) trained from scratch with cross-entropy on
               PALM's 3 classes (320 train images, 64×64, flips / rotation
               / colour jitter), AdamW, 600 steps of batch 32. Its stage
               folder is the teacher checkpoint of `cpu`.
  cpu          that teacher (default runs/encoder_teacher/teacher) →
               EfficientViT-B0 (its published widths; 2×2 last map at
               64×64) on the shared sets' images pooled without labels
               (`shared_images`: the train splits of ACDC, IDRiD grading
               and lesions, DRIVE, PALM, PneumoniaMNIST, 4,449 images,
               64×64 RGB, DINO-style crops, flips, colour jitter), AdamW,
               300 steps of batch 32 (~2 passes), float32, kd_jax's CPU
               layers (`layers="cpu"`), `study.seeds=(0, 1)`.

               The budget is the study's, not the method's: on a free
               2-core VM a step takes 0.6–1 s (mostly the student's
               forward and backward), so a seed's 5 arms take ~25 min
               and its two probe runs ~22 min
               (docs/encoder/study_2026-12-07.md). For a closer look at
               the recipe: --config.steps=600 --config.study.seeds="(0,1,2)".
  paper        an imported ViT-L/16 (`python -m kd_jax.convert`, e.g. UNI or
               DINOv2 weights; no default) → EfficientViT-B0 (or B1:
               `paper,b1`) at 224×224, bfloat16 compute, on
               `shared_images` at 224 (for your own tiles write
               data=dict(name="image_folder", image_dir=...)), batch 128,
               20000 steps.

The arms share one teacher folder: `--config.stages.<any arm>.teacher.
checkpoint=<folder>` sets it for all of them (one ml_collections reference).

Every arm is a distill stage with no task loss (the data has no labels: the
run's one output is an embedding head, `kd_jax.tasks`):

  global_cos    student "embedding" → linear projection → teacher
                "embedding" ([CLS]), 1 - cosine (`embedding_cosine`)
  global_l2     the same pair, squared L2 (`embedding_l2`)
  dense_attn    student last map "stage4" → learned attention pooling
                (`attention_pool`) onto the teacher's patch grid →
                teacher "patch_map", 1 - cosine per token
                (`feature_map_cosine`)
  dense_interp  the same with a bilinear resize + 1×1 convolution
                (`resize_conv1x1`) instead of attention pooling
  global_dense  global_cos + dense_attn, equal weights
"""
import ml_collections

PRESETS = ("teacher_cpu", "cpu", "paper")
STUDENTS = ("b0", "b1")
ARMS = ("global_cos", "global_l2", "dense_attn", "dense_interp",
        "global_dense")
USAGE = "<preset>[,<student>]"

# The cpu teacher: small enough to train on 2 cores, a real ViT (the same
# code as ViT-L/16) with an 8×8 patch grid for the dense arms.
CPU_TEACHER = dict(name="vit_tiny", width=96, depth=4, num_heads=3, patch=8,
                   image_size=64)
CPU_TEACHER_DIR = "runs/encoder_teacher/teacher"


def parse_arg(arg) -> tuple[str, str]:
  parts = [p.strip() for p in (arg or "cpu").split(",")]
  preset = parts[0] or "cpu"
  student = parts[1] if len(parts) > 1 else "b0"
  if preset not in PRESETS or student not in STUDENTS or len(parts) > 2:
    raise ValueError(f"config arg {arg!r}: expected {USAGE} with preset in "
                     f"{', '.join(PRESETS)} and student in "
                     f"{', '.join(STUDENTS)}, e.g. "
                     "configs/encoder/distill.py:cpu")
  return preset, student


def _base(batch_size, steps, lr):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.compute_dtype = "float32"
  config.layers = "flax"
  config.batch_size = batch_size
  config.steps = steps
  config.log_every = 50
  config.eval_every = steps
  config.checkpoint_every = 250
  config.on_nonfinite = "stop"
  # "auto" or a folder: the teacher's outputs per augmented view from
  # kd_jax.teacher_cache (the ViT-L forward paid once for every arm).
  config.teacher_cache = ml_collections.config_dict.placeholder(str)
  config.teacher_cache_dtype = "float32"
  config.teacher_cache_top_k = 0
  config.optimizer = dict(name="adamw", lr=lr, weight_decay=0.05,
                          momentum=0.9, warmup_steps=steps // 20,
                          grad_clip=1.0)
  return config


def _teacher_cpu():
  """A supervised ViT on PALM: the cpu preset's teacher."""
  # 600 steps of 32: 60 epochs of PALM's 320 training images.
  config = _base(batch_size=32, steps=600, lr=1e-3)
  config.data = dict(name="palm", num_classes=3, image_size=64,
                     augment=True, workers=0, transfer_dtype="float32",
                     augment_on_device=False)
  config.stages = dict(teacher=dict(
      method="supervised", model=dict(CPU_TEACHER, num_classes=3),
      losses=dict(ce=dict(fn="cross_entropy"))))
  config.stage_order = ("teacher",)
  return config


def _arms(grid, teacher_width):
  """{arm: loss terms}; `grid` is the teacher's patch grid (h, w)."""
  del teacher_width  # The connectors take the teacher's width themselves.
  glob = dict(student="embedding", teacher="embedding", connector="linear")
  dense = dict(fn="feature_map_cosine", student="stage4",
               teacher="patch_map")
  attn = dict(dense, connector=dict(kind="attention_pool", grid=grid,
                                    hidden=128, num_heads=4))
  interp = dict(dense, connector=dict(kind="resize_conv1x1", grid=grid))
  return dict(
      global_cos=dict(emb=dict(glob, fn="embedding_cosine")),
      global_l2=dict(emb=dict(glob, fn="embedding_l2")),
      dense_attn=dict(dense=attn),
      dense_interp=dict(dense=interp),
      global_dense=dict(emb=dict(glob, fn="embedding_cosine"), dense=attn),
  )


def get_config(arg=None):
  preset, student = parse_arg(arg)
  if preset == "teacher_cpu":
    return _teacher_cpu()
  paper = preset == "paper"
  size = 224 if paper else 64
  if paper:
    config = _base(batch_size=128, steps=20000, lr=1e-3)
    config.compute_dtype = "bfloat16"
    teacher = dict(name="vit_l16", num_classes=0, image_size=size)
    grid = (size // 16,) * 2
    checkpoint = ""  # An imported ViT-L/16: the user's own.
  else:
    # 300 steps of 32: ~2 passes over the 4,449 pooled training images
    # (the 2-core study's budget, module docstring).
    config = _base(batch_size=32, steps=300, lr=2e-3)
    # kd_jax.cpu_layers' XLA:CPU forms (1×1 convolutions as matmuls).
    config.layers = "cpu"
    teacher = dict(CPU_TEACHER, num_classes=3)
    grid = (size // CPU_TEACHER["patch"],) * 2
    checkpoint = CPU_TEACHER_DIR
  # One reference for every arm's teacher folder: setting any arm's
  # teacher.checkpoint on the command line sets them all.
  checkpoint = ml_collections.FieldReference(checkpoint)
  # On a GPU host: --config.data.workers=8 --config.data.transfer_dtype=uint8
  # (the pooled images are in [0, 1]) --config.data.augment_on_device=True
  # (the crops and jitter in the step); docs/usage.md.
  config.data = dict(name="shared_images", image_size=size, channels=3,
                     augment=True, workers=0, transfer_dtype="float32",
                     augment_on_device=False)
  model = dict(name=f"efficientvit_{student}", num_classes=0)
  config.stages = {
      arm: dict(method="distill", model=model,
                teacher=dict(model=teacher, checkpoint=checkpoint),
                losses=losses)
      for arm, losses in _arms(grid, None).items()}
  config.stage_order = ARMS
  config.study = dict(seeds=(0, 1, 2) if paper else (0, 1))
  return config
