"""kd_jax.evaluate.lesion_iou: K scaled to the map's size, the top-K overlap
averaged over lesion images against numpy, the same-photograph matching of
IDRiD's two parts, and the pipeline on a tiny trained MED-TEX run."""
import json
import os
import sys

import numpy as np
import pytest

from kd_jax.data import sources
from kd_jax.evaluate import lesion_iou

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDRID = os.path.join(str(sources.resolve_data_dir()), "idrid")


def test_k_is_the_papers_share_of_the_image():
  assert [lesion_iou.num_pixels(k, (224, 224)) for k in (1, 6)] == [1024,
                                                                    6144]
  assert lesion_iou.num_pixels(1, (112, 112)) == 256
  assert lesion_iou.num_pixels(3, (16, 16)) == round(3 * 1024 / 196)


def test_scores_are_the_mean_over_lesion_images_against_numpy():
  rng = np.random.default_rng(0)
  maps = rng.uniform(size=(4, 32, 32))
  lesions = rng.uniform(size=(4, 32, 32)) < 0.15
  lesions[1] = False  # No lesion: left out of the mean.
  got = lesion_iou.topk_scores(maps, lesions, ks=(1, 4))
  for i, k in enumerate((1, 4)):
    n = round(k * 1024 * 32 * 32 / 224 ** 2)
    jac, dice = [], []
    for s, b in zip(maps[[0, 2, 3]], lesions[[0, 2, 3]]):
      a = s >= np.sort(s.ravel())[-n]
      inter = np.sum(a & b)
      jac.append(inter / np.sum(a | b))
      dice.append(2 * inter / (n + b.sum()))
    assert got["jaccard"][i] == pytest.approx(np.mean(jac), rel=1e-12)
    assert got["dice"][i] == pytest.approx(np.mean(dice), rel=1e-12)
  with pytest.raises(ValueError, match="no lesion mask"):
    lesion_iou.topk_scores(maps, np.zeros_like(lesions))
  with pytest.raises(ValueError, match="differ in shape"):
    lesion_iou.topk_scores(maps, lesions[:, :16])


def test_same_photographs_are_matched_across_sizes():
  rng = np.random.default_rng(1)
  b = rng.integers(0, 256, (5, 64, 64, 3)).astype(np.uint8)
  # a: b[3] upsampled 2x (same block means), b[0] with ±1 noise, and a new
  # image.
  up = np.repeat(np.repeat(b[3], 2, 0), 2, 1)
  noisy = np.clip(np.repeat(np.repeat(b[0], 2, 0), 2, 1).astype(int)
                  + rng.integers(-1, 2, (128, 128, 3)), 0, 255)
  new = rng.integers(0, 256, (128, 128, 3))
  a = np.stack([up, noisy, new]).astype(np.uint8)
  np.testing.assert_array_equal(lesion_iou.match_images(a, b), [3, 0, -1])


def test_42_of_the_54_lesion_images_are_grading_images():
  if not os.path.isdir(IDRID):
    pytest.skip("IDRiD is not in ../shared/data")
  match = lesion_iou.part_overlap()
  assert match.shape == (54,) and (match >= 0).sum() == 42
  # A lesion image matches one grading image, and every match has DR grade
  # >= 2 (lesion images show DR).
  assert len(set(match[match >= 0])) == 42
  grade = np.load(os.path.join(IDRID, "grading_256_train.npz"))[
      "train_dr_grade"]
  assert (grade[match[match >= 0]] >= 2).all()


@pytest.mark.slow
def test_pipeline_on_a_tiny_medtex_run(tmp_path):
  if not os.path.isdir(IDRID):
    pytest.skip("IDRiD is not in ../shared/data")
  sys.path.insert(0, ROOT)
  from kd_jax import data, train
  from tests.test_explain_method import _write_folder, tiny_config
  c = tiny_config(_write_folder(tmp_path / "pngs"), steps=2)
  ds = data.build(c.data)
  workdir = str(tmp_path / "run")
  for stage in c.stage_order:
    train.train_stage(c, stage, workdir, ds)
  report = lesion_iou.evaluate(c, workdir, max_images=3)
  assert set(report["scores"]) == {"teacher/saliency", "teacher/grad_cam",
                                   "medtex/theta", "chance/random"}
  assert report["input_hw"] == [16, 16] and report["num_images"] == 3
  for s in report["scores"].values():
    assert len(s["jaccard"]) == len(s["dice"]) == 6
    assert all(0 <= j <= d <= 1 for j, d in zip(s["jaccard"], s["dice"]))
  out = os.path.join(workdir, "lesion_iou")
  with open(os.path.join(out, "lesion_iou.json")) as f:
    assert json.load(f)["k"] == [1, 2, 3, 4, 5, 6]
  assert all(os.path.getsize(os.path.join(out, p)) > 0
             for p in ("lesion_iou.png", "overlays.png"))
