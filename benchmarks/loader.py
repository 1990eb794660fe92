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
saying so. No device work: the loader alone.
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
      for workers in args.workers:
        for dtype in args.dtypes:
          if dtype == "uint8" and not in_unit:
            dtype = "bfloat16"  # z-scored images: uint8 is refused.
          r = rate(pipeline, training_batches(config)[1], config.batch_size,
                   args, workers, dtype)
          mb = first.size * {"float32": 4, "bfloat16": 2, "uint8": 1}[dtype]
          rows.append((name, preset, config.data.name,
                       "×".join(map(str, first.shape[1:])),
                       config.batch_size, augmentation(ds.train_transforms),
                       workers, dtype, r, mb / 2**20))
          print("| " + " | ".join(_cells(rows[-1])) + " |", flush=True)
  return rows


def _cells(row):
  *head, r, mb = row
  return [str(x) for x in head] + [f"{r:.0f}", f"{mb:.2f}"]


HEADER = ("recipe", "preset", "data", "image", "batch", "augmentation",
          "workers", "transfer", "images/s", "MB/batch")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  split = lambda s: [x for x in s.split(",") if x]
  parser.add_argument("--recipes", type=split, default=[],
                      help="comma-separated recipe names (default: all)")
  parser.add_argument("--presets", type=split, default=["cpu", "full"])
  parser.add_argument("--workers", type=lambda s: [int(x) for x in split(s)],
                      default=[0, 2])
  parser.add_argument("--dtypes", type=split, default=["float32", "uint8"])
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
