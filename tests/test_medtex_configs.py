"""configs/medtex: the arms of the MED-TEX study on PALM, the less-data
fractions (fixed, seeded, nested subsets), bad args."""
import os

import numpy as np
import pytest

from configs.medtex import medtex
from kd_jax import data, train
from kd_jax.data import sources

PALM = os.path.join(str(sources.resolve_data_dir()), "palm")


@pytest.mark.parametrize("arg", ["cpu,1.5", "gpu", "cpu,half", "cpu,1.0,x"])
def test_bad_args_are_one_line(arg):
  with pytest.raises(ValueError, match="expected <preset>\\[,<fraction>\\]"):
    medtex.get_config(arg)


def test_the_arms_differ_as_the_paper_says():
  c = medtex.get_config("cpu,0.25")
  s = {n: train.stage_config(c, n) for n in c.stage_order}
  assert [s[n]["method"] for n in c.stage_order] == [
      "supervised", "supervised", "distill", "distill", "explain", "explain"]
  fns = {n: sorted(t["fn"] for t in s[n]["losses"]) for n in s}
  assert fns["kd"] == fns["med_ex"] == ["soft_cross_entropy"]
  assert fns["vid"] == fns["med_tex"] == ["soft_cross_entropy"] + ["vid"] * 4
  assert {t.get("weight") for t in s["med_tex"]["losses"]
          if t["fn"] == "vid"} == {0.01}
  # One student; the teacher on all of the train split, the rest on 25 %.
  assert len({str(s[n]["model"]) for n in c.stage_order[1:]}) == 1
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
