"""Prints the README's model table: parameters and FLOPs of every registered
model at its default input, and the recipe that uses it.

    python -m benchmarks.model_table                  # every model
    python -m benchmarks.model_table resnet50 espnet  # some

Nothing runs: parameters come from `jax.eval_shape`, FLOPs from XLA's cost
analysis of the compiled eval-mode forward at batch 1 (see
`kd_jax.models.summary`; a multiply-add counts as 2 FLOPs). Each model
module declares its default input (`DEFAULT_INPUT`), recipe note (`RECIPES`)
and, where its constructor needs them, build arguments (`DEFAULT_KWARGS`). A
model that fails to build or compile is reported on stderr and skipped.
Compiling the largest models takes a few seconds each on a CPU.
"""
import sys
import time

from kd_jax import models
from kd_jax.models.summary import default_kwargs, recipes


def row(name: str) -> str:
  shape = models.default_input(name)
  s = models.summary(models.build(name, **default_kwargs(name)), shape)
  h, w, c = shape[1:]
  return (f"| `{name}` | {h}×{w}×{c} | {s['params'] / 1e6:.3f} M | "
          f"{s['flops'] / 1e9:.2f} | {recipes(name)} |")


def main(argv):
  names = argv[1:] or models.names()
  print("| model | input (H×W×C) | params | GFLOPs (XLA, batch 1) | recipe |")
  print("|---|---|---:|---:|---|")
  start = time.time()
  failed = []
  for name in names:
    try:
      print(row(name), flush=True)
    except Exception as e:  # pylint: disable=broad-except
      failed.append(name)
      print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
  print(f"\n({len(names) - len(failed)} models in "
        f"{time.time() - start:.0f} s; failed: {failed or 'none'})",
        file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
