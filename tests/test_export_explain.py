"""kd_jax.export and python -m kd_jax.evaluate on an explain (MED-TEX)
stage: explainer + student deployed together, loaded back and serialized,
giving the method's own prediction and mask Θ.

A tiny teacher and MED-TEX stage (tests/test_explain_method.py's config on
16×16 PNGs) are trained once per module, a few steps each.
"""
import json
import os
import sys

import jax
import numpy as np
import pytest

from kd_jax import checkpoint, data, export, train
from kd_jax.evaluate import __main__ as evaluate_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.test_explain_method import (  # noqa: E402
    EXPLAINER, STUDENT, _write_folder, tiny_config)
from tests.test_export import _run_jax_only  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  c = tiny_config(_write_folder(tmp_path_factory.mktemp("pngs")))
  ds = data.build(c.data)
  workdir = str(tmp_path_factory.mktemp("medtex_run"))
  train.train_stage(c, "teacher", workdir, ds)
  method, state = train.train_stage(c, "medtex", workdir, ds)
  out = str(tmp_path_factory.mktemp("export") / "medtex")
  assert export.export(c, workdir, "medtex", out) == out
  images = np.stack([ds.test[i]["image"] for i in range(len(ds.test))])
  return c, ds, workdir, method, jax.device_get(state), out, images


def test_model_json_describes_explainer_and_student(exported):
  *_, out, _ = exported
  with open(os.path.join(out, "model.json")) as f:
    spec = json.load(f)
  kwargs = lambda cfg: {k: list(v) if isinstance(v, tuple) else v  # noqa
                        for k, v in cfg.items() if k != "name"}
  assert spec["model"] == dict(
      module="kd_jax.models.medtex.MedTexExplained",
      parts=dict(explainer=dict(name=EXPLAINER["name"],
                                kwargs=kwargs(EXPLAINER)),
                 student=dict(name=STUDENT["name"], kwargs=kwargs(STUDENT))))
  assert spec["features"] == ["mask"] and spec["num_classes"] == 2
  assert spec["method"] == "explain" and spec["input_shape"] == [16, 16, 3]


def test_load_gives_the_trained_pair_and_the_methods_explanation(exported):
  _, _, _, method, state, out, images = exported
  model, variables = export.load(out)
  # Explainer and student, exactly as trained: no connectors, no teacher.
  want = {c: {k: getattr(state, c)[k] for k in ("explainer", "student")}
          for c in ("params", "batch_stats")}
  assert jax.tree.structure(variables) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, variables, want)
  logits, features = jax.jit(
      lambda v, x: model.apply(v, x, train=False))(variables, images)
  want_logits, want_mask = jax.jit(method.explain)(
      state.params, state.batch_stats, images)
  assert features["mask"].shape == images.shape[:3] + (1,)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(features["mask"], want_mask, rtol=1e-6,
                             atol=1e-6)
  # A trained mask, not a constant: the comparison says something.
  assert float(np.ptp(want_mask)) > 0


def test_serialized_forward_gives_prediction_and_mask_with_jax_alone(
    exported, tmp_path):
  _, _, _, method, state, out, images = exported
  got = _run_jax_only(out, images[:3], tmp_path)  # Any batch size.
  want_logits, want_mask = method.explain(state.params, state.batch_stats,
                                          images[:3])
  assert set(got) == {"0", "1/mask"}
  np.testing.assert_allclose(got["0"], want_logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got["1/mask"], want_mask, rtol=1e-6, atol=1e-6)


def test_evaluate_scores_the_explain_stage(exported):
  c, ds, workdir, method, state, _, images = exported
  report = evaluate_cli.evaluate_checkpoints(c, workdir, stages=["medtex"])
  labels = np.array([ds.test[i]["label"] for i in range(len(ds.test))])
  pred = np.asarray(method.predict(state.params, state.batch_stats,
                                   images)).argmax(-1)
  got = report["stages"]["medtex"]
  assert got["method"] == "explain" and report["num_images"] == len(labels)
  np.testing.assert_allclose(got["accuracy"], np.mean(pred == labels),
                             rtol=1e-6)


def test_a_checkpoint_without_the_deployed_keys_is_one_line(exported):
  _, _, workdir, *_ = exported
  with pytest.raises(ValueError, match=r"holds no \['explainer', 'student'\]"
                     r".*trained by another method") as e:
    checkpoint.load_model_variables(os.path.join(workdir, "teacher"),
                                    ("explainer", "student"))
  assert "\n" not in str(e.value)


def test_load_refuses_a_module_outside_kd_jax_models(exported, tmp_path):
  *_, out, _ = exported
  with open(os.path.join(out, "model.json")) as f:
    spec = json.load(f)
  spec["model"]["module"] = "os.system"
  with open(tmp_path / "model.json", "w") as f:
    json.dump(spec, f)
  with pytest.raises(ValueError, match="model.module 'os.system' is not a "
                     "class of kd_jax.models"):
    export.load(str(tmp_path))
  spec["model"]["module"] = "kd_jax.models.nope.Gone"
  with open(tmp_path / "model.json", "w") as f:
    json.dump(spec, f)
  with pytest.raises(ValueError, match="does not exist in this kd_jax"):
    export.load(str(tmp_path))
