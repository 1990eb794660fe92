"""kd_jax.study --merge: one table over seeds that ran apart, from their
study.json files (segmentation and head studies, the lesion read-out,
fractions), and the one-line refusals."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import default, fundus_mtl
from kd_jax import data, study, train
from kd_jax.evaluate import lesion_iou

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _heads_config():
  c = fundus_mtl.get_config("cpu,synthetic")
  c.data.num_train, c.data.num_val, c.data.num_test = 8, 4, 4
  c.study.columns = ("dr_grade/kappa",)
  return c


def _lesions(seeds, rng):
  per_seed = {str(s): {"a/theta": dict(jaccard=list(rng.random(6)),
                                       dice=list(rng.random(6)))}
              for s in seeds}
  return dict(seeds=list(seeds), k=list(lesion_iou.KS), num_pixels=[1] * 6,
              input_hw=[8, 8], num_images=3, also_grading_images=2,
              forms=dict(jaccard="j", dice="d"), scores={},
              per_seed=per_seed, figures=dict(
                  bars="lesion_iou.png", overlays=f"seed{seeds[0]}/o.png"))


def _heads_part(tmp_path, c, seeds, rng, lesions=False):
  """A finished head study of `seeds` (made-up scores) in its folder."""
  ds = data.build(c.data)
  heads = train.run_heads(c, ds)
  per_seed = {s: {"student": {"dr_grade/kappa": float(rng.random())},
                  "kd": {"dr_grade/kappa": float(rng.random())}}
              for s in seeds}
  workdir = tmp_path / ("part_" + "_".join(map(str, seeds)))
  os.makedirs(workdir)
  c.study.seeds = tuple(seeds)
  study.write_heads_report(
      str(workdir), c, ds, heads, study.aggregate(per_seed),
      {"student": dict(model="m", params=10, gflops=0.1),
       "kd": dict(model="m", params=10, gflops=0.1)}, per_seed, {},
      _lesions(seeds, rng) if lesions else None)
  return str(workdir / "study.json"), per_seed


def test_merged_head_table_is_over_every_seed_with_its_sources(tmp_path):
  rng = np.random.default_rng(0)
  c = _heads_config()
  c.study.lesion_iou = True
  a, seeds_a = _heads_part(tmp_path, c, (0, 1), rng, lesions=True)
  b, seeds_b = _heads_part(tmp_path, c, (2,), rng, lesions=True)
  c.study.seeds = (0, 1, 2)
  out = tmp_path / "merged"
  result = study.merge(c, str(out), [a, os.path.dirname(b)])
  values = [p[s]["kd"]["dr_grade/kappa"] for p in (seeds_a, seeds_b)
            for s in p]
  row = result["table"]["kd"]["dr_grade/kappa"]
  np.testing.assert_allclose([row["mean"], row["std"]],
                             [np.mean(values), np.std(values, ddof=1)])
  assert result["seeds"] == [0, 1, 2]
  assert [m["seeds"] for m in result["merged_from"]] == [[0, 1], [2]]
  assert result["merged_from"][0]["code"] == study.provenance()["code"]
  # The lesion read-out over the three seeds' kept scores.
  lesion_parts = [json.load(open(p))["lesion_iou"]["per_seed"]
                  for p in (a, b)]
  dice = np.array([part[s]["a/theta"]["dice"] for part in lesion_parts
                   for s in part])
  got = result["lesion_iou"]["scores"]["a/theta"]["dice"]
  np.testing.assert_allclose(got["mean"], dice.mean(0))
  np.testing.assert_allclose(got["std"], dice.std(0, ddof=1))
  assert os.path.getsize(out / "lesion_iou.png") > 0
  assert result["lesion_iou"]["figures"]["overlays"] == os.path.join(
      os.path.dirname(a), "seed0/o.png")
  md = open(out / "study.md").read()
  assert "merged (`--merge`)" in md and f"seeds [2]: {b}" in md
  # A merged study merges again, keeping the original sources.
  again = study.merge(c, str(tmp_path / "again"), [str(out / "study.json")])
  assert again["merged_from"] == result["merged_from"]
  assert again["table"] == json.loads(json.dumps(result["table"]))


def test_merged_segmentation_table_and_gap(tmp_path):
  c = default.get_config()
  c.data.num_train, c.data.num_val, c.data.num_test = 4, 2, 2
  c.study = dict(seeds=(0, 1, 2))
  c.eval_window = 16  # Named in the report.
  ds = study._with_volumes(c, data.build(c.data))  # pylint: disable=protected-access
  rng = np.random.default_rng(1)
  names, parts, dice = ds.class_names, [], {}
  for seeds in ((0,), (1, 2)):
    per_seed = {}
    for s in seeds:
      per_seed[s] = {}
      for stage in ("teacher", "student", "kd"):
        d = float(rng.random())
        dice.setdefault(stage, []).append(d)
        per_seed[s][stage] = study.flat_scores(dict(
            mean_dice=d, mean_iou=d, mean_iou_all=d, pixel_accuracy=d,
            mean_hd95=1.0, dice=[None] + [d] * (len(names) - 1),
            iou=[d] * len(names), hd95=[None] + [1.0] * (len(names) - 1)),
            names)
    workdir = tmp_path / f"p{seeds[0]}"
    os.makedirs(workdir)
    info = {k: dict(model=k, params=1, gflops=0.5) for k in per_seed[seeds[0]]}
    study.write_report(str(workdir), c, ds, study.aggregate(per_seed), info,
                       {}, per_seed, {}, {})
    parts.append(str(workdir))
  result = study.merge(c, str(tmp_path / "m"), parts)
  row = result["table"]["kd"]["mean_dice"]
  np.testing.assert_allclose([row["mean"], row["std"]],
                             [np.mean(dice["kd"]), np.std(dice["kd"], ddof=1)])
  t, s, k = (np.mean(dice[n]) for n in ("teacher", "student", "kd"))
  assert result["gap_closed"]["kd"] == study.gap_closed(t, s, k)
  md = open(tmp_path / "m" / "study.md").read()
  assert "each slice on 16² sliding windows" in md


def test_merge_refusals_are_one_line(tmp_path):
  rng = np.random.default_rng(2)
  c = _heads_config()
  a, _ = _heads_part(tmp_path, c, (0, 1), rng)
  b, _ = _heads_part(tmp_path, c, (1,), rng)
  out = str(tmp_path / "m")
  cases = [
      ([a, b], "seed 1 is in both"),
      ([str(tmp_path / "nowhere.json")], "not a readable study.json"),
  ]
  other = _heads_config()
  other.optimizer.lr = 0.5
  for paths, match in cases:
    with pytest.raises(train.ConfigError, match=match) as e:
      study.merge(c, out, paths)
    assert "\n" not in str(e.value)
  with pytest.raises(train.ConfigError,
                     match=r"not a run of this config \(config.optimizer.lr: "
                     ) as e:
    study.merge(other, out, [a])
  assert "\n" not in str(e.value)
  assert not os.path.exists(out)
  # A part's own folder is never written over.
  part = os.path.dirname(a)
  before = open(a).read()
  with pytest.raises(train.ConfigError, match="holds a study's own "
                     "study.json; merge into a new folder"):
    study.merge(c, part, [a])
  assert open(a).read() == before


def test_merge_puts_each_file_in_its_fraction(tmp_path):
  rng = np.random.default_rng(3)
  c = _heads_config()
  c.stages.student.data = dict(train_fraction=1.0)
  c.study.fractions = (0.5, 1.0)
  files = {}
  for f, seeds in ((0.5, (0,)), (0.5, (1,)), (1.0, (0,))):
    sub = study.fraction_config(c, f)
    sub_dir = tmp_path / f"f{f}"
    os.makedirs(sub_dir, exist_ok=True)
    files.setdefault(f, []).append(
        _heads_part(sub_dir, sub, seeds, rng)[0])
  out = tmp_path / "m"
  result = study.merge(c, str(out), files[0.5] + files[1.0])
  assert sorted(result) == [0.5, 1.0]
  assert result[0.5]["seeds"] == [0, 1] and result[1.0]["seeds"] == [0]
  page = open(out / "study.md").read()
  assert "## 0.5 of the training split" in page and "## 1 of the" in page
  c.study.fractions = (0.25,)
  with pytest.raises(train.ConfigError, match="a run of none of the "
                     r"fractions \[0.25\]"):
    study.merge(c, str(tmp_path / "m2"), files[0.5])


def test_the_command_merges(tmp_path):
  rng = np.random.default_rng(4)
  c = _heads_config()
  a, _ = _heads_part(tmp_path, c, (0,), rng)
  b, _ = _heads_part(tmp_path, c, (1,), rng)
  out = tmp_path / "m"
  cmd = [sys.executable, "-m", "kd_jax.study",
         "--config=configs/fundus_mtl.py:cpu,synthetic",
         "--config.data.num_train=8", "--config.data.num_val=4",
         "--config.data.num_test=4",
         "--config.study.columns=('dr_grade/kappa',)",
         f"--workdir={out}", f"--merge={a},{b}"]
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  assert json.load(open(out / "study.json"))["seeds"] == [0, 1]
  # Not a run of this config: one line, nothing written.
  bad = subprocess.run(cmd[:-2] + ["--config.optimizer.lr=0.5",
                                   f"--workdir={tmp_path / 'bad'}",
                                   f"--merge={a}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith(
      f"error: --merge {a}: not a run of this config")
  assert not os.path.exists(tmp_path / "bad")


def test_the_recorded_command_is_the_line_to_paste():
  here = os.path.dirname(os.path.abspath(study.__file__))
  got = study._command([os.path.join(here, "study.py"),
                        "--config=configs/medtex/medtex.py:cpu,0.25",
                        "--config.study.seeds=(0,)", "--workdir=runs/a b"])
  assert got == ("python -m kd_jax.study "
                 "--config=configs/medtex/medtex.py:cpu,0.25 "
                 "'--config.study.seeds=(0,)' '--workdir=runs/a b'")
  assert study._command([os.path.join(here, "evaluate", "__main__.py"),
                         "--x=1"]) == "python -m kd_jax.evaluate --x=1"
  assert study._command(["my_script.py", "--y"]) == "my_script.py --y"
  assert study._command([]) == ""
