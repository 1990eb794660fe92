"""The structured-KD ablation table over data sets, from merged studies.

    python docs/skd/make_table.py docs/skd/results [--readme]

Reads <root>/<set>/study.json (the `kd_jax.study --merge` output of one
data set, e.g. docs/skd/results/acdc) for every set present and prints,
per set, each arm's mIoU over all classes (background included, the
paper's convention) and over the foreground classes, the IoU of each
class, pixel accuracy, mean HD95 and the model's params and GFLOPs, mean ±
sample std over the study's seeds (as study.json has them), then the share
of the teacher–student mIoU (all) gap each arm closes. --readme: one
compact table over the sets for the README: scores in percent (whole;
pixel accuracy to 0.1; HD95 in whole pixels), as the paper's mIoU; the
foreground classes' IoU under short names only where there are several
(the background's follows from the two means); HD95 of README_HD95's
sets; the seeds and the models' params and GFLOPs in the line above (every
student arm is one model); rows named by the term each adds; no gap column
for a set whose teacher does not beat its student.
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
README_HD95 = ("acdc",)  # The other sets' HD95 stays in their study.md.
# The README's rows: each adds its term to the row above, as in the paper.
README_ARMS = {"teacher": "teacher", "student": "student alone",
               "pixel": "+pixel", "pixel_pair": "+pair",
               "skd": "+holistic (SKD)", "mimic": "MIMIC", "at": "AT"}
SHORT = {"right_ventricle": "RV", "myocardium": "Myo", "left_ventricle": "LV"}


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


def _columns(study, readme, hd95=True):
  """[(header, key, digits, scale)] of one set's table."""
  digits, scale = (0, 100.0) if readme else (3, 1.0)
  classes = study["class_names"]
  if readme:
    # The background's IoU follows from the two means, and a single
    # foreground class's IoU is mIoU (fg): the README leaves them out.
    classes = classes[1:] if len(classes) > 2 else []
  cols = ([("mIoU (all)", "mean_iou_all", digits, scale),
           ("mIoU (fg)", "mean_iou", digits, scale)]
          + [(f"IoU {SHORT.get(c, c) if readme else c}", f"iou/{c}", digits,
              scale) for c in classes]
          + [("pixel acc.", "pixel_accuracy", 1 if readme else 3, scale),
             ("HD95", "mean_hd95", 0 if readme else 1, 1.0)])
  if not hd95 or all(row.get("mean_hd95") is None
                    for row in study["table"].values()):
    cols.pop()
  return cols


def _has_gap(study):
  """Whether the teacher beats the student (else no gap to close)."""
  return any(_gap(study["table"], arm) != "–" for arm in study["table"])


def _cells(study, arm, cols, gap=True):
  row = study["table"].get(arm, {})
  return [_cell(row.get(key), d, scale) for _, key, d, scale in cols] + (
      [_gap(study["table"], arm)] if gap else [])


def table(study) -> str:
  """One set's full table."""
  cols = _columns(study, readme=False)
  head = ["arm", "model", "params (M)", "GFLOPs"] + [c[0] for c in cols] + [
      "gap closed"]
  lines = ["| " + " | ".join(head) + " |",
           "|---|---|" + "---:|" * (len(head) - 2)]
  for arm, label in ARMS.items():
    if arm in study["table"]:
      info = study["models"].get(arm, {})
      cells = [label, info.get("model", "–"), *_size(info)]
      lines.append("| " + " | ".join(cells + _cells(study, arm, cols)) + " |")
  return "\n".join(lines)


def readme(studies) -> str:
  """All sets in one compact table (module docstring), their seeds and
  model sizes in the line above."""
  names = [s for s in SETS if s in studies] + [
      s for s in studies if s not in SETS]
  cols = {n: _columns(studies[n], readme=True, hd95=n in README_HD95)
          for n in names}
  about = []
  for n in names:
    models = studies[n]["models"]
    # Every study has both; the units once: "teacher 4.42 M params, 0.466
    # GFLOPs at 64²; student 0.82 M, 0.077" (GFLOPs of one whole image).
    side = studies[n]["config"]["data"]["image_size"]
    sizes = [("teacher %s M params, %s GFLOPs" % _size(models["teacher"]))
             + f" at {side}²",
             "student %s M, %s" % _size(models["student"])]
    seeds = ", ".join(str(s) for s in studies[n]["seeds"])
    about.append(f"{SETS.get(n, n)} (seeds {seeds}): " + "; ".join(sizes))
  head = ["arm"]
  for n in names:
    head += [f"{SETS.get(n, n)} {cols[n][0][0]}"] + [c[0] for c in cols[n][1:]]
    if _has_gap(studies[n]):  # A column of dashes says nothing.
      head.append("gap closed")
  lines = [". ".join(about) + ".", "",
           "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
  for arm, label in README_ARMS.items():
    if any(arm in studies[n]["table"] for n in names):
      cells = [label]
      for n in names:
        cells += _cells(studies[n], arm, cols[n], _has_gap(studies[n]))
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) < 2:
    sys.exit(__doc__)
  studies = load(argv[1])
  if "--readme" in argv[2:]:
    print(readme(studies))
    return
  out = []
  for name, study in studies.items():
    seeds = ", ".join(str(s) for s in study["seeds"])
    out += [f"### {name} (seeds {seeds})", "", table(study), ""]
  print("\n".join(out))


if __name__ == "__main__":
  main(sys.argv)
