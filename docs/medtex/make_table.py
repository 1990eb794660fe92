"""The MED-TEX tables over data sets and fractions, from merged studies.

    python docs/medtex/make_table.py docs/medtex/results [--readme]

Reads <root>/<set>/fraction<f>/study.json (the `kd_jax.study --merge`
output of one data set, e.g. docs/medtex/results/palm) for every set and
fraction present and prints, per set, each arm's post-hoc agreement with
the teacher (accuracy and positive-class F1, MED-TEX's read-out) at every
fraction, mean ± sample std over the study's seeds (as study.json has
them; the teacher row: its own accuracy against the labels). --readme: one
compact table, set × fraction columns, "agreement accuracy/F1", each
mean±std in whole percent (one val image is 1.25 % on PALM, 1.2 % on
IDRiD).
"""
import json
import pathlib
import sys

ARMS = {"teacher": "teacher (acc.)", "student": "student alone",
        "kd": "KD", "vid": "VID", "med_ex": "MED-EX", "med_tex": "MED-TEX",
        "attention": "soft attention", "l2x": "L2X"}


SETS = {"palm": "PALM", "idrid": "IDRiD"}  # README order and names.


def load(root):
  """{set: {fraction: study.json}} under root."""
  out = {}
  for path in sorted(pathlib.Path(root).glob("*/fraction*/study.json")):
    fraction = float(path.parent.name[len("fraction"):])
    out.setdefault(path.parent.parent.name, {})[fraction] = json.loads(
        path.read_text())
  return {s: dict(sorted(f.items())) for s, f in out.items()}


def _cell(score, digits=3, sep=" ± ", scale=1.0):
  if not score or score.get("mean") is None:
    return "–"
  return sep.join(f"{scale * v:.{digits}f}" for v in (score["mean"],
                                                      score.get("std"))
                  if v is not None)


def _short(score):
  """A README cell: whole percent (one val image is 1.2–1.25 %)."""
  return _cell(score, 0, "±", 100.0)


def _scores(study, arm):
  row = study["table"].get(arm, {})
  if arm == "teacher":
    return row.get("accuracy"), None
  return row.get("fidelity_accuracy"), row.get("fidelity_f1_positive")


def tables(root) -> str:
  lines = []
  for name, fractions in load(root).items():
    lines += [f"### {name}", "",
              "| arm | " + " | ".join(
                  f"{f:g}: agreement acc. | {f:g}: agreement F1"
                  for f in fractions) + " |",
              "|---|" + "---:|---:|" * len(fractions)]
    for arm, label in ARMS.items():
      cells = []
      for study in fractions.values():
        acc, f1 = _scores(study, arm)
        cells += [_cell(acc), _cell(f1)]
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    seeds = {f: s["seeds"] for f, s in fractions.items()}
    lines += ["", f"seeds per fraction: {seeds}", ""]
  return "\n".join(lines)


def readme(root) -> str:
  data = load(root)
  order = [n for n in SETS if n in data] + sorted(set(data) - set(SETS))
  cols = [(n, f) for n in order for f in data[n]]
  lines = ["| arm | " + " | ".join(f"{SETS.get(n, n)} {100 * f:g} %"
                                   for n, f in cols) + " |",
           "|---|" + "---:|" * len(cols)]
  for arm, label in ARMS.items():
    cells = []
    for n, f in cols:
      acc, f1 = _scores(data[n][f], arm)
      cells.append(_short(acc) if arm == "teacher" else
                   f"{_short(acc)}/{_short(f1)}")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) < 2:
    sys.exit(__doc__)
  print(readme(sys.argv[1]) if "--readme" in sys.argv[2:] else
        tables(sys.argv[1]))
