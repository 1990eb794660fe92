"""colabs/: the notebooks are stored without outputs, agree with the script
that writes them, and each runs top to bottom (a smoke budget,
KD_JAX_COLAB_TINY=1) in a fresh Jupyter kernel: a failing cell fails."""
import importlib.util
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, "colabs")


def _script():
  spec = importlib.util.spec_from_file_location(
      "make_notebooks", os.path.join(COLABS, "make_notebooks.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


SCRIPT = _script()
NAMES = sorted(SCRIPT.NOTEBOOKS)


def _read(name):
  return nbformat.read(os.path.join(COLABS, name), as_version=4)


def test_every_notebook_in_colabs_is_written_by_the_script():
  assert sorted(f for f in os.listdir(COLABS) if f.endswith(".ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.id


@pytest.mark.parametrize("name", NAMES)
def test_notebook_agrees_with_its_script(name):
  assert _read(name) == SCRIPT.notebook(SCRIPT.NOTEBOOKS[name]), (
      "rerun python colabs/make_notebooks.py")


@pytest.mark.parametrize("name", NAMES)
def test_first_cell_says_what_how_long_and_own_data(name):
  first = _read(name).cells[0]
  assert first.cell_type == "markdown"
  text = " ".join(first.source.split())
  assert "What it does:" in text and "Time:" in text
  assert re.search(r"minutes? on a 2-core CPU", text)
  assert "TPU runtime" in text and "estimate" in text
  assert "Your own data:" in text or "your own copy" in text


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
  # The kernel inherits this environment: the smoke budget, runs under
  # tmp_path, kd_jax from this checkout, the CPU.
  monkeypatch.setenv("KD_JAX_COLAB_TINY", "1")
  monkeypatch.setenv("KD_JAX_COLAB_WORKDIR", str(tmp_path))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # The older threefry lowering: the same random bits' role (the smoke run
  # checks that cells run, not values), and ~4× faster compiles of the
  # jitted inits on XLA:CPU (a PSPNet-ResNet18's: 30 s → 7 s of CPU).
  monkeypatch.setenv("JAX_THREEFRY_PARTITIONABLE", "0")
  # XLA:CPU without LLVM's optimisations: the smoke run's compiles (most of
  # its time) take ~40 % less CPU, and its tiny steps run fast anyway.
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  nb = _read(name)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}
                          ).execute()  # CellExecutionError on a failing cell.
  runs = [d for d in os.listdir(tmp_path) if os.path.isdir(tmp_path / d)]
  if name == "compose_your_own_loss.ipynb":
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    assert re.search(r"student mean Dice (\d\.\d+|nan)", text), text[-2000:]
  else:  # One run folder (beside it, maybe generated data files).
    reports = [d for d in runs if os.path.isfile(tmp_path / d / "report.md")]
    assert len(reports) == 1, runs
  if name == "quickstart.ipynb":
    text = "".join(o.get("text", "") for o in nb.cells[6].outputs)
    difference = float(re.search(r"max difference: (\S+)", text).group(1))
    assert difference <= 1e-5
