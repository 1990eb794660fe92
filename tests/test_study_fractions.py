"""kd_jax.study's less-data sweep (`study.fractions`) and lesion read-out
over seeds (`study.lesion_iou`, `lesion_iou.study`): which stages move with
the fraction, one-line refusals, the seed mean ± std against numpy, and a
tiny end-to-end study (slow)."""
import json
import os
import sys

import numpy as np
import pytest

from kd_jax import study, train
from kd_jax.evaluate import lesion_iou

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDRID = os.path.join(ROOT, "..", "shared", "data", "idrid")


def _medtex(arg):
  sys.path.insert(0, ROOT)
  from configs.medtex import medtex  # pylint: disable=import-outside-toplevel
  return medtex.get_config(arg)


def test_a_fraction_moves_the_subset_stages_and_not_the_teacher():
  c = _medtex("cpu,all,idrid")
  assert tuple(c.study.fractions) == (0.25, 0.5, 1.0) and c.study.lesion_iou
  f = study.fraction_config(c, 0.25)
  for name in c.stage_order:
    got = (f.stages[name].get("data") or {}).get("train_fraction")
    assert got == (None if name == "teacher" else 0.25), name
  assert not f.study.fractions  # One level: the sub-study does not sweep.
  assert c.stages.kd.data.train_fraction == 1.0  # The original is kept.
  one = _medtex("cpu,0.5")
  assert not one.study.fractions and not one.study.lesion_iou
  with pytest.raises(ValueError, match="or all"):
    _medtex("cpu,0.3")


@pytest.mark.parametrize("fractions,match", [
    ((0.5, 1.5), r"study.fractions=\[0.5, 1.5\]: fractions in \(0, 1\]"),
    ((0.5,), "no stage sets data.train_fraction"),
])
def test_bad_sweeps_are_one_line(tmp_path, fractions, match):
  c = _medtex("cpu,all")
  c.study.fractions = fractions
  if fractions == (0.5,):
    for name in c.stages:
      c.stages[name].data = {}
  with pytest.raises(train.ConfigError, match=match) as e:
    study.run_fractions(c, str(tmp_path / "run"))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "run")


def test_seed_mean_and_std_against_numpy():
  rng = np.random.default_rng(0)
  values = rng.uniform(size=(3, 2, 2, 6))  # seed, method, form, k
  reports = [{"scores": {m: {f: values[s, i, j].tolist()
                             for j, f in enumerate(("jaccard", "dice"))}
                         for i, m in enumerate(("a/theta", "b/grad_cam"))}}
             for s in range(3)]
  reports[1]["scores"]["c/saliency"] = reports[1]["scores"]["a/theta"]
  got = lesion_iou.combine(reports)
  assert list(got) == ["a/theta", "b/grad_cam"]  # c: not in every seed.
  for i, m in enumerate(got):
    for j, f in enumerate(("jaccard", "dice")):
      np.testing.assert_allclose(got[m][f]["mean"], values[:, i, j].mean(0))
      np.testing.assert_allclose(got[m][f]["std"],
                                 values[:, i, j].std(0, ddof=1))
  one = lesion_iou.combine(reports[:1])
  assert one["a/theta"]["dice"]["std"] == [None] * 6  # study.mean_std's rule.
  np.testing.assert_allclose(one["a/theta"]["dice"]["mean"], values[0, 0, 1])


@pytest.mark.slow  # 2 fractions × 2 seeds of a tiny MED-TEX run (~2 min).
def test_tiny_sweep_with_the_lesion_read_out(tmp_path):
  if not os.path.isdir(IDRID):
    pytest.skip("IDRiD is not in ../shared/data")
  sys.path.insert(0, ROOT)
  from tests.test_explain_method import _write_folder, tiny_config
  c = tiny_config(_write_folder(tmp_path / "pngs"), steps=2)
  c.stages.medtex.data = dict(train_fraction=1.0)
  c.study = dict(seeds=(0, 1), fidelity="teacher", lesion_iou=True,
                 fractions=(0.5, 1.0), columns=("fidelity_accuracy",
                                                "accuracy"))
  workdir = str(tmp_path / "run")
  study.run(c, workdir)
  page = open(os.path.join(workdir, "study.md")).read()
  for f in ("0.5", "1"):
    sub = os.path.join(workdir, f"fraction{f}")
    record = json.load(open(os.path.join(sub, "study.json")))
    assert record["config"]["stages"]["medtex"]["data"][
        "train_fraction"] == float(f)
    assert f"## {f} of the training split" in page
    # The read-out over seeds is the numpy mean of the seeds' own JSONs.
    seeds = [json.load(open(os.path.join(sub, f"seed{s}", "lesion_iou",
                                         "lesion_iou.json")))
             for s in (0, 1)]
    combined = json.load(open(os.path.join(sub, "lesion_iou.json")))
    assert set(combined["scores"]) == {"teacher/saliency",
                                       "teacher/grad_cam", "medtex/theta",
                                       "chance/random"}
    for m, forms in combined["scores"].items():
      for form, s in forms.items():
        np.testing.assert_allclose(
            s["mean"], np.mean([r["scores"][m][form] for r in seeds], 0))
    assert os.path.getsize(os.path.join(sub, "lesion_iou.png")) > 0
    assert "| medtex/theta |" in open(os.path.join(sub, "study.md")).read()
  # Rerun: every stage finished, the seeds' lesion JSONs are reused.
  path = os.path.join(workdir, "fraction0.5", "seed1", "lesion_iou",
                      "lesion_iou.json")
  before = os.path.getmtime(path)
  study.run(c, workdir)
  assert os.path.getmtime(path) == before


# 2 fractions of a tiny MED-TEX run, one seed (~20 s: in the fast set).
def test_a_stage_alike_at_every_fraction_trains_once(tmp_path):
  sys.path.insert(0, ROOT)
  from tests.test_explain_method import _write_folder, tiny_config
  c = tiny_config(_write_folder(tmp_path / "pngs"), steps=2)
  c.stages.medtex.data = dict(train_fraction=1.0)
  c.study = dict(seeds=(0,), fidelity="teacher", fractions=(0.5, 1.0),
                 columns=("fidelity_accuracy", "accuracy"))
  workdir = str(tmp_path / "run")
  study.run(c, workdir)
  timed = {f: json.load(open(os.path.join(workdir, f"fraction{f}",
                                          "study.json")))["timings_s"]
           for f in ("0.5", "1")}
  assert set(timed["0.5"]) == {"seed0/teacher", "seed0/medtex"}
  assert set(timed["1"]) == {"seed0/medtex"}  # The teacher: copied.
  first, second = (os.path.join(workdir, f"fraction{f}", "seed0", "teacher")
                   for f in ("0.5", "1"))
  files = sorted(os.path.relpath(os.path.join(d, n), first)
                 for d, _, names in os.walk(first) for n in names
                 if n != train.LOCK_FILE)
  assert files == sorted(os.path.relpath(os.path.join(d, n), second)
                         for d, _, names in os.walk(second) for n in names)
  for name in files:
    assert open(os.path.join(first, name), "rb").read() == open(
        os.path.join(second, name), "rb").read(), name
  # Its scores in the second fraction are those of the same checkpoint.
  tables = [json.load(open(os.path.join(workdir, f"fraction{f}",
                                        "study.json")))["per_seed"]["0"]
            for f in ("0.5", "1")]
  assert tables[0]["teacher"] == tables[1]["teacher"]
  study.run(c, workdir)  # Rerun: nothing trains again.
  assert json.load(open(os.path.join(second, "..", "..", "study.json")))[
      "timings_s"] == {}
