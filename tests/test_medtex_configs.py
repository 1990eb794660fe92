"""configs/medtex: the arms of the MED-TEX study on PALM, the less-data
fractions (fixed, seeded, nested subsets), bad args."""
import os

import numpy as np
import pytest

from configs.medtex import medtex
from kd_jax import data, train
from kd_jax.data import sources

PALM = os.path.join(str(sources.resolve_data_dir()), "palm")


@pytest.mark.parametrize("arg", ["cpu,1.5", "gpu", "cpu,half", "cpu,1.0,x",
                                 "cpu,1.0,idrid,x"])
def test_bad_args_are_one_line(arg):
  with pytest.raises(ValueError, match="expected <preset>\\[,<fraction>\\]"):
    medtex.get_config(arg)


def test_the_arms_differ_as_the_paper_says():
  c = medtex.get_config("cpu,0.25")
  s = {n: train.stage_config(c, n) for n in c.stage_order}
  assert [s[n]["method"] for n in c.stage_order] == [
      "supervised", "supervised", "distill", "distill", "explain", "explain",
      "distill", "distill"]
  fns = {n: sorted(t["fn"] for t in s[n]["losses"]) for n in s}
  assert fns["kd"] == fns["med_ex"] == ["soft_cross_entropy"]
  assert fns["vid"] == fns["med_tex"] == ["soft_cross_entropy"] + ["vid"] * 4
  assert {t.get("weight") for t in s["med_tex"]["losses"]
          if t["fn"] == "vid"} == {0.01}
  # One student; the teacher on all of the train split, the rest on 25 %.
  assert len({str(s[n]["model"]) for n in c.stage_order[1:6]}) == 1
  # The explanation baselines: the student's widths behind their own mask.
  assert [s[n]["model"]["name"] for n in ("attention", "l2x")] == [
      "medtex_attention_student", "medtex_l2x_student"]
  assert fns["attention"] == fns["l2x"] == ["soft_cross_entropy"]
  assert not c.stages.teacher.get("data")
  assert all(c.stages[n].data.train_fraction == 0.25
             for n in c.stage_order[1:])


@pytest.fixture(scope="module")
def palm():
  if not os.path.isdir(PALM):
    pytest.skip("PALM is not in ../shared/data")
  return data.build(medtex.get_config("cpu").data)


def test_cpu_preset_validates_and_fractions_nest(palm, tmp_path):
  c = medtex.get_config("cpu,0.25")
  train.validate(c, str(tmp_path), palm)

  def ids(fraction):
    c = medtex.get_config(f"cpu,{fraction}")
    train_split = train.stage_datasets(c, "med_tex", palm).train
    return {np.asarray(train_split[i]["image"]).tobytes()
            for i in range(len(train_split))}

  quarter, half, whole = ids(0.25), ids(0.5), ids(1.0)
  assert (len(quarter), len(half), len(whole)) == (80, 160, 320)
  assert quarter < half < whole
  assert ids(0.25) == quarter  # Fixed: the same subset on a rebuild.


def test_idrid_choice_is_referable_dr_and_keeps_the_arms():
  palm_config = medtex.get_config("cpu,0.5")
  c = medtex.get_config("cpu,0.5,idrid")
  assert c.data.name == "idrid_referable"
  assert medtex.get_config("cpu,,idrid").stages.kd.data.train_fraction == 1
  assert c.stage_order == palm_config.stage_order
  assert c.steps == 30 * 330 // 16 and palm_config.steps == 30 * 320 // 16
  assert all(c.stages[n].data.train_fraction == 0.5
             for n in c.stage_order[1:])


def test_referable_labels_are_grade_two_or_more():
  path = os.path.join(str(sources.resolve_data_dir()), "idrid",
                      "grading_256_train.npz")
  if not os.path.isfile(path):
    pytest.skip("IDRiD is not in ../shared/data")
  cfg = medtex.get_config("cpu,1.0,idrid").data
  cfg.image_size = 8  # The labels alone are checked: small images are quick.
  ds = data.build(cfg)
  grade = np.load(path)["train_dr_grade"]
  assert (len(ds.train), len(ds.val)) == (330, 83)
  for split in (ds.train, ds.val):
    got = np.array([int(split[i]["label"]) for i in range(len(split))])
    want = np.array([int(split[i]["dr_grade"]) >= 2
                     for i in range(len(split))])
    np.testing.assert_array_equal(got, want)
  # Class-stratified: val's share of referable images is the file's.
  val = np.array([int(ds.val[i]["label"]) for i in range(len(ds.val))])
  assert abs(val.sum() - (grade >= 2).mean() * 83) <= 1.5
