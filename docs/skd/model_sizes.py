"""Params and GFLOPs of every Structured KD model, at both presets.

    python docs/skd/model_sizes.py > docs/skd/models.md

Builds the teacher, each student (`student=` of configs/skd/ablation.py)
and the holistic term's critic as the config builds them, for ACDC's four
classes and one image channel, and counts them with `models.summary` (XLA
cost analysis of the eval forward at batch 1; a multiply-add = 2 FLOPs).
The cpu preset runs on 64² inputs (DRIVE: 64² crops and windows), the
paper preset on 512² crops.
"""
import importlib.util
import pathlib

from kd_jax import models

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLASSES, CHANNELS = 4, 1
SIZES = {"cpu": 64, "paper": 512}


def _ablation():
  spec = importlib.util.spec_from_file_location(
      "ablation", ROOT / "configs" / "skd" / "ablation.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _size(model_cfg, size, channels, **extra):
  cfg = dict(model_cfg, **extra)
  s = models.summary(models.build(cfg.pop("name"), **cfg),
                     (1, size, size, channels))
  return f"{s['params'] / 1e6:.2f} M", f"{s['flops'] / 1e9:.3f}"


def main():
  ablation = _ablation()
  rows, critics = {}, {}
  for preset, size in SIZES.items():
    for student in ablation.STUDENTS:
      stages = ablation.get_config(
          f"{preset},acdc,student={student}").stages
      teacher, critic = stages.teacher.model, stages.skd.critic.model
      rows.setdefault(f"teacher: {teacher.name}", {})[preset] = _size(
          teacher.to_dict(), size, CHANNELS, num_classes=CLASSES)
      rows.setdefault(f"student: {student}", {})[preset] = _size(
          stages.student.model.to_dict(), size, CHANNELS,
          num_classes=CLASSES)
      # The critic sees the class probabilities beside the image.
      critics.setdefault(f"critic (training only): {critic.name}", {})[
          preset] = _size(critic.to_dict(), size, CLASSES + CHANNELS)
  print("| model | cpu params | cpu GFLOPs (64²) | paper params "
        "| paper GFLOPs (512²) |")
  print("|---|---:|---:|---:|---:|")
  for name, by in {**rows, **critics}.items():
    print(f"| {name} | " + " | ".join(f"{by[p][0]} | {by[p][1]}"
                                      for p in SIZES) + " |")


if __name__ == "__main__":
  main()
