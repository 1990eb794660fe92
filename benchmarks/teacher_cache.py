"""The teacher cache (`kd_jax.teacher_cache`) against the live teacher.

    python benchmarks/teacher_cache.py                 # all three parts
    python benchmarks/teacher_cache.py --parts=sizes   # or study, steps

- **study**: a tiny distillation study on synthetic CT
  (`tiny_study_config`): 3 arms (KD at T=4; KD at T=2; KD + hint) ×
  2 seeds distil one trained teacher, once with the teacher live in every
  step and once with `teacher_cache="auto"` (one cache per seed, holding
  the union of the outputs the arms read, shared by that seed's arms).
  Prints the teacher forwards (examples through the teacher) and the wall
  time of every run, cache builds included.
- **steps**: seconds per jitted step, interleaved rounds: the distill step
  with the live teacher, the same step fed the teacher outputs of a cache
  (KD + hint, and KD alone), and the student alone (the "baseline" stage:
  CE + Dice). The goal is a cached step within 1.1× the student-only step.
  Then the host's side, also interleaved: milliseconds to assemble one
  batch (augmented views) without a cache and with the cached outputs of
  KD + hint read with it, stored in float32 and in bfloat16.
- **sizes**: bytes on disk per example and epoch of every distill stage of
  the recipe configs, from shapes alone (`jax.eval_shape`), for float32,
  bfloat16 and bfloat16 with top-10 logits.

Timings on a shared CPU are noisy; compare within one run.
"""
import argparse
import functools
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kd_jax import data, teacher_cache, train  # noqa: E402

# Two arms read the teacher's logits alone, the third also a teacher
# feature: one cache per seed holds both (the union of the arms' outputs).
ARMS = {
    "kd_t4": dict(kd=dict(fn="kd_kl", temperature=4.0)),
    "kd_t2": dict(kd=dict(fn="kd_kl", temperature=2.0, weight=0.5)),
    "kd_hint": dict(kd=dict(fn="kd_kl", temperature=4.0),
                    hint=dict(fn="hint_l2", student="bottleneck",
                              teacher="bottleneck")),
}
SEEDS = (0, 1)
RECIPES = [("configs/default.py", None), ("configs/distillo.py", "kd"),
           ("configs/distillo.py", "latent"), ("configs/skd/ablation.py", None),
           ("configs/medtex/medtex.py", None), ("configs/fundus_mtl.py", None),
           ("configs/encoder/distill.py", "cpu")]


def tiny_study_config(steps):
  """configs/default.py at 32 px, 24 training examples, batch 8: a UNet
  teacher of width 16 (~16× the FLOPs of the width-4 student), depth 2."""
  from configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.batch_size = 8
  c.steps = steps
  c.log_every = steps
  c.eval_every = steps
  c.checkpoint_every = steps
  c.optimizer.warmup_steps = 0
  c.data.image_size = 32
  c.data.num_train = 24
  c.data.num_val = 8
  c.data.num_test = 8
  c.data.augment = True
  c.stages.teacher.steps = 4
  for name in ("teacher",):
    c.stages[name].model.width = 16
    c.stages[name].model.depth = 2
  for name in ("baseline", "distilled"):
    c.stages[name].model.width = 4
    c.stages[name].model.depth = 2
  c.stages.distilled.teacher.model.width = 16
  c.stages.distilled.teacher.model.depth = 2
  base = c.stages.distilled.to_dict()
  task = dict(ce=dict(fn="cross_entropy"), dice=dict(fn="dice"))
  for arm, terms in ARMS.items():
    c.stages[arm] = dict(base, losses=dict(task, **terms))
  return c


def study(steps, root):
  c = tiny_study_config(steps)
  ds = data.build(c.data)
  teacher_dir = os.path.join(root, "teacher_run")
  train.train_stage(c, "teacher", teacher_dir, ds)
  rows, totals = [], {}
  os.environ["KD_JAX_CACHE"] = os.path.join(root, "cache")
  for cache in (None, "auto"):
    for seed in SEEDS:
      for arm in ARMS:
        cfg = tiny_study_config(steps)
        cfg.teacher_cache = cache
        cfg.stage_order = tuple(ARMS)  # A study of the arms.
        for name in ARMS:
          cfg.stages[name].seed = seed
          cfg.stages[name].teacher.stage = ""
          cfg.stages[name].teacher.checkpoint = os.path.join(teacher_dir,
                                                             "teacher")
        workdir = os.path.join(root, f"{cache}_{seed}_{arm}")
        before, t = teacher_cache.forwards, time.perf_counter()
        train.train_stage(cfg, arm, workdir, ds)
        wall = time.perf_counter() - t
        forwards = (teacher_cache.forwards - before if cache
                    else steps * cfg.batch_size)  # One per row per step.
        rows.append((cache or "live", seed, arm, forwards, wall))
        n, w = totals.get(cache or "live", (0, 0.0))
        totals[cache or "live"] = (n + forwards, w + wall)
  print("\n| teacher | seed | arm | teacher forwards | wall (s) |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} |")
  for k, (n, w) in totals.items():
    print(f"| **{k}, all 6 runs** | | | **{n}** | **{w:.1f}** |")


def _random_like(tree, rng):
  """Arrays of `tree`'s shapes: parameters ~ N(0, 0.1²), batch variances
  1, optimizer state, integers and key data 0."""
  def fill(path, x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key(0)
    where = jax.tree_util.keystr(path)
    if not jnp.issubdtype(x.dtype, jnp.floating) or "opt_state" in where:
      return jnp.zeros(x.shape, x.dtype)  # Adam's moments start at 0.
    if "var" in where:
      return jnp.ones(x.shape, x.dtype)
    return jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype)
  return jax.tree_util.tree_map_with_path(fill, tree)


# (row, stage): the distill step with the teacher live and fed from the
# cache, for KD + hint (logits and a feature) and KD alone (logits), and the
# student alone (CE + Dice).
STEPS = (("live teacher, kd_hint", "kd_hint"), ("cached, kd_hint", "kd_hint"),
         ("cached, kd_t4", "kd_t4"), ("student only", "baseline"))


def _step_fns(c, ds):
  """{name: (jitted step, state, batch, frozen)} for the `STEPS`."""
  mesh = train.make_mesh()
  batches = data.pipeline.train_batches(
      ds.train, batch_size=c.batch_size, seed=0,
      transforms=ds.train_transforms)
  batch = batches[0]
  out = {}
  for name, stage in STEPS:
    method, _ = train.build_method(c, stage, "", ds.num_classes,
                                   load_teacher=False)
    s = train.stage_config(c, stage)
    tx = train.make_optimizers(method, s)
    example = jnp.asarray(batch["image"][:1])
    rng = np.random.default_rng(0)
    # Shapes from the method's own init, values drawn in numpy: an init
    # compile takes minutes on a loaded 2-core CPU.
    state = _random_like(jax.eval_shape(lambda x, m=method, t=tx: (
        train.init_state(m, t, jax.random.key(0), x)), example), rng)
    frozen = {}
    b = dict(batch)
    if stage != "baseline":
      frozen = _random_like(jax.eval_shape(lambda x, m=method: m.teacher.init(
          jax.random.key(1), x, train=False), example), rng)
      frozen = {"params": frozen["params"],
                "batch_stats": frozen.get("batch_stats", {})}
      if name.startswith("cached"):
        b["teacher"] = jax.tree.map(np.asarray, jax.jit(
            method.teacher_outputs)(frozen, b["image"]))
    step = train.jit_train_step(train.make_train_step(method, tx), mesh)
    out[name] = (step, state, train.to_global(b, mesh), frozen)
  return out


def steps_timing(rounds, per_round):
  c = tiny_study_config(10)
  ds = data.build(c.data)
  fns = _step_fns(c, ds)
  times = {k: [] for k in fns}
  for name, (step, state, batch, frozen) in fns.items():  # Compile.
    state, m = step(state, batch, frozen)
    jax.block_until_ready(m)
    fns[name] = (step, state, batch, frozen)
  for _ in range(rounds):
    for name, (step, state, batch, frozen) in fns.items():
      t = time.perf_counter()
      for _ in range(per_round):
        state, m = step(state, batch, frozen)
      jax.block_until_ready(m)
      times[name].append((time.perf_counter() - t) / per_round)
      fns[name] = (step, state, batch, frozen)
  med = {k: float(np.median(v)) for k, v in times.items()}
  print("\n| step | median ms | × student only |")
  print("|---|---|---|")
  for k, v in med.items():
    print(f"| {k} | {1e3 * v:.1f} | {v / med['student only']:.2f}× |")


def host_timing(rounds, batches=24):
  """Milliseconds per batch assembled on the host, interleaved rounds."""
  c = tiny_study_config(rounds * batches)
  c.teacher_cache = "auto"
  c.stage_order = tuple(ARMS)
  ds = data.build(c.data)
  method, _ = train.build_method(c, "kd_hint", "", ds.num_classes,
                                 load_teacher=False)
  example = jnp.asarray(ds.train[0]["image"][None])
  frozen = _random_like(jax.eval_shape(lambda x: method.teacher.init(
      jax.random.key(1), x, train=False), example), np.random.default_rng(0))
  frozen = {"params": frozen["params"],
            "batch_stats": frozen.get("batch_stats", {})}
  streams = {"no cache": None}
  with tempfile.TemporaryDirectory() as root:
    os.environ["KD_JAX_CACHE"] = root
    for dtype in ("float32", "bfloat16"):
      c.teacher_cache_dtype = dtype
      cache = teacher_cache.for_stage(c, "kd_hint", root, method, frozen, ds)
      streams[f"cache, {dtype}"] = cache.batch_outputs
    streams = {k: data.pipeline.train_batches(
        ds.train, batch_size=c.batch_size, seed=0,
        transforms=ds.train_transforms, teacher_outputs=v)
               for k, v in streams.items()}
    times = {k: [] for k in streams}
    for r in range(rounds):
      for k, stream in streams.items():
        t = time.perf_counter()
        for i in range(r * batches, (r + 1) * batches):
          stream[i]  # pylint: disable=pointless-statement
        times[k].append((time.perf_counter() - t) / batches)
  print("\n| host batch (8 views, 32×32) | median ms |")
  print("|---|---|")
  for k, v in times.items():
    print(f"| {k} | {1e3 * float(np.median(v)):.1f} |")


def _load(path, arg):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT,
                                                                    path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _size(b):
  for unit in ("B", "KiB", "MiB"):
    if b < 10 * 1024 or unit == "MiB":
      return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
    b /= 1024
  return ""


def sizes():
  print("\n| config | stage | input | examples | epochs | outputs | float32 "
        "| bfloat16 | bfloat16, features whole | bfloat16 top-10 "
        "| whole cache, bfloat16 |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for path, arg in RECIPES:
    c = _load(path, arg)
    try:
      ds = data.build(c.data)
    except Exception as e:  # pylint: disable=broad-except
      print(f"| {path} | – | data: {e} |")
      continue
    for name in c.stage_order:
      s = c.stages[name]
      if s.get("method") not in ("distill", "adversarial", "explain"):
        continue
      sds = train.stage_datasets(c, name, ds)
      method, _ = train.build_method(c, name, "", sds.num_classes,
                                     load_teacher=False,
                                     heads=train.run_heads(c, sds))
      image = np.asarray(sds.train[0]["image"])
      x = jax.ShapeDtypeStruct((1,) + image.shape, image.dtype)
      teachers = method.teachers
      frozen = [jax.eval_shape(lambda x, t=t: t.init(
          jax.random.key(0), x, train=False), x) for t in teachers]
      frozen = [{"params": f["params"], "batch_stats": f.get("batch_stats",
                                                             {})}
                for f in frozen]
      frozen = frozen if method.ensemble else frozen[0]
      views = getattr(method, "view_table", {})
      out = jax.eval_shape(method.teacher_outputs, frozen, x)
      # The layout before teacher views: every feature a term reads, whole.
      whole = jax.eval_shape(functools.partial(
          method.teacher_outputs, outputs=sorted(
              {n for n in method.teacher_output_names()
               if not n.startswith("views.")}
              | {f"features.{v['feature']}" for v in views.values()})),
                             frozen, x)
      sizes_ = []
      for dtype, k, outputs in (("float32", 0, out), ("bfloat16", 0, out),
                                ("bfloat16", 0, whole),
                                ("bfloat16", 10, out)):
        m = teacher_cache.manifest(
            teacher_model={}, teacher_variables={}, data_options={},
            examples=len(sds.train), transforms=(), input_shape=image.shape,
            seed=0, outputs=outputs, dtype=dtype, top_k=k, views=views)
        sizes_.append(teacher_cache.bytes_per_example(m))
      shapes = ", ".join(f"{n} {tuple(v)}"
                         for n, v in m["outputs"].items())
      epochs = math.ceil(train.stage_config(c, name)["steps"] * c.batch_size
                         / len(sds.train))
      print(f"| {path}{':' + arg if arg else ''} | {name} | "
            f"{image.shape} | {len(sds.train)} | {epochs} | {shapes} | "
            + " | ".join(_size(b) for b in sizes_)
            + f" | {_size(sizes_[1] * len(sds.train) * epochs)} |")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--parts", default="sizes,steps,study")
  p.add_argument("--steps", type=int, default=12,
                 help="training steps of each study run")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--per_round", type=int, default=5)
  args = p.parse_args()
  parts = args.parts.split(",")
  if "sizes" in parts:
    sizes()
  if "steps" in parts:
    steps_timing(args.rounds, args.per_round)
    host_timing(args.rounds)
  if "study" in parts:
    with tempfile.TemporaryDirectory() as root:
      study(args.steps, root)


if __name__ == "__main__":
  main()
