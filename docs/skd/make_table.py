"""The structured-KD ablation table over data sets, from merged studies.

    python docs/skd/make_table.py docs/skd/results [--readme]

Reads <root>/<set>/study.json (the `kd_jax.study --merge` output of one
data set, e.g. docs/skd/results/acdc) for every set present and prints,
per set, each arm's mIoU over all classes (background included, the
paper's convention) and over the foreground classes, the IoU of each
class, pixel accuracy, mean HD95 and the model's params and GFLOPs, mean ±
sample std over the study's seeds (as study.json has them), then the share
of the teacher–student mIoU (all) gap each arm closes. --readme: the same
with 2-digit cells (HD95: 1 digit) and no model column.
"""
import json
import pathlib
import sys

from kd_jax import study as study_lib

# The paper's Table 1 rows in its order, then its comparison rows.
ARMS = {"teacher": "teacher", "student": "student alone", "pixel": "+pixel",
        "pixel_pair": "+pixel +pair", "skd": "+pixel +pair +holistic",
        "mimic": "MIMIC", "at": "attention transfer"}


def load(root):
  """{set: study.json} under root."""
  return {p.parent.name: json.loads(p.read_text())
          for p in sorted(pathlib.Path(root).glob("*/study.json"))}


def _cell(score, digits):
  if not score or score.get("mean") is None:
    return "–"
  if score.get("std") is None:
    return f"{score['mean']:.{digits}f}"
  return f"{score['mean']:.{digits}f}±{score['std']:.{digits}f}"


def _gap(table, arm):
  """The share of the teacher–student mIoU (all) gap `arm` closes."""
  if arm in ("teacher", "student"):
    return "–"
  g = study_lib.gap_closed(*(table.get(a, {}).get("mean_iou_all", {}).get(
      "mean") for a in ("teacher", "student", arm)))
  return "–" if g is None else f"{100 * g:.0f} %"


def table(study, digits=3, model=True) -> str:
  t = study["table"]
  names = study["class_names"]
  cols = ([("mIoU (all)", "mean_iou_all", digits),
           ("mIoU (fg)", "mean_iou", digits)]
          + [(f"IoU {c}", f"iou/{c}", digits) for c in names]
          + [("pixel acc.", "pixel_accuracy", digits),
             ("HD95", "mean_hd95", max(digits - 2, 1))])
  head = ["arm"] + (["model"] if model else []) + [
      "params (M)", "GFLOPs"] + [c[0] for c in cols] + ["gap closed"]
  lines = ["| " + " | ".join(head) + " |",
           "|---|" + ("---|" if model else "") + "---:|" * (len(head) - 1
                                                            - model)]
  for arm, label in ARMS.items():
    if arm not in t:
      continue
    info = study["models"].get(arm, {})
    cells = [label] + ([info.get("model", "–")] if model else [])
    cells += [f"{info['params'] / 1e6:.2f}" if "params" in info else "–",
              f"{info['gflops']:.3f}" if "gflops" in info else "–"]
    cells += [_cell(t[arm].get(key), d) for _, key, d in cols]
    cells.append(_gap(t, arm))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) < 2:
    sys.exit(__doc__)
  readme = "--readme" in argv[2:]
  out = []
  for name, study in load(argv[1]).items():
    out += [f"### {name} (seeds {study['seeds']})", "",
            table(study, 2 if readme else 3, model=not readme), ""]
  print("\n".join(out))


if __name__ == "__main__":
  main(sys.argv)
