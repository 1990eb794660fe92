"""The encoder study's table from its probe runs (docs/encoder/study_*.md).

    python docs/encoder/make_table.py runs/encoder_study [--readme]

Reads <root>/s<seed>/probe_<feature>/probe.json (and
probe_<feature>_*/probe.json beside it) for every seed folder present and
prints, per feature and set, each encoder's linear-probe
balanced accuracy, macro F1 and AUC and k-NN balanced accuracy as mean ±
sample std over the seeds found (ddof 1; no ± with one seed; n = seeds),
the share of the teacher's linear balanced accuracy kept (per seed, then
averaged), and size and speed from the first seed (this CPU,
`kd_jax.probe`).
"""
import json
import pathlib
import sys

import numpy as np


def _load(root, feature):
  """{seed: {encoder: record}} from probe_<feature>/probe.json and any
  probe_<feature>_<more>/probe.json beside it (e.g. the random-init
  reference, probed later); an encoder's first record wins."""
  runs = {}
  for seed_dir in sorted(pathlib.Path(root).glob("s[0-9]*")):
    main = seed_dir / f"probe_{feature}" / "probe.json"
    if not main.is_file():
      continue
    runs[seed_dir.name] = json.loads(main.read_text())
    for path in sorted(seed_dir.glob(f"probe_{feature}_*/probe.json")):
      for name, rec in json.loads(path.read_text()).items():
        runs[seed_dir.name].setdefault(name, rec)
  return runs


def _stat(values):
  values = [v for v in values if v is not None]
  if not values:
    return "—"
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def table(root, feature):
  runs = _load(root, feature)
  if not runs:
    return f"no probe_{feature}/probe.json under {root}/s*\n"
  first = next(iter(runs.values()))
  lines = [f"### feature: {feature} (seeds: {', '.join(runs)})", "",
           "| encoder | set | n | linear bal. acc | linear F1 | linear AUC "
           "| k-NN bal. acc | kept (linear) | params (M) | GFLOPs | images/s "
           "| latency ms (median / p95) |", "|" + "---|" * 12]
  for name, rec in first.items():
    for set_name in rec["sets"]:
      def col(read, name=name, set_name=set_name):
        return [read(r[name]["sets"][set_name]) for r in runs.values()
                if name in r and set_name in r[name]["sets"]]
      lin = col(lambda s: s["linear"]["balanced_accuracy"])
      kept = [r[name]["sets"][set_name]["linear"]["balanced_accuracy"]
              / r["teacher"]["sets"][set_name]["linear"]["balanced_accuracy"]
              for r in runs.values() if name in r and "teacher" in r]
      lines.append(
          f"| {name} | {set_name} | {len(lin)} | {_stat(lin)} "
          f"| {_stat(col(lambda s: s['linear']['macro_f1']))} "
          f"| {_stat(col(lambda s: s['linear']['auc']))} "
          f"| {_stat(col(lambda s: s['knn']['balanced_accuracy']))} "
          f"| {_stat(kept) if name != 'teacher' else '—'} "
          f"| {rec['size']['params'] / 1e6:.2f} | {rec['size']['gflops']:.4f} "
          f"| {rec['speed']['throughput_images_per_s']:.1f} "
          f"| {rec['speed']['latency_ms_median']:.2f} / "
          f"{rec['speed']['latency_ms_p95']:.2f} |")
  return "\n".join(lines) + "\n"


def compact(root, feature):
  """The README's short form: per encoder, linear-probe balanced accuracy
  on each set (mean ± std over seeds), size and speed (first seed)."""
  runs = _load(root, feature)
  first = next(iter(runs.values()))
  sets = list(first["teacher"]["sets"])
  lines = ["| encoder | " + " | ".join(sets) + " | params (M) | GFLOPs "
           "| images/s | ms (batch 1) |", "|---|" + "---:|" * (len(sets) + 4)]
  for name, rec in first.items():
    accs = [[r[name]["sets"][s]["linear"]["balanced_accuracy"]
             for r in runs.values() if name in r] for s in sets]
    # The same value on every seed (the teacher, trained once): no ±.
    accs = [f"{a[0]:.3f}" if len(set(a)) == 1 else _stat(a) for a in accs]
    lines.append(f"| {name} | " + " | ".join(accs) +
                 f" | {rec['size']['params'] / 1e6:.2f} "
                 f"| {rec['size']['gflops']:.3f} "
                 f"| {rec['speed']['throughput_images_per_s']:.0f} "
                 f"| {rec['speed']['latency_ms_median']:.1f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  if "--readme" in sys.argv:
    print(compact(sys.argv[1], "embedding"))
  else:
    for feat in ("embedding", "pooled"):
      print(table(sys.argv[1], feat))
