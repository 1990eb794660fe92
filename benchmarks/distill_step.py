"""kd_jax's jitted distillation step against the same step in PyTorch eager.

    python benchmarks/distill_step.py --pair=default
    python benchmarks/distill_step.py --pair=default --devices=1,8
    python benchmarks/distill_step.py --pair=default --teacher_cache
    python benchmarks/distill_step.py --pair=transunet_squeeze --rounds=3
    python benchmarks/distill_step.py --pair=vit_efficientvit
    python benchmarks/distill_step.py --pair=default --layers=cpu,flax \
        --torch_threads=0,1 --profile
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
  parameters and loss). On an accelerator the summary gives MFU: XLA's
  cost-analysis FLOPs per step / step time / the devices' dense peak
  (PEAK_FLOPS, or `--peak_tflops`).
* PyTorch side: the twins in `benchmarks/torch_models.py` (NCHW), loaded
  with the kd_jax initial weights; `torch.optim.AdamW` + `clip_grad_norm_`
  + the same schedule. `--torch_threads=0,1` runs one worker per count
  (0 = PyTorch's default, one per core); on the GPU when there is one,
  with bf16 autocast for `--compute_dtype=bfloat16`. Parameter counts must equal
  kd_jax's (asserted), and the first-step losses are printed side by side:
  both sides compute the same thing.

Each configuration runs in its own worker process (its own threads, XLA
flags and peak RSS from `resource.getrusage`); the parent imports neither
framework. The workers start one after another; after the warm-up (compile
+ `--warmup` steps, excluded) they take turns, one round each (`--steps`
steps and one sync at the end, like a training loop that syncs only to
log), for `--rounds` rounds in rotating order, so the noise of a shared
machine hits all of them alike. Printed as a markdown table per
configuration: median time per step over the rounds, the range, images/s,
speed relative to PyTorch (the fastest PyTorch row's time / this row's: >1
means faster than PyTorch), the same ratio round by round (its median over
the rounds: steadier when the machine's speed drifts), compile time, peak
RSS and the part imports alone take. Then the images/s of kd_jax's grain training pipeline (synthetic
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
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
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
}
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
# Dense peak FLOP/s of one device, (bfloat16, float32), for MFU; float32 as
# XLA runs it by default (TF32 tensor cores on NVIDIA, bf16 passes on TPU).
# Matched by substring of `device_kind`, first match wins.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 495e12),
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
    if key in device_kind:
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
  p.add_argument("--no_torch", action="store_true", help="kd_jax only")
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
  if args.size is None:
    args.size = PAIRS[args.pair]["size"]
  return args


def pair_config(pair, size, root=REPO):
  """(config, teacher model cfg, student model cfg) of `pair`, from the
  configs/default.py of the checkout at `root`. Needs only ml_collections,
  so every process (and the parent) can call it."""
  if root not in sys.path:
    sys.path.insert(0, root)
  from configs import default  # pylint: disable=import-outside-toplevel

  def sized(model):  # A model learned for one input side gets this one.
    return dict(model, image_size=size) if "image_size" in model else model

  config = default.get_config()
  config.data.image_size = size
  stage = config.stages.distilled
  spec = PAIRS[pair]
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
    # Before any jax import: the device count is fixed when jax starts.
    os.environ["XLA_FLAGS"] = " ".join(
        f for f in (os.environ.get("XLA_FLAGS", ""),
                    f"--xla_force_host_platform_device_count={devices}",
                    args.xla_flags, " ".join(opts["xla"])) if f)
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    import kd_jax  # pylint: disable=import-outside-toplevel
    from kd_jax import data, train  # pylint: disable=import-outside-toplevel

    try:  # A tree with kd_jax.runtime (kd_jax.main called it there) ...
      from kd_jax import runtime  # pylint: disable=import-outside-toplevel
      runtime.configure()
    except ImportError:
      pass
    # ... but no persistent cache unless asked: the compile is measured cold.
    jax.config.update("jax_compilation_cache_dir", args.compile_cache or None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    mode = opts["mode"]
    # Imported libraries alone hold hundreds of MB: reported apart.
    info = dict(devices=devices, import_rss_mb=_rss_mb(), mode=mode,
                platform=jax.devices()[0].platform,
                device_kind=jax.devices()[0].device_kind)
    if info["platform"] == "cpu":
      assert jax.device_count() == devices, jax.devices()
    else:  # An accelerator: its own devices, not virtual host ones.
      devices = info["devices"] = jax.device_count()
    self.jax, self.data, self.train, self.args = jax, data, train, args
    self.mode = mode
    config, _, _ = pair_config(args.pair, args.size, root)
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
    mesh = self.mesh = train.make_mesh()
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
                gflop_per_step=cost_analysis_flops(self.step) / 1e9)
    losses = []
    for _ in range(max(args.warmup, 1)):
      self.state, metrics = self.step(self.state, self.batch, self.frozen)
      losses.append(float(metrics["loss"]))
    info.update(first_loss=losses[0])
    self.info = info

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
  """The PyTorch twins, eager, `threads` intra-op threads (0: default), on
  the GPU when there is one; bf16 autocast with --compute_dtype=bfloat16."""

  def __init__(self, args, threads):
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel

    if HERE not in sys.path:
      sys.path.insert(0, HERE)
    import torch_models as tm  # pylint: disable=import-outside-toplevel

    info = dict(import_rss_mb=_rss_mb(),
                version=torch.__version__.split("+")[0])
    if threads:
      torch.set_num_threads(threads)
    info["threads"] = torch.get_num_threads()
    self.torch, self.tm = torch, tm
    config, t_cfg, s_cfg = pair_config(args.pair, args.size)

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
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    info["device"] = self.device
    self.teacher.to(self.device)
    self.student.to(self.device)
    self.autocast = args.compute_dtype == "bfloat16"
    batch = _load_batch(args)
    self.images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)
    self.images = self.images.contiguous().to(self.device)
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
                                 weight_decay=opt.weight_decay)
    self.sched = torch.optim.lr_scheduler.LambdaLR(
        self.opt, _warmup_cosine(opt.warmup_steps, config.steps))
    self.grad_clip = opt.grad_clip
    info.update(params_teacher=tm.count_params(self.teacher),
                params_student=tm.count_params(self.student),
                params_connectors=(tm.count_params(connector)
                                   if connector is not None else 0))
    losses = [self._step() for _ in range(max(args.warmup, 1))]
    info.update(first_loss=float(losses[0]))
    self.info = info

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

  def _step(self):
    torch = self.torch
    with torch.autocast(self.device, torch.bfloat16, enabled=self.autocast):
      with torch.no_grad():
        teacher = self.teacher(self.images)
      student = self.student(self.images)
    loss = self.loss(student, teacher)
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

  kind, n = args.worker.split(":")
  if kind == "jax":
    worker = JaxWorker(args, int(n), args.worker_flags)
  else:
    worker = TorchWorker(args, int(n))
  send(worker.info)
  for line in sys.stdin:
    cmd = line.strip()
    if cmd == "round":
      send({"step_s": worker.round(args.steps)})
    elif cmd == "profile":
      send(worker.profile(args.steps))
    elif cmd == "rss":
      send({"peak_rss_mb": _peak_rss_mb()})
    elif cmd == "loader":
      send(worker.loader(args.loader_batches))
    elif cmd == "quit":
      send({})
      return


# ----------------------------------------------------------------------------
# Parent: starts the workers, interleaves their rounds, prints the table.


class Proc:
  """A worker process and its pipe."""

  def __init__(self, name, argv, env, cwd=None):
    self.name = name
    self.is_torch = any(a.startswith("--worker=torch") for a in argv)
    self.p = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)] + argv, env=env, cwd=cwd,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def read(self):
    for line in self.p.stdout:
      if line.startswith(REPLY):
        return json.loads(line[len(REPLY):])
    raise RuntimeError(f"worker {self.name!r} died (exit {self.p.wait()}); "
                       "its traceback is above")

  def ask(self, cmd):
    self.p.stdin.write(cmd + "\n")
    self.p.stdin.flush()
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
  """Starts the workers, runs the interleaved rounds, prints the results."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep +
             os.environ.get("PYTHONPATH", ""))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # Cold compiles unless asked.
  common = [f"--pair={args.pair}", f"--batch={args.batch}",
            f"--size={args.size}", f"--steps={args.steps}",
            f"--warmup={args.warmup}", f"--xla_flags={args.xla_flags}",
            f"--compute_dtype={args.compute_dtype}",
            f"--compile_cache={args.compile_cache}",
            f"--init_opt_level={args.init_opt_level}",
            f"--loader_batches={args.loader_batches}", f"--tmp={args.tmp}"]
  workers, infos = [], {}

  def start(name, extra, flags=""):
    t = time.perf_counter()
    opts = worker_options(flags)
    # A worker from another checkout imports its kd_jax and configs.
    tree_env = dict(env, **opts["env"])
    if opts["tree"]:
      tree_env["PYTHONPATH"] = opts["tree"] + os.pathsep + os.environ.get(
          "PYTHONPATH", "")
    w = Proc(name, common + extra, tree_env, cwd=opts["tree"] or None)
    info = w.read()
    if "threads" in info:
      n = info["threads"]
      w.name = (f"PyTorch {info['version']} eager, {n} thread"
                + "s" * (n > 1))
    print(f"  started {w.name} in {time.perf_counter() - t:.0f} s",
          file=sys.stderr, flush=True)
    workers.append(w)
    infos[w.name] = info

  # One after another, so compiles and warm-ups never overlap; the first
  # kd_jax worker writes the batch and the initial weights every worker
  # uses.
  for name, n, flags in jax_configs:
    start(name, [f"--worker=jax:{n}", f"--worker_flags={flags}"], flags)
  if not args.no_torch:
    for n in (int(x) for x in args.torch_threads.split(",") if x):
      start("PyTorch", [f"--worker=torch:{n}"])

  load = os.getloadavg()[0]
  print(f"pair {args.pair}: batch {args.batch}, {args.size}x{args.size}, "
        f"{args.rounds} rounds x {args.steps} steps, interleaved; "
        f"{os.cpu_count()} CPUs, load average {load:.1f} at the start")
  ref = infos[workers[0].name]
  for w in workers:
    i = infos[w.name]
    conn = i.get("params_connectors", 0)
    print(f"  {w.name}: params teacher {i['params_teacher']:,}, student "
          f"{i['params_student']:,}" + (f", connectors {conn:,}" if conn
                                        else "") +
          f"; first-step loss {i['first_loss']:.5f}" + (
              f"; kd_jax from {i['kd_jax']}, layers {i['layers']}"
              if "kd_jax" in i else ""))
    # Same architectures: the parameter counts must be equal (the
    # student-only step has no teacher and no connectors).
    assert i["params_student"] == ref["params_student"] and (
        i.get("mode") == "student" or
        (i["params_teacher"], conn) == (ref["params_teacher"],
                                        ref.get("params_connectors", 0))), (
            f"parameter counts differ: {w.name} {i} vs {workers[0].name} "
            f"{ref}")

  times = {w.name: [] for w in workers}
  for r in range(args.rounds):
    k = r % len(workers)
    for w in workers[k:] + workers[:k]:
      times[w.name].append(w.ask("round")["step_s"])
    print(f"  round {r + 1}: " + ", ".join(
        f"{w.name} {times[w.name][-1] * 1e3:.0f} ms" for w in workers),
          file=sys.stderr, flush=True)
  profiles = {w.name: w.ask("profile") for w in workers} if args.profile \
      else {}
  rss = {w.name: w.ask("rss")["peak_rss_mb"] for w in workers}
  loader = workers[0].ask("loader") if args.loader_batches else None
  # The cache and student-only modes time their own (unaugmented) loops.
  loops = {w.name: w.ask("loader") for w in workers[1:]
           if infos[w.name].get("mode", "distill") != "distill"
           and args.loader_batches}
  for w in workers:
    w.ask("quit")
    w.p.wait()

  end_load = os.getloadavg()[0]
  print(f"load average {end_load:.1f} at the end" + (
      " (above the CPU count: other processes share the cores, expect noise)"
      if max(load, end_load) > (os.cpu_count() or 1) else ""))
  med = {k: statistics.median(v) for k, v in times.items()}
  torch_times = [med[w.name] for w in workers if w.is_torch]
  best_torch = min(torch_times) if torch_times else None
  # The same ratio round by round (the workers of a round ran within a
  # second of each other), its median: steadier than the ratio of medians
  # when the machine's speed drifts during the run.
  ref = min((w.name for w in workers if w.is_torch), key=med.get,
            default=None)

  def per_round(base, name):  # Median of base's time / name's, by round.
    return statistics.median(a / b for a, b in zip(times[base], times[name]))

  print()
  columns = ["configuration", "step (ms, median)", "min–max (ms)",
             "images/s", "speed vs PyTorch", "per round", "compile (s)",
             "peak RSS (MB)", "imports' RSS (MB)"]
  print("| " + " | ".join(columns) + " |")
  print("|---|" + "---:|" * (len(columns) - 1))
  for w in workers:
    i, t = infos[w.name], med[w.name]
    speed = f"{best_torch / t:.2f}×" if best_torch else "–"
    by_round = "–" if ref is None else f"{per_round(ref, w.name):.2f}×"
    compile_s = (f"{i['trace_s'] + i['compile_s']:.1f}" if "compile_s" in i
                 else "–")
    print(f"| {w.name} | {t * 1e3:.0f} | {min(times[w.name]) * 1e3:.0f}–"
          f"{max(times[w.name]) * 1e3:.0f} | {args.batch / t:.0f} | {speed} "
          f"| {by_round} | {compile_s} | {rss[w.name]:.0f} | "
          f"{i['import_rss_mb']:.0f} |")
  def extra_row(name, step_s=None, images_per_s=None):
    """A loader or train-loop row: step time, images/s and speed vs
    PyTorch where they apply, '–' in every other column."""
    cells = ["–"] * (len(columns) - 1)
    if step_s is not None:
      images_per_s = args.batch / step_s
      cells[0] = f"{step_s * 1e3:.0f}"
      cells[3] = f"{best_torch / step_s:.2f}×" if best_torch else "–"
    cells[2] = f"{images_per_s:.0f}"
    print(f"| {name} | " + " | ".join(cells) + " |")

  if loader is not None:
    extra_row("grain loader, 4 threads: synthetic CT + augment, first epoch "
              "(each example rendered)", images_per_s=loader["images_per_s"])
    extra_row("grain loader, 4 threads: synthetic CT + augment, later epochs "
              f"(the {loader['num_train']} examples from memory; rendering "
              f"them took {loader['render_all_s']:.0f} s)",
              images_per_s=loader["cached_images_per_s"])
    for key, what in (("loop_rendered_s", "first epoch"),
                      ("loop_cached_s", "later epochs")):
      extra_row(f"{workers[0].name}, train loop: step + loader ({what})",
                loader[key])
  for name, loop in loops.items():
    built = (f"; cache of {loop['num_train']} examples built in "
             f"{loop['cache_build_s']:.1f} s" if "cache_build_s" in loop
             else "")
    extra_row(f"{name}, train loop: step + loader (later epochs, no "
              f"augmentation{built})", loop["loop_unaugmented_s"])
  print()
  # An A/B of kd_jax workers (variants, device counts, modes) cancels the
  # drift the same way: each against the first, round by round.
  jax_workers = [w.name for w in workers if not w.is_torch]
  for name in jax_workers[1:]:
    faster = sum(a > b for a, b in zip(times[jax_workers[0]], times[name]))
    print(f"{name} against {jax_workers[0]}, per round: "
          f"{per_round(jax_workers[0], name):.3f}× (faster in {faster} of "
          f"{args.rounds} rounds)")
  by_mode = {infos[w.name].get("mode"): w.name for w in reversed(workers)}
  if "cached" in by_mode and "student" in by_mode:
    cached, student = med[by_mode["cached"]], med[by_mode["student"]]
    line = (f"teacher cache: cached step / student-only step = "
            f"{cached / student:.2f}× (target ≤ 1.1×)")
    if "distill" in by_mode:
      line += (f"; full distill step / student-only = "
               f"{med[by_mode['distill']] / student:.2f}×")
    names = (by_mode["cached"], by_mode["student"])
    if all(n in loops for n in names):
      ratio = (loops[names[0]]["loop_unaugmented_s"] /
               loops[names[1]]["loop_unaugmented_s"])
      line += f"; in the train loop (an epoch from the cache) {ratio:.2f}×"
    print(line)
  elif "cached" in by_mode and "distill" in by_mode:  # No student-only step.
    print(f"teacher cache: cached step / full distill step = "
          f"{med[by_mode['cached']] / med[by_mode['distill']]:.2f}× (this "
          "pair has no student-only step)")
  for w in workers:
    i = infos[w.name]
    if "compile_s" in i:
      # cost_analysis counts one device's share of an SPMD program.
      gflop = i["gflop_per_step"] * i["devices"]
      peak = (args.peak_tflops * 1e12 or
              peak_flops(i["device_kind"], args.compute_dtype))
      if i["platform"] == "cpu":
        util = "MFU – (CPU: no peak figure)"
      elif peak:
        util = (f"MFU {mfu(gflop * 1e9, med[w.name], peak, i['devices']):.1%}"
                f" of {peak / 1e12:.0f} TFLOP/s × {i['devices']} "
                f"({i['device_kind']}, {args.compute_dtype})")
      else:
        util = (f"MFU – (no peak figure for {i['device_kind']!r}: give "
                "--peak_tflops)")
      print(f"{w.name}: XLA cost analysis {gflop:.2f} GFLOP/step"
            f" ({gflop / med[w.name]:.1f} GFLOP/s, {util}); step trace "
            f"{i['trace_s']:.1f} s + compile {i['compile_s']:.1f} s; "
            f"init (compile + run, XLA backend level "
            f"{i['init_opt_level']}) {i['init_s']:.1f} s")
  for name, prof in profiles.items():
    print(f"\n{name}: profiled round {prof['wall_ms']:.0f} ms/step "
          "(wall); top entries, ms/step summed over threads:")
    for kind, ms, count in prof["rows"]:
      print(f"  {ms:8.1f}  {count:5d}×  {kind}")


if __name__ == "__main__":
  main()
