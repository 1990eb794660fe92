"""A ResNet backbone's training forward + backward, kd_jax against its
PyTorch eager twin (`torch_models.ResNet`, the same initial weights).

    python benchmarks/backbone_step.py --model=resnet18 --size=64
    python benchmarks/backbone_step.py --model=resnet50 --size=28 --batch=32

The loss is the mean square of the last stage's features, BatchNorm in
training mode; kd_jax's step is jitted (gradients of every parameter). A
third worker runs kd_jax with XLA's own convolution where kd_jax has its
own on CPU: for outputs of at most 2×2 (`layers.TINY_OUTPUT = 0`; XLA:CPU
runs those 10-40× slower than a matmul, a ResNet's last stage on inputs up
to 64²) and for the 3×3 convolutions of `kd_jax.native`'s kernels (64
channels on maps of 32² and more: a ResNet's first stage from 128² up).

Each worker is its own process (in one process the idle threads of one
spin while another works); their rounds take turns, and the ratio is taken
round by round (median), which cancels the machine's drift.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

import distill_step  # The variables' (un)flattening for the twin.

WORKERS = ("kd_jax", "kd_jax, XLA's convolutions", "PyTorch eager")


def _jax_step(args, xla_convs):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from kd_jax import runtime  # pylint: disable=import-outside-toplevel
  from kd_jax.models import layers, registry  # pylint: disable=import-outside-toplevel

  runtime.configure()
  # No persistent cache: the compile time is a cold compile.
  jax.config.update("jax_compilation_cache_dir", None)
  if xla_convs:
    layers.TINY_OUTPUT = 0
    distill_step.PATCHES["no_native"]()
  x = jnp.asarray(np.load(args.tmp + "/x.npy"))
  model = registry.build(args.model, num_classes=None, width=args.width)
  variables = model.init(jax.random.key(0), x[:1], train=False)
  if not xla_convs:  # The twin starts from the same weights.
    flat = distill_step._flatten(variables)  # pylint: disable=protected-access
    np.savez(args.tmp + "/init.npz",
             **{k: np.asarray(v) for k, v in flat.items()})

  def loss(params, stats):
    (_, feats), updates = model.apply(
        {"params": params, "batch_stats": stats}, x, train=True,
        mutable=["batch_stats"])
    return jnp.mean(feats["layer4"] ** 2), updates

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  params, stats = variables["params"], variables["batch_stats"]
  t = time.perf_counter()
  compiled = grad.lower(params, stats).compile()
  compile_s = time.perf_counter() - t

  def step():
    return jax.block_until_ready(compiled(params, stats))

  (value, _), _ = step()  # Before any update: the twin's weights.
  return step, dict(compile_s=compile_s, loss=float(value))


def _torch_step(args):
  import torch  # pylint: disable=import-outside-toplevel

  from kd_jax import runtime  # pylint: disable=import-outside-toplevel

  import torch_models as tm  # pylint: disable=import-outside-toplevel

  runtime.configure()  # The same malloc setting as kd_jax's process.
  flat = dict(np.load(args.tmp + "/init.npz"))
  variables = distill_step._unflatten(flat)  # pylint: disable=protected-access
  model = tm.ResNet(args.model, width=args.width).train()
  tm.load_flax_variables(model, variables)
  x = torch.from_numpy(np.load(args.tmp + "/x.npy")).permute(0, 3, 1, 2)
  x = x.contiguous()

  def step():
    model.zero_grad(set_to_none=True)
    loss = (model(x)["layer4"] ** 2).mean()
    loss.backward()
    return loss

  loss = float(step().detach())  # Before any update: kd_jax's weights.
  return step, dict(threads=torch.get_num_threads(), loss=loss)


def serve(args):
  """One worker: build, warm up, then time `--steps` steps per line read."""
  if args.worker == WORKERS[2]:
    step, info = _torch_step(args)
  else:
    step, info = _jax_step(args, xla_convs=args.worker == WORKERS[1])
  for _ in range(2):
    step()
  print(json.dumps(info), flush=True)
  for _ in sys.stdin:
    t = time.perf_counter()
    for _ in range(args.steps):
      step()
    print((time.perf_counter() - t) / args.steps, flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="resnet18",
                 choices=("resnet18", "resnet34", "resnet50", "resnet101"))
  p.add_argument("--size", type=int, default=64, help="image side")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--width", type=int, default=64,
                 help="channels of the first stage (64: the published nets)")
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--steps", type=int, default=2, help="steps per round")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--tmp", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    serve(args)
    return
  import tempfile  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as tmp:
    x = np.random.default_rng(0).normal(
        size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    np.save(tmp + "/x.npy", x)

    def start(name):
      return subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), f"--worker={name}",
           f"--tmp={tmp}", f"--model={args.model}", f"--steps={args.steps}",
           f"--width={args.width}"],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    # The kd_jax workers start together; PyTorch's once the first has
    # written the weights it starts from.
    procs = [start(WORKERS[0]), start(WORKERS[1])]
    infos = [json.loads(procs[0].stdout.readline())]
    procs.append(start(WORKERS[2]))
    infos += [json.loads(p.stdout.readline()) for p in procs[1:]]
    times = [[] for _ in WORKERS]
    for _ in range(args.rounds):
      for proc, t in zip(procs, times):
        proc.stdin.write("round\n")
        proc.stdin.flush()
        t.append(float(proc.stdout.readline()))
    for proc in procs:
      proc.stdin.close()
      proc.wait()
  torch_t = np.array(times[2])
  print(f"{args.model} backbone (width {args.width}), training forward + "
        f"backward, batch {args.batch}, {args.size}², {args.rounds} rounds "
        f"× {args.steps} steps, {os.cpu_count()} CPUs; PyTorch "
        f"{infos[2]['threads']} threads")
  print("| worker | step (ms, median) | speed vs PyTorch (per round) "
        "| compile (s) | loss |")
  print("|---|---:|---:|---:|---:|")
  for name, t, info in zip(WORKERS, times, infos):
    t = np.array(t)
    compile_s = f"{info['compile_s']:.1f}" if "compile_s" in info else "–"
    print(f"| {name} | {np.median(t) * 1e3:.1f} | "
          f"{np.median(torch_t / t):.2f}× | {compile_s} | "
          f"{info['loss']:.6f} |")


if __name__ == "__main__":
  main()
