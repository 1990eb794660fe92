"""kd_jax.export: the student alone, written and loaded back.

The export runs in-process (the command is a thin flag wrapper around
`export.export`; tests/test_evaluate_cli.py runs the same flag set up as a
real command).
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from kd_jax import data, export, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The tiny runs are shared with the evaluate tests (trained once per
# session).
from tests.test_evaluate_cli import (  # noqa: E402
    trained_heads_run, trained_run)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  c, ds, workdir, _, stages = trained_run(tmp_path_factory)
  out = str(tmp_path_factory.mktemp("export") / "student")
  assert export.export(c, workdir, "distilled", out) == out
  return c, ds, workdir, stages["distilled"], out


def test_model_json_describes_the_student(exported):
  _, _, _, _, out = exported
  with open(os.path.join(out, "model.json")) as f:
    spec = json.load(f)
  assert spec["model"] == dict(name="unet", kwargs=dict(width=2, depth=2,
                                                        num_classes=9))
  assert spec["num_classes"] == 9 and spec["input_shape"] == [16, 16, 1]
  assert spec["stage"] == "distilled" and spec["dtype"] == "float32"


def test_load_gives_the_student_alone(exported):
  _, _, _, (_, state), out = exported
  model, variables = export.load(out)
  assert set(variables) == {"params", "batch_stats"}
  # Exactly the student's trained arrays: no connectors, optimizer, teacher.
  student = jax.device_get({"params": state.params["student"],
                            "batch_stats": state.batch_stats["student"]})
  assert (jax.tree.structure(variables) == jax.tree.structure(student))
  jax.tree.map(np.testing.assert_array_equal, variables, student)
  assert model.width == 2 and model.depth == 2


def test_loaded_model_reproduces_the_students_predictions(exported):
  _, ds, _, (method, state), out = exported
  model, variables = export.load(out)
  images = np.stack([ds.test[i]["image"] for i in range(len(ds.test))])
  want = jax.jit(method.predict)(state.params, state.batch_stats, images)
  logits, features = jax.jit(
      lambda v, x: model.apply(v, x, train=False))(variables, images)
  np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(want, -1))
  np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)
  assert "dec1" in features


# Loads the serialized forward in a process that imports jax and numpy only,
# and checks that neither kd_jax nor flax got imported along the way.
_JAX_ONLY = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    out, images, result = sys.argv[1:]
    with open(out + "/inference.jax", "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    params = dict(np.load(out + "/inference_params.npz"))
    outputs = exported.call(params, np.load(images))
    # Any pytree of outputs by its path: "" for one array, "dr_grade" for a
    # head, "0" and "1/mask" for (outputs, {"mask": ...}).
    flat = jax.tree_util.tree_flatten_with_path(outputs)[0]
    np.savez(result, **{jax.tree_util.keystr(p, simple=True, separator="/"):
                        np.asarray(v) for p, v in flat})
    assert not {"kd_jax", "flax"} & set(sys.modules), "imported kd_jax/flax"
""")


def _run_jax_only(out, images, tmp_path) -> dict:
  np.save(tmp_path / "images.npy", images)
  result = tmp_path / "outputs.npz"
  # Run from the temporary folder: kd_jax is not importable from there.
  subprocess.run([sys.executable, "-c", _JAX_ONLY, out,
                  str(tmp_path / "images.npy"), str(result)],
                 check=True, cwd=tmp_path, capture_output=True, text=True,
                 env={k: v for k, v in os.environ.items()
                      if k not in ("PYTHONPATH", "XLA_FLAGS")})
  return dict(np.load(result))


def test_serialized_forward_runs_with_jax_alone(exported, tmp_path):
  _, ds, _, (method, state), out = exported
  images = np.stack([ds.test[i]["image"] for i in range(3)])  # Any batch.
  want = jax.jit(method.predict)(state.params, state.batch_stats, images)
  got = _run_jax_only(out, images, tmp_path)[""]
  assert got.shape == want.shape == (3, 16, 16, 9)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_export_errors(exported, tmp_path):
  c, _, workdir, _, out = exported
  with pytest.raises(FileExistsError, match="not empty"):
    export.export(c, workdir, "distilled", out)
  with pytest.raises(FileNotFoundError, match="stage 'baseline' has no "
                     "checkpoint"):
    export.export(c, workdir, "baseline", str(tmp_path / "a"))
  with pytest.raises(ValueError, match="unknown stage 'student'"):
    export.export(c, workdir, "student", str(tmp_path / "b"))
  wider = c.copy_and_resolve_references()
  wider.stages.distilled.model.width = 3
  with pytest.raises(ValueError, match="does not fit the config's model.*"
                     "width.*3"):
    export.export(wider, workdir, "distilled", str(tmp_path / "c"))
  with pytest.raises(FileNotFoundError, match="not a folder written by "
                     "kd_jax.export"):
    export.load(workdir)



# ----------------------------------------------------------------------------
# A model with four named heads: model.json names them, load returns the
# dict of heads.


@pytest.fixture(scope="module")
def exported_heads(tmp_path_factory):
  c, workdir, _ = trained_heads_run(tmp_path_factory)
  ds = data.build(c.data)
  # Training's own restore of the finished stage: the trained state.
  method, state = train.train_stage(c, "a", workdir, ds)
  out = str(tmp_path_factory.mktemp("export_heads") / "a")
  assert export.export(c, workdir, "a", out) == out
  return ds, method, state, out


def test_model_json_of_a_multi_head_model_names_its_heads(exported_heads):
  _, _, _, out = exported_heads
  with open(os.path.join(out, "model.json")) as f:
    spec = json.load(f)
  # multitask_* constructors take no num_classes: none is forced in.
  assert spec["model"] == dict(name="multitask_resnet18",
                               kwargs=dict(width=0.125, dropout=0.0))
  assert "num_classes" not in spec and "class_names" not in spec
  assert sorted(spec["heads"]) == ["dme_risk", "dr_grade", "fovea",
                                   "optic_disc"]
  assert spec["heads"]["dr_grade"] == dict(
      kind="classification", label="dr_grade", num_classes=5,
      class_names=list(data.synthetic.DR_GRADES))
  assert spec["heads"]["optic_disc"] == dict(
      kind="landmark", label="optic_disc", num_classes=None, class_names=None)
  assert spec["input_shape"] == [32, 32, 3] and spec["stage"] == "a"


def test_a_loaded_multi_head_model_reproduces_the_trained_one(exported_heads):
  ds, method, state, out = exported_heads
  model, variables = export.load(out)
  images = np.stack([ds.test[i]["image"] for i in range(len(ds.test))])
  want = jax.jit(method.predict)(state.params, state.batch_stats, images)
  got, features = jax.jit(
      lambda v, x: model.apply(v, x, train=False))(variables, images)
  assert set(got) == set(want) == {"dr_grade", "dme_risk", "fovea",
                                   "optic_disc"}
  for name in got:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6,
                               err_msg=name)
  assert "embedding" in features


def test_serialized_multi_head_forward_gives_every_head(exported_heads,
                                                        tmp_path):
  ds, method, state, out = exported_heads
  images = np.stack([ds.test[i]["image"] for i in range(2)])
  want = jax.jit(method.predict)(state.params, state.batch_stats, images)
  got = _run_jax_only(out, images, tmp_path)
  assert set(got) == set(want)
  for name in got:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6,
                               err_msg=name)
