"""Default experiment: UNet teacher → narrow UNet student on synthetic CT.

Three stages in one run, each in its own subfolder of the workdir:
  teacher    a wide UNet trained alone (CE + Dice)
  baseline   a narrow UNet trained alone (CE + Dice)
  distilled  the same narrow UNet distilled from the frozen teacher
             (CE + Dice + Hinton KD on every pixel)
Sized to finish in under 10 minutes on a 2-core CPU.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  # float32 on CPU; "bfloat16" computes in bf16 (float32 params and loss) on
  # GPU/TPU.
  config.compute_dtype = "float32"
  config.batch_size = 16
  config.steps = 400
  config.log_every = 50
  config.eval_every = 200
  config.checkpoint_every = 100
  config.optimizer = dict(name="adamw", lr=3e-3, weight_decay=1e-4,
                          momentum=0.9, warmup_steps=30, grad_clip=1.0)
  config.data = dict(name="synthetic", image_size=64, num_train=512,
                     num_val=64, num_test=256, seed=0, augment=True)
  # Distill stages: compute the teacher's outputs once per training example
  # and reuse them every epoch (needs data.augment=False: a random view per
  # epoch would need a new teacher forward).
  config.teacher_cache = False

  teacher = dict(name="unet", width=16, depth=3)
  student = dict(name="unet", width=4, depth=3)
  # Loss terms by name, so that `--config.stages.distilled.losses.kd.weight=2`
  # overrides one of them.
  task = dict(ce=dict(fn="cross_entropy", weight=1.0),
              dice=dict(fn="dice", weight=1.0))
  config.stage_order = ("teacher", "baseline", "distilled")
  config.stages = dict(
      teacher=dict(method="supervised", model=teacher, losses=task),
      baseline=dict(method="supervised", model=student, losses=task),
      distilled=dict(
          method="distill", model=student,
          teacher=dict(model=teacher, stage="teacher", checkpoint=""),
          losses=dict(task, kd=dict(fn="kd_kl", weight=1.0, temperature=4.0))),
  )
  return config
