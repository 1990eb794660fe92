"""kd_jax's jitted distillation step against the same step in PyTorch eager.

    python benchmarks/distill_step.py --pair=default
    python benchmarks/distill_step.py --pair=default --devices=1,8
    python benchmarks/distill_step.py --pair=default --teacher_cache
    python benchmarks/distill_step.py --pair=transunet_squeeze --rounds=3
    python benchmarks/distill_step.py --pair=vit_efficientvit
    python benchmarks/distill_step.py --pair=default --layers=cpu,flax \
        --torch_threads=0,1 --profile
    python benchmarks/distill_step.py --pair=vit_l16_efficientvit_b1 \
        --compute_dtype=bfloat16 --torch_modes=eager,compile --sequential \
        --json=out.json          # one pair of benchmarks/gpu.py's run
    git worktree add --detach /tmp/kd_old <commit>   # an older kd_jax
    python benchmarks/distill_step.py --pair=default --layers=cpu,flax \
        --variant="1:tree=/tmp/kd_old KD_JAX_NATIVE=0"

One step = teacher forward (eval mode, frozen) + student forward/backward +
optimizer update, with the loss of configs/default.py's distilled stage
(CE + Dice + a logit term, kd_kl or cwd, as the config says) unless the
pair gives its own (`losses`: vit_efficientvit's), AdamW with
warm-up/cosine schedule and global-norm clipping, at `--batch` (16 unless
given). Pairs: `default` (configs/default.py's teacher and student: UNet
width 16 → 8, depth 3, 64²),
`unet_large` (UNet 32 → 16, depth 4, 128²: 7.8 M → 1.9 M parameters) and
`transunet_squeeze` (transunet_tiny → squeeze_unet, 128²) and
`pspnet_resnet18` (pspnet_resnet101 → pspnet_resnet18, deep-stem dilated
ResNets at output stride 8, 64²: 70.4 M → 13.1 M parameters; the student's
dropout masks are each framework's own draws, so its first-step losses
agree only approximately) and `vit_efficientvit` (foundation-encoder
distillation: vit_b16 with its position embedding learned for the input
side → efficientvit_b0, 64², 1 channel; one loss term, embedding_cosine
between the teacher's [CLS] "embedding" and the student's pooled
"embedding" through a linear connector, trained with the student on both
sides; the models' 9-class heads are unused by the loss: XLA drops them
from kd_jax's step, the PyTorch side computes them, as a user's loop
would); 9 classes.

* kd_jax side: the trainer's own pieces (`train.build_method`,
  `init_state`, `make_optimizer`, `make_train_step`, `jit_train_step` over
  `make_mesh()`), compiled ahead of time so the compile is timed on its
  own (cold: no persistent cache unless `--compile_cache`), with the
  config's `layers` (flax's own, or kd_jax.cpu_layers' CPU forms) unless
  `--layers` names them: a comma list (`cpu,flax`) runs one kd_jax worker
  per value. `--devices=N` shards the batch over N virtual host devices
  (`--xla_force_host_platform_device_count=N`, set before jax is
  imported); a comma list (`1,8`) runs one kd_jax worker per count, and
  `--variant=N:OPTIONS` adds a worker with any of: extra XLA flags,
  `layers=NAME`, another step (`mode=NAME`, see MODES), environment
  variables (`NAME=VALUE`, upper case) and `tree=PATH`: kd_jax and
  configs/ from another checkout (that worker's PYTHONPATH and working
  folder), so that an older kd_jax (a `git worktree`) and this one are
  timed in one run; a tree whose kd_jax has a `runtime.configure()` gets
  it called, as its `kd_jax.main` did. The PyTorch twins start from the
  initial weights of this checkout's first distill worker; a `tree=`
  worker draws its own, so its first-step loss may differ.
  `--teacher_cache` adds two workers: the step
  fed a teacher cache (`config.teacher_cache`: the batch carries the
  teacher outputs, computed once before the loop) and the student
  trained alone (CE + Dice), and prints their ratio; each also times its
  train loop over unaugmented examples (each epoch's view is the
  example itself), the cached one after building the cache. A pair
  without a per-pixel student (vit_efficientvit) has no student-only step:
  `--teacher_cache` adds only the cached worker and compares it with the
  full distill step, and `mode=student` is refused.
  `--compute_dtype=bfloat16` sets `config.compute_dtype` (float32
  parameters and loss). On an accelerator `--devices=N` takes JAX's first
  N devices (and CUDA_VISIBLE_DEVICES=0..N-1 unless set); the XLA:CPU
  device-count flag is set on the CPU only. MFU (every row, both
  frameworks) = model FLOPs per step / step time / the devices' dense peak
  (PEAK_FLOPS by device name, or `--peak_tflops`; n/a on the CPU and on
  unknown devices); model FLOPs = XLA's cost analysis of the lowered
  teacher eval forward + 3 × the student's train forward.
* PyTorch side: the twins in `benchmarks/torch_models.py` (NCHW), loaded
  with the kd_jax initial weights; `torch.optim.AdamW` + `clip_grad_norm_`
  + the same schedule. `--torch_threads=0,1` runs one worker per count
  (0 = PyTorch's default, one per core) and `--torch_modes=eager,compile`
  one per mode (compile: the forward and loss through torch.compile); on
  the first GPU when there is one, with bf16 autocast for
  `--compute_dtype=bfloat16`, channels_last, cudnn.benchmark, the fused
  AdamW and TF32 matched to JAX's default precision. Parameter counts must equal
  kd_jax's (asserted), and the first-step losses are printed side by side:
  both sides compute the same thing.

Each configuration runs in its own worker process (its own threads, XLA
flags and peak RSS from `resource.getrusage`); the parent imports neither
framework. The workers start one after another; after the warm-up (compile
+ `--warmup` steps, excluded) they take turns, one round each (`--steps`
steps and one sync at the end, like a training loop that syncs only to
log), for `--rounds` rounds in rotating order, so the noise of a shared
machine hits all of them alike. With `--sequential` (an accelerator) each
worker instead runs all its rounds and exits before the next starts, so
no two hold a GPU's memory at once; `--worker_timeout` and `--time_budget`
then bound each worker and the run (a worker past them is killed and its
row says so), and `--json` writes every row after each worker. Peak
device memory: JAX's `peak_bytes_in_use`, PyTorch's
`max_memory_allocated`. `--smoke` swaps in the pair's tiny stand-ins.

Printed as a markdown table per configuration: median time per step over
the rounds, the range, images/s, speed relative to PyTorch (the fastest
PyTorch row's time / this row's: >1 means faster than PyTorch), the same
ratio round by round (its median over the rounds: steadier when the
machine's speed drifts), MFU, peak device memory, compile time (PyTorch:
its first step), peak RSS and the part imports alone take. Then the
images/s of kd_jax's grain training pipeline (synthetic
CT + augmentation, `data.pipeline.train_batches` + `iterate`) in the first
epoch (each example rendered) and in later ones (examples served from
memory), and the trainer's loop (step fed by that pipeline) with each.
With more than one kd_jax worker, each later one against the first, round
by round (median, and how many rounds it was faster). `--profile` adds
where each side's time goes (XLA thunks by kind from a JAX profiler trace,
summed over threads; PyTorch's profiler by op). Timings on shared machines
are noisy: the load average is printed with the table.
"""
import argparse
import collections
import json
import os
import queue
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))

PAIRS = {
    # Teacher/student from configs/default.py's distilled stage.
    "default": dict(teacher=None, student=None, size=64),
    # STACK.md's CPU figure: UNet 7.8 M → 1.9 M parameters at 128².
    "unet_large": dict(teacher=dict(name="unet", width=32, depth=4),
                       student=dict(name="unet", width=16, depth=4), size=128),
    # The CPU preset of the heterogeneous recipe: TransUNet → SqueezeU-Net.
    "transunet_squeeze": dict(teacher=dict(name="transunet_tiny"),
                              student=dict(name="squeeze_unet"), size=128),
    # The Structured KD pair: PSPNet on a dilated ResNet-101 → on ResNet-18
    # (output stride 8; 64² gives an 8×8 map, ≥ the largest bin, 6).
    "pspnet_resnet18": dict(teacher=dict(name="pspnet_resnet101"),
                            student=dict(name="pspnet_resnet18"), size=64),
    # Foundation-encoder distillation: ViT-B/16 → EfficientViT-B0 (the side
    # must be a multiple of 32), global embedding matching as the stage's
    # one term: the student's pooled head vector through a linear
    # connector against the teacher's [CLS]. `image_size=None` is filled in
    # with the input side by pair_config, so the ViT's position embedding
    # is learned for it and never resized. No student-only step
    # (`student_only=False`): the baseline stage's CE + Dice reads per-pixel
    # logits, and this image-level student has none.
    "vit_efficientvit": dict(
        teacher=dict(name="vit_b16", image_size=None),
        student=dict(name="efficientvit_b0"), size=64,
        losses=dict(embedding=dict(fn="embedding_cosine", student="embedding",
                                   teacher="embedding", connector="linear")),
        student_only=False),
    # The accelerator pairs (benchmarks/gpu.py). The seed's own setting
    # (configs/distillo.py's full preset, kd arm): TransUNet R50-ViT-B/16 →
    # SqueezeU-Net width 24 at 224², CE + Dice + KL (weights 1: the preset's
    # 0.5 / 0.5 only scale the loss).
    "distillo_full": dict(
        teacher=dict(name="transunet_b16", image_size=None),
        student=dict(name="squeeze_unet", width=24), size=224,
        losses=dict(ce=dict(fn="cross_entropy"), dice=dict(fn="dice"),
                    kd=dict(fn="kd_kl", temperature=1.0)),
        # The cheapest stand-ins (CI runs this pair's smoke): one level each.
        smoke=dict(teacher=dict(name="unet", width=2, depth=1),
                   student=dict(name="squeeze_unet", width=4, depth=1),
                   size=16)),
    # Foundation-encoder distillation at full size: ViT-L/16 → EfficientViT-B1.
    "vit_l16_efficientvit_b1": dict(
        teacher=dict(name="vit_l16", image_size=None),
        student=dict(name="efficientvit_b1"), size=224,
        losses=dict(embedding=dict(fn="embedding_cosine", student="embedding",
                                   teacher="embedding", connector="linear")),
        student_only=False,
        smoke=dict(teacher=dict(name="vit_tiny", image_size=None),
                   student=dict(name="efficientvit_b0"), size=32)),
}
# `--smoke` swaps a pair's models and side for its `smoke` entry: tiny
# models of the same families, so that benchmarks/gpu.py's whole run (every
# arm, the JSON, the table) is checked on a CPU in seconds; it measures the
# machinery, not the models.
PAIRS["pspnet_resnet18"]["smoke"] = dict(
    teacher=dict(name="pspnet_resnet18", width=8),
    student=dict(name="pspnet_resnet18", width=4), size=64)
NUM_CLASSES = 9  # The synthetic CT source's classes.
def _teacher_outputs(jax, method, frozen, images, batch):
  """`method.teacher_outputs` of every image, `batch` at a time, as host
  arrays (what a teacher cache holds for unaugmented examples)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  fn = jax.jit(method.teacher_outputs)
  images = np.stack(images)
  parts = []
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    pad = batch - len(chunk)
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    parts.append(jax.tree.map(lambda x, n=len(chunk): np.asarray(x)[:n],
                              fn(frozen, padded)))
  return jax.tree.map(lambda *x: np.concatenate(x), *parts)


REPLY = "@@"  # Prefix of a worker's reply line (libraries may print too).
# What a kd_jax worker's step trains (`mode=` in --variant): the distill
# step (teacher forward + student forward/backward + update), the same step
# fed a teacher cache (`config.teacher_cache`: the batch carries the teacher
# outputs), or the student alone on CE + Dice (the config's baseline stage).
MODES = {"distill": "", "cached": "teacher cache",
         "student": "student only (CE + Dice)"}
# The PyTorch arms: eager, or the forward and loss through torch.compile.
TORCH_MODES = {"eager": "eager", "compile": "torch.compile"}
# Dense peak FLOP/s of one device, (bfloat16, float32), for MFU; float32 as
# XLA runs it by default (TF32 tensor cores on NVIDIA, bf16 passes on TPU).
# Matched as whole words of the device name (JAX's `device_kind`, PyTorch's
# `get_device_name`), first match wins; any other device gets no MFU
# ("n/a") rather than a guess. NVIDIA's datasheet figures without sparsity.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 418e12),
    ("H100", 989e12, 495e12),  # SXM.
    ("H200", 989e12, 495e12),
    ("A100", 312e12, 156e12),
    ("L4", 121e12, 60e12),
    ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12),
    ("TPU v5", 459e12, 459e12),
    ("TPU v6 lite", 918e12, 918e12),
)


def peak_flops(device_kind, dtype):
  """Dense peak FLOP/s of one device of this kind, or None (CPU, unknown)."""
  for key, bf16, f32 in PEAK_FLOPS:
    if re.search(r"(?<!\w)" + re.escape(key) + r"(?!\w)", device_kind or ""):
      return bf16 if dtype == "bfloat16" else f32
  return None


def mfu(flops_per_step, step_s, peak_per_device, devices):
  """Model FLOPs utilisation: the step's FLOPs (all devices) per second over
  the devices' peak."""
  return flops_per_step / step_s / (peak_per_device * devices)


def cost_analysis_flops(compiled):
  """FLOPs XLA's cost analysis counts for a compiled program (one device's
  share of an SPMD program; a multiply-add counts 2)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  return float(cost.get("flops", 0.0))


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n", maxsplit=1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--pair", default="default", choices=sorted(PAIRS))
  p.add_argument("--batch", type=int, default=16, help="global batch")
  p.add_argument("--size", type=int, default=None,
                 help="image side (default: the pair's, 64 or 128)")
  # Rounds of one run scatter by ±20 % on a shared VM: 5 rounds left the
  # default pair's ratio anywhere in 0.9-1.1×.
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--steps", type=int, default=3,
                 help="steps per round and configuration")
  p.add_argument("--warmup", type=int, default=2,
                 help="untimed steps after compiling")
  p.add_argument("--devices", default="1",
                 help="virtual host devices of the kd_jax side; a comma list "
                 "(1,8) runs one kd_jax worker per count")
  p.add_argument("--layers", default="",
                 help="config.layers of the kd_jax workers, a comma list "
                 "(flax,cpu) running one worker per value on each --devices "
                 "count (default: the config's own)")
  p.add_argument("--variant", action="append", default=[],
                 help="N:OPTIONS, one more kd_jax worker on N devices; "
                 "OPTIONS (space-separated): mode=NAME (see MODES), "
                 "layers=NAME, tree=PATH (kd_jax and configs/ from another "
                 "checkout), NAME=VALUE (an environment variable, upper "
                 "case) and --xla... flags (repeatable)")
  p.add_argument("--teacher_cache", action="store_true",
                 help="also time the step fed a teacher cache and the "
                 "student-only step (two more kd_jax workers, on the first "
                 "--devices count; the latter only for pairs that have one)")
  p.add_argument("--compute_dtype", default="float32",
                 choices=("float32", "bfloat16"),
                 help="config.compute_dtype of the kd_jax side (float32 "
                 "parameters and loss either way); PyTorch uses autocast")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="peak TFLOP/s of one accelerator for MFU, when its "
                 "kind is not in PEAK_FLOPS")
  p.add_argument("--xla_flags", default="",
                 help="extra XLA_FLAGS for every kd_jax worker")
  p.add_argument("--torch_threads", default="0",
                 help="torch.set_num_threads per PyTorch worker, comma list "
                 "(0: PyTorch's default, one per core)")
  p.add_argument("--torch_modes", default="eager",
                 help="PyTorch arms, a comma list of eager and compile "
                 "(torch.compile of the forward and loss), one worker per "
                 "mode and --torch_threads count")
  p.add_argument("--torch_compile_backend", default="inductor",
                 help="torch.compile backend of the compile arm")
  p.add_argument("--channels_last", default="auto",
                 choices=("auto", "on", "off"),
                 help="PyTorch models and images in channels_last (auto: on "
                 "a GPU)")
  p.add_argument("--no_torch", action="store_true", help="kd_jax only")
  p.add_argument("--sequential", action="store_true",
                 help="each worker does its warm-up and all its rounds, "
                 "then exits before the next starts (no two processes hold "
                 "an accelerator's memory at once); default: interleaved "
                 "rounds, for noisy shared CPUs")
  p.add_argument("--smoke", action="store_true",
                 help="the pair's tiny stand-in models and side (its "
                 "`smoke` entry in PAIRS): checks the machinery on a CPU")
  p.add_argument("--json", default="",
                 help="also write the results (every row and field) to this "
                 "JSON file, rewritten after each worker")
  p.add_argument("--worker_timeout", type=float, default=0.0,
                 help="seconds a worker may take, start to exit, before it "
                 "is killed and its row reports the timeout (0: no limit; "
                 "with --sequential only)")
  p.add_argument("--time_budget", type=float, default=0.0,
                 help="seconds for the whole run (with --sequential): a "
                 "worker gets at most what is left, and workers left "
                 "without time are reported as not run (0: no limit)")
  p.add_argument("--loader_seconds", type=float, default=0.0,
                 help="instead of --loader_batches' measure: the grain "
                 "pipeline's images/s over the step's examples (held in "
                 "memory, augmented, batched), timed for this many seconds")
  p.add_argument("--compile_cache", default="",
                 help="persistent compilation cache folder (default none: "
                 "the compile time is a cold compile)")
  p.add_argument("--init_opt_level", default="0",
                 help="XLA backend optimisation level for compiling the "
                 "(untimed) parameter init: 0 (fast), 'default' (XLA's)")
  p.add_argument("--loader_batches", type=int, default=24,
                 help="batches timed through the grain pipeline, at least "
                 "24 (3× its prefetch buffer); 0: skip")
  p.add_argument("--profile", action="store_true",
                 help="after the rounds, profile one round per worker and "
                 "print where the time goes")
  # Internal: what a worker process is.
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--worker_flags", default="", help=argparse.SUPPRESS)
  p.add_argument("--tmp", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.smoke and "smoke" not in PAIRS[args.pair]:
    p.error(f"--smoke: pair {args.pair} has no smoke models; pairs with "
            f"them: {', '.join(k for k, v in PAIRS.items() if 'smoke' in v)}")
  if args.size is None:
    args.size = _spec(args.pair, args.smoke)["size"]
  bad = set(args.torch_modes.split(",")) - set(TORCH_MODES) - {""}
  if bad:
    p.error(f"--torch_modes: {', '.join(sorted(bad))}; choose from "
            f"{', '.join(TORCH_MODES)}")
  if (args.worker_timeout or args.time_budget) and not args.sequential:
    p.error("--worker_timeout and --time_budget need --sequential")
  return args


def _spec(pair, smoke=False):
  """The pair's PAIRS entry, with its smoke stand-ins swapped in."""
  spec = PAIRS[pair]
  return dict(spec, **spec["smoke"]) if smoke else spec


def pair_config(pair, size, root=REPO, smoke=False):
  """(config, teacher model cfg, student model cfg) of `pair` (its smoke
  stand-ins with `smoke`), from the configs/default.py of the checkout at
  `root`. Needs only ml_collections, so every process (and the parent) can
  call it."""
  if root not in sys.path:
    sys.path.insert(0, root)
  from configs import default  # pylint: disable=import-outside-toplevel

  def sized(model):  # A model learned for one input side gets this one.
    return dict(model, image_size=size) if "image_size" in model else model

  config = default.get_config()
  config.data.image_size = size
  stage = config.stages.distilled
  spec = _spec(pair, smoke)
  if spec["student"]:
    stage.model = sized(spec["student"])
    stage.teacher.model = sized(spec["teacher"])
  if "losses" in spec:
    stage.losses = spec["losses"]
  return config, stage.teacher.model.to_dict(), stage.model.to_dict()


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if hasattr(v, "items"):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def _unflatten(flat):
  tree = {}
  for key, v in flat.items():
    *path, leaf = key.split("/")
    node = tree
    for k in path:
      node = node.setdefault(k, {})
    node[leaf] = v
  return tree


def _peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _accelerator_visible():
  """Whether JAX will run on an accelerator here, decided before it starts:
  JAX_PLATFORMS, else the device files kd_jax.accelerator knows (a tree
  without that module is benchmarked as on the CPU)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").split(",")
  if platforms[0].strip():
    return platforms[0].strip() != "cpu"
  try:
    from kd_jax import accelerator  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return any(os.path.exists(f)
             for f in accelerator.NVIDIA_FILES + accelerator.TPU_FILES)


def _restrict_accelerators(devices):
  """Before a framework starts: only the first `devices` GPUs (unless
  CUDA_VISIBLE_DEVICES already names some), and JAX taking GPU memory as it
  needs it instead of 75 % up front, so that a JAX and a PyTorch worker
  never fight over one GPU's memory and JAX's peak is its own."""
  os.environ.setdefault("CUDA_VISIBLE_DEVICES",
                        ",".join(str(i) for i in range(devices)))
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _rss_mb():
  """Current resident set size (Linux /proc), for the imports' share."""
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def _load_batch(args):
  import numpy as np  # pylint: disable=import-outside-toplevel

  with np.load(os.path.join(args.tmp, "batch.npz")) as b:
    return {"image": b["image"], "label": b["label"]}


def worker_options(text):
  """A kd_jax worker's OPTIONS (see --variant) as a dict: mode, layers,
  tree, env (NAME=VALUE pairs) and xla (flags); ValueError for others."""
  opts = dict(mode="distill", layers="", tree="", env={}, xla=[])
  for word in text.split():
    key, eq, value = word.partition("=")
    if word.startswith("--"):
      opts["xla"].append(word)
    elif key in ("mode", "layers", "tree") and value:
      opts[key] = value
    elif eq and key.isupper():
      opts["env"][key] = value
    else:
      raise ValueError(f"{word!r}: a kd_jax worker's options are mode=, "
                       "layers=, tree=, NAME=VALUE and --xla... flags")
  if opts["mode"] not in MODES:
    raise ValueError(f"mode={opts['mode']}: choose one of {sorted(MODES)}")
  if opts["layers"] not in ("", "flax", "cpu"):
    raise ValueError(f"layers={opts['layers']}: choose flax or cpu")
  if opts["tree"]:
    opts["tree"] = os.path.abspath(opts["tree"])
  return opts


# ----------------------------------------------------------------------------
# Workers. Each answers "round", "profile", "rss", "loader", "quit" on stdin
# with one JSON line on stdout.


class JaxWorker:
  """kd_jax's trainer pieces on `devices` virtual host devices."""

  def __init__(self, args, devices, extra_flags):
    opts = worker_options(extra_flags)
    root = opts["tree"] or REPO  # The parent put its kd_jax on PYTHONPATH.
    host = not _accelerator_visible()
    _restrict_accelerators(devices)
    # Before jax starts its backends (importing it starts none): the count
    # of virtual host devices is an XLA:CPU flag, set on the CPU only.
    os.environ["XLA_FLAGS"] = " ".join(
        f for f in (os.environ.get("XLA_FLAGS", ""),
                    f"--xla_force_host_platform_device_count={devices}"
                    if host else "",
                    args.xla_flags, " ".join(opts["xla"])) if f)
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    import kd_jax  # pylint: disable=import-outside-toplevel
    from kd_jax import data, train  # pylint: disable=import-outside-toplevel

    if host:
      try:  # A tree with kd_jax.runtime (kd_jax.main called it there) ...
        from kd_jax import runtime  # pylint: disable=import-outside-toplevel
        runtime.configure()
      except ImportError:
        pass
    # ... but no persistent cache unless asked: the compile is measured cold.
    jax.config.update("jax_compilation_cache_dir", args.compile_cache or None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    mode = opts["mode"]
    if jax.default_backend() == "cpu" and not host:
      raise SystemExit("an accelerator is visible but JAX runs on the CPU "
                       "(a CPU-only jaxlib?); set JAX_PLATFORMS=cpu to "
                       "benchmark the CPU")
    if jax.default_backend() == "cpu":
      assert jax.device_count() == devices, jax.devices()
    elif jax.device_count() < devices:
      raise SystemExit(f"--devices={devices}: JAX sees {jax.device_count()} "
                       f"{jax.default_backend()} devices")
    # The first N devices only: PyTorch's side runs on one.
    self.devices = jax.devices()[:devices]
    # Imported libraries alone hold hundreds of MB: reported apart.
    info = dict(devices=devices, import_rss_mb=_rss_mb(), mode=mode,
                platform=self.devices[0].platform,
                device_kind=self.devices[0].device_kind,
                # None: Precision.DEFAULT, which lets XLA run float32
                # matmuls and convolutions on TF32 tensor cores on NVIDIA
                # GPUs (Ampere and later); PyTorch's side is set to match.
                matmul_precision=str(
                    jax.config.jax_default_matmul_precision or "DEFAULT"))
    self.jax, self.data, self.train, self.args = jax, data, train, args
    self.mode = mode
    config, _, _ = pair_config(args.pair, args.size, root, args.smoke)
    config.compute_dtype = args.compute_dtype
    if opts["layers"]:
      config.layers = opts["layers"]
    info.update(kd_jax=os.path.dirname(os.path.dirname(kd_jax.__file__)),
                layers=config.get("layers", "–"))
    self.config = config
    self.datasets = data.build(config.data)

    # The student alone trains in the config's "baseline" stage (CE + Dice).
    stage = "baseline" if mode == "student" else "distilled"
    method, _ = train.build_method(config, stage, "", NUM_CLASSES,
                                   load_teacher=False)
    self.method = method
    s = train.stage_config(config, stage)
    tx = train.make_optimizer(s["optimizer"], s["steps"])
    mesh = self.mesh = train.make_mesh(self.devices)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_file = os.path.join(args.tmp, "batch.npz")
    if not os.path.exists(batch_file):
      # The step's batch, the same for every worker: the first `batch`
      # training examples, unaugmented.
      ex = [self.datasets.train[i] for i in range(args.batch)]
      np.savez(batch_file + ".tmp.npz",
               image=np.stack([e["image"] for e in ex]),
               label=np.stack([e["label"] for e in ex]))
      os.replace(batch_file + ".tmp.npz", batch_file)
    batch = _load_batch(args)
    example = jax.numpy.asarray(batch["image"][:1])
    rng = jax.random.key(config.seed)
    # Set-up, run once: by default XLA's backend optimisation (LLVM) of the
    # random initialisers costs most of a minute here and buys nothing.
    init_opt = args.init_opt_level
    level = ({} if init_opt == "default" else
             {"xla_backend_optimization_level": int(init_opt)})
    info["init_opt_level"] = init_opt
    t = time.perf_counter()
    init = jax.jit(lambda x: train.init_state(method, tx, rng, x),
                   out_shardings=rep)
    self.state = init.lower(example).compile(compiler_options=level)(example)
    if mode == "student":
      teacher = {"params": {}}
    else:
      init_teacher = jax.jit(lambda x: method.teacher.init(
          jax.random.fold_in(rng, 7), x, train=False), out_shardings=rep)
      teacher = init_teacher.lower(example).compile(compiler_options=level)(
          example)
    jax.block_until_ready((self.state, teacher))
    info["init_s"] = time.perf_counter() - t
    self.frozen = {"params": teacher["params"],
                   "batch_stats": teacher.get("batch_stats", {})}
    if mode == "cached":
      # The teacher cache's batches carry the teacher outputs.
      batch["teacher"] = _teacher_outputs(jax, method, self.frozen,
                                          batch["image"], args.batch)
    elif mode == "student":
      self.frozen = {}
    self.batch = train.to_global(batch, mesh)

    def count(tree):
      return int(sum(x.size for x in jax.tree.leaves(tree)))

    model_key = method.model_key
    info.update(params_teacher=count(teacher["params"]),
                params_student=count(self.state.params[model_key]),
                params_connectors=count(self.state.params.get("connectors",
                                                              {})))
    init_file = os.path.join(args.tmp, "init.npz")
    if mode == "distill" and not opts["tree"] and not os.path.exists(
        init_file):  # The PyTorch twins start from these.
      host = jax.device_get({
          "student": {"params": self.state.params["student"],
                      "batch_stats": self.state.batch_stats["student"]},
          "teacher": self.frozen,
          "connectors": {"params": self.state.params["connectors"]}})
      np.savez(init_file + ".tmp.npz", **{
          k: np.asarray(v) for k, v in _flatten(host).items()})
      os.replace(init_file + ".tmp.npz", init_file)

    step = train.jit_train_step(train.make_train_step(method, tx), mesh)
    t0 = time.perf_counter()
    lowered = step.lower(self.state, self.batch, self.frozen)
    t1 = time.perf_counter()
    self.step = lowered.compile()
    t2 = time.perf_counter()
    info.update(trace_s=t1 - t0, compile_s=t2 - t1,
                gflop_per_step=cost_analysis_flops(self.step) / 1e9,
                **self._model_gflop(batch["image"]))
    losses = []
    for _ in range(max(args.warmup, 1)):
      self.state, metrics = self.step(self.state, self.batch, self.frozen)
      losses.append(float(metrics["loss"]))
    info.update(first_loss=losses[0])
    self.info = info

  def _model_gflop(self, images):
    """Model GFLOP of one step, from XLA's cost analysis of the lowered
    forwards (before XLA's passes: the whole model, heads included, as
    PyTorch runs it; a multiply-add counts 2): the frozen teacher's eval
    forward, the student's train forward, and per step the teacher's once
    plus the student's three times (forward + backward ≈ 3 forwards)."""
    jax = self.jax
    from kd_jax.methods import common  # pylint: disable=import-outside-toplevel

    def flops(fn, *args):
      shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            args)
      return cost_analysis_flops(jax.jit(fn).lower(*shapes)) / 1e9

    key = self.method.model_key
    student = flops(
        lambda p, s, x: common.apply_train(self.method.model, p, s, x,
                                           jax.random.key(0)),
        self.state.params[key], self.state.batch_stats[key], images)
    teacher = 0.0
    if self.mode == "distill":
      teacher = flops(
          lambda f, x: common.apply_eval(self.method.teacher, f["params"],
                                         f["batch_stats"], x),
          self.frozen, images)
    return dict(teacher_forward_gflop=teacher, student_forward_gflop=student,
                model_gflop_per_step=teacher + 3 * student)

  def peak_device_bytes(self):
    """The largest peak of allocated bytes over this worker's devices since
    it started (None where the runtime keeps no such count: the CPU)."""
    stats = [d.memory_stats() for d in self.devices]
    if not all(stats) or any("peak_bytes_in_use" not in m for m in stats):
      return None
    return max(m["peak_bytes_in_use"] for m in stats)

  def round(self, steps):
    t = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch, self.frozen)
    self.jax.block_until_ready((self.state, metrics))
    return (time.perf_counter() - t) / steps

  def profile(self, steps):
    """Thunk time by kind (summed over XLA's threads), ms per step."""
    import gzip  # pylint: disable=import-outside-toplevel
    import glob  # pylint: disable=import-outside-toplevel

    folder = tempfile.mkdtemp(dir=self.args.tmp)
    with self.jax.profiler.trace(folder, create_perfetto_trace=True):
      wall = self.round(steps)
    path = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"),
                     recursive=True)[0]
    with gzip.open(path) as f:
      trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    kinds = collections.defaultdict(float)
    counts = collections.Counter()
    for e in events:
      name = e.get("name", "")
      if (e.get("ph") != "X" or "XLA" not in threads.get(
          (e["pid"], e["tid"]), "") or name.startswith("ThunkExecutor")):
        continue
      kind = _thunk_kind(name)
      kinds[kind] += e.get("dur", 0) / 1e3 / steps
      counts[kind] += 1
    rows = sorted(kinds.items(), key=lambda kv: -kv[1])[:8]
    return {"wall_ms": wall * 1e3,
            "rows": [(k, v, counts[k] // steps) for k, v in rows]}

  def loader(self, batches):
    """Images/s of the trainer's pipeline (shuffle, augment, batch,
    prefetch) over the synthetic source in the first epoch (each example
    rendered) and in later ones (`SyntheticCT` serves rendered examples from
    memory); then the time per step of the trainer's loop fed by each."""

    # Fewer would mostly time batches prefetched while the first was waited.
    batches = max(batches, 24)

    def rate(source):
      ds = self.data.pipeline.train_batches(
          source, batch_size=self.args.batch, seed=self.config.seed,
          transforms=self.datasets.train_transforms)
      it = self.data.pipeline.iterate(ds, 0)
      next(it)  # Starts the threads.
      t = time.perf_counter()
      for _ in range(batches):
        next(it)
      rate = batches * self.args.batch / (time.perf_counter() - t)
      it.close()  # Its prefetch threads would compete with the next timing.
      return rate

    def fresh():  # A new source: nothing rendered yet.
      return self.data.build(self.config.data).train

    t = time.perf_counter()
    memo = self.datasets.train
    cached = [memo[i] for i in range(len(memo))]
    render_s = time.perf_counter() - t
    out = {"render_all_s": render_s, "num_train": len(cached)}
    if self.mode != "distill":
      # The teacher cache needs data.augment=False: these modes' loops read
      # the rendered examples unaugmented, with the cached teacher outputs.
      teacher = None
      if self.mode == "cached":
        t = time.perf_counter()
        teacher = _teacher_outputs(
            self.jax, self.method, self.frozen,
            [x["image"] for x in cached], self.args.batch)
        out["cache_build_s"] = time.perf_counter() - t
      out["loop_unaugmented_s"] = self._loop(cached, (), batches, teacher)
      return out
    out.update(images_per_s=rate(fresh()), cached_images_per_s=rate(memo))
    # The trainer's loop: each step takes its batch from the pipeline, whose
    # threads share the cores with XLA's.
    for key, source in (("loop_rendered_s", fresh()), ("loop_cached_s", memo)):
      out[key] = self._loop(source, self.datasets.train_transforms, batches)
    return out

  def loader_rate(self, seconds):
    """Images/s of the trainer's grain pipeline (`train_batches` +
    `iterate`: shuffle, the config's augmentation, batching, its threads)
    over the step's examples held in memory, so that it measures the
    pipeline and not the synthetic source's rendering; timed for `seconds`
    after the first batch."""
    held = _Held([self.datasets.train[i] for i in range(self.args.batch)])
    ds = self.data.pipeline.train_batches(
        held, batch_size=self.args.batch, seed=self.config.seed,
        transforms=self.datasets.train_transforms)
    it = self.data.pipeline.iterate(ds, 0)
    next(it)  # Starts the threads.
    batches, t = 0, time.perf_counter()
    while not batches or time.perf_counter() - t < seconds:
      next(it)
      batches += 1
    elapsed = time.perf_counter() - t
    it.close()
    return {"images_per_s": batches * self.args.batch / elapsed,
            "batches": batches, "seconds": elapsed, "examples": len(held)}

  def _loop(self, source, transforms, batches, teacher_outputs=None):
    """Seconds per step of the trainer's loop fed by the grain pipeline."""
    if teacher_outputs is not None and hasattr(self.data.pipeline,
                                               "example_view"):
      # kd_jax's pipeline reads a cache by (epoch, example index); without
      # transforms every epoch's view is the example itself.
      outputs = teacher_outputs
      teacher_outputs = lambda e, i: self.jax.tree.map(lambda x: x[i],
                                                       outputs)
    ds = self.data.pipeline.train_batches(
        source, batch_size=self.args.batch, seed=self.config.seed,
        transforms=transforms, teacher_outputs=teacher_outputs)
    it = self.data.pipeline.iterate(ds, 0)
    self.state, metrics = self.step(
        self.state, self.train.to_global(next(it), self.mesh), self.frozen)
    self.jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(batches):
      self.state, metrics = self.step(
          self.state, self.train.to_global(next(it), self.mesh), self.frozen)
    self.jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t) / batches
    it.close()
    return seconds


class _Held:
  """A random-access source over examples in memory; each access a copy
  (a transform may write to its input)."""

  def __init__(self, examples):
    self.examples = examples

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return {k: v.copy() for k, v in self.examples[i].items()}


def _thunk_kind(name):
  base = re.sub(r"\.\d+$", "", name)
  if base.startswith("ynn_fusion"):
    return "YNNPACK fusions (convolutions with their BatchNorm/ReLU, reductions)"
  if "conv" in base:
    return "convolutions (Eigen)"
  if "dot" in base:
    return "dots"
  if "fusion" in base or base.startswith("wrapped"):
    return "elementwise/reduce fusions (XLA codegen)"
  return "other: " + base


class TorchWorker:
  """The PyTorch twins, `threads` intra-op threads (0: default), eager or
  with the forward and loss through torch.compile (`mode`), on the first GPU
  when there is one, with bf16 autocast for --compute_dtype=bfloat16
  (float32 parameters and loss, as on kd_jax's side).

  On a GPU it takes what a tuned PyTorch loop takes: models and images in
  channels_last, cuDNN's autotuner (`cudnn.benchmark`), the fused AdamW, and
  TF32 for float32 matmuls and convolutions, which is what JAX's default
  precision (Precision.DEFAULT) gives float32 on these GPUs.
  """

  def __init__(self, args, threads, mode="eager"):
    _restrict_accelerators(1)
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel

    if HERE not in sys.path:
      sys.path.insert(0, HERE)
    import torch_models as tm  # pylint: disable=import-outside-toplevel

    info = dict(import_rss_mb=_rss_mb(), mode=mode,
                version=torch.__version__.split("+")[0])
    if threads:
      torch.set_num_threads(threads)
    info["threads"] = torch.get_num_threads()
    self.torch, self.tm = torch, tm
    config, t_cfg, s_cfg = pair_config(args.pair, args.size, smoke=args.smoke)
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = self.device == "cuda"
    if cuda:
      torch.backends.cudnn.benchmark = True
      torch.backends.cuda.matmul.allow_tf32 = True
      torch.backends.cudnn.allow_tf32 = True
    fmt = (torch.channels_last if args.channels_last == "on" or (
        args.channels_last == "auto" and cuda) else torch.contiguous_format)
    info.update(device=self.device, platform="gpu" if cuda else "cpu",
                device_kind=(torch.cuda.get_device_name(0) if cuda
                             else "cpu"),
                channels_last=fmt == torch.channels_last, fused_adamw=cuda,
                tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                tf32_cudnn=torch.backends.cudnn.allow_tf32)

    def build(cfg):
      cfg = dict(cfg)
      return tm.build(cfg.pop("name"), NUM_CLASSES, **cfg)

    self.teacher = build(t_cfg).eval()
    for p in self.teacher.parameters():
      p.requires_grad_(False)
    self.student = build(s_cfg).train()
    init = _unflatten(dict(np.load(os.path.join(args.tmp, "init.npz"))))
    tm.load_flax_variables(self.teacher, init["teacher"])
    tm.load_flax_variables(self.student, init["student"])
    self.teacher.to(self.device, memory_format=fmt)
    self.student.to(self.device, memory_format=fmt)
    self.autocast = args.compute_dtype == "bfloat16"
    batch = _load_batch(args)
    self.images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)
    self.images = self.images.to(self.device).contiguous(memory_format=fmt)
    self.labels = torch.from_numpy(batch["label"]).long().to(self.device)

    self.loss, connector = self._loss_fn(config.stages.distilled.losses,
                                         init.get("connectors", {}))
    # As kd_jax's optimizer over state.params: the student and the
    # connectors, clipped by one global norm.
    self.trained = list(self.student.parameters())
    if connector is not None:
      self.trained += list(connector.parameters())
    opt = config.optimizer
    self.opt = torch.optim.AdamW(self.trained, lr=opt.lr,
                                 weight_decay=opt.weight_decay,
                                 fused=True if cuda else None)
    self.sched = torch.optim.lr_scheduler.LambdaLR(
        self.opt, _warmup_cosine(opt.warmup_steps, config.steps))
    self.grad_clip = opt.grad_clip
    info.update(params_teacher=tm.count_params(self.teacher),
                params_student=tm.count_params(self.student),
                params_connectors=(tm.count_params(connector)
                                   if connector is not None else 0))
    self.forward_loss = (self._forward_loss if mode == "eager" else
                         torch.compile(self._forward_loss,
                                       backend=args.torch_compile_backend))
    # The first step (torch.compile's compiles, cuDNN's autotuning) apart.
    t = time.perf_counter()
    losses = [float(self._step())]
    info["first_step_s"] = time.perf_counter() - t
    if mode == "eager":
      # The FLOPs PyTorch's counter sees in a step (matmuls, convolutions,
      # attention; forwards and backwards): a check on the model FLOPs.
      from torch.utils import flop_counter  # pylint: disable=import-outside-toplevel
      with flop_counter.FlopCounterMode(display=False) as counter:
        losses.append(self._step())
      info["counted_gflop_per_step"] = counter.get_total_flops() / 1e9
    losses += [self._step() for _ in range(max(args.warmup - 1, 0))]
    info.update(first_loss=float(losses[0]))
    self.info = info

  def peak_device_bytes(self):
    """Peak bytes PyTorch's allocator held on the GPU since the start (None
    on the CPU)."""
    if self.device != "cuda":
      return None
    return self.torch.cuda.max_memory_allocated()

  def _loss_fn(self, losses, connectors):
    """(loss of the student's and the teacher's (logits, features), the
    connector module or None) for the stage's terms: global embedding
    matching when that is the only term, else CE + Dice + a logit term.

    Both models run their whole forward, heads included, as a user's
    PyTorch loop would; kd_jax's jitted step drops what the loss does not
    read (XLA dead-code elimination), a few small matmuls here. The loss
    (connector included: kd_jax builds connectors in float32) runs outside
    autocast.
    """
    tm = self.tm
    emb = _embedding_term(losses)
    if emb is None:
      kd = _kd_term(losses)
      return (lambda s, t: tm.distill_loss(
          s[0].float(), t[0].float(), self.labels, **kd)[0]), None
    # The connector's variables from kd_jax's init, under the term's name.
    variables = {"params": connectors["params"][emb["name"]]}
    connector = tm.LinearConnector(
        *variables["params"]["dense"]["kernel"].shape)
    tm.load_flax_variables(connector, variables)
    connector.to(self.device)

    def loss(s, t):
      s_emb = connector(s[1][emb["student"]].float())
      return emb["weight"] * tm.embedding_cosine(s_emb,
                                                 t[1][emb["teacher"]])

    return loss, connector

  def _forward_loss(self):
    torch = self.torch
    with torch.autocast(self.device, torch.bfloat16, enabled=self.autocast):
      with torch.no_grad():
        teacher = self.teacher(self.images)
      student = self.student(self.images)
    return self.loss(student, teacher)

  def _step(self):
    torch = self.torch
    loss = self.forward_loss()
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.trained, self.grad_clip)
    self.opt.step()
    self.sched.step()
    return loss.detach()

  def round(self, steps):
    t = time.perf_counter()
    for _ in range(steps):
      loss = self._step()
    float(loss)  # Waits for the device, like a loop that logs.
    return (time.perf_counter() - t) / steps

  def profile(self, steps):
    """Self CPU time by op, ms per step (PyTorch's profiler)."""
    prof = self.torch.profiler
    with prof.profile(activities=[prof.ProfilerActivity.CPU]) as p:
      wall = self.round(steps)
    rows = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"wall_ms": wall * 1e3,
            "rows": [(e.key, e.self_cpu_time_total / 1e3 / steps,
                      e.count // steps) for e in rows[:8]]}


def _kd_term(losses):
  """The logit term of a stage's losses (a list of term dicts, or a dict of
  named terms) as `torch_models.distill_loss` keywords, checking the terms
  are the ones the twin computes: CE + Dice (weights 1) + kd_kl or cwd."""
  terms = list(losses.values()) if hasattr(losses, "items") else list(losses)
  task = [t for t in terms if t["fn"] in ("cross_entropy", "dice")]
  logit = [t for t in terms if t["fn"] in ("kd_kl", "cwd")]
  if (sorted(t["fn"] for t in task) != ["cross_entropy", "dice"]
      or len(logit) != 1 or len(terms) != 3
      or any(t.get("weight", 1.0) != 1.0 for t in task)):
    raise ValueError(f"the PyTorch twin computes CE + Dice (weights 1) + "
                     f"kd_kl or cwd; the config's distilled stage has {terms}")
  return dict(kd=logit[0]["fn"], kd_weight=float(logit[0].get("weight", 1.0)),
              temperature=float(logit[0].get("temperature", 1.0)))


def _embedding_term(losses):
  """The stage's global embedding term as {name, weight, student, teacher}
  when it is the stage's only term and an `embedding_cosine` through a
  "linear" connector (what the PyTorch twins compute for it); None when no
  term is `embedding_cosine`, ValueError for any other mix."""
  items = (list(losses.items()) if hasattr(losses, "items")
           else [(t.get("name", t["fn"]), t) for t in losses])
  if all(t["fn"] != "embedding_cosine" for _, t in items):
    return None
  if (len(items) != 1 or items[0][1]["fn"] != "embedding_cosine"
      or items[0][1].get("connector", "conv1x1") != "linear"):
    raise ValueError(f"the PyTorch twin computes embedding_cosine through a "
                     f"linear connector as the stage's only term; the "
                     f"config's distilled stage has {losses}")
  name, term = items[0]
  return dict(name=term.get("name", name),
              weight=float(term.get("weight", 1.0)),
              student=term["student"], teacher=term["teacher"])


def _warmup_cosine(warmup, total):
  """kd_jax.train.make_optimizer's schedule, as a LambdaLR factor."""
  import math  # pylint: disable=import-outside-toplevel

  warmup = max(min(int(warmup), max(total - 1, 0)), 1)
  decay = max(total, warmup + 1)

  def factor(step):
    if step < warmup:
      return step / warmup
    frac = min((step - warmup) / (decay - warmup), 1.0)
    return 0.5 * (1 + math.cos(math.pi * frac))

  return factor


def serve(args):
  """A worker's loop; replies go to the real stdout, all else to stderr."""
  reply_fd = os.dup(1)
  os.dup2(2, 1)
  out = os.fdopen(reply_fd, "w")

  def send(obj):
    out.write(REPLY + json.dumps(obj) + "\n")
    out.flush()

  kind, n, *mode = args.worker.split(":")
  if kind == "jax":
    worker = JaxWorker(args, int(n), args.worker_flags)
  else:
    worker = TorchWorker(args, int(n), *mode)
  send(worker.info)
  for line in sys.stdin:
    cmd = line.strip()
    if cmd == "round":
      send({"step_s": worker.round(args.steps)})
    elif cmd == "profile":
      send(worker.profile(args.steps))
    elif cmd == "rss":
      send({"peak_rss_mb": _peak_rss_mb(),
            "peak_device_bytes": worker.peak_device_bytes()})
    elif cmd == "loader":
      send(worker.loader_rate(args.loader_seconds) if args.loader_seconds
           else worker.loader(args.loader_batches))
    elif cmd == "quit":
      send({})
      return


# ----------------------------------------------------------------------------
# Parent: starts the workers, interleaves their rounds, prints the table.


class WorkerError(RuntimeError):
  """A worker died or ran past its time limit."""


class Proc:
  """A worker process and its pipe; `deadline` (a time.monotonic() value)
  bounds every wait for a reply: past it the worker is killed."""

  def __init__(self, name, argv, env, cwd=None, deadline=None):
    self.name = name
    self.is_torch = any(a.startswith("--worker=torch") for a in argv)
    self.deadline = deadline
    self.p = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)] + argv, env=env, cwd=cwd,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.replies = queue.Queue()
    threading.Thread(target=self._pump, daemon=True).start()

  def _pump(self):
    """Reply lines into the queue, then None when the worker's pipe ends."""
    for line in self.p.stdout:
      if line.startswith(REPLY):
        self.replies.put(json.loads(line[len(REPLY):]))
    self.replies.put(None)

  def read(self):
    wait = (None if self.deadline is None
            else max(self.deadline - time.monotonic(), 0.0))
    try:
      reply = self.replies.get(timeout=wait)
    except queue.Empty:
      self.p.kill()
      self.p.wait()
      raise WorkerError(f"worker {self.name!r} killed at its time limit") \
          from None
    if reply is None:
      raise WorkerError(f"worker {self.name!r} died (exit {self.p.wait()}); "
                        "its traceback is above")
    return reply

  def ask(self, cmd):
    try:
      self.p.stdin.write(cmd + "\n")
      self.p.stdin.flush()
    except BrokenPipeError:
      pass  # It died: read() says so.
    return self.read()


def _jax_configs(args):
  """(label, devices, options) of each kd_jax worker."""
  out = [(n, f"layers={layers}" if layers else "")
         for n in (int(x) for x in args.devices.split(",") if x)
         for layers in args.layers.split(",")]
  if args.teacher_cache and out:
    out.append((out[0][0], f"{out[0][1]} mode=cached".strip()))
    if PAIRS[args.pair].get("student_only", True):
      out.append((out[0][0], f"{out[0][1]} mode=student".strip()))
  for v in args.variant:
    n, _, flags = v.partition(":")
    out.append((int(n), flags.strip()))

  def label(n, flags):
    words = [MODES.get(o[len("mode="):], o) if o.startswith("mode=") else o
             for o in flags.split()]
    return ", ".join([f"kd_jax jit, {n} device{'s' if n > 1 else ''}"]
                     + [w for w in words if w])

  return [(label(n, flags), n, flags) for n, flags in out]


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    serve(args)
    return
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  jax_configs = _jax_configs(args)
  for label, n, flags in jax_configs:
    if args.batch % n:
      sys.exit(f"--batch={args.batch} is not divisible by {n} devices")
    try:
      worker_options(flags)
    except ValueError as e:
      sys.exit(f"{label}: {e}")
  if not jax_configs:
    sys.exit("--devices names no kd_jax worker")
  if not PAIRS[args.pair].get("student_only", True):
    if any("mode=student" in f.split() for _, _, f in jax_configs):
      sys.exit(f"--pair={args.pair} has no student-only step (mode=student "
               "trains the baseline stage's CE + Dice on per-pixel logits; "
               "this pair's student gives image-level ones)")
    if args.teacher_cache:
      print(f"--teacher_cache: no student-only worker for --pair="
            f"{args.pair}; the cached step is compared with the full "
            "distill step", file=sys.stderr)
  args.tmp = tempfile.mkdtemp(prefix="kd_bench_")
  try:
    _compare(args, jax_configs)
  finally:
    shutil.rmtree(args.tmp, ignore_errors=True)


def _compare(args, jax_configs):
  """Starts the workers, runs their rounds (interleaved, or each worker's
  all at once with --sequential), prints the results."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep +
             os.environ.get("PYTHONPATH", ""))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # Cold compiles unless asked.
  common = [f"--pair={args.pair}", f"--batch={args.batch}",
            f"--size={args.size}", f"--steps={args.steps}",
            f"--warmup={args.warmup}", f"--xla_flags={args.xla_flags}",
            f"--compute_dtype={args.compute_dtype}",
            f"--compile_cache={args.compile_cache}",
            f"--init_opt_level={args.init_opt_level}",
            f"--loader_batches={args.loader_batches}",
            f"--loader_seconds={args.loader_seconds}",
            f"--torch_compile_backend={args.torch_compile_backend}",
            f"--channels_last={args.channels_last}",
            f"--tmp={args.tmp}"] + ["--smoke"] * args.smoke
  # (label, worker arguments, kd_jax options) of each worker, in start
  # order: the first kd_jax worker writes the batch and the initial weights
  # every worker uses.
  specs = [(label, [f"--worker=jax:{n}", f"--worker_flags={flags}"], flags)
           for label, n, flags in jax_configs]
  if not args.no_torch:
    specs += [(f"PyTorch {TORCH_MODES[m]}, {n or 'default'} threads",
               [f"--worker=torch:{n}:{m}"], "")
              for n in (int(x) for x in args.torch_threads.split(",") if x)
              for m in args.torch_modes.split(",") if m]
  run = _Run(args)
  budget_end = (time.monotonic() + args.time_budget if args.time_budget
                else None)

  def start(label, extra, flags, deadline=None):
    t = time.perf_counter()
    opts = worker_options(flags)
    # A worker from another checkout imports its kd_jax and configs.
    tree_env = dict(env, **opts["env"])
    if opts["tree"]:
      tree_env["PYTHONPATH"] = opts["tree"] + os.pathsep + os.environ.get(
          "PYTHONPATH", "")
    w = Proc(label, common + extra, tree_env, cwd=opts["tree"] or None,
             deadline=deadline)
    info = w.read()
    if "threads" in info:
      w.name = _torch_label(info)
    print(f"  started {w.name} in {time.perf_counter() - t:.0f} s",
          file=sys.stderr, flush=True)
    run.add(w, info)
    return w

  if args.sequential:
    # Each worker alone, start to exit: no two hold an accelerator's memory.
    for label, extra, flags in specs:
      now = time.monotonic()
      ends = [e for e in (budget_end, args.worker_timeout and
                          now + args.worker_timeout) if e]
      deadline = min(ends) if ends else None
      if deadline is not None and deadline - now < 1:
        run.fail(label, extra, "not run: the time budget was spent")
        continue
      w = None
      try:
        w = start(label, extra, flags, deadline)
        for r in range(args.rounds):
          run.times[w.name].append(w.ask("round")["step_s"])
        _finish(args, run, w)
      except WorkerError as e:
        print(f"  {e}", file=sys.stderr, flush=True)
        run.fail(w.name if w else label, extra, str(e))
      if args.json:
        run.write_json(args.json)
  else:
    workers = [start(*spec) for spec in specs]
    for r in range(args.rounds):
      k = r % len(workers)
      for w in workers[k:] + workers[:k]:
        run.times[w.name].append(w.ask("round")["step_s"])
      print(f"  round {r + 1}: " + ", ".join(
          f"{w.name} {run.times[w.name][-1] * 1e3:.0f} ms" for w in workers),
            file=sys.stderr, flush=True)
    for w in workers:
      _finish(args, run, w)
  if args.json:
    run.write_json(args.json)
  _report(args, run)


def _torch_label(info):
  where = (f"{info['threads']} thread" + "s" * (info["threads"] > 1)
           if info["device"] == "cpu" else info["device"])
  return (f"PyTorch {info['version']} {TORCH_MODES[info['mode']]}, "
          f"{where}")


def _finish(args, run, w):
  """A worker's profile, peak memory and loader measures; then it exits."""
  if args.profile:
    run.profiles[w.name] = w.ask("profile")
  run.memory[w.name] = w.ask("rss")
  info = run.infos[w.name]
  if not w.is_torch and (args.loader_batches or args.loader_seconds):
    if run.loader is None and info["mode"] == "distill":
      run.loader = w.ask("loader")
    elif info["mode"] != "distill" and not args.loader_seconds:
      # The cache and student-only modes time their own (unaugmented)
      # loops.
      run.loops[w.name] = w.ask("loader")
  w.ask("quit")
  w.p.wait()


class _Run:
  """What the workers reported, by worker name, in start order."""

  def __init__(self, args):
    self.args = args
    self.names, self.infos, self.errors = [], {}, {}
    self.torch = set()
    self.times = collections.defaultdict(list)
    self.memory, self.profiles, self.loops = {}, {}, {}
    self.loader = None
    self.start_load = os.getloadavg()[0]

  def add(self, w, info):
    self.names.append(w.name)
    self.infos[w.name] = info
    if w.is_torch:
      self.torch.add(w.name)

  def fail(self, name, extra, error):
    if name not in self.infos:
      self.names.append(name)
      self.infos[name] = {}
      if any(a.startswith("--worker=torch") for a in extra):
        self.torch.add(name)
    self.errors[name] = error
    self.times.pop(name, None)

  def timed(self):
    """Workers that finished their rounds."""
    return [n for n in self.names if self.times.get(n)
            and n not in self.errors]

  def median(self, name):
    return statistics.median(self.times[name])

  def model_gflop(self, name):
    """Model GFLOP per step of a worker's step: a kd_jax worker's own
    count; PyTorch's the first full distill step's (the same models)."""
    info = self.infos[name]
    if "model_gflop_per_step" in info:
      return info["model_gflop_per_step"]
    for n in self.names:
      i = self.infos[n]
      if i.get("mode") == "distill" and "model_gflop_per_step" in i:
        return i["model_gflop_per_step"]
    return None

  def mfu(self, name):
    """Model FLOPs utilisation against the device's dense peak for the
    compute dtype; None on the CPU, an unknown device or a failed worker."""
    info = self.infos[name]
    gflop = self.model_gflop(name)
    if (name not in self.timed() or gflop is None
        or info.get("platform", "cpu") == "cpu"):
      return None
    peak = (self.args.peak_tflops * 1e12 or
            peak_flops(info["device_kind"], self.args.compute_dtype))
    if not peak:
      return None
    return mfu(gflop * 1e9, self.median(name), peak, info.get("devices", 1))

  def row(self, name):
    """One worker's results as plain JSON values."""
    info, timed = self.infos[name], name in self.timed()
    mem = self.memory.get(name, {})
    peak = mem.get("peak_device_bytes")
    compile_s = (info["trace_s"] + info["compile_s"] if "compile_s" in info
                 else info.get("first_step_s"))
    keep = ("platform", "device_kind", "devices", "params_teacher",
            "params_student", "params_connectors", "first_loss", "version",
            "threads", "layers", "matmul_precision", "channels_last",
            "fused_adamw", "tf32_matmul", "tf32_cudnn",
            "counted_gflop_per_step", "gflop_per_step", "init_s")
    out = dict(name=name,
               framework="pytorch" if name in self.torch else "kd_jax",
               mode=info.get("mode"), error=self.errors.get(name),
               step_ms=self.median(name) * 1e3 if timed else None,
               step_ms_min=min(self.times[name]) * 1e3 if timed else None,
               step_ms_max=max(self.times[name]) * 1e3 if timed else None,
               images_per_s=(self.args.batch / self.median(name) if timed
                             else None),
               model_gflop_per_step=self.model_gflop(name) if info else None,
               mfu=self.mfu(name) if info else None,
               peak_device_mb=peak / 2**20 if peak is not None else None,
               peak_rss_mb=mem.get("peak_rss_mb"), compile_s=compile_s)
    out.update({k: info[k] for k in keep if k in info})
    return out

  def summary(self):
    """The run as one JSON-able dict: settings, model FLOPs, every
    worker's row, the loader and its images/s over the fastest kd_jax
    step's."""
    args = self.args
    _, t_cfg, s_cfg = pair_config(args.pair, args.size, smoke=args.smoke)
    rows = [self.row(n) for n in self.names]
    first = next((self.infos[n] for n in self.names
                  if "model_gflop_per_step" in self.infos[n]), {})
    steps = [r["images_per_s"] for r in rows
             if r["framework"] == "kd_jax" and r["images_per_s"]]
    loader = dict(self.loader) if self.loader else None
    if loader and "images_per_s" in loader and steps:
      loader["over_step"] = loader["images_per_s"] / max(steps)
    return dict(
        pair=args.pair, smoke=args.smoke, size=args.size, batch=args.batch,
        compute_dtype=args.compute_dtype, rounds=args.rounds,
        steps=args.steps, sequential=args.sequential, teacher=t_cfg,
        student=s_cfg,
        flops_source=("XLA cost analysis of kd_jax's lowered forwards: "
                      "teacher eval forward + 3 x student train forward"),
        teacher_forward_gflop=first.get("teacher_forward_gflop"),
        student_forward_gflop=first.get("student_forward_gflop"),
        model_gflop_per_step=first.get("model_gflop_per_step"),
        rows=rows, loader=loader)

  def write_json(self, path):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(self.summary(), f, indent=1)
    os.replace(path + ".tmp", path)


def _report(args, run):
  """The markdown table and the lines after it."""
  load, end_load = run.start_load, os.getloadavg()[0]
  print(f"pair {args.pair}{' (smoke stand-ins)' * args.smoke}: batch "
        f"{args.batch}, {args.size}x{args.size}, {args.compute_dtype}, "
        f"{args.rounds} rounds x {args.steps} steps, "
        f"{'sequential' if args.sequential else 'interleaved'}; "
        f"{os.cpu_count()} CPUs, load average {load:.1f} at the start, "
        f"{end_load:.1f} at the end" + (
            " (above the CPU count: other processes share the cores, expect "
            "noise)" if max(load, end_load) > (os.cpu_count() or 1) else ""))
  names = [n for n in run.names if run.infos[n]]
  ref = names[0] if names else None
  for name in names:
    i = run.infos[name]
    conn = i.get("params_connectors", 0)
    print(f"  {name}: params teacher {i['params_teacher']:,}, student "
          f"{i['params_student']:,}" + (f", connectors {conn:,}" if conn
                                        else "") +
          f"; first-step loss {i['first_loss']:.5f}" + (
              f"; kd_jax from {i['kd_jax']}, layers {i['layers']}"
              if "kd_jax" in i else ""))
    # Same architectures: the parameter counts must be equal (the
    # student-only step has no teacher and no connectors).
    r = run.infos[ref]
    assert i["params_student"] == r["params_student"] and (
        i.get("mode") == "student" or
        (i["params_teacher"], conn) == (r["params_teacher"],
                                        r.get("params_connectors", 0))), (
            f"parameter counts differ: {name} {i} vs {ref} {r}")
  timed = run.timed()
  med = {n: run.median(n) for n in timed}
  # The same ratio round by round (the workers of a round ran within a
  # second of each other), its median: steadier than the ratio of medians
  # when the machine's speed drifts during the run. With --sequential the
  # rounds of two workers are minutes apart: the ratio of medians only.
  torch_rows = [n for n in timed if n in run.torch]
  best = min(torch_rows, key=med.get, default=None)

  def per_round(base, name):  # Median of base's time / name's, by round.
    return statistics.median(a / b for a, b in zip(run.times[base],
                                                   run.times[name]))

  print()
  columns = ["configuration", "step (ms, median)", "min–max (ms)",
             "images/s", "speed vs PyTorch", "per round", "MFU",
             "peak device memory (MB)", "compile / first step (s)",
             "peak RSS (MB)", "imports' RSS (MB)"]
  print("| " + " | ".join(columns) + " |")
  print("|---|" + "---:|" * (len(columns) - 1))
  for name in run.names:
    if name in run.errors:
      print(f"| {name} | {run.errors[name]} |" + " – |" * (len(columns) - 2))
      continue
    r, i, t = run.row(name), run.infos[name], med[name]
    speed = f"{med[best] / t:.2f}×" if best else "–"
    by_round = ("–" if best is None or args.sequential
                else f"{per_round(best, name):.2f}×")
    print(f"| {name} | {t * 1e3:.0f} | {r['step_ms_min']:.0f}–"
          f"{r['step_ms_max']:.0f} | {args.batch / t:.0f} | {speed} "
          f"| {by_round} | {_fmt(r['mfu'], '.1%')} | "
          f"{_fmt(r['peak_device_mb'], '.0f')} | "
          f"{_fmt(r['compile_s'], '.1f')} | "
          f"{_fmt(r['peak_rss_mb'], '.0f')} | {i['import_rss_mb']:.0f} |")

  def extra_row(name, step_s=None, images_per_s=None):
    """A loader or train-loop row: step time, images/s and speed vs
    PyTorch where they apply, '–' in every other column."""
    cells = ["–"] * (len(columns) - 1)
    if step_s is not None:
      images_per_s = args.batch / step_s
      cells[0] = f"{step_s * 1e3:.0f}"
      cells[3] = f"{med[best] / step_s:.2f}×" if best else "–"
    cells[2] = f"{images_per_s:.0f}"
    print(f"| {name} | " + " | ".join(cells) + " |")

  loader = run.loader
  if loader is not None and "batches" in loader:
    extra_row(f"grain loader (train_batches + iterate): the step's "
              f"{loader['examples']} examples from memory, augmented, "
              f"{loader['batches']} batches in {loader['seconds']:.1f} s",
              images_per_s=loader["images_per_s"])
  elif loader is not None:
    extra_row("grain loader, 4 threads: synthetic CT + augment, first epoch "
              "(each example rendered)", images_per_s=loader["images_per_s"])
    extra_row("grain loader, 4 threads: synthetic CT + augment, later epochs "
              f"(the {loader['num_train']} examples from memory; rendering "
              f"them took {loader['render_all_s']:.0f} s)",
              images_per_s=loader["cached_images_per_s"])
    for key, what in (("loop_rendered_s", "first epoch"),
                      ("loop_cached_s", "later epochs")):
      extra_row(f"{names[0]}, train loop: step + loader ({what})",
                loader[key])
  for name, loop in run.loops.items():
    built = (f"; cache of {loop['num_train']} examples built in "
             f"{loop['cache_build_s']:.1f} s" if "cache_build_s" in loop
             else "")
    extra_row(f"{name}, train loop: step + loader (later epochs, no "
              f"augmentation{built})", loop["loop_unaugmented_s"])
  print()
  # An A/B of kd_jax workers (variants, device counts, modes) cancels the
  # drift the same way: each against the first, round by round.
  jax_rows = [n for n in timed if n not in run.torch]
  for name in jax_rows[1:] if not args.sequential else []:
    faster = sum(a > b for a, b in zip(run.times[jax_rows[0]],
                                       run.times[name]))
    print(f"{name} against {jax_rows[0]}, per round: "
          f"{per_round(jax_rows[0], name):.3f}× (faster in {faster} of "
          f"{args.rounds} rounds)")
  by_mode = {run.infos[n].get("mode"): n for n in reversed(jax_rows)}
  if "cached" in by_mode and "student" in by_mode:
    cached, student = med[by_mode["cached"]], med[by_mode["student"]]
    line = (f"teacher cache: cached step / student-only step = "
            f"{cached / student:.2f}× (target ≤ 1.1×)")
    if "distill" in by_mode:
      line += (f"; full distill step / student-only = "
               f"{med[by_mode['distill']] / student:.2f}×")
    pair = (by_mode["cached"], by_mode["student"])
    if all(n in run.loops for n in pair):
      ratio = (run.loops[pair[0]]["loop_unaugmented_s"] /
               run.loops[pair[1]]["loop_unaugmented_s"])
      line += f"; in the train loop (an epoch from the cache) {ratio:.2f}×"
    print(line)
  elif "cached" in by_mode and "distill" in by_mode:  # No student-only step.
    print(f"teacher cache: cached step / full distill step = "
          f"{med[by_mode['cached']] / med[by_mode['distill']]:.2f}× (this "
          "pair has no student-only step)")
  for name in timed:
    i = run.infos[name]
    gflop = run.model_gflop(name)
    peak = (args.peak_tflops * 1e12 or
            peak_flops(i["device_kind"], args.compute_dtype))
    util = (f"MFU {run.mfu(name):.1%} of {peak / 1e12:.0f} TFLOP/s × "
            f"{i.get('devices', 1)} ({i['device_kind']}, "
            f"{args.compute_dtype})" if run.mfu(name) is not None else
            "MFU n/a (CPU: no peak figure)" if i["platform"] == "cpu" else
            f"MFU n/a (no peak figure for {i['device_kind']!r}: give "
            "--peak_tflops)")
    line = (f"{name}: model {_fmt(gflop, '.2f')} GFLOP/step "
            f"({_fmt(gflop and gflop / med[name], '.1f')} GFLOP/s, {util})")
    if "compile_s" in i:
      # cost_analysis counts one device's share of an SPMD program.
      line += (f"; XLA cost analysis of the compiled step "
               f"{i['gflop_per_step'] * i['devices']:.2f} GFLOP; step trace "
               f"{i['trace_s']:.1f} s + compile {i['compile_s']:.1f} s; init "
               f"(compile + run, XLA backend level {i['init_opt_level']}) "
               f"{i['init_s']:.1f} s")
    if "counted_gflop_per_step" in i:
      line += (f"; PyTorch's FlopCounterMode counts "
               f"{i['counted_gflop_per_step']:.2f} GFLOP in a step")
    print(line)
  for name, prof in run.profiles.items():
    print(f"\n{name}: profiled round {prof['wall_ms']:.0f} ms/step "
          "(wall); top entries, ms/step summed over threads:")
    for kind, ms, count in prof["rows"]:
      print(f"  {ms:8.1f}  {count:5d}×  {kind}")


def _fmt(value, spec):
  return "n/a" if value is None else format(value, spec)


if __name__ == "__main__":
  main()
