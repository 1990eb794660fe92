"""Writes the notebooks of colabs/ from the cells below (without outputs).

    python colabs/make_notebooks.py

Edit the cells here, rerun, and commit both this file and the notebooks;
tests/test_colabs.py checks that they agree and runs each notebook.
"""
import os

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

# First code cell of every notebook: works on Colab (CPU or TPU runtime) and
# wherever kd_jax is already importable (then it installs nothing).
SETUP = '''\
import glob, importlib.util, os, subprocess, sys

# The git URL of the kd_jax repository this notebook was opened from (needed
# only where kd_jax is not installed yet, e.g. a fresh Colab runtime).
KD_JAX_GIT = os.environ.get("KD_JAX_GIT", "")
if importlib.util.find_spec("kd_jax") is None:
  if not KD_JAX_GIT:
    raise ValueError("kd_jax is not installed: set KD_JAX_GIT in this cell "
                     "to the repository's git URL (the GitHub page this "
                     "notebook was opened from) and run it again")
  if not os.path.isdir("kd_jax_repo"):
    subprocess.run(["git", "clone", "--depth=1", KD_JAX_GIT, "kd_jax_repo"],
                   check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e",
                  "kd_jax_repo"], check=True)
  # This kernel started before the editable install: put the clone on the
  # path by hand.
  sys.path.insert(0, os.path.abspath("kd_jax_repo"))
# A Colab TPU runtime is a TPU VM: JAX needs its TPU build (libtpu) there.
on_tpu_vm = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
                 or os.environ.get("COLAB_TPU_ADDR"))
if on_tpu_vm and importlib.util.find_spec("libtpu") is None:
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-U",
                  "jax[tpu]"], check=True)

%matplotlib inline
import jax
import kd_jax

print(jax.devices())
# The repository's root: configs/ lives there.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(kd_jax.__file__)))


def load_config(name, arg=None):
  """configs/<name>.py's get_config(arg), as --config=configs/<name>.py:arg."""
  spec = importlib.util.spec_from_file_location(
      f"configs.{name}", os.path.join(REPO, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)'''

# KD_JAX_COLAB_TINY=1 (set by tests/test_colabs.py) shrinks a notebook to a
# smoke run; KD_JAX_COLAB_WORKDIR moves its runs.
BUDGET = '''\
# Budget. KD_JAX_COLAB_TINY=1 turns this notebook into a smoke run of a few
# steps on tiny images (CI runs it so); leave it unset for the real thing.
TINY = os.environ.get("KD_JAX_COLAB_TINY") == "1"
WORKDIR = os.environ.get("KD_JAX_COLAB_WORKDIR", "runs")
ON_TPU = jax.default_backend() == "tpu"'''


def md(text):
  return nbformat.v4.new_markdown_cell(text.strip())


def code(text):
  return nbformat.v4.new_code_cell(text.strip())


QUICKSTART = [
    md('''
# kd_jax quickstart: distil a UNet on synthetic CT

What it does: installs kd_jax, runs the default experiment (a wide UNet
teacher, a narrow UNet student trained alone, and the same student distilled
from the teacher with CE + Dice + channel-wise distillation) at a notebook
budget through `kd_jax.train.train_and_evaluate`, shows the report table,
the prediction overlays and the training curves, exports the distilled
student and loads it back two ways (the Flax module, and a `jax.export`
artefact that needs only jax) to segment a new image.

Time: about 6 minutes on a 2-core CPU runtime (1,200 steps in all, scaled
from the default experiment's measured 11 minutes for 3,200 steps); on a
TPU runtime an estimate of 2 minutes, mostly compilation (not measured).

Your own data: set `config.data` to one of kd_jax's data sets (e.g.
`dict(name="folder", csv=...)` for a folder of images with a CSV, or
`dict(name="acdc", root=...)`); `kd_jax.data.options(name)` lists each
one's options. The budget cell sets the steps.
'''),
    code(SETUP),
    code(BUDGET + '''
from kd_jax import train

config = load_config("default")
# Notebook budget: 600 teacher and 300 steps per student (the command's
# default is 1600 / 800).
config.steps = 4 if TINY else 300
config.stages.teacher.steps = 4 if TINY else 600
config.log_every, config.eval_every = (2, 4) if TINY else (100, 300)
config.checkpoint_every = config.eval_every
if TINY:
  config.data.update(image_size=16, num_train=16, num_val=8, num_test=8)
# bf16 compute (float32 parameters) on a TPU; the batch is split over its
# cores, so it must be a multiple of their number.
config.compute_dtype = "bfloat16" if ON_TPU else "float32"
config.batch_size = max(config.batch_size, jax.device_count())
run = os.path.join(WORKDIR, "quickstart")
results = train.train_and_evaluate(config, run)'''),
    md('''
## The report

`train_and_evaluate` wrote `report.md` with the test scores of every stage,
and its figures, into the run folder.
'''),
    code('''
from IPython.display import Image, Markdown, display

with open(os.path.join(run, "report.md")) as f:
  report = f.read()
display(Markdown(report.split("Test examples:")[0]))
display(Image(os.path.join(run, "predictions.png")))
display(Image(os.path.join(run, "curves.png")))'''),
    md('''
## Export the student, and load it back

`kd_jax.export.export` writes the distilled student alone (no teacher, no
optimizer state). Load it as a Flax module with `export.load`, or, with jax
and numpy alone (no kd_jax, no flax), from the serialized `jax.export`
artefact beside it.
'''),
    code('''
import shutil

import numpy as np
from kd_jax import data, export

out = os.path.join(run, "export", "distilled")
shutil.rmtree(out, ignore_errors=True)  # A rerun exports again.
export.export(config, run, "distilled", out)
print(sorted(os.listdir(out)))

# A new image: a synthetic slice from another seed than the training data.
new = data.build(dict(config.data, seed=123, augment=False)).test[0]
images = new["image"][None]

# 1. The Flax module.
model, variables = export.load(out)
logits, features = model.apply(variables, images, train=False)

# 2. jax alone: StableHLO plus its parameters.
with open(os.path.join(out, "inference.jax"), "rb") as f:
  exported = jax.export.deserialize(bytearray(f.read()))
params = dict(np.load(os.path.join(out, "inference_params.npz")))
logits_jax_only = exported.call(params, images)
print("max difference:", float(np.abs(logits - logits_jax_only).max()))'''),
    code('''
from kd_jax.evaluate import figures

ds = data.build(config.data)
figures.segmentation_grid(
    None, images, new["label"][None],
    {"distilled (export.load)": np.argmax(logits, -1),
     "distilled (jax.export)": np.argmax(logits_jax_only, -1)},
    num_classes=ds.num_classes, class_names=ds.class_names)'''),
]

COMPOSE = [
    md('''
# Compose your own loss: CE + Dice + CWD + a feature hint

What it does: no kd_jax trainer. Your own Flax + optax train step mixes
kd_jax's pure losses (`kd_jax.losses`: cross-entropy, Dice, channel-wise
distillation of the logits, and an L2 hint between the student's and the
teacher's bottleneck maps through a learned 1×1 connector), is differentiated
with `jax.grad` and compiled with `jax.jit` over a `jax.sharding.Mesh` of
the runtime's devices (8 TPU cores, or 1 CPU), and plots each term over
training.

Time: about 3 minutes on a 2-core CPU runtime (estimate: two small UNets,
400 steps at 64×64); well under a minute on a TPU runtime (estimate, not
measured).

Your own data: replace the `data.build(...)` line by your arrays (`images`
float32 (N, H, W, C), `labels` int (N, H, W)), or by any kd_jax data set
(`kd_jax.data.options(name)`).
'''),
    code(SETUP),
    code(BUDGET + '''
import functools

import flax.linen as nn
import matplotlib.pyplot as plt
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from kd_jax import data, losses, models
from kd_jax.models import connectors

STEPS = 4 if TINY else 200  # Per model: teacher, then student.
SIZE = 16 if TINY else 64
ds = data.build(dict(name="synthetic", image_size=SIZE, augment=False,
                     num_train=16 if TINY else 512, num_val=8, num_test=8))
images = np.stack([ds.train[i]["image"] for i in range(len(ds.train))])
labels = np.stack([ds.train[i]["label"] for i in range(len(ds.train))])

# One mesh axis over every device; a batch is split along it.
mesh = jax.make_mesh((jax.device_count(),), ("data",))
batch_sharding = NamedSharding(mesh, P("data"))
replicated = NamedSharding(mesh, P())
BATCH = 8 * jax.device_count()


def batches(seed):
  """Random batches of (images, labels), placed on the mesh."""
  rng = np.random.default_rng(seed)
  while True:
    idx = rng.integers(0, len(images), BATCH)
    yield jax.device_put((images[idx], labels[idx]), batch_sharding)'''),
    md('''
## The teacher: a wide UNet with CE + Dice

`kd_jax.models` are plain Flax modules whose `__call__(x, train=...)`
returns `(logits, features)`.
'''),
    code('''
dtype = jax.numpy.bfloat16 if ON_TPU else jax.numpy.float32
teacher = models.build("unet", width=16, depth=3, num_classes=ds.num_classes,
                       dtype=dtype)
student = models.build("unet", width=8, depth=3, num_classes=ds.num_classes,
                       dtype=dtype)
tx = optax.adamw(optax.cosine_decay_schedule(3e-3, STEPS), weight_decay=1e-4)


def fit(loss_fn, params, batch_stats, seed):
  """Runs STEPS steps of AdamW on loss_fn; returns params, batch stats and
  the per-step terms."""
  opt_state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, batch_stats, opt_state, batch):
    grads, (batch_stats, terms) = jax.grad(loss_fn, has_aux=True)(
        params, batch_stats, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, terms

  state = jax.device_put((params, batch_stats, opt_state), replicated)
  history = []
  for _, batch in zip(range(STEPS), batches(seed)):
    *state, terms = step(*state, batch)
    history.append(terms)
  return state[0], state[1], jax.device_get(history)


def teacher_loss(params, batch_stats, batch):
  x, y = batch
  (logits, _), updates = teacher.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True,
      mutable=["batch_stats"])
  terms = dict(ce=losses.cross_entropy(logits, y),
               dice=losses.dice_loss(logits, y))
  return sum(terms.values()), (updates["batch_stats"], terms)


v = teacher.init(jax.random.key(0), images[:1], train=False)
t_params, t_stats, t_history = fit(teacher_loss, v["params"],
                                   v["batch_stats"], seed=0)'''),
    md('''
## The student: your objective

The student's objective mixes four pure losses. The hint term matches the
student's bottleneck (8·2³ = 64 channels at depth 3) to the teacher's (128)
through a 1×1 convolution trained with the student
(`kd_jax.models.connectors`) and thrown away afterwards.
'''),
    code('''
WEIGHTS = dict(ce=1.0, dice=1.0, cwd=3.0, hint=0.1)
t_vars = {"params": t_params, "batch_stats": t_stats}
_, t_features = teacher.apply(t_vars, images[:1], train=False)
connector = connectors.build_connector(
    "conv1x1", t_features["bottleneck"].shape[-1])


def student_loss(params, batch_stats, batch):
  x, y = batch
  # The frozen teacher: eval mode, and no gradient flows into it.
  t_logits, t_feats = jax.lax.stop_gradient(
      teacher.apply(t_vars, x, train=False))
  (logits, feats), updates = student.apply(
      {"params": params["student"], "batch_stats": batch_stats}, x,
      train=True, mutable=["batch_stats"])
  hint = connector.apply({"params": params["connector"]}, feats["bottleneck"],
                         train=True)
  terms = dict(ce=losses.cross_entropy(logits, y),
               dice=losses.dice_loss(logits, y),
               cwd=losses.cwd(logits, t_logits, temperature=1.0),
               hint=losses.hint_l2(hint, t_feats["bottleneck"]))
  total = sum(WEIGHTS[k] * v for k, v in terms.items())
  return total, (updates["batch_stats"], terms)


s = student.init(jax.random.key(1), images[:1], train=False)
_, s_features = student.apply(s, images[:1], train=False)
c = connector.init(jax.random.key(2), s_features["bottleneck"], train=False)
params = {"student": s["params"], "connector": c["params"]}
s_params, s_stats, s_history = fit(student_loss, params, s["batch_stats"],
                                   seed=1)'''),
    code('''
fig, axes = plt.subplots(1, 4, figsize=(14, 3))
for ax, name in zip(axes, WEIGHTS):
  ax.plot([h[name] for h in s_history])
  ax.set_title(f"{name} (weight {WEIGHTS[name]})")
  ax.set_xlabel("step")
plt.tight_layout()
plt.show()'''),
    code('''
# Mean Dice over the organs on the test split, for teacher and student.
from kd_jax.evaluate import metrics

test_x = np.stack([ds.test[i]["image"] for i in range(len(ds.test))])
test_y = np.stack([ds.test[i]["label"] for i in range(len(ds.test))])
for name, model, variables in [
    ("teacher", teacher, t_vars),
    ("student", student, {"params": s_params["student"],
                          "batch_stats": s_stats})]:
  pred = np.argmax(model.apply(variables, test_x, train=False)[0], -1)
  scores = metrics.segmentation_scores(
      metrics.confusion_matrix(pred, test_y, ds.num_classes))
  print(name, "mean Dice", round(float(scores["mean_dice"]), 3))'''),
]

DISTILLO = [
    md('''
# Distillo: TransUNet → SqueezeU-Net on ACDC cardiac MRI

What it does: the "Distillo, ergo sum" recipe (`configs/distillo.py`) at a
notebook budget: a TransUNet teacher, the SqueezeU-Net student alone, and
the student distilled with CE + Dice + KL to the frozen teacher, trained and
scored by `kd_jax.train.train_and_evaluate`; then saliency and Grad-CAM
maps (`kd_jax.evaluate.explain`) of each model for the left ventricle (or
the liver on the synthetic CT).

Data, in this order: ACDC from `KD_JAX_DATA` (or the repository's
`../shared/data`) when it is there; else your own copy of the ACDC npz
files (`acdc/train_slices_256.npz`, `acdc/val_volumes.npz`; see
`kd_jax.data.sources`) from a mounted Google Drive or uploaded by hand
(`DATA_FROM` below); else the synthetic CT slices, so the notebook always
runs.

Time: about 8 minutes on a 2-core CPU runtime at this budget (estimate: 3
epochs of the 1,312 ACDC slices at 64×64 per stage; the CPU preset's 12
epochs take ~30 minutes a stage); an estimated 2–3 minutes on a TPU
runtime with bf16 compute (not measured). On a TPU, `PRESET = "full"`
trains the paper's 224×224 `transunet_b16` instead (hours).
'''),
    code(SETUP),
    code(BUDGET + '''
# Where your ACDC files come from when KD_JAX_DATA has none: "drive" (mount
# Google Drive; put acdc/ under DRIVE_ROOT), "upload" (pick the two npz
# files), or "" (use the synthetic CT).
DATA_FROM = ""
DRIVE_ROOT = "/content/drive/MyDrive/kd_jax_data"
PRESET = "cpu"  # "full": 224², transunet_b16, 40 epochs (for a TPU)

root = os.environ.get("KD_JAX_DATA") or os.path.join(REPO, "..", "shared",
                                                     "data")
if not os.path.isdir(os.path.join(root, "acdc")) and DATA_FROM == "drive":
  from google.colab import drive
  drive.mount("/content/drive")
  root = DRIVE_ROOT
elif not os.path.isdir(os.path.join(root, "acdc")) and DATA_FROM == "upload":
  from google.colab import files
  root = "/content/data"
  os.makedirs(os.path.join(root, "acdc"), exist_ok=True)
  for name, content in files.upload().items():
    with open(os.path.join(root, "acdc", name), "wb") as f:
      f.write(content)
use_acdc = os.path.isdir(os.path.join(root, "acdc"))
print("data:", f"ACDC from {os.path.abspath(root)}" if use_acdc
      else "synthetic CT")'''),
    code('''
from kd_jax import train

config = load_config("distillo", f"study,{PRESET}")
# The smoke run trains the teacher and the distilled student only.
config.stage_order = ("teacher", "kd") if TINY else ("teacher", "student",
                                                     "kd")
size = 32 if TINY else config.data.image_size
if use_acdc:
  config.data.update(root=root, image_size=size)
  # A budget: the first slices and validation volumes only.
  config.data.update(max_train=16 if TINY else 0,
                     max_volumes=1 if TINY else 0)
  train_slices = 16 if TINY else 1312
else:
  config.data = dict(name="synthetic", image_size=size, augment=True,
                     num_train=16 if TINY else 512, num_val=8,
                     num_test=8 if TINY else 64)
  train_slices = config.data.num_train
config.stages.teacher.model.image_size = size
config.stages.kd.teacher.model.image_size = size
epochs = 0 if TINY else 3
config.steps = 2 if TINY else epochs * train_slices // config.batch_size
config.log_every = config.eval_every = config.checkpoint_every = (
    2 if TINY else 50)
# bf16 compute with float32 parameters on a TPU.
config.compute_dtype = "bfloat16" if ON_TPU else "float32"
config.batch_size = max(config.batch_size, jax.device_count())
run = os.path.join(WORKDIR, "distillo")
results = train.train_and_evaluate(config, run)'''),
    code('''
from IPython.display import Image, Markdown, display

with open(os.path.join(run, "report.md")) as f:
  display(Markdown(f.read().split("Test examples:")[0]))
display(Image(os.path.join(run, "predictions.png")))'''),
    md('''
## Where each model looks: saliency and Grad-CAM

`kd_jax.evaluate.explain.explainer(model, feature, class)` gives, for a
batch, vanilla saliency |∂score/∂x| and Grad-CAM on the named feature map,
the score being the class's mean logit over the image. Each model's
default map is its highest-resolution decoder map.
'''),
    code('''
import numpy as np
from kd_jax import data, export
from kd_jax.evaluate import explain, figures

ds = data.build(config.data)
n = min(4, len(ds.test))
images = np.stack([ds.test[i]["image"] for i in range(n)])
labels = np.stack([ds.test[i]["label"] for i in range(n)])
target = list(ds.class_names).index(
    "left_ventricle" if use_acdc else "liver")
maps = {}
for stage in config.stage_order:
  method, variables = export.restore_stage(config, run, stage, ds)
  feature = explain.model_cam_feature(method.model, images.shape)
  saliency, cam = explain.explainer(method.model, feature, target)(
      variables, images)
  maps[f"{stage}\\nsaliency"] = np.asarray(saliency)
  maps[f"{stage}\\nGrad-CAM {feature}"] = np.asarray(cam)
figures.explanation_grid(None, images, maps, masks=labels == target)'''),
]

FUNDUS = [
    md('''
# Multi-task fundus distillation from a teacher ensemble

What it does: the multi-task recipe (`configs/fundus_mtl.py`, Chelaramani
et al., WACV 2021) on synthetic fundus photographs with its four targets
(DR grade 0–4, DME risk 0–2, fovea and optic-disc (u, v)): three ResNet-18
teachers (one architecture, three seeds), the small student alone, and the
student distilled from one teacher and from the ensemble (`ensemble_kd` on
the grades, `ensemble_l2` on the coordinates), trained and scored by
`kd_jax.train.train_and_evaluate` at a minutes budget; then the report
table of every head's scores.

Time: about 10 minutes on a 2-core CPU runtime (estimate: six stages of
100 steps at 64×64); an estimated 2 minutes on a TPU runtime (not
measured).

Your own data: IDRiD grading (`configs/fundus_mtl.py:cpu` reads it from
`KD_JAX_DATA`): set `DATASET = "idrid"` below with `KD_JAX_DATA` pointing at
a folder holding `idrid/grading_256_train.npz`.
'''),
    code(SETUP),
    code(BUDGET + '''
from kd_jax import train

DATASET = "synthetic"  # or "idrid"
config = load_config("fundus_mtl", f"cpu,{DATASET}")
size = 32 if TINY else 64
config.data.image_size = size
if DATASET == "synthetic":
  config.data.update(num_train=16 if TINY else 256, num_val=8,
                     num_test=8 if TINY else 64)
# The smoke run keeps one teacher and the one-teacher student.
if TINY:
  config.stage_order = ("teacher0", "kd_one")
config.steps = 2 if TINY else 100
config.log_every = config.eval_every = config.checkpoint_every = (
    2 if TINY else 50)
config.compute_dtype = "bfloat16" if ON_TPU else "float32"
config.batch_size = max(config.batch_size, jax.device_count())
run = os.path.join(WORKDIR, "fundus_mtl")
results = train.train_and_evaluate(config, run)'''),
    code('''
from IPython.display import Markdown, display

with open(os.path.join(run, "report.md")) as f:
  display(Markdown(f.read()))'''),
]

NOTEBOOKS = {
    "quickstart.ipynb": QUICKSTART,
    "compose_your_own_loss.ipynb": COMPOSE,
    "distillo_acdc.ipynb": DISTILLO,
    "fundus_multitask.ipynb": FUNDUS,
}


def notebook(cells) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook(cells=cells)
  nb.metadata.update(
      kernelspec=dict(name="python3", display_name="Python 3",
                      language="python"),
      language_info=dict(name="python"),
      accelerator="TPU", colab=dict(provenance=[]))
  # Stable ids: a rerun of this script changes nothing.
  for i, cell in enumerate(nb.cells):
    cell.id = f"cell-{i}"
  return nb


def main():
  for name, cells in NOTEBOOKS.items():
    nbformat.write(notebook(cells), os.path.join(HERE, name))


if __name__ == "__main__":
  main()
