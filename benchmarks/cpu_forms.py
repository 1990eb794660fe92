"""Does each of kd_jax.cpu_layers' forms earn its place? Whole train steps.

    python benchmarks/cpu_forms.py --config=configs/default.py --stage=distilled
    python benchmarks/cpu_forms.py --config=configs/distillo.py:kd,cpu --stage=kd

Builds the stage of a shipped config exactly as the trainer does
(`train.build_method`, `make_optimizer`, `init_state`, `make_train_step`,
`jit_train_step`), with random teacher variables and a random batch of the
config's input shape, once per layer set:

  flax          flax's own layers (`config.layers="flax"`)
  cpu           every form in kd_jax.cpu_layers (`config.layers="cpu"`)
  cpu-<form>    every form but <form> (conv, norm, conv_transpose, pool)
  <a>+<b>       exactly the forms named (e.g. norm+conv_transpose, or norm)

Each is compiled first (not timed); then the sets take turns, `--steps`
steps each with one sync at the end, for `--rounds` rounds in rotating
order, so drifts of a shared machine hit them alike. Prints per set the
median ms per step over rounds and the speed against the first (median over
rounds of the first set's time / this set's time in the same round; > 1 is
faster) and in how many rounds it beat `cpu` (else the last set) (a form whose removal does not make
the step slower in most rounds changes nothing measurable).
"""
import argparse
import dataclasses
import functools
import importlib.util
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import cpu_layers, methods, train


def _load_config(spec):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _build(config, stage, forms):
  """(jitted step, state, batch, frozen) for `stage` with these CPU forms."""
  num_classes = 9 if config.data.name == "synthetic" else 4
  cfg = config.copy_and_resolve_references()
  dtype = jnp.dtype(cfg.compute_dtype)

  def build_model(model_cfg):  # flax's layers, then only the forms named
    model = train._build_model(model_cfg, num_classes, dtype)  # pylint: disable=protected-access
    return cpu_layers.apply(model, forms=forms) if forms else model

  ctx = dataclasses.replace(
      train.build_context(cfg, stage, "/nonexistent", num_classes,
                          load_frozen=False), build_model=build_model)
  method, _ = methods.from_config(train.stage_config(cfg, stage), ctx)
  s = train.stage_config(cfg, stage)
  tx = train.make_optimizer(s["optimizer"], s["steps"])
  side = int(cfg.data.get("image_size", 64))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(cfg.batch_size, side, side, 1)).astype(np.float32)
  batch = {"image": images,
           "label": rng.integers(0, num_classes, images.shape[:3]).astype(
               np.int32)}
  state = jax.jit(functools.partial(train.init_state, method, tx,
                                    jax.random.key(0)))(images[:1])
  frozen = None
  if getattr(method, "teacher", None) is not None:
    frozen = jax.jit(functools.partial(method.teacher.init, train=False))(
        jax.random.key(1), images[:1])
    frozen = {"params": frozen["params"],
              "batch_stats": frozen.get("batch_stats", {})}
  mesh = train.make_mesh()
  step = train.jit_train_step(train.make_train_step(method, tx), mesh)
  batch = train.to_global(batch, mesh)
  return step, state, batch, frozen


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--stage", default="distilled")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--sets", default="flax,cpu,cpu-conv,cpu-norm,"
                      "cpu-conv_transpose,cpu-pool")
  args = parser.parse_args()
  config = _load_config(args.config)
  sets = {}
  for name in args.sets.split(","):
    if name == "flax":
      forms = ()
    elif name == "cpu":
      forms = cpu_layers.FORMS
    elif name.startswith("cpu-"):
      forms = tuple(f for f in cpu_layers.FORMS if f != name[4:])
    else:  # "a+b": exactly these forms.
      forms = tuple(name.split("+"))
    t = time.perf_counter()
    step, state, batch, frozen = _build(config, args.stage, forms)
    state, m = step(state, batch, frozen)  # Compile + one step.
    jax.block_until_ready(state)
    sets[name] = dict(step=step, state=state, batch=batch, frozen=frozen,
                      times=[], loss=float(m["loss"]),
                      compile=time.perf_counter() - t)
  names = list(sets)
  for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      s = sets[name]
      t = time.perf_counter()
      state = s["state"]
      for _ in range(args.steps):
        state, _ = s["step"](state, s["batch"], s["frozen"])
      jax.block_until_ready(state)
      s["state"] = state
      s["times"].append((time.perf_counter() - t) / args.steps * 1e3)
  print(f"{args.config} stage {args.stage}: {args.rounds} rounds x "
        f"{args.steps} steps, batch {config.batch_size}, "
        f"{jax.devices()[0].device_kind} x {jax.device_count()}")
  print(f"| layers | ms/step (median) | range | vs {names[0]} | faster than "
        f"{'cpu' if 'cpu' in sets else names[-1]} "
        "| first loss | build+compile s |")
  print("|---|---:|---|---:|---:|---:|---:|")
  ref = sets[names[0]]["times"]
  cpu = sets.get("cpu", sets[names[-1]])["times"]
  for name in names:
    ts = sets[name]["times"]
    ratio = statistics.median(a / b for a, b in zip(ref, ts))
    wins = sum(a < b for a, b in zip(ts, cpu))
    print(f"| {name} | {statistics.median(ts):.1f} | {min(ts):.1f}-"
          f"{max(ts):.1f} | {ratio:.2f} | {wins}/{len(ts)} | "
          f"{sets[name]['loss']:.5f} | {sets[name]['compile']:.1f} |")


if __name__ == "__main__":
  main()
