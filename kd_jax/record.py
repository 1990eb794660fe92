"""Run records: the config each stage's checkpoints were trained under.

Each stage folder holds `run_record.json`: the kd_jax version, the flat
settings that define the stage's result (`defining`) and a history of the
config changes it was allowed to continue through. A rerun compares the
record with its config before any stage trains (`resolve`): identical, the
stage resumes or is reused; different in a defining key while the stage has
checkpoints, the run stops with one line naming the stage and each key's
old → new value, unless the user chose `restart` (the stage's files are
moved to `<stage>/set_aside/<time>/`, never deleted, and it trains anew) or
`allow_config_change` (it continues under the new config; the change goes
into the record's history).

What defines a stage's result: its resolved settings (`train.stage_config`:
method, model, losses, steps, optimizer, seed, data, teacher, ...), every
run-wide key except those in `NOT_DEFINING` (batch size, heads, compute
dtype, layers, teacher cache, and any key added later), and the defining
settings of each earlier stage it reads (a teacher `stage=`), under
`<stage>/...`. How often a run logs, evaluates or saves, and what it does
on a non-finite step, change nothing it computes.
"""
import datetime
import json
import os

import jax
from absl import logging

import kd_jax
from kd_jax import train

RECORD_FILE = "run_record.json"
# Where `restart` moves a stage's earlier files, inside the stage folder.
SET_ASIDE = "set_aside"
# Run-wide keys that change how a run is watched or saved, not its result.
# `eval_window` is how the trained models are evaluated.
# `epochs` is a config's own reference its `steps` are computed from (the
# resolved steps are recorded); `study` holds kd_jax.study's read-out;
# `teacher_cache` is where the teacher's outputs come from (a float32 cache
# holds the live teacher's; its dtype and top-k are defining).
# `mesh`, `shard_student` and `remat` say where arrays live and what the
# backward recomputes (the same numbers to float rounding), so a run may
# resume on another mesh.
NOT_DEFINING = frozenset({"log_every", "eval_every", "checkpoint_every",
                          "on_nonfinite", "max_skipped_steps", "epochs",
                          "study", "mesh", "shard_student", "remat",
                          "teacher_cache", "eval_window"})
# Data options that change how batches are read, not which: the same
# batches come with 0 or N loader workers.
NOT_DEFINING_DATA = frozenset({"data.workers"})
# Options recorded only where they differ from this default, so that a
# record written before they existed still matches a config at it.
# (`augment_on_device` changes the views by float32 round-off, label maps
# at half-pixel ties, and quantises before the warp with uint8.)
QUIET_DEFAULTS = {"data.transfer_dtype": "float32",
                  "data.augment_on_device": False}
# Run-wide keys recorded through each stage's resolved settings.
_IN_STAGE = frozenset({"stages", "stage_order", "steps", "seed", "optimizer",
                       "data"})


def _jsonable(value):
  """Plain JSON values (tuples → lists, ConfigDicts → dicts), so a record
  read back compares equal to one built now."""
  def plain(v):
    v = train._plain(v)
    if isinstance(v, dict):
      return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [plain(x) for x in v]
    return v
  return json.loads(json.dumps(plain(value), default=str))


def _flatten(value, prefix, out):
  if isinstance(value, dict) and value:
    for k in sorted(value):
      _flatten(value[k], f"{prefix}.{k}" if prefix else str(k), out)
  else:
    out[prefix] = value
  return out


def _upstream(value) -> set:
  """The values of every `stage` key in a stage's settings: the earlier
  stages it reads (a teacher, ensemble members)."""
  found = set()
  if isinstance(value, dict):
    for k, v in value.items():
      if k == "stage" and isinstance(v, str) and v:
        found.add(v)
      found |= _upstream(v)
  elif isinstance(value, list):
    for v in value:
      found |= _upstream(v)
  return found


def defining(config, name: str, _seen=()) -> dict:
  """The flat settings (`"optimizer.lr": 0.003`, `"losses.cwd.weight": 3.0`,
  `"teacher/model.width": 16`) that define stage `name`'s result."""
  stage = train.stage_config(config, name)
  stage["losses"] = {t["name"]: {k: v for k, v in t.items() if k != "name"}
                     for t in stage["losses"]}
  stage = _jsonable(stage)
  out = {k: v for k, v in _flatten(stage, "", {}).items()
         if k not in NOT_DEFINING_DATA
         and not (k in QUIET_DEFAULTS and v == QUIET_DEFAULTS[k])}
  for key in sorted(set(config) - NOT_DEFINING - _IN_STAGE):
    _flatten(_jsonable(config[key]), key, out)
  for up in sorted(_upstream(stage)):
    if up in config.stages and up != name and up not in _seen:
      for k, v in defining(config, up, _seen + (name,)).items():
        out[f"{up}/{k}"] = v
  return out


def path(stage_dir: str) -> str:
  return os.path.join(stage_dir, RECORD_FILE)


def read(stage_dir: str):
  """The stage's record (a dict), or None where it has none. A record that
  does not parse is a ConfigError naming the file."""
  try:
    with open(path(stage_dir), encoding="utf-8") as f:
      rec = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise train.ConfigError(
        f"{path(stage_dir)} does not read ({e}): move it away to record the "
        "current config, or use another --workdir") from None
  if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict):
    raise train.ConfigError(
        f"{path(stage_dir)} holds no run record: move it away to record the "
        "current config, or use another --workdir")
  return rec


def write(stage_dir: str, record: dict) -> None:
  """Writes the record atomically (a temporary file renamed over it), so a
  kill leaves the old record or the new one, never half of one."""
  if jax.process_index() != 0:
    return
  os.makedirs(stage_dir, exist_ok=True)
  tmp = path(stage_dir) + f".tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path(stage_dir))


def new_record(config, name: str) -> dict:
  return {"kd_jax_version": kd_jax.__version__,
          "config": defining(config, name), "history": []}


_UNSET = "<unset>"


def differences(old: dict, new: dict) -> dict:
  """{key: (old value, new value)} of the keys whose values differ
  (`"<unset>"` for a key one side lacks)."""
  return {k: (old.get(k, _UNSET), new.get(k, _UNSET))
          for k in sorted(set(old) | set(new))
          if old.get(k, _UNSET) != new.get(k, _UNSET)}


def _schedules(flat: dict) -> set:
  """The schedules of the stage's own optimizers (not an earlier stage's);
  `cosine` where none is set (`train.make_optimizer`'s default)."""
  found = {v for k, v in flat.items() if "/" not in k and (
      k == "optimizer.schedule"
      or (k.startswith("optimizers.") and k.endswith(".schedule")))}
  return found if "optimizer.schedule" in flat else found | {"cosine"}


def continues(diff: dict, old: dict, new: dict) -> bool:
  """Whether `diff` only raises `steps` under a schedule that does not read
  the total steps: then training on from the old end is exactly a longer
  run. `train.make_optimizer` spreads `cosine` and `poly` decay over the
  stage's steps (more steps change the learning rate of every step after
  the warm-up), while `plateau` reads them only to cut a warm-up longer
  than the stage, so only `plateau` with `warmup_steps` < the old steps
  continues."""
  if set(diff) != {"steps"}:
    return False
  before, after = diff["steps"]
  if not (isinstance(before, int) and isinstance(after, int)
          and after > before):
    return False
  warmups = [v for k, v in new.items()
             if "/" not in k and k.endswith("warmup_steps")]
  return (_schedules(old) == _schedules(new) == {"plateau"}
          and all(int(w) < before for w in warmups))


def _has_checkpoints(stage_dir: str) -> bool:
  folder = os.path.join(stage_dir, "checkpoints")
  return os.path.isdir(folder) and any(d.isdigit()
                                       for d in os.listdir(folder))


def describe(diff: dict) -> str:
  """`optimizer.lr 0.003 → 0.001, losses.cwd.weight 3.0 → 0.0`."""
  def show(v):
    return v if v == _UNSET else json.dumps(v)
  return ", ".join(f"{k} {show(a)} → {show(b)}" for k, (a, b) in diff.items())


def _set_aside(stage_dir: str) -> str:
  """Moves everything in the stage folder but its lock and earlier set-aside
  files into `set_aside/<UTC time>/`; returns that folder."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y%m%dT%H%M%S")
  dst = os.path.join(stage_dir, SET_ASIDE, stamp)
  n = 1
  while os.path.exists(dst):
    dst = os.path.join(stage_dir, SET_ASIDE, f"{stamp}.{n}")
    n += 1
  os.makedirs(dst)
  for entry in os.listdir(stage_dir):
    if entry not in (SET_ASIDE, train.LOCK_FILE):
      os.rename(os.path.join(stage_dir, entry), os.path.join(dst, entry))
  return dst


_OPTIONS = ("use a new --workdir, or --restart to set its checkpoints aside "
            "and train it anew, or --allow_config_change to continue it "
            "under the new config")


def _plan(config, name, stage_dir, restart, allow_config_change):
  """(what to do, old record, differences) for one stage; what to do is
  "write" (no record, or nothing trained yet), "same", "continue" (steps
  raised, `continues`), "restart", "allow" or "refuse"."""
  old = read(stage_dir) if os.path.isdir(stage_dir) else None
  if old is None or not _has_checkpoints(stage_dir):
    return "write", old, {}
  diff = differences(old["config"], defining(config, name))
  if not diff:
    return "same", old, diff
  if continues(diff, old["config"], defining(config, name)):
    return "continue", old, diff
  if restart:
    return "restart", old, diff
  return ("allow" if allow_config_change else "refuse"), old, diff


def _apply(config, name, stage_dir, plan, old, diff) -> None:
  if plan == "same":
    if old.get("kd_jax_version") != kd_jax.__version__:
      logging.warning("stage %s was recorded under kd_jax %s; this is %s",
                      name, old.get("kd_jax_version"), kd_jax.__version__)
    return
  rec = new_record(config, name)
  if plan == "write":
    if old is None and _has_checkpoints(stage_dir):
      logging.warning("stage %s has checkpoints but no %s (trained before "
                      "run records): recording the current config", name,
                      RECORD_FILE)
    if old is not None:  # Nothing trained under it: replaced, history kept.
      rec["history"] = list(old.get("history", []))
    write(stage_dir, rec)
    return
  change = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "action": {"continue": "steps raised", "restart": "restart",
                       "allow": "allow_config_change"}[plan],
            "kd_jax_version": kd_jax.__version__,
            "changed": {k: list(v) for k, v in diff.items()}}
  if plan == "restart":
    if jax.process_index() == 0:
      change["set_aside"] = _set_aside(stage_dir)
      logging.warning("stage %s: --restart moved its earlier files to %s "
                      "(%s)", name, change["set_aside"], describe(diff))
  else:
    logging.warning("stage %s continues under a changed config (%s)", name,
                    describe(diff))
  rec["history"] = list(old.get("history", [])) + [change]
  write(stage_dir, rec)


def resolve(config, workdir: str, *, restart=False, allow_config_change=False,
            dry_run=False) -> None:
  """Compares every stage's record in `workdir` with `config`, and records.

  Raises ConfigError, before anything is written, naming each stage trained
  under another config (its differing keys, old → new) unless `restart` or
  `allow_config_change` says what to do with it. With `dry_run` only checks
  (the validation pass, before the locks); else, under the run's locks:
  writes the record of a stage that has none (or no checkpoints yet), sets
  a restarted stage's files aside, and notes an allowed change (or a
  `continues` raise of steps) in the record's history."""
  plans, refused = [], []
  for name in config.stage_order:
    stage_dir = os.path.join(workdir, name)
    plan = _plan(config, name, stage_dir, restart, allow_config_change)
    plans.append((name, stage_dir) + plan)
    if plan[0] == "refuse":
      refused.append(f"stage {name!r}: {describe(plan[2])}")
  if refused:
    raise train.ConfigError(
        f"workdir {workdir} was trained under another config ("
        + "; ".join(refused) + "): use a new --workdir, or --restart to set "
        "those stages' checkpoints aside and train them anew, or "
        "--allow_config_change to continue them under the new config")
  if not dry_run:
    for args in plans:
      _apply(config, *args)


def ensure(config, name: str, workdir: str) -> None:
  """`resolve` for one stage trained on its own (`train.train_stage`):
  records its config, and refuses (ConfigError) checkpoints trained under
  another config that no `resolve` settled."""
  stage_dir = os.path.join(workdir, name)
  plan = _plan(config, name, stage_dir, False, False)
  if plan[0] == "refuse":
    raise train.ConfigError(
        f"stage {name!r} in {workdir} was trained under another config ("
        f"{describe(plan[2])}): {_OPTIONS}")
  _apply(config, name, stage_dir, *plan)
