"""One 3×3 convolution (padding 1) per shape, timed alone: XLA's own
(`jax.lax.conv_general_dilated`), kd_jax's (`kd_jax.models.layers`, what
every model runs) and PyTorch eager's, forward and forward + both gradients.

    python benchmarks/conv_shapes.py                  # the default pair's shapes
    python benchmarks/conv_shapes.py --shapes=64:8:8,64:16:16 --batch=16
    python benchmarks/conv_shapes.py --shapes=resnet18_64  # its 2×2 outputs

Each framework runs in its own process, one after the other (in one process
the idle threads of one spin while the other works), both with kd_jax's
malloc setting (`kd_jax.runtime.retain_freed_memory`). Medians of `--reps`
calls after a warm-up, ms; within a process the calls take turns. Shapes are
side:C_in:C_out[:stride] (stride 1 by default), NHWC (NCHW for PyTorch),
batch `--batch`, or the name of a list in PRESETS.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial

import numpy as np

# The UNet levels of configs/default.py's pair (teacher width 16, student 8).
SHAPES = "64:16:16,64:32:16,64:8:8,64:16:8,32:8:16,32:16:16,32:32:32,16:64:64"
# Padding 1 on each side, as PyTorch's padding=1 and kd_jax's ResNets (for
# stride 1 the same as "SAME").
PADS = ((1, 1), (1, 1))
PRESETS = {
    "default": SHAPES,
    # ResNet-18's last two stages at 64² (outputs 4×4 and 2×2): the 2×2
    # ones are matmuls in kd_jax on CPU (`layers.TINY_OUTPUT`).
    "resnet18_64": "8:128:256:2,4:256:256,4:256:512:2,2:512:512",
}


def _medians_ms(fns, reps):
  """Median ms per call of each of `fns`, called in turn (the machine's
  noise hits all alike)."""
  for fn in fns * 3:
    fn()
  times = [[] for _ in fns]
  for _ in range(reps):
    for fn, t_list in zip(fns, times):
      t = time.perf_counter()
      fn()
      t_list.append(time.perf_counter() - t)
  return [float(np.median(t) * 1e3) for t in times]


def _jax(shapes, batch, reps):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from kd_jax import runtime  # pylint: disable=import-outside-toplevel
  from kd_jax.models import layers  # pylint: disable=import-outside-toplevel

  runtime.configure()
  dn = ("NHWC", "HWIO", "NHWC")

  def xla(x, w, stride):
    return jax.lax.conv_general_dilated(x, w, (stride,) * 2, PADS,
                                        dimension_numbers=dn)

  def kd(x, w, stride):
    return layers.conv_general_dilated(
        x, w, (stride,) * 2, PADS,
        dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, w.shape, dn))

  out = {}
  for key, (side, cin, cout, stride) in shapes.items():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, side, side, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
    out_side = -(-side // stride)
    g = jnp.asarray(rng.normal(size=(batch, out_side, out_side, cout)),
                    jnp.float32)
    fns = []
    for conv in (xla, kd):
      conv = partial(conv, stride=stride)
      fwd = jax.jit(conv)
      both = jax.jit(jax.grad(lambda x, w, c=conv: jnp.sum(c(x, w) * g),
                              argnums=(0, 1)))
      fns += [lambda f=fwd: f(x, w).block_until_ready(),
              lambda f=both: jax.block_until_ready(f(x, w))]
    t = _medians_ms(fns, reps)
    out[key] = {"xla": t[0:2], "kd_jax": t[2:4]}
  return out


def _torch(shapes, batch, reps):
  import torch  # pylint: disable=import-outside-toplevel

  from kd_jax import runtime  # pylint: disable=import-outside-toplevel

  # kd_jax's malloc setting on both sides: alone, PyTorch's gradients of a
  # 64² convolution took 1.5-2× longer with glibc's defaults (fresh pages
  # for each output), which is the allocator, not the convolution.
  runtime.retain_freed_memory()

  out = {}
  for key, (side, cin, cout, stride) in shapes.items():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(batch, cin, side, side)),
                     dtype=torch.float32, requires_grad=True)
    w = torch.tensor(rng.normal(size=(cout, cin, 3, 3)), dtype=torch.float32,
                     requires_grad=True)
    out_side = -(-side // stride)
    g = torch.tensor(rng.normal(size=(batch, cout, out_side, out_side)),
                     dtype=torch.float32)

    def fwd(stride=stride):
      with torch.no_grad():
        torch.nn.functional.conv2d(x, w, stride=stride, padding=1)

    def both(stride=stride):
      y = torch.nn.functional.conv2d(x, w, stride=stride, padding=1)
      torch.autograd.grad(y, (x, w), g)

    out[key] = {"pytorch": _medians_ms([fwd, both], reps)}
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default=SHAPES)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--framework", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  spec = PRESETS.get(args.shapes, args.shapes)
  shapes = {}
  for s in spec.split(","):
    values = [int(v) for v in s.split(":")]
    if len(values) not in (3, 4):
      p.error(f"--shapes: {s!r} is not side:C_in:C_out[:stride] and "
              f"{args.shapes!r} not one of {sorted(PRESETS)}")
    shapes[s] = tuple(values + [1] * (4 - len(values)))
  if args.framework:
    run = _jax if args.framework == "jax" else _torch
    print(json.dumps(run(shapes, args.batch, args.reps)))
    return
  rows = {}
  for framework in ("jax", "torch"):
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--framework={framework}",
         f"--shapes={spec}", f"--batch={args.batch}",
         f"--reps={args.reps}"], check=True, capture_output=True, text=True)
    for key, row in json.loads(proc.stdout.splitlines()[-1]).items():
      rows.setdefault(key, {}).update(row)
  names = ("xla", "kd_jax", "pytorch")
  print(f"batch {args.batch}, ms (median of {args.reps}): forward | "
        "forward + gradients of input and kernel")
  print("| side, C_in → C_out | " + " | ".join(f"{n} fwd" for n in names)
        + " | " + " | ".join(f"{n} fwd+grads" for n in names) + " |")
  print("|---|" + "---:|" * 6)
  for key, row in rows.items():
    side, cin, cout, stride = shapes[key]
    cells = [f"{row[n][0]:.2f}" for n in names] + [
        f"{row[n][1]:.2f}" for n in names]
    strided = f", stride {stride}" if stride > 1 else ""
    print(f"| {side}², {cin} → {cout}{strided} | " + " | ".join(cells)
          + " |")


if __name__ == "__main__":
  main()
