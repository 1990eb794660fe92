"""Images/s of the trainer's input pipeline for each recipe's data.

    KD_JAX_DATA=/work/shared/data python benchmarks/loader.py
    python benchmarks/loader.py --recipes=default,medtex --presets=cpu \
        --workers=0,2 --dtypes=float32,uint8 --batches=8

For each recipe config at each preset (its CPU preset, and its paper/full
input size), the training batches are built as `kd_jax.train` builds them
(`data.build(config.data)`, `pipeline.train_batches` with the set's
augmentation and unlabelled pool, `config.batch_size`) and read through
`pipeline.iterate` with each number of loader workers and each transfer
dtype. Every row reads freshly built sources, and times `--batches`
batches after the first `--skip` (the threads or worker processes
starting): a run's first-epoch rate, where examples are read, resized
(once: `ResizedCache`) and augmented as they come; later epochs skip the
resize. uint8 is refused for images outside
[0, 1] (ACDC's z-scored slices): bfloat16 runs in its place there. A
recipe whose data is absent (`$KD_JAX_DATA`) is skipped with a line
saying so.

`--augment=host,device` times each row with the augmentation on the host
(the transforms' pixel work in the loader) and with
`data.augment_on_device=True` (the loader only draws the parameters and
ships the unwarped images; recipes without augmentation, or with an
unlabelled pool, get host rows only). Every row also gives "transforms
images/s": the training transforms alone on examples already in memory,
one thread (the per-view host work the switch removes, without the cold
reads that dominate a first epoch). A device row gives "warp images/s":
the step's extra work alone, the jitted `decode` + `device_augment.apply`
of one batch on the default JAX device (median of `--warp_repeats`). A
line per recipe gives the device/host ratios of the same run. The loader
rows do no device work.
"""
import argparse
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, config file, {preset: config arg}).
RECIPES = (
    ("default", "configs/default.py", {"cpu": None}),
    ("distillo", "configs/distillo.py", {"cpu": "kd,cpu", "full": "kd,full"}),
    ("fundus_mtl", "configs/fundus_mtl.py", {"cpu": "cpu", "full": "full"}),
    ("skd", "configs/skd/ablation.py", {"cpu": "cpu,acdc",
                                        "full": "paper,drive"}),
    ("medtex", "configs/medtex/medtex.py", {"cpu": "cpu,1.0",
                                            "full": "full,1.0"}),
)


def load_config(path, arg):
  spec = importlib.util.spec_from_file_location(
      "cfg_" + os.path.basename(path)[:-3], os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def augmentation(transforms) -> str:
  return "+".join(type(t).__name__ for t in transforms) or "none"


def rate(pipeline, ds, batch_size, args, workers, dtype) -> float:
  it = pipeline.iterate(ds, 0, workers=workers, transfer_dtype=dtype)
  try:
    for _ in range(args.skip):  # The threads or worker processes start.
      next(it)
    t = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    return args.batches * batch_size / (time.perf_counter() - t)
  finally:
    it.close()  # Its threads would compete with the next timing.


def warp_rate(batches, batch_size, dtype, repeats) -> float:
  """Images/s of the step's device augmentation alone (decode + warp of
  one batch, compiled once, on the default device)."""
  import jax  # pylint: disable=g-import-not-at-top
  from kd_jax.data import device_augment  # pylint: disable=g-import-not-at-top
  from kd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batch = jax.device_put(pipeline.encode(batches[0], dtype))
  warp = jax.jit(lambda b: device_augment.apply(pipeline.decode(b))["image"])
  warp(batch).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    warp(batch).block_until_ready()
    times.append(time.perf_counter() - t)
  return batch_size / sorted(times)[len(times) // 2]


def assembly_rate(pipeline, ds, seed, count) -> float:
  """Images/s of the training transforms alone, one thread, on `count`
  examples already in memory (read and resized beforehand): the host's
  per-view work that `augment_on_device` removes, without the source's
  reading, resizing or rendering that dominates a cold first epoch."""
  examples = [ds.train[i % len(ds.train)] for i in range(count)]
  times = []
  for epoch in range(4):  # The first pass warms up; median of the others.
    t = time.perf_counter()
    for i in range(count):
      pipeline.example_view(examples, seed, epoch, i, ds.train_transforms)
    times.append(time.perf_counter() - t)
  return count / sorted(times[1:])[1]


def _with_augment(config, where):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.augment_on_device = where == "device"
  return config


def run(args):
  from kd_jax import data  # pylint: disable=g-import-not-at-top
  from kd_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  def training_batches(config):
    # Built anew for every row: each row reads cold sources (nothing
    # resized or rendered yet), as a run's first epoch does.
    ds = data.build(config.data)
    pool = ({"unlabelled": ds.unlabelled,
             "unlabelled_per_batch": ds.unlabelled_per_batch}
            if ds.unlabelled is not None else {})
    return ds, pipeline.train_batches(
        ds.train, batch_size=config.batch_size, seed=config.seed,
        transforms=ds.train_transforms, **pool)

  rows = []
  for name, path, presets in RECIPES:
    if args.recipes and name not in args.recipes:
      continue
    for preset, arg in presets.items():
      if preset not in args.presets:
        continue
      config = load_config(path, arg)
      try:
        ds, batches = training_batches(config)
      except (FileNotFoundError, ValueError) as e:
        print(f"# {name} {preset}: skipped ({str(e)[:120]})", flush=True)
        continue
      first = batches[0]["image"]
      in_unit = first.min() >= 0 and first.max() <= 1
      wheres = [w for w in args.augment if w == "host" or (
          ds.train_transforms and ds.unlabelled is None)]
      rates = {}
      for workers in args.workers:
        for dtype in args.dtypes:
          if dtype == "uint8" and not in_unit:
            dtype = "bfloat16"  # z-scored images: uint8 is refused.
          for where in wheres:
            cfg = _with_augment(config, where)
            r = rate(pipeline, training_batches(cfg)[1], config.batch_size,
                     args, workers, dtype)
            warp = (warp_rate(training_batches(cfg)[1], config.batch_size,
                              dtype, args.warp_repeats)
                    if where == "device" else None)
            built = training_batches(cfg)[0]
            alone = (assembly_rate(pipeline, built, config.seed,
                                   args.assembly)
                     if built.train_transforms else None)
            rates[workers, dtype, where] = (r, warp, alone)
            mb = first.size * {"float32": 4, "bfloat16": 2,
                               "uint8": 1}[dtype]
            rows.append((name, preset, config.data.name,
                         "×".join(map(str, first.shape[1:])),
                         config.batch_size,
                         augmentation(ds.train_transforms), workers, dtype,
                         where, alone, r, warp, mb / 2**20))
            print("| " + " | ".join(_cells(rows[-1])) + " |", flush=True)
      _print_ratios(name, preset, rates)
  return rows


def _print_ratios(name, preset, rates):
  """Device over host loader images/s per (workers, dtype), and the warp's
  images/s over the device loader's (how far the step's extra work stays
  from the loader's rate)."""
  parts = []
  for (workers, dtype, where), (r, warp, alone) in sorted(rates.items()):
    host = rates.get((workers, dtype, "host"))
    if where == "device" and host:
      parts.append(f"{workers} workers {dtype}: transforms alone "
                   f"×{alone / host[2]:.0f}, loader ×{r / host[0]:.2f}, "
                   f"warp {warp / r:.1f}× the device loader's rate")
  if parts:
    print(f"# {name} {preset} device/host: " + "; ".join(parts), flush=True)


def _cells(row):
  *head, alone, r, warp, mb = row
  rate_or_dash = lambda x: "–" if x is None else f"{x:.0f}"
  return [str(x) for x in head] + [
      rate_or_dash(alone), f"{r:.0f}", rate_or_dash(warp), f"{mb:.2f}"]


HEADER = ("recipe", "preset", "data", "image", "batch", "augmentation",
          "workers", "transfer", "augment on", "transforms images/s",
          "images/s", "warp images/s", "MB/batch")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  split = lambda s: [x for x in s.split(",") if x]
  parser.add_argument("--recipes", type=split, default=[],
                      help="comma-separated recipe names (default: all)")
  parser.add_argument("--presets", type=split, default=["cpu", "full"])
  parser.add_argument("--workers", type=lambda s: [int(x) for x in split(s)],
                      default=[0, 2])
  parser.add_argument("--dtypes", type=split, default=["float32", "uint8"])
  parser.add_argument("--augment", type=split, default=["host", "device"],
                      help="where the augmentation runs: host, device")
  parser.add_argument("--assembly", type=int, default=64,
                      help="examples in memory timed through the transforms")
  parser.add_argument("--warp_repeats", type=int, default=5,
                      help="timed calls of the step's warp (median)")
  parser.add_argument("--skip", type=int, default=2,
                      help="batches read before the timing starts")
  parser.add_argument("--batches", type=int, default=16,
                      help="batches timed (well past the prefetch buffers)")
  args = parser.parse_args(argv)
  sys.path.insert(0, ROOT)
  print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
  print("| " + " | ".join(HEADER) + " |")
  print("|" + "---|" * len(HEADER))
  run(args)


if __name__ == "__main__":  # Grain's worker processes start by spawn.
  main()
