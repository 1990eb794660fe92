"""The GPU benchmark: kd_jax's jitted distill step against PyTorch eager and
torch.compile on the accelerator pairs, in one command within a time budget.

    bash benchmarks/gpu.sh               # the device machine (README "GPU")
    python benchmarks/gpu.py --out=DIR [--pairs=a,b] [--budget=420]
    python benchmarks/gpu.py --smoke --out=DIR   # tiny stand-ins, a CPU

Each pair of SUITE runs as one `distill_step.py --sequential` process on one
device (`--devices=1`: JAX's mesh and PyTorch both on the first GPU): the
kd_jax worker, then PyTorch eager, then torch.compile, each alone on the
GPU from start to exit, at the pair's side and batch in bf16 (float32
parameters, AdamW), with the grain loader's images/s on the step's examples.
A pair gets an equal share of what is left of `--budget` (a worker at most
WORKER_SHARE of it); what runs past its share is killed and reported as
such, so the whole command ends in time.

Writes DIR/gpu_bench.json (every pair's `distill_step.py --json` result,
with the settings and the elapsed time) and DIR/gpu_bench.md (one table, as
printed last), and each pair's log to stdout.

`--smoke` runs the same machinery on each pair's tiny stand-in models
(PAIRS' `smoke` entries) at batch 2, with torch.compile's `aot_eager`
backend (the graph capture and autograd of the compile arm without
inductor's C++ build, minutes on a small CPU) and XLA's backend
optimisation level 0, on a CPU in about a minute; MFU is n/a there.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import distill_step  # noqa: E402  pylint: disable=wrong-import-position

# (pair, image side, global batch): the issue's realistic sizes; bf16 all.
SUITE = (
    ("distillo_full", 224, 64),  # The seed: TransUNet-B/16 → SqueezeU-Net.
    ("pspnet_resnet18", 512, 16),  # PSPNet-R101 → PSPNet-R18.
    ("vit_l16_efficientvit_b1", 224, 64),  # ViT-L/16 → EfficientViT-B1.
)
# What every pair's run passes to distill_step.py.
COMMON = ("--compute_dtype=bfloat16", "--devices=1", "--layers=flax",
          "--torch_modes=eager,compile", "--sequential",
          "--loader_batches=0")
# The parameter init is compiled once and untimed: at XLA's own level on
# the GPU (level 0 only saves LLVM time on the CPU).
FULL = ("--rounds=5", "--steps=10", "--warmup=3", "--loader_seconds=3",
        "--init_opt_level=default")
SMOKE = ("--smoke", "--batch=2", "--rounds=2", "--steps=1", "--warmup=1",
         "--loader_seconds=0.3", "--torch_threads=1",
         "--torch_compile_backend=aot_eager", "--channels_last=on",
         "--xla_flags=--xla_backend_optimization_level=0")
# The largest share of a pair's time one worker may take: the kd_jax
# worker's compile must leave the PyTorch arms time to run.
WORKER_SHARE = 0.6
# Seconds a pair's process gets past its share to write its JSON and exit.
GRACE_S = 20


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  p.add_argument("--out", required=True, help="folder for the results")
  p.add_argument("--pairs", default=",".join(s[0] for s in SUITE),
                 help="a comma list of SUITE's pairs (default: all)")
  p.add_argument("--budget", type=float, default=420.0,
                 help="seconds for all pairs together")
  p.add_argument("--smoke", action="store_true",
                 help="tiny stand-in models at batch 2, for a CPU")
  args = p.parse_args(argv)
  known = [s[0] for s in SUITE]
  bad = [x for x in args.pairs.split(",") if x not in known]
  if bad:
    p.error(f"--pairs: {', '.join(bad)}; choose from {', '.join(known)}")
  return args


def pair_argv(pair, size, batch, cap, smoke, json_path):
  """distill_step.py's arguments for one pair within `cap` seconds."""
  sized = () if smoke else (f"--size={size}", f"--batch={batch}")
  return ([f"--pair={pair}", *COMMON, *(SMOKE if smoke else FULL), *sized,
           f"--time_budget={cap:.0f}",
           f"--worker_timeout={cap * WORKER_SHARE:.0f}",
           f"--json={json_path}"])


def run_pair(pair, size, batch, cap, args):
  """One pair's distill_step.py run; its JSON summary with `status` and
  `seconds` added (a pair killed at its cap keeps the workers it wrote)."""
  path = os.path.join(args.out, f"{pair}.json")
  if os.path.exists(path):
    os.remove(path)
  argv = pair_argv(pair, size, batch, cap, args.smoke, path)
  print(f"== {pair}: {cap:.0f} s; distill_step.py {' '.join(argv)}",
        flush=True)
  t = time.monotonic()
  try:
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "distill_step.py"), *argv],
        timeout=cap + GRACE_S, check=False)
    status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
  except subprocess.TimeoutExpired:
    status = f"killed after {cap + GRACE_S:.0f} s"
  summary = {"pair": pair, "size": size, "batch": batch, "rows": []}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
  summary.update(status=status, seconds=time.monotonic() - t)
  return summary


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  chosen = [s for s in SUITE if s[0] in args.pairs.split(",")]
  start = time.monotonic()
  results = []
  for i, (pair, size, batch) in enumerate(chosen):
    left = args.budget - (time.monotonic() - start)
    cap = max(left / (len(chosen) - i) - GRACE_S, 1.0)
    results.append(run_pair(pair, size, batch, cap, args))
  report = dict(smoke=args.smoke, budget_s=args.budget,
                elapsed_s=time.monotonic() - start, host=platform.node(),
                cpus=os.cpu_count(), pairs=results)
  with open(os.path.join(args.out, "gpu_bench.json"), "w",
            encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  table = markdown(report)
  with open(os.path.join(args.out, "gpu_bench.md"), "w",
            encoding="utf-8") as f:
    f.write(table)
  print(table)


def _fmt(value, spec, scale=1.0):
  return "n/a" if value is None else format(value * scale, spec)


def markdown(report):
  """One table: a row per pair and arm, then a line per pair."""
  cols = ["pair", "arm", "device", "step (ms)", "images/s",
          "vs best PyTorch", "MFU (bf16 peak)", "peak memory (GiB)",
          "compile / first step (s)", "loader images/s", "loader / step"]
  lines = ["| " + " | ".join(cols) + " |",
           "|---|---|---|" + "---:|" * (len(cols) - 3)]
  notes = []
  for p in report["pairs"]:
    rows = p["rows"]
    torch_ms = [r["step_ms"] for r in rows
                if r["framework"] == "pytorch" and r["step_ms"]]
    loader = (p.get("loader") or {}).get("images_per_s")
    name = f"{p['pair']} {p['size']}² ×{p['batch']}"
    if not rows:
      lines.append(f"| {name} | {p['status']} |" + " |" * (len(cols) - 2))
    for r in rows:
      if r["error"]:
        lines.append(f"| {name} | {r['name']}: {r['error']} |"
                     + " |" * (len(cols) - 2))
        continue
      over = loader / r["images_per_s"] if loader else None
      lines.append(
          f"| {name} | {r['name']} | {r.get('device_kind', '?')} | "
          f"{r['step_ms']:.1f} | {r['images_per_s']:.0f} | "
          f"{_fmt(min(torch_ms) / r['step_ms'] if torch_ms else None, '.2f')}"
          f"× | {_fmt(r['mfu'], '.1%')} | "
          f"{_fmt(r['peak_device_mb'], '.1f', 1 / 1024)} | "
          f"{_fmt(r['compile_s'], '.0f')} | {_fmt(loader, '.0f')} | "
          f"{_fmt(over, '.2f')}× |")
    counted = [r.get("counted_gflop_per_step") for r in rows
               if r.get("counted_gflop_per_step")]
    notes.append(
        f"- {p['pair']} ({p['status']}, {p['seconds']:.0f} s): teacher "
        f"{(p.get('teacher') or {}).get('name', '?')} → student "
        f"{(p.get('student') or {}).get('name', '?')}; model "
        f"{_fmt(p.get('model_gflop_per_step'), '.1f')} GFLOP/step (teacher "
        f"forward {_fmt(p.get('teacher_forward_gflop'), '.1f')} + 3 × "
        f"student forward {_fmt(p.get('student_forward_gflop'), '.1f')}, "
        f"XLA cost analysis)" + (
            f"; PyTorch's FlopCounterMode counts {counted[0]:.1f}"
            if counted else ""))
  return ("\n".join(lines) + "\n\n" + "\n".join(notes) +
          f"\n\n{len(report['pairs'])} pairs in "
          f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s "
          f"budget{' (smoke stand-ins)' * report['smoke']}.\n")


if __name__ == "__main__":
  main()
