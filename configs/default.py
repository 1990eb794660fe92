"""Default experiment: UNet teacher → narrow UNet student on synthetic CT.

Three stages in one run, each in its own subfolder of the workdir:
  teacher    a wide UNet trained alone (CE + Dice)
  baseline   a narrow UNet trained alone (CE + Dice)
  distilled  the same narrow UNet distilled from the frozen teacher
             (CE + Dice + channel-wise distillation of the logits)
Sized to finish in minutes on a 2-core CPU.

Why channel-wise distillation (Shu et al., ICCV 2021) and not Hinton KD on
every pixel: the organs cover a few percent of the pixels, so a per-pixel KL
averaged over the image is mostly a background term; with it the narrow
student's result swung with the seed, on some seeds below the student alone. CWD turns each class
channel into a distribution over the pixels and matches those, so every
organ weighs the same. T = 1 keeps those distributions peaked on the organ
(the paper's T = 4, for 19-class street scenes, spreads them here). The
runs behind these choices: docs/default.md.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  # float32 on CPU; "bfloat16" computes in bf16 (float32 params and loss) on
  # GPU/TPU.
  config.compute_dtype = "float32"
  # kd_jax.cpu_layers' forms of flax's layers on a CPU backend (this demo
  # runs on CPUs); "flax" uses flax's own. Ignored on GPU/TPU.
  config.layers = "cpu"
  # Small batches, more updates: the narrow student learns each organ in a
  # jump, and 800 updates at batch 8 get it further than 400 at batch 16 for
  # the same compute.
  config.batch_size = 8
  config.steps = 800
  config.log_every = 100
  config.eval_every = 400
  # 0: evaluate on whole images; N: on N² sliding windows (models trained
  # on N² crops, docs/usage.md).
  config.eval_window = 0
  config.checkpoint_every = 200
  config.optimizer = dict(name="adamw", lr=3e-3, weight_decay=1e-4,
                          momentum=0.9, warmup_steps=30, grad_clip=1.0)
  config.data = dict(name="synthetic", image_size=64, num_train=512,
                     num_val=64, num_test=256, seed=0, augment=True)
  # How the batches reach the device (docs/usage.md); on a GPU host e.g.
  # --config.data.workers=8 --config.data.transfer_dtype=uint8.
  config.data.workers = 0
  config.data.transfer_dtype = "float32"
  # True: the augmentation runs batched in the jitted step.
  config.data.augment_on_device = False
  # Distill stages: read the teacher's outputs for each example's view of
  # each epoch from a cache on disk (kd_jax.teacher_cache) instead of running
  # the teacher every step: None (off), "auto" or a folder.
  config.teacher_cache = ml_collections.config_dict.placeholder(str)
  config.teacher_cache_dtype = "float32"
  config.teacher_cache_top_k = 0
  # A non-finite loss or gradient stops the stage ("stop"), or its update
  # is skipped up to max_skipped_steps times ("skip").
  config.on_nonfinite = "stop"
  config.max_skipped_steps = 10

  teacher = dict(name="unet", width=16, depth=3)
  # Width 8: its last map has 8 channels for 9 classes; at width 4 the
  # logits are a rank-4 map and which organs the student learns at all
  # changes from seed to seed.
  student = dict(name="unet", width=8, depth=3)
  # Loss terms by name, so that `--config.stages.distilled.losses.cwd.weight=2`
  # overrides one of them.
  task = dict(ce=dict(fn="cross_entropy", weight=1.0),
              dice=dict(fn="dice", weight=1.0))
  config.stage_order = ("teacher", "baseline", "distilled")
  config.stages = dict(
      # The teacher gets twice the updates: at 800 it missed the gallbladder
      # (the smallest organ) on one seed of three (docs/default.md).
      teacher=dict(method="supervised", model=teacher, losses=task,
                   steps=1600),
      baseline=dict(method="supervised", model=student, losses=task),
      distilled=dict(
          method="distill", model=student,
          teacher=dict(model=teacher, stage="teacher", checkpoint=""),
          losses=dict(task, cwd=dict(fn="cwd", weight=3.0, temperature=1.0))),
  )
  return config
