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
config.steps = 2 if TINY else 300
config.stages.teacher.steps = 2 if TINY else 600
config.log_every, config.eval_every = (1, 2) if TINY else (100, 300)
config.checkpoint_every = config.eval_every
if TINY:  # The smoke run: narrow, shallow UNets on 16×16 slices.
  config.data.update(image_size=16, num_train=8, num_val=4, num_test=4)
  config.batch_size = 4
  stages = config.stages
  for model in (stages.teacher.model, stages.baseline.model,
                stages.distilled.model, stages.distilled.teacher.model):
    model.update(width=4, depth=2)
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
# The smoke run: 16×16 slices (TransUNet's smallest, one ViT token), batch
# 4, and the smallest TransUNet and SqueezeU-Net the layouts allow (one
# unit per ResNet stage, one ViT block, one pooling step): a few compiles.
size = 16 if TINY else config.data.image_size
if TINY:
  tiny_teacher = dict(resnet_width=8, hidden=16, depth=1, num_heads=1,
                      mlp_dim=16, head_channels=8,
                      decoder_channels=(8, 8, 8, 8))
  config.stages.teacher.model.update(tiny_teacher)
  config.stages.kd.teacher.model.update(tiny_teacher)
  config.stages.kd.model.update(width=8, depth=1)
  config.batch_size = 4
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

SKD = [
    md('''
# Structured KD: PSPNet-ResNet101 → PSPNet-ResNet18 on ACDC

What it does: the structured knowledge distillation recipe
(`configs/skd/ablation.py`, Liu et al., CVPR 2019) at a notebook budget: a
PSPNet-ResNet101 teacher, the PSPNet-ResNet18 student alone, and the
student distilled pixel-wise (`pixel`), pixel-wise + pair-wise
(`pixel_pair`) and pixel-wise + pair-wise + holistic (`skd`: a WGAN-GP
critic on image ⊕ class probabilities, trained in turn with the student by
method `adversarial`), trained and scored by
`kd_jax.train.train_and_evaluate`; then the report table, the critic's
loss and Wasserstein estimate over training, and each stage's mIoU over
all classes (background included, the paper's) beside the foreground mIoU.

Data, in this order: ACDC (or DRIVE, `DATASET` below) from `KD_JAX_DATA`
(or the repository's `../shared/data`) when it is there. Your own data:
where it is absent, set `OWN_DATA` to a segmentation folder (a CSV
listing image and mask paths, `kd_jax.data.options("folder")`), e.g. on a
mounted Google Drive; else the synthetic CT slices, so the notebook always
runs.

Time: about 25 minutes on a 2-core CPU runtime (estimate: five stages at
64×64, the cpu preset's width-16 teacher for 300 steps and 150 steps per
student); an estimated 3–5 minutes on a TPU runtime with bf16 compute (not
measured). `configs/skd/ablation.py:paper` is the paper's 512×512 setting
(40k iterations, for a TPU or GPU).
'''),
    code(SETUP),
    code(BUDGET + '''
DATASET = "acdc"  # or "drive" (vessels), when the shared data is there
# Your own data when the shared data is absent, e.g. dict(name="folder",
# csv="/content/drive/MyDrive/seg/train.csv", mask_column="mask",
# num_classes=3) (mount the drive first: google.colab.drive.mount).
OWN_DATA = None

root = os.environ.get("KD_JAX_DATA") or os.path.join(REPO, "..", "shared",
                                                     "data")
if os.path.isdir(os.path.join(root, DATASET)):
  data_config = dict(name=DATASET, root=root)
  if DATASET == "acdc" and TINY:  # The first slices and volume only.
    data_config.update(max_train=8, max_volumes=1)
elif OWN_DATA:
  data_config = dict(OWN_DATA)
else:
  data_config = dict(name="synthetic", num_train=8 if TINY else 512,
                     num_val=2 if TINY else 32, num_test=2 if TINY else 64)
print("data:", data_config)'''),
    code('''
from kd_jax import train

config = load_config("skd/ablation",
                     "cpu,drive" if data_config["name"] == "drive" else "cpu")
# The critic needs 64×64 at least: the smoke run keeps the size.
if data_config["name"] in ("acdc", "drive"):  # the paper's scale + crop
  config.data.update(data_config, image_size=64)
else:  # flips and a small rotation
  config.data = dict(data_config, image_size=64, augment=True)
if TINY:
  # The smoke run (a PSPNet's compiles alone take minutes on a CPU): tiny
  # one-level UNets for the two PSPNets (no auxiliary head, so no aux term;
  # the pair-wise term on their bottleneck), a small critic, and only the
  # teacher and skd stages.
  config.stage_order = ("teacher", "skd")
  teacher, skd = config.stages.teacher, config.stages.skd
  teacher.model = skd.teacher.model = dict(name="unet", width=8, depth=1)
  skd.model = dict(name="unet", width=4, depth=1)
  del teacher.losses["aux"], skd.losses["aux"]
  skd.losses.pair.update(student="bottleneck", teacher="bottleneck")
  skd.critic.model.conv_dim = 4
else:
  config.stage_order = ("teacher", "student", "pixel", "pixel_pair", "skd")
# Notebook budget: 300 teacher steps and 150 per student (the cpu preset:
# 1200 and 600).
config.steps = 2 if TINY else 150
config.stages.teacher.steps = 2 if TINY else 300
config.log_every = 1 if TINY else 10
config.eval_every = config.checkpoint_every = 2 if TINY else 150
config.batch_size = 2 if TINY else config.batch_size
# bf16 compute (float32 parameters) on a TPU; the batch is split over its
# cores, so it must be a multiple of their number.
config.compute_dtype = "bfloat16" if ON_TPU else "float32"
config.batch_size = max(config.batch_size, jax.device_count())
run = os.path.join(WORKDIR, "skd")
results = train.train_and_evaluate(config, run)'''),
    code('''
from IPython.display import Image, Markdown, display

with open(os.path.join(run, "report.md")) as f:
  display(Markdown(f.read().split("Test examples:")[0]))
display(Image(os.path.join(run, "predictions.png")))'''),
    md('''
## The holistic term: the critic over training

The critic D scores image ⊕ class probabilities: the teacher's map is
"real", the student's "fake". Its loss is E[D(fake)] − E[D(real)] plus the
gradient penalty; `critic/wasserstein` = E[D(real)] − E[D(fake)] is its
estimate of the Wasserstein distance between the two, which the student's
holistic term (`wgan_generator`, −E[D(fake)]) pushes down. Every stage logs
its terms to `<run>/<stage>/history.jsonl`.
'''),
    code('''
from kd_jax.evaluate import figures

history = train.read_history(os.path.join(run, "skd"))
figures.training_curves(None, {
    k: history[k] for k in ("train/critic/loss", "train/critic/wasserstein",
                            "train/critic/gradient_penalty", "train/holistic")
    if k in history}, log_scale=())'''),
    md('''
## mIoU over all classes vs the foreground

The paper's mIoU averages every class, background included
(`mean_iou_all`); medical tables usually average the foreground organs only
(`mean_iou`). Background is most of each image, so the first is the higher.
'''),
    code('''
import matplotlib.pyplot as plt
import numpy as np

stages = list(results)
x = np.arange(len(stages))
fig, ax = plt.subplots(figsize=(1.6 * len(stages) + 2, 3))
for i, (key, label) in enumerate([("mean_iou_all", "mIoU, all classes"),
                                  ("mean_iou", "mIoU, foreground")]):
  ax.bar(x + (i - 0.5) * 0.4, [float(results[s]["scores"][key])
                               for s in stages], 0.4, label=label)
ax.set_xticks(x, stages)
ax.set_ylabel("test mIoU")
ax.legend()
plt.show()'''),
]

# Writes generated fundus photographs (kd_jax.data.synthetic) as PNG files
# and a CSV: the synthetic default takes the path of one's own files.
SYNTHETIC_FUNDUS_FILES = '''
def write_synthetic_fundus(folder, n, size):
  \"\"\"n generated fundus images as PNGs in `folder` and labels.csv (image,
  label = referable DR: grade >= 2, grade); returns the CSV's path.\"\"\"
  import numpy as np
  from PIL import Image as PILImage
  from kd_jax.data import synthetic

  os.makedirs(folder, exist_ok=True)
  rows = ["image,label,grade"]
  for i in range(n):
    ex = synthetic.render_fundus(np.random.default_rng([0, i]), size)
    PILImage.fromarray(np.uint8(ex["image"] * 255)).save(
        os.path.join(folder, f"{i:04d}.png"))
    rows.append(f"{i:04d}.png,{int(ex['dr_grade'] >= 2)},{ex['dr_grade']}")
  path = os.path.join(folder, "labels.csv")
  with open(path, "w") as f:
    f.write("\\n".join(rows) + "\\n")
  return path'''

MEDTEX = [
    md('''
# MED-TEX: transfer and explain with less data

What it does: the MED-TEX recipe (`configs/medtex/medtex.py`, Nguyen-Duc et
al., ISBI 2022) at a notebook budget: a CNN teacher trained on the labels,
then, on a quarter of the training images (`FRACTION`), the tiny student
alone, the student distilled from the teacher's soft targets (`kd`, with
VID on four block pairs: `vid`), and an explainer + student pair trained
together on X' = Θ ⊙ X (`med_ex`, and with VID: `med_tex`), trained and
scored by `kd_jax.train.train_and_evaluate`; then the report table
(accuracy, F1, AUC, fidelity to the teacher), each stage's explanation
over validation images (Θ of the explainer stages, the others' saliency and
Grad-CAM), and, where IDRiD's lesion masks are there, the top-K overlap of
each explanation with the lesions (`kd_jax.evaluate.lesion_iou`).

Data, in this order: PALM (pathologic myopia or not; or IDRiD referable
DR, `DATASET` below) from `KD_JAX_DATA` (or the repository's
`../shared/data`) when it is there. Your own data: where it is absent,
set `OWN_CSV` to a CSV of image paths and 0 / 1 labels
(`kd_jax.data.options("folder")`), e.g. on a mounted Google Drive; else
generated fundus photographs written as PNG files and a CSV in that same
form (label: DR grade ≥ 2).

Time: about 10 minutes on a 2-core CPU runtime (estimate: six stages of
200 steps at 112×112, batch 16); an estimated 2 minutes on a TPU runtime
with bf16 compute (not measured). `configs/medtex/medtex.py:full` is the
paper's 224×224 setting (for a TPU or GPU).
'''),
    code(SETUP),
    code(BUDGET + '''
DATASET = "palm"  # or "idrid" (referable DR), when the shared data is there
FRACTION = 0.25  # of the training split for every stage but the teacher
# Your own data when the shared data is absent: a CSV with columns image
# (paths, relative to the CSV's folder) and label (0 / 1).
OWN_CSV = ""
''' + SYNTHETIC_FUNDUS_FILES + '''


SIZE = 32 if TINY else 112
root = os.environ.get("KD_JAX_DATA") or os.path.join(REPO, "..", "shared",
                                                     "data")
use_shared = os.path.isdir(os.path.join(root, DATASET))
if use_shared:
  data_config = None  # the config's own: palm or idrid_referable
elif OWN_CSV:
  data_config = dict(name="folder", csv=OWN_CSV, num_classes=2)
else:
  csv = write_synthetic_fundus(os.path.join(WORKDIR, "synthetic_fundus"),
                               n=24 if TINY else 400, size=SIZE)
  data_config = dict(name="folder", csv=csv, num_classes=2)
print("data:", f"{DATASET} from {os.path.abspath(root)}" if use_shared
      else data_config)'''),
    code('''
from kd_jax import train

config = load_config("medtex/medtex", f"cpu,{FRACTION},{DATASET}")
if use_shared:
  config.data.update(root=root, image_size=SIZE)
else:
  config.data = dict(data_config, image_size=SIZE, workers=0)
if TINY:  # The smoke run: the teacher and MED-EX (MED-TEX without VID).
  config.stage_order = ("teacher", "med_ex")
  config.batch_size = 4
else:
  config.stage_order = ("teacher", "student", "kd", "vid", "med_ex",
                        "med_tex")
# Notebook budget: 200 steps a stage (the cpu preset: 600).
config.steps = 2 if TINY else 200
config.log_every = config.eval_every = config.checkpoint_every = (
    2 if TINY else 50)
# bf16 compute (float32 parameters) on a TPU; the batch is split over its
# cores, so it must be a multiple of their number.
config.compute_dtype = "bfloat16" if ON_TPU else "float32"
config.batch_size = max(config.batch_size, jax.device_count())
run = os.path.join(WORKDIR, "medtex")
results = train.train_and_evaluate(config, run)'''),
    code('''
from IPython.display import Image, Markdown, display

with open(os.path.join(run, "report.md")) as f:
  display(Markdown(f.read()))'''),
    md('''
## The explanations

MED-TEX's explainer gives a mask Θ ∈ [0, 1] per image: the student sees
only Θ ⊙ X, so Θ shows what it needs. The stages without an explainer are
explained post hoc by saliency and Grad-CAM of the positive class
(`kd_jax.evaluate.lesion_iou.stage_maps`).
'''),
    code('''
import numpy as np
from kd_jax import data, export
from kd_jax.evaluate import figures, lesion_iou

ds = data.build(config.data)
images = np.stack([ds.val[i]["image"] for i in range(min(4, len(ds.val)))])
maps = {}
for stage in config.stage_order:
  method, variables = export.restore_stage(config, run, stage, ds)
  for kind, m in lesion_iou.stage_maps(method, variables, images,
                                       batch=len(images)).items():
    maps[f"{stage}\\n{kind}"] = m
figures.explanation_grid(None, images, maps)'''),
    md('''
## Top-K overlap with IDRiD's lesions

Where the shared data holds IDRiD's lesion masks (part A), the top K
pixels of each explanation are compared with the lesions (MA, HE, EX, SE)
for k = 1…6 (K = k·32·32 pixels of a 224² image, scaled to the input):
Dice (the paper's "IoU") and Jaccard.
'''),
    code('''
lesions = os.path.join(root, "idrid", "segmentation_512_train.npz")
if use_shared and os.path.isfile(lesions):
  scores = lesion_iou.evaluate(config, run, max_images=4 if TINY else 0)
  out = os.path.join(run, "lesion_iou")
  display(Image(os.path.join(out, "lesion_iou.png")))
  display(Image(os.path.join(out, "overlays.png")))
else:
  print("no IDRiD lesion masks here: top-K overlap skipped")'''),
]

ENCODER = [
    md('''
# Foundation-encoder distillation: ViT → EfficientViT, then linear probes

What it does: the encoder recipe (`configs/encoder/distill.py`) at a
notebook budget: a ViT teacher (the cpu preset's small ViT, trained here
with labels; or your own ViT-L/16 converted by `python -m kd_jax.convert`,
`PRESET = "paper"`) distilled into EfficientViT-B0 on unlabelled images by
`kd_jax.train.train_and_evaluate`, one stage per arm (global: [CLS] ↔
pooled student through a linear projection; dense: the student's last map
↔ the teacher's patch grid through attention pooling; both); then each
frozen encoder read out by `kd_jax.probe` (a linear probe and k-NN on a
labelled set, its size and speed).

Data, in this order: the shared sets' images without labels
(`shared_images`) and PALM / PneumoniaMNIST for the probes, from
`KD_JAX_DATA` (or the repository's `../shared/data`) when it is there.
Your own data: where it is absent, `OWN_IMAGES` (a folder of unlabelled
images of any size) and `OWN_CSV` (a CSV of image paths and class labels,
for the cpu teacher and the probe), e.g. on a mounted Google Drive; else
generated fundus photographs written as PNG files and a CSV in that form.

Time: about 15 minutes on a 2-core CPU runtime (estimate: the teacher and
three arms of 300 steps at 64×64, batch 32); an estimated 3 minutes on a
TPU runtime with bf16 compute (not measured); the paper preset (224²,
20,000 steps) is for a TPU.
'''),
    code(SETUP),
    code(BUDGET + '''
PRESET = "cpu"  # "paper": your ViT-L/16 (TEACHER) at 224², for a TPU
TEACHER = ""  # paper: the folder `python -m kd_jax.convert` wrote
# Your own data when the shared data is absent: unlabelled images, and a
# CSV (columns image, label) for the cpu teacher and the probe.
OWN_IMAGES, OWN_CSV = "", ""
''' + SYNTHETIC_FUNDUS_FILES + '''


SIZE = 32 if TINY else (224 if PRESET == "paper" else 64)
root = os.environ.get("KD_JAX_DATA") or os.path.join(REPO, "..", "shared",
                                                     "data")
use_shared = os.path.isdir(os.path.join(root, "palm"))
if use_shared:
  # The smoke run pools PALM's images only.
  unlabelled = dict(name="shared_images", root=root,
                    **(dict(sets=("palm",)) if TINY else {}))
  labelled = dict(name="palm", root=root, num_classes=3)
  probe_sets = ("palm",) if TINY else ("palm", "pneumoniamnist")
elif OWN_IMAGES:
  unlabelled = dict(name="image_folder", image_dir=OWN_IMAGES)
  labelled, probe_sets = dict(name="folder", csv=OWN_CSV), None
else:
  csv = write_synthetic_fundus(os.path.join(WORKDIR, "synthetic_fundus"),
                               n=24 if TINY else 600, size=SIZE)
  unlabelled = dict(name="image_folder", image_dir=os.path.dirname(csv))
  labelled, probe_sets = dict(name="folder", csv=csv), None
print("distil on:", unlabelled, "\\nlabelled:", labelled)'''),
    md('''
## The teacher

The cpu preset's teacher is a small ViT (8×8 patches, LayerScale) trained
here with labels; the paper preset takes your converted ViT-L/16 instead.
'''),
    code('''
from kd_jax import data, train

run = os.path.join(WORKDIR, "encoder")
TINY_VIT = dict(width=32, depth=1, num_heads=2)  # the smoke run's teacher
if PRESET == "cpu":
  tconfig = load_config("encoder/distill", "teacher_cpu")
  tconfig.data = dict(labelled, image_size=SIZE, augment=True, workers=0)
  num_classes = data.build(tconfig.data).num_classes
  tconfig.stages.teacher.model.update(image_size=SIZE,
                                      num_classes=num_classes,
                                      **(TINY_VIT if TINY else {}))
  tconfig.steps = 2 if TINY else 300
  tconfig.batch_size = 4 if TINY else tconfig.batch_size
  tconfig.log_every = tconfig.eval_every = tconfig.checkpoint_every = (
      2 if TINY else 100)
  tconfig.compute_dtype = "bfloat16" if ON_TPU else "float32"
  tconfig.batch_size = max(tconfig.batch_size, jax.device_count())
  train.train_and_evaluate(tconfig, os.path.join(run, "vit_teacher"))
  TEACHER = os.path.join(run, "vit_teacher", "teacher")'''),
    md('''
## Distil on unlabelled images

No labels: the run's one output is an embedding head, and each arm is a
`distill` stage with feature terms only (`docs/encoder.md`).
'''),
    code('''
config = load_config("encoder/distill", PRESET)
config.data = dict(unlabelled, image_size=SIZE, augment=True, workers=0)
config.stage_order = (("global_cos",) if TINY else
                      ("global_cos", "dense_attn", "global_dense"))
for arm in config.stage_order:
  stage = config.stages[arm]
  if PRESET == "cpu":
    stage.teacher.model.update(image_size=SIZE, num_classes=num_classes,
                               **(TINY_VIT if TINY else {}))
    if "dense" in stage.losses:  # the teacher's patch grid at this size
      stage.losses.dense.connector.grid = (SIZE // 8, SIZE // 8)
  if TINY:  # a narrow, shallow EfficientViT
    stage.model.update(widths=(4, 8, 8, 16, 16), depths=(1, 1, 1, 1, 1),
                       head_widths=(32, 32))
# One reference: this sets every arm's teacher folder.
config.stages[config.stage_order[0]].teacher.checkpoint = TEACHER
config.steps = 2 if TINY else 300
config.batch_size = 4 if TINY else config.batch_size
config.log_every = config.eval_every = config.checkpoint_every = (
    2 if TINY else 100)
config.compute_dtype = "bfloat16" if ON_TPU else "float32"
config.batch_size = max(config.batch_size, jax.device_count())
results = train.train_and_evaluate(config, run)'''),
    md('''
## Linear probes, k-NN, size and speed

`kd_jax.probe` reads each encoder frozen: the teacher's pooled patch
tokens and each student's mean-pooled last map (`stage4`; the dense arms
never train the student's head), a logistic-regression probe and a cosine
k-NN fitted on the labelled set's train split and scored on its test
split; `kept` is the balanced accuracy relative to the teacher's.
'''),
    code('''
from IPython.display import Image, Markdown, display
from kd_jax import probe

if probe_sets:
  sets = {n: probe.build_set(n, SIZE, root) for n in probe_sets}
else:
  sets = {"own": (data.build(dict(labelled, image_size=SIZE)), "label")}
shape = (SIZE, SIZE, 3)
readout = {}
for label, folder in [("teacher", TEACHER)] + [
    (arm, os.path.join(run, arm)) for arm in config.stage_order]:
  module, variables, _ = probe.load_encoder(folder, image_size=SIZE)
  feature = probe.pick_feature(module, variables, shape, ("stage4", "tokens"))
  fn = probe.forward(module, feature)
  readout[label] = dict(
      size=probe.size(module, shape),
      speed=probe.speed(fn, variables, shape, batch=8 if TINY else 256,
                        repeats=1 if TINY else 5, warmup=1 if TINY else 10,
                        runs=2 if TINY else 100),
      sets=probe.probe_encoder(module, variables, sets, feature=feature,
                               batch_size=8 if TINY else 64,
                               k=3 if TINY else 20))
probe.add_kept(readout, "teacher")
display(Markdown(probe.markdown(readout)))
probe.plot(readout, os.path.join(run, "probe.png"))
display(Image(os.path.join(run, "probe.png")))'''),
]

NOTEBOOKS = {
    "quickstart.ipynb": QUICKSTART,
    "compose_your_own_loss.ipynb": COMPOSE,
    "distillo_acdc.ipynb": DISTILLO,
    "fundus_multitask.ipynb": FUNDUS,
    "structured_kd.ipynb": SKD,
    "medtex_explain.ipynb": MEDTEX,
    "encoder_distill.ipynb": ENCODER,
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
