"""kd_jax.study's post-hoc fidelity columns (`config.study.fidelity`, the
MED-TEX read-out): predictions through `method.predict`, fidelity to the
reference stage and the positive-class F1 against numpy; a bad reference is
one line before training; a tiny study writes the columns."""
import json
import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import study, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Threshold:
  """A stand-in classifier: class 1 where the image's mean exceeds `t` (its
  predict is the real jnp computation the study runs)."""

  def __init__(self, t):
    self.t = t

  def predict(self, params, batch_stats, images):
    m = images.mean((1, 2, 3))
    return jnp.stack([self.t - m, m - self.t], -1)


def _f1(pred, ref, c):
  tp = np.sum((pred == c) & (ref == c))
  return 2 * tp / (2 * tp + np.sum((pred == c) != (ref == c)))


def test_fidelity_and_positive_f1_against_numpy():
  rng = np.random.default_rng(0)
  source = [dict(image=rng.uniform(size=(4, 4, 3)).astype(np.float32),
                 label=np.int32(rng.integers(0, 2))) for _ in range(23)]
  means = np.array([e["image"].mean() for e in source])
  labels = np.array([e["label"] for e in source])
  state = types.SimpleNamespace(params={}, batch_stats={})
  seen = {}
  t_out = study._fidelity("teacher", "teacher", Threshold(0.5), state,
                          source, 8, 2, seen)
  teacher = (means > 0.5).astype(int)
  np.testing.assert_array_equal(seen["teacher"], teacher)
  assert t_out == {"f1_positive": pytest.approx(_f1(teacher, labels, 1))}
  out = study._fidelity("teacher", "med_tex", Threshold(0.48), state,
                        source, 8, 2, seen)
  student = (means > 0.48).astype(int)
  assert student.tolist() != teacher.tolist()  # The test can fail.
  assert out["fidelity_accuracy"] == pytest.approx(np.mean(student ==
                                                           teacher))
  assert out["fidelity_f1_positive"] == pytest.approx(
      _f1(student, teacher, 1))
  assert out["fidelity_f1"] == pytest.approx(
      (_f1(student, teacher, 0) + _f1(student, teacher, 1)) / 2)
  assert out["f1_positive"] == pytest.approx(_f1(student, labels, 1))


def _tiny(tmp_path, steps=2):
  sys.path.insert(0, ROOT)
  from tests.test_explain_method import _write_folder, tiny_config
  c = tiny_config(_write_folder(tmp_path / "pngs"), steps=steps)
  c.study = dict(seeds=(0,), fidelity="teacher",
                 columns=("fidelity_accuracy", "fidelity_f1_positive",
                          "accuracy", "f1_positive"))
  return c


def test_a_reference_outside_the_stages_is_one_line(tmp_path):
  from kd_jax import data, tasks
  c = _tiny(tmp_path)
  c.study.fidelity = "teachr"
  ds = data.build(c.data)
  with pytest.raises(train.ConfigError, match="study.fidelity='teachr': "
                     "name a stage of stage_order"):
    study.run_heads(c, str(tmp_path / "run"), ds,
                    tasks.from_config(None, ds.targets))


@pytest.mark.slow
def test_tiny_study_writes_the_fidelity_columns(tmp_path):
  from kd_jax import data, tasks
  c = _tiny(tmp_path)
  ds = data.build(c.data)
  workdir = str(tmp_path / "run")
  study.run_heads(c, workdir, ds, tasks.from_config(None, ds.targets))
  with open(os.path.join(workdir, "study.json")) as f:
    table = json.load(f)["table"]
  assert "fidelity_accuracy" not in table["teacher"]
  for key in ("fidelity_accuracy", "fidelity_f1", "fidelity_f1_positive",
              "f1_positive", "accuracy"):
    assert key in table["medtex"], key
  with open(os.path.join(workdir, "study.md")) as f:
    text = f.read()
  assert "| fidelity_accuracy | fidelity_f1_positive |" in text
  assert "macro F1 over both classes" in text
  # The explain stage's params are what it deploys: explainer + student.
  from kd_jax import models  # pylint: disable=import-outside-toplevel
  shape = (1,) + ds.train[0]["image"].shape
  count = lambda m: models.summary(models.build(**m.to_dict()), shape)[
      "params"]
  want = (count(c.stages.medtex.explainer.model)
          + count(c.stages.medtex.model))
  row = next(line for line in text.splitlines()
             if line.startswith("| medtex |"))
  assert f"| {want:,} |" in row, row
  assert " + " in row.split("|")[2], row
