"""The structured-KD ablation table over data sets, from merged studies.

    python docs/skd/make_table.py docs/skd/results [--readme]

Reads <root>/<set>/study.json (the `kd_jax.study --merge` output of one
data set, e.g. docs/skd/results/acdc) for every set present and prints,
per set, each arm's mIoU over all classes (background included, the
paper's convention) and over the foreground classes, the IoU of each
class, pixel accuracy, mean HD95 and the model's params and GFLOPs, mean ±
sample std over the study's seeds (as study.json has them), then the share
of the teacher–student mIoU (all) gap each arm closes. --readme: the same
as compact as the README needs: scores in percent (whole, pixel accuracy
to 0.1; HD95 in whole pixels), as the paper's mIoU, the foreground classes'
IoU under short names only where there are several (the background's
follows from the two means), and the models' params and GFLOPs in the line
above the table instead of in columns (every student arm is one model).
"""
import json
import pathlib
import sys

from kd_jax import study as study_lib

# The paper's Table 1 rows in its order, then its comparison rows.
ARMS = {"teacher": "teacher", "student": "student alone", "pixel": "+pixel",
        "pixel_pair": "+pixel +pair", "skd": "+pixel +pair +holistic",
        "mimic": "MIMIC", "at": "attention transfer"}
SETS = {"acdc": "ACDC", "drive": "DRIVE"}  # README order and names.
SHORT = {"background": "BG", "right_ventricle": "RV", "myocardium": "Myo",
         "left_ventricle": "LV"}


def load(root):
  """{set: study.json} under root."""
  return {p.parent.name: json.loads(p.read_text())
          for p in sorted(pathlib.Path(root).glob("*/study.json"))}


def _cell(score, digits, scale=1.0):
  if not score or score.get("mean") is None:
    return "–"
  return "±".join(f"{scale * v:.{digits}f}" for v in (score["mean"],
                                                      score.get("std"))
                  if v is not None)


def _gap(table, arm):
  """The share of the teacher–student mIoU (all) gap `arm` closes."""
  if arm in ("teacher", "student"):
    return "–"
  g = study_lib.gap_closed(*(table.get(a, {}).get("mean_iou_all", {}).get(
      "mean") for a in ("teacher", "student", arm)))
  return "–" if g is None else f"{100 * g:.0f} %"


def _size(info):
  return (f"{info['params'] / 1e6:.2f}" if "params" in info else "–",
          f"{info['gflops']:.3f}" if "gflops" in info else "–")


def table(study, readme=False) -> str:
  """One set's table; readme: the compact form (module docstring)."""
  t = study["table"]
  digits, scale = (0, 100.0) if readme else (3, 1.0)
  classes = study["class_names"]
  if readme:
    # The background's IoU follows from the two means, and a single
    # foreground class's IoU is mIoU (fg): the README leaves them out.
    classes = classes[1:] if len(classes) > 2 else []
  cols = ([("mIoU (all)", "mean_iou_all", digits),
           ("mIoU (fg)", "mean_iou", digits)]
          + [(f"IoU {SHORT.get(c, c) if readme else c}", f"iou/{c}", digits)
             for c in classes]
          + [("pixel acc.", "pixel_accuracy", 1 if readme else 3),
             ("HD95", "mean_hd95", 0 if readme else 1)])
  if all(t[a].get("mean_hd95") is None for a in t):
    cols.pop()
  head = (["arm"] + ([] if readme else ["model", "params (M)", "GFLOPs"])
          + [c[0] for c in cols] + ["gap closed"])
  lines = ["| " + " | ".join(head) + " |",
           "|---|" + ("" if readme else "---|") + "---:|" * (
               len(head) - (1 if readme else 2))]
  for arm, label in ARMS.items():
    if arm not in t:
      continue
    info = study["models"].get(arm, {})
    cells = [label] + ([] if readme else [info.get("model", "–"),
                                          *_size(info)])
    cells += [_cell(t[arm].get(key), d, 1.0 if key == "mean_hd95" else scale)
              for _, key, d in cols]
    cells.append(_gap(t, arm))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def heading(name, study, readme=False) -> str:
  seeds = ", ".join(str(s) for s in study["seeds"])
  if not readme:
    return f"### {name} (seeds {seeds})"
  sizes = [f"{arm} %s M params, %s GFLOPs" % _size(study["models"][arm])
           for arm in ("teacher", "student") if arm in study["models"]]
  return f"**{SETS.get(name, name)}**, seeds {seeds}; " + "; ".join(sizes) + ":"


def main(argv):
  if len(argv) < 2:
    sys.exit(__doc__)
  readme = "--readme" in argv[2:]
  out = []
  studies = load(argv[1])
  order = [s for s in SETS if s in studies] + [
      s for s in studies if s not in SETS]
  for name in order:
    out += [heading(name, studies[name], readme), "",
            table(studies[name], readme), ""]
  print("\n".join(out))


if __name__ == "__main__":
  main(sys.argv)
