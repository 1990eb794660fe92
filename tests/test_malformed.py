"""Malformed configs and data sets stop `python -m kd_jax.main` before the
first step: exit code != 0, one `error:` line naming the key or file, no
traceback, and the workdir as it was.

Most cases run in this process through the command's own functions
(`main.parse_flags`, then `main.main`: the path `app.run` takes), since a
subprocess costs ~10 s of imports here; the config-file cases, which
config_flags loads once per process, run as subprocesses.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kd_jax import main, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests import synapse_fixture  # noqa: E402
from tests.test_record import tree_digest  # noqa: E402
from tests.test_reliability import _TINY  # noqa: E402

DEFAULT = os.path.join(ROOT, "configs", "default.py")


def run_main(monkeypatch, workdir, overrides=(), edit=None, config=DEFAULT):
  """The command's exit: 0, or the SystemExit code (its message). A
  validation that passes trips the guard instead of training."""
  def trained(*args, **kwargs):
    raise AssertionError("the config passed validation")
  monkeypatch.setattr(train, "_train_and_evaluate", trained)
  monkeypatch.setattr(main, "quiet_console", lambda: None)
  argv = (["kd_jax.main", f"--config={config}", f"--workdir={workdir}"]
          + [f"--config.{o}" for o in _TINY + list(overrides)])
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads overrides here.
  main.FLAGS.unparse_flags()
  for name in [n for n in main.FLAGS if n.startswith("config.")]:
    delattr(main.FLAGS, name)  # Each parse defines the overrides anew.
  try:
    rest = main.parse_flags(argv)
    if edit:
      with main.FLAGS.config.unlocked():
        edit(main.FLAGS.config)
    main.main(rest)
  except SystemExit as e:
    return e.code
  return 0


def _assert_refused(code, names, capsys):
  assert isinstance(code, str), code  # sys.exit(message): exit status 1.
  assert code.startswith("error: ") and "\n" not in code, code
  for name in names:
    assert name in code, code
  err = capsys.readouterr().err
  assert "Traceback" not in err


# (id, --config overrides (or a function that edits the parsed config, for
# keys the command line cannot add), what the line must name)
CONFIGS = [
    ("lr_zero", ["optimizer.lr=0"], ["optimizer.lr=0.0"]),
    ("lr_negative", ["optimizer.lr=-0.1"], ["optimizer.lr=-0.1"]),
    ("lr_stage", [lambda c: setattr(c.stages.teacher, "optimizer",
                                    {"lr": 0.0})],
     ["'teacher'", "optimizer.lr=0.0"]),
    ("negative_weight", ["stages.teacher.losses.dice.weight=-1"],
     ["losses.dice.weight=-1.0"]),
    ("negative_kd_weight", ["stages.distilled.losses.cwd.weight=-3"],
     ["'distilled'", "losses.cwd.weight"]),
    ("duplicate_stage", ["stage_order=('teacher','baseline','teacher')"],
     ["stage_order", "'teacher'"]),
    ("unknown_stage", ["stage_order=('teacher','student')"],
     ["stage_order", "student"]),
    ("log_every_0", ["log_every=0"], ["config.log_every=0"]),
    ("eval_every_0", ["eval_every=0"], ["config.eval_every=0"]),
    ("checkpoint_every_0", ["checkpoint_every=0"],
     ["config.checkpoint_every=0"]),
    ("log_every_negative", ["log_every=-5"], ["config.log_every=-5"]),
    ("batch_0", ["batch_size=0"], ["config.batch_size=0"]),
    ("steps_0", ["steps=0"], ["steps=0"]),
    ("stage_steps_negative", ["stages.teacher.steps=-4"], ["steps=-4"]),
    ("warmup_negative", ["optimizer.warmup_steps=-1"],
     ["optimizer.warmup_steps=-1"]),
    ("grad_clip_negative", ["optimizer.grad_clip=-1"],
     ["optimizer.grad_clip=-1.0"]),
    ("weight_decay_negative", ["optimizer.weight_decay=-0.1"],
     ["optimizer.weight_decay"]),
    ("optimizer_name", ["optimizer.name=adamx"], ["optimizer.name 'adamx'"]),
    ("schedule_name", ["optimizer.schedule=linear"], ["optimizer.schedule"]),
    ("seed_negative", ["seed=-1"], ["seed=-1"]),
    ("compute_dtype", ["compute_dtype=float7"], ["config.compute_dtype"]),
    ("layers", ["layers=gpu"], ["config.layers"]),
    ("on_nonfinite", ["on_nonfinite=ignore"], ["on_nonfinite='ignore'"]),
    ("max_skipped_negative", ["max_skipped_steps=-1"],
     ["max_skipped_steps=-1"]),
    ("model_name", ["stages.baseline.model.name=unett"],
     ["'baseline'", "unknown model 'unett'"]),
    ("loss_fn", ["stages.teacher.losses.dice.fn=dise"], ["dise"]),
    ("temperature_0", ["stages.distilled.losses.cwd.temperature=0"],
     ["'distilled'", "temperature"]),
    ("teacher_not_earlier", ["stages.distilled.teacher.stage=distilled"],
     ["teacher.stage 'distilled'"]),
    ("teacher_folder_missing", ["stages.distilled.teacher.stage=",
                                "stages.distilled.teacher.checkpoint=/nope"],
     ["teacher.checkpoint '/nope'"]),
    ("misspelt_key", ["stages.teacher.stepz=3"],
     ["--config.stages.teacher.stepz", "did you mean 'steps'",
      "the keys there: losses, method, model, steps"]),
    ("misspelt_section", ["optimizr.lr=0.1"],
     ["no key 'optimizr' at the top level", "'optimizer'"]),
    ("bad_value_type", ["batch_size=eight"], ["--config.batch_size=eight"]),
    ("teacher_cache_true", ["teacher_cache=True"],
     ["teacher_cache='True'", "--config.teacher_cache=auto"]),
    ("data_name", ["data.image_size=8"], ["data:", "size"]),
    ("stage_data_key", [lambda c: setattr(c.stages.baseline, "data",
                                          {"image_size": 32})],
     ["data.image_size cannot differ"]),
]


@pytest.mark.parametrize("overrides,names", [c[1:] for c in CONFIGS],
                         ids=[c[0] for c in CONFIGS])
def test_malformed_config(tmp_path, monkeypatch, capsys, overrides, names):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("kept")
  before = tree_digest(tmp_path)
  edits = [o for o in overrides if callable(o)]
  code = run_main(monkeypatch, workdir,
                  [o for o in overrides if not callable(o)],
                  edits[0] if edits else None)
  _assert_refused(code, names, capsys)
  assert tree_digest(tmp_path) == before


def test_a_teacher_folder_without_checkpoints(tmp_path, monkeypatch, capsys):
  """Found before the first stage trains, not when the distill stage loads
  its teacher."""
  teacher = tmp_path / "teacher_run"
  (teacher / "checkpoints").mkdir(parents=True)
  before = tree_digest(tmp_path)
  code = run_main(monkeypatch, tmp_path / "run", [
      "stages.distilled.teacher.stage=",
      f"stages.distilled.teacher.checkpoint={teacher}"])
  _assert_refused(code, [f"teacher.checkpoint '{teacher}' holds no "
                         "checkpoint"], capsys)
  assert tree_digest(tmp_path) == before


def _teacher_checkpoint(folder, **model):
  """A stage folder whose checkpoint holds an initialised UNet as a trained
  stage saves it (`params`/`batch_stats` under "model"), on the synthetic
  data's 1-channel 16 x 16 images."""
  import jax
  import jax.numpy as jnp
  from kd_jax import checkpoint, models
  net = models.build("unet", **model)
  variables = net.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)),
                       train=False)
  mngr = checkpoint.manager(str(folder / "checkpoints"), save_every=1)
  checkpoint.save(mngr, 3, {"step": 3,
                            "params": {"model": variables["params"]},
                            "batch_stats": {"model": variables.get(
                                "batch_stats", {})}})
  mngr.wait_until_finished()
  mngr.close()
  return str(folder)


def _ensemble_of(folder):
  """Edits the default config's distilled stage into an ensemble of one
  member loaded from `folder`."""
  def edit(c):
    d = c.stages.distilled
    del d["teacher"]
    d.teachers = [dict(model=dict(name="unet", width=4, depth=2),
                       checkpoint=folder)]
    d.losses = dict(ce=dict(fn="cross_entropy"),
                    kd=dict(fn="ensemble_kd", temperature=1.0))
  return edit


# (id, the teacher's checkpoint (UNet fields) or None for an earlier stage,
# whether an ensemble member loads it, what the line must name). The
# synthetic data has 9 classes; the distilled stage's teacher.model is a
# UNet of width 4, depth 2, without num_classes.
TEACHERS = [
    ("checkpoint_classes", dict(width=4, depth=2, num_classes=4), False,
     ["'distilled'", "teacher.checkpoint", "the checkpoint has 4 classes, "
      "teacher.model 'unet' 9", "set teacher.model.num_classes=4"]),
    ("checkpoint_width", dict(width=8, depth=2, num_classes=9), False,
     ["teacher.checkpoint", "holds another model than teacher.model 'unet'",
      "bottleneck/BatchNorm_0/bias is (32,) there, (16,) in the model"]),
    ("checkpoint_depth", dict(width=4, depth=3, num_classes=9), False,
     ["holds another model than teacher.model 'unet'", "is not in the model"]),
    ("ensemble_classes", dict(width=4, depth=2, num_classes=4), True,
     ["teachers[0].checkpoint", "the checkpoint has 4 classes",
      "set teachers[0].model.num_classes=4"]),
    ("stage_classes", None, False,
     ["'distilled'", "teacher.model builds 4 classes, stage 'teacher' "
      "trains 9", "set teacher.model.num_classes=9"]),
]


@pytest.mark.parametrize("model,ensemble,names",
                         [c[1:] for c in TEACHERS],
                         ids=[c[0] for c in TEACHERS])
def test_a_teacher_of_another_model_or_class_count(
    tmp_path, monkeypatch, capsys, model, ensemble, names):
  """Refused before the first stage trains, not when the distill stage
  restores its teacher."""
  workdir = tmp_path / "run"
  if model is None:
    # A new dict: the default config's teacher model dict is shared with
    # the teacher stage's.
    overrides, edit = [], lambda c: setattr(
        c.stages.distilled.teacher, "model",
        dict(name="unet", width=4, depth=2, num_classes=4))
  else:
    folder = _teacher_checkpoint(tmp_path / "teacher_run", **model)
    overrides = [] if ensemble else [
        "stages.distilled.teacher.stage=",
        f"stages.distilled.teacher.checkpoint={folder}"]
    edit = _ensemble_of(folder) if ensemble else None
  before = tree_digest(tmp_path)
  code = run_main(monkeypatch, workdir, overrides, edit)
  _assert_refused(code, names, capsys)
  assert tree_digest(tmp_path) == before


def test_a_matching_teacher_checkpoint_passes_the_check(tmp_path):
  """The same model and class count: no refusal (the check compares, it
  does not refuse every checkpoint)."""
  from kd_jax import checks
  from tests.test_train import tiny_config
  folder = _teacher_checkpoint(tmp_path, width=4, depth=2, num_classes=9)
  c = tiny_config()
  stage = dict(teacher=dict(model=dict(name="unet", width=4, depth=2),
                            checkpoint=folder))
  example = np.zeros((1, 16, 16, 1), np.float32)
  for classes in (9, 5):
    ctx = train.build_context(c, "teacher", str(tmp_path), classes)
    if classes == 9:
      checks.teachers(c, stage, ctx, classes, example)
    else:
      with pytest.raises(ValueError, match="the checkpoint has 9 classes, "
                         "teacher.model 'unet' 5"):
        checks.teachers(c, stage, ctx, classes, example)


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_a_workdir_that_cannot_be_written(tmp_path, monkeypatch, capsys,
                                          kind):
  if kind == "file":
    workdir = tmp_path / "run"
    workdir.write_text("not a folder")
    names = [f"--workdir {workdir} is a file"]
  else:
    # /proc refuses new folders even to root (who passes chmod checks).
    workdir = "/proc/kd_jax_test/run"
    names = ["--workdir /proc/kd_jax_test/run: cannot write in /proc"]
  before = tree_digest(tmp_path)
  code = run_main(monkeypatch, workdir)
  _assert_refused(code, names, capsys)
  assert tree_digest(tmp_path) == before


# ----------------------------------------------------------------------------
# Malformed data sets.


def _png(path, size=(16, 16), mode="RGB", value=100):
  path.parent.mkdir(parents=True, exist_ok=True)
  shape = size[::-1] + ((3,) if mode == "RGB" else ())
  Image.fromarray(np.full(shape, value, np.uint8), mode).save(path)


def _folder(root, rows, header="image,label", images=True, **png):
  root.mkdir(parents=True, exist_ok=True)
  lines = [header]
  for name, label in rows:
    lines.append(f"{name},{label}")
    if images:
      _png(root / name, **png)
  (root / "list.csv").write_text("\n".join(lines) + "\n")
  return str(root / "list.csv")


def _classes(n=12):
  return [(f"img/{i:03d}.png", i % 2) for i in range(n)]


def _folder_data(csv, **more):
  return dict(name="folder", csv=csv, image_size=16, val_fraction=0.34,
              **more)


def _data_case(kind, root):
  """(data dict, what the error line names) for malformed data `kind`
  written under `root`."""
  if kind == "missing_csv":
    return _folder_data(str(root / "none.csv")), ["none.csv", "not found"]
  if kind == "missing_column":
    csv = _folder(root, _classes(), header="image,grade")
    return _folder_data(csv), ["list.csv", "missing column"]
  if kind == "missing_image":
    csv = _folder(root, _classes())
    os.remove(root / "img" / "005.png")
    return _folder_data(csv), ["list.csv", "005.png"]
  if kind == "nan_label":
    rows = _classes()
    rows[3] = (rows[3][0], "nan")
    return _folder_data(_folder(root, rows)), ["list.csv", "row 5", "'nan'"]
  if kind == "label_out_of_range":
    csv = _folder(root, _classes())
    return _folder_data(csv, num_classes=1), ["list.csv", "labels span"]
  if kind == "empty_csv":
    return _folder_data(_folder(root, [])), ["list.csv", "empty"]
  if kind == "npz_without_label":
    synapse_fixture.write(root, size=16)
    path = root / "train_npz" / "case0007_slice002.npz"
    np.savez(path, image=np.zeros((16, 16), np.float32))
    return (dict(name="synapse", root=str(root), image_size=16,
                 augment=False), ["case0007_slice002.npz", "'label'"])
  if kind == "mask_size":
    root.mkdir(parents=True)
    lines = ["image,mask"]
    for i in range(12):
      _png(root / f"img/{i}.png")
      _png(root / f"mask/{i}.png", size=(8, 8) if i == 4 else (16, 16),
           mode="L", value=1)
      lines.append(f"img/{i}.png,mask/{i}.png")
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    return (_folder_data(str(root / "list.csv"), mask_column="mask",
                         num_classes=2), ["mask/4.png", "mask size"])
  if kind == "truncated_npz":
    synapse_fixture.write(root, size=16)
    path = root / "train_npz" / "case0006_slice001.npz"
    path.write_bytes(path.read_bytes()[:100])
    return (dict(name="synapse", root=str(root), image_size=16,
                 augment=False), ["case0006_slice001.npz"])
  if kind == "nan_coordinates":
    n = 24
    rng = np.random.default_rng(0)
    fovea = rng.uniform(1000, 2000, (n, 2))
    fovea[7, 1] = np.nan
    np.savez(_shared(root, "idrid", "grading_256_train.npz"),
             train_images=rng.integers(0, 255, (n, 32, 32, 3), np.uint8),
             train_dr_grade=np.arange(n) % 5, train_dme_risk=np.arange(n) % 3,
             train_fovea_xy=fovea / 16, train_od_xy=fovea / 16,
             train_fovea_xy_orig=fovea, train_od_xy_orig=fovea + 300,
             train_crop_box_xys=np.tile([0.0, 0.0, 2848.0], (n, 1)))
    return (dict(name="idrid_grading", root=str(root), image_size=32),
            ["train_fovea_xy_orig", "non-finite"])
  raise ValueError(kind)


def _shared(root, *parts):
  path = root.joinpath(*parts)
  path.parent.mkdir(parents=True, exist_ok=True)
  return path


DATA = ["missing_csv", "missing_column", "missing_image", "nan_label",
        "label_out_of_range", "empty_csv", "npz_without_label", "mask_size",
        "truncated_npz", "nan_coordinates"]


@pytest.mark.parametrize("kind", DATA)
def test_malformed_data(tmp_path, monkeypatch, capsys, kind):
  spec, names = _data_case(kind, tmp_path / "data")
  workdir = tmp_path / "run"
  workdir.mkdir()
  before = tree_digest(tmp_path)

  def edit(c):
    c.data = spec
    c.stage_order = ("teacher",)  # Any task: one supervised stage.
  code = run_main(monkeypatch, workdir, edit=edit)
  _assert_refused(code, names, capsys)
  assert tree_digest(tmp_path) == before


# ----------------------------------------------------------------------------
# Config files, loaded once per process by config_flags: subprocesses.

CONFIG_FILES = [
    ("missing", None, ["no such file"]),
    ("syntax", "def get_config(:\n", ["does not load: SyntaxError"]),
    ("raises", "def get_config():\n  raise RuntimeError('no data here')\n",
     ["does not load: RuntimeError: no data here"]),
    ("unknown_key", "from configs import default\n"
     "def get_config():\n  c = default.get_config()\n  c.epochz = 3\n"
     "  return c\n", ["unknown config keys ['epochz']"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("text,names", [c[1:] for c in CONFIG_FILES],
                         ids=[c[0] for c in CONFIG_FILES])
def test_malformed_config_file(tmp_path, text, names):
  config = tmp_path / "exp.py"
  if text is not None:
    config.write_text(text)
  workdir = tmp_path / "run"
  before = tree_digest(tmp_path)
  out = subprocess.run(
      [sys.executable, "-m", "kd_jax.main", f"--config={config}",
       f"--workdir={workdir}"], capture_output=True, text=True, cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT), check=False)
  assert out.returncode != 0
  lines = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, out.stderr
  assert "Traceback" not in out.stderr + out.stdout
  for name in names:
    assert name in lines[0], lines[0]
  assert tree_digest(tmp_path) == before


def test_splits_with_other_channel_counts_are_refused():
  """RGB training images with grey validation images (a data set whose
  splits come from different folders): refused before the first step, not
  at the first evaluation."""
  import types
  from kd_jax import checks
  from tests.test_train import tiny_config

  def split(n, channels):
    return [{"image": np.zeros((16, 16, channels), np.float32)}] * n
  c = tiny_config()
  stage = train.stage_config(c, "teacher")
  ok = types.SimpleNamespace(train=split(12, 3), val=split(4, 3),
                             test=split(4, 3))
  checks.stage_values(c, stage, ok)
  grey_val = types.SimpleNamespace(train=split(12, 3), val=split(4, 1),
                                   test=split(4, 3))
  with pytest.raises(ValueError, match=r"different channel counts "
                     r"\{'train': 3, 'val': 1, 'test': 3\}"):
    checks.stage_values(c, stage, grey_val)
