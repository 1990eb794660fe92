"""Frozen-encoder read-out: linear probes, k-NN, speed and size.

    python -m kd_jax.probe --encoders=runs/enc/teacher,runs/enc/global_cos \\
        --sets=pneumoniamnist,palm,idrid --image_size=224 --out=runs/enc/probe

Each encoder is a folder, frozen as it is:

- a teacher made by `python -m kd_jax.convert` (its `model.json` names the
  model),
- a stage folder of a run (`<workdir>/<stage>`; the model is read from its
  `run_record.json`, or given with `--model` / `--model_args`),
- a folder written by `python -m kd_jax.export`.

`label=folder` names a row (default: the folder's name). `label=init:folder`
is that folder's architecture freshly initialised (`--seed`), its
checkpoint unread: the random-encoder reference a distilled student has to
beat. A checkpoint that does not fit the model is one line naming the
first parameter that differs and both shapes.

Embeddings. `--feature=embedding` (the default) takes the model's
`features["embedding"]`: a ViT's [CLS] token after the final LayerNorm, an
EfficientViT's pooled head vector. Any other feature name is mean-pooled
over its positions (an NHWC map over H, W; NLD tokens over L), e.g.
`--feature=tokens` (a ViT's patch tokens) or `--feature=stage4` (an
EfficientViT's last map). A list takes, per encoder, the first name its
model offers: `--feature=stage4,tokens` probes the students' mean-pooled
last map and the ViT teacher's mean-pooled patch tokens (the dense arms
never train the students' head, so their "embedding" is a fixed random
projection of the last map). The JSON records the feature used. Images are the registry's, at `--image_size` in
RGB (PneumoniaMNIST's grey images repeated over 3 channels), as training
feeds them ([0, 1], no further normalisation).

Labelled sets (`--sets`), built by `kd_jax.data` from the shared folder:

    pneumoniamnist  "label": normal / pneumonia
    palm            "label": high myopia / normal / pathologic myopia
    idrid           "dr_grade": DR grade 0-4 (IDRiD grading)

Splits: the probe trains on the registry's train split and is scored on its
test split, which for these sets is the registry's val split (the official
test splits are not in the shared folder; the JSON says `test_is_val`).
The linear probe's C is chosen on a seeded stratified `--val_fraction` of
the train split (highest balanced accuracy; on a tie, as on a separable
val split, the lowest log-loss), then refit on the whole train split.

Read-outs, fitted on the encoder's float32 embeddings:

- linear: scikit-learn `LogisticRegression` (lbfgs, multinomial) on
  features standardised with the train split's mean and std
  (`StandardScaler`), C from `--cs`;
- knn: `KNeighborsClassifier(k, metric="cosine")` on the raw embeddings,
  votes weighted equally; its class probabilities are the vote fractions.

Scores on the test split: balanced accuracy, macro F1 (scikit-learn's
`balanced_accuracy_score`, `f1_score(average="macro")`) and AUC
(`roc_auc_score`: the positive class's probability for two classes,
one-vs-rest macro over the classes for more; null when the test split lacks
a class).

Speed, on the device the command runs on (`jax.devices()[0]`), for the
eval forward up to the chosen feature, jitted, compile excluded:
throughput in images/s at batch `--speed_batch` (`--speed_repeats` timed
calls after a warm-up call), and latency at batch 1 over `--latency_runs`
timed calls after `--warmup` untimed ones (median and 95th percentile, in
ms; each call waits for its result). Size: parameters (the "params"
collection) and GFLOPs of one image's eval forward as XLA counts them
(`kd_jax.models.summary`: a multiply-add is 2 FLOPs).

`--reference=<label>` (e.g. the teacher) adds, per set and read-out,
`kept`: each encoder's balanced accuracy divided by the reference's.

Outputs in `--out`: `probe.json` (per encoder: model, feature, size,
speed, and per set and read-out the scores and the chosen C),
`probe.md` (one table row per encoder and set) and `probe.png` (per set,
the linear probe's balanced accuracy against images/s, one labelled point
per encoder).
"""
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import models

# name → (data config, label key, short description).
SETS = {
    "pneumoniamnist": (dict(name="pneumoniamnist", channels=3), "label",
                       "PneumoniaMNIST, normal / pneumonia"),
    "palm": (dict(name="palm", num_classes=3), "label",
             "PALM, 3 classes"),
    "idrid": (dict(name="idrid_grading"), "dr_grade",
              "IDRiD DR grade 0-4"),
}
DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0)


# ----------------------------------------------------------------------------
# Encoders.


def _tuples(x):
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def _record_model(folder: str):
  """The model config in a stage folder's run_record.json, or None."""
  path = os.path.join(folder, "run_record.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    flat = json.load(f).get("config", {})
  model = {k[len("model."):]: _tuples(v) for k, v in flat.items()
           if k.startswith("model.")}
  return model if model.get("name") else None


def _param_shapes(tree) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape)
          for path, x in flat}


def check_fits(folder: str, saved: dict, built: dict, name: str) -> None:
  """Raises ValueError (one line) naming the first parameter path (sorted)
  at which the checkpoint's shapes `saved` and the model's `built` differ,
  with both shapes ("absent" where one side lacks it)."""
  for key in sorted(saved.keys() | built.keys()):
    if saved.get(key) != built.get(key):
      got = saved.get(key, "absent")
      want = built.get(key, "absent")
      raise ValueError(
          f"encoder {folder}: the checkpoint does not fit model {name!r}: "
          f"{key} is {got} in the checkpoint, {want} in the model; give "
          "--model/--model_args as the encoder was trained")


INIT = "init:"


def load_encoder(folder: str, model_config=None, image_size=None,
                 seed: int = 0):
  """(module, variables, model config) of the encoder in `folder` (see the
  module docstring); `model_config` (dict(name=..., **fields)) overrides
  what the folder says. `image_size` is the probe's input side, used to
  check the checkpoint's shapes. `init:<folder>`: the folder's model with
  fresh variables (`jax.random.key(seed)`)."""
  from kd_jax import checkpoint, export  # pylint: disable=g-import-not-at-top
  if folder.startswith(INIT):
    module, variables, cfg = load_encoder(folder[len(INIT):], model_config,
                                          image_size)
    size = image_size or models.default_input(cfg["name"])[1]
    fresh = module.init(jax.random.key(seed),
                        jnp.zeros((1, size, size, 3), jnp.float32),
                        train=False)
    return module, fresh, cfg
  spec_path = os.path.join(folder, "model.json")
  spec = None
  if os.path.isfile(spec_path):
    with open(spec_path) as f:
      spec = json.load(f)
  if model_config is None and spec is not None and "format" in spec:
    module, variables = export.load(folder)
    part = spec["model"]
    return module, variables, dict(name=part.get("name"),
                                   **part.get("kwargs", {}))
  if model_config is None and spec is not None:
    model_config = dict(spec["model"])
  if model_config is None:
    model_config = _record_model(folder)
  if model_config is None:
    raise ValueError(f"encoder {folder}: no model.json and no "
                     "run_record.json naming its model; give --model (and "
                     "--model_args)")
  cfg = dict(model_config)
  name = cfg.pop("name")
  module = models.build(name, **{k: _tuples(v) for k, v in cfg.items()})
  saved = checkpoint.saved_model_shapes(folder)
  if saved is not None:
    size = image_size or models.default_input(name)[1]
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    built = jax.eval_shape(lambda x: module.init(jax.random.key(0), x,
                                                 train=False), x)
    check_fits(folder, saved, _param_shapes(built["params"]), name)
  variables = checkpoint.load_model_variables(folder)
  return module, variables, dict(model_config)


# ----------------------------------------------------------------------------
# Embeddings.


def pool(feature: jax.Array) -> jax.Array:
  """(B, D) as it is; NLD tokens averaged over L; NHWC maps over H, W."""
  if feature.ndim == 2:
    return feature
  return jnp.mean(feature, axis=tuple(range(1, feature.ndim - 1)))


def pick_feature(module, variables, image_shape, names) -> str:
  """The first of `names` that the model's features hold (by tracing)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  feats = jax.eval_shape(
      lambda v, x: module.apply(v, x, train=False)[1], variables, x)
  for name in names:
    if name in feats:
      return name
  raise ValueError(f"--feature {','.join(names)}: the model offers none of "
                   f"them; it offers {sorted(feats)}")


def forward(module, feature: str):
  """Jitted (variables, images) -> (B, D) float32 embeddings."""
  def fn(variables, images):
    _, feats = module.apply(variables, images, train=False)
    if feature not in feats:
      raise ValueError(f"--feature {feature!r}: the model offers "
                       f"{sorted(feats)}")
    return pool(feats[feature]).astype(jnp.float32)
  return jax.jit(fn)


def extract(fn, variables, source, label_key: str, batch_size: int):
  """(embeddings (N, D), labels (N,)) of every example of `source`, in its
  order (padding of the last batch dropped)."""
  from kd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  embs, labels = [], []
  for batch in pipeline.eval_batches(source, batch_size=batch_size,
                                     shard_index=0, shard_count=1):
    valid = batch["valid"]
    embs.append(np.asarray(fn(variables, batch["image"]))[valid])
    labels.append(np.asarray(batch[label_key])[valid])
  return (np.concatenate(embs).astype(np.float32),
          np.concatenate(labels).astype(np.int64))


# ----------------------------------------------------------------------------
# Read-outs.


def scores(y_true, y_pred, proba, num_classes: int) -> dict:
  """Balanced accuracy, macro F1 and AUC (see the module docstring)."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  out = dict(balanced_accuracy=float(metrics.balanced_accuracy_score(
      y_true, y_pred)), macro_f1=float(metrics.f1_score(
          y_true, y_pred, average="macro", labels=np.arange(num_classes),
          zero_division=0)))
  if len(np.unique(y_true)) < num_classes:
    out["auc"] = None  # AUC of a class the split lacks is undefined.
  elif num_classes == 2:
    out["auc"] = float(metrics.roc_auc_score(y_true, proba[:, 1]))
  else:
    out["auc"] = float(metrics.roc_auc_score(
        y_true, proba, multi_class="ovr", average="macro",
        labels=np.arange(num_classes)))
  return out


def _full_proba(model, x, num_classes):
  """(N, num_classes) probabilities, zero for classes the fit never saw."""
  proba = np.zeros((len(x), num_classes))
  proba[:, model.classes_] = model.predict_proba(x)
  return proba


def _linear(c, seed):
  from sklearn import linear_model, pipeline, preprocessing  # pylint: disable=g-import-not-at-top
  return pipeline.make_pipeline(
      preprocessing.StandardScaler(),
      linear_model.LogisticRegression(C=c, max_iter=2000, random_state=seed))


def _val_split(y, fraction, seed):
  """Stratified seeded (fit indices, val indices) of the train labels."""
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  idx = np.arange(len(y))
  counts = np.bincount(y)
  strat = y if counts[counts > 0].min() >= 2 else None
  return model_selection.train_test_split(idx, test_size=fraction,
                                          random_state=seed, stratify=strat)


def linear_probe(train_x, train_y, test_x, num_classes, *, cs=DEFAULT_CS,
                 val_fraction=0.2, seed=0) -> tuple:
  """(predictions, probabilities, chosen C, {C: (val balanced accuracy, val
  log-loss)}) of the logistic-regression probe (module docstring)."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  # float64: probabilities that sum to 1 as scikit-learn's metrics expect.
  train_x, test_x = (np.asarray(a, np.float64) for a in (train_x, test_x))
  cs = tuple(float(c) for c in cs)
  val = {}
  if len(cs) > 1:
    fit, held = _val_split(train_y, val_fraction, seed)
    for c in cs:
      m = _linear(c, seed).fit(train_x[fit], train_y[fit])
      proba = _full_proba(m, train_x[held], num_classes)
      val[c] = (float(metrics.balanced_accuracy_score(
          train_y[held], m.predict(train_x[held]))),
                float(metrics.log_loss(train_y[held], proba,
                                       labels=np.arange(num_classes))))
  # Ties in accuracy (a separable val split) go to the lower log-loss.
  best = max(cs, key=lambda c: (val[c][0], -val[c][1]) if val else 0)
  m = _linear(best, seed).fit(train_x, train_y)
  return (m.predict(test_x), _full_proba(m, test_x, num_classes), best, val)


def knn_probe(train_x, train_y, test_x, num_classes, *, k=20) -> tuple:
  """(predictions, vote fractions) of the cosine k-NN classifier."""
  from sklearn import neighbors  # pylint: disable=g-import-not-at-top
  m = neighbors.KNeighborsClassifier(n_neighbors=min(k, len(train_x)),
                                     metric="cosine")
  m.fit(train_x, train_y)
  return m.predict(test_x), _full_proba(m, test_x, num_classes)


# ----------------------------------------------------------------------------
# Speed and size.


def speed(fn, variables, image_shape, *, batch=256, repeats=5, warmup=10,
          runs=100) -> dict:
  """Throughput (images/s at `batch`) and batch-1 latency (median, p95 in
  ms) of `fn(variables, images)` on jax's default device."""
  device = jax.devices()[0]
  variables = jax.device_put(variables, device)
  big = jax.device_put(jnp.zeros((batch, *image_shape), jnp.float32), device)
  jax.block_until_ready(fn(variables, big))  # Compile, then time.
  t = time.perf_counter()
  for _ in range(repeats):
    out = fn(variables, big)
  jax.block_until_ready(out)
  throughput = repeats * batch / (time.perf_counter() - t)
  one = jax.device_put(jnp.zeros((1, *image_shape), jnp.float32), device)
  for _ in range(warmup + 1):
    jax.block_until_ready(fn(variables, one))
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(fn(variables, one))
    times.append(time.perf_counter() - t)
  ms = np.asarray(times) * 1e3
  return dict(device=str(device.device_kind), platform=device.platform,
              throughput_images_per_s=float(throughput),
              throughput_batch=int(batch),
              latency_ms_median=float(np.median(ms)),
              latency_ms_p95=float(np.percentile(ms, 95)),
              latency_runs=int(runs))


def size(module, image_shape) -> dict:
  s = models.summary(module, (1, *image_shape))
  return dict(params=int(s["params"]), gflops=s["flops"] / 1e9)


# ----------------------------------------------------------------------------
# The command.


def parse_encoders(items) -> list:
  """[(label, folder)] from "folder" or "label=folder" items."""
  out = []
  for item in items:
    label, sep, folder = item.partition("=")
    if not sep:
      label, folder = os.path.basename(os.path.normpath(item)), item
    if not os.path.isdir(folder.removeprefix(INIT)):
      raise ValueError(f"--encoders: {folder.removeprefix(INIT)!r} is not "
                       "a folder")
    out.append((label, folder))
  return out


def build_set(name: str, image_size: int, root: str = ""):
  """(Datasets, label key) of probe set `name` at `image_size`, RGB."""
  from kd_jax import data  # pylint: disable=g-import-not-at-top
  if name not in SETS:
    raise ValueError(f"--sets: unknown set {name!r}; choose from "
                     f"{sorted(SETS)}")
  cfg, label, _ = SETS[name]
  cfg = dict(cfg, image_size=int(image_size), root=root)
  return data.build(cfg), label


def probe_encoder(module, variables, sets, *, feature="embedding",
                  batch_size=64, cs=DEFAULT_CS, k=20, val_fraction=0.2,
                  seed=0) -> dict:
  """{set name: {"linear": scores, "knn": scores, ...}} for one encoder
  over `sets` ({name: (Datasets, label key)})."""
  fn = forward(module, feature)
  out = {}
  for name, (ds, label) in sets.items():
    n_cls = ds.targets[label].num_classes
    train_x, train_y = extract(fn, variables, ds.train, label, batch_size)
    test_x, test_y = extract(fn, variables, ds.test, label, batch_size)
    pred, proba, c, val = linear_probe(train_x, train_y, test_x, n_cls,
                                           cs=cs, val_fraction=val_fraction,
                                           seed=seed)
    k_pred, k_proba = knn_probe(train_x, train_y, test_x, n_cls, k=k)
    out[name] = dict(
        linear=dict(scores(test_y, pred, proba, n_cls), C=c,
                    val_balanced_accuracy={str(a): b[0]
                                           for a, b in val.items()},
                    val_log_loss={str(a): b[1] for a, b in val.items()}),
        knn=dict(scores(test_y, k_pred, k_proba, n_cls),
                 k=min(k, len(train_x))),
        num_train=len(train_y), num_test=len(test_y),
        embedding_dim=int(train_x.shape[1]), test_is_val=ds.test_is_val)
  return out


def add_kept(results: dict, reference: str) -> None:
  """Sets `kept` (balanced accuracy / the reference encoder's) in every
  encoder's read-outs, in place."""
  if reference not in results:
    raise ValueError(f"--reference {reference!r} is not one of the "
                     f"encoders {sorted(results)}")
  ref = results[reference]["sets"]
  for r in results.values():
    for name, s in r["sets"].items():
      for readout in ("linear", "knn"):
        base = ref[name][readout]["balanced_accuracy"]
        s[readout]["kept"] = (s[readout]["balanced_accuracy"] / base
                              if base else None)


def plot(results: dict, path: str) -> None:
  """probe.png: per set, linear balanced accuracy against throughput."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  sets = list(next(iter(results.values()))["sets"])
  fig = Figure(figsize=(4.2 * len(sets), 3.4))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(sets), squeeze=False)[0]
  for ax, name in zip(axes, sets):
    for label, r in results.items():
      x = r["speed"]["throughput_images_per_s"]
      y = r["sets"][name]["linear"]["balanced_accuracy"]
      ax.scatter([x], [y])
      ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3),
                  textcoords="offset points")
    ax.set_xscale("log")
    ax.set_title(name)
    ax.set_xlabel("images/s")
    ax.set_ylabel("linear probe balanced accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _cell(x, fmt="{:.3f}"):
  return "—" if x is None or (isinstance(x, float) and math.isnan(x)) \
      else fmt.format(x)


def markdown(results: dict) -> str:
  """One row per encoder and set: linear and k-NN scores, size, speed."""
  lines = ["| encoder | set | linear bal. acc | linear F1 | linear AUC | "
           "k-NN bal. acc | k-NN F1 | k-NN AUC | kept (linear / k-NN) | "
           "params (M) | GFLOPs | images/s | latency ms (median / p95) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for label, r in results.items():
    sz, sp = r["size"], r["speed"]
    for name, s in r["sets"].items():
      lin, knn = s["linear"], s["knn"]
      lines.append(
          f"| {label} | {name} | {_cell(lin['balanced_accuracy'])} | "
          f"{_cell(lin['macro_f1'])} | {_cell(lin['auc'])} | "
          f"{_cell(knn['balanced_accuracy'])} | {_cell(knn['macro_f1'])} | "
          f"{_cell(knn['auc'])} | {_cell(lin.get('kept'), '{:.2f}')} / "
          f"{_cell(knn.get('kept'), '{:.2f}')} | {sz['params'] / 1e6:.2f} | "
          f"{sz['gflops']:.3g} | {sp['throughput_images_per_s']:.4g} | "
          f"{sp['latency_ms_median']:.3g} / {sp['latency_ms_p95']:.3g} |")
  return "\n".join(lines) + "\n"


def run(encoders, set_names, out, *, image_size, model_config=None,
        feature=("embedding",), batch_size=64, cs=DEFAULT_CS, k=20,
        val_fraction=0.2, seed=0, root="", speed_batch=256, speed_repeats=5,
        warmup=10, latency_runs=100, reference=None) -> dict:
  """Probes every (label, folder) of `encoders`; writes probe.json and
  probe.md in `out`; returns the results."""
  sets = {n: build_set(n, image_size, root) for n in set_names}
  shape = (image_size, image_size, 3)
  results = {}
  names = [feature] if isinstance(feature, str) else list(feature)
  for label, folder in encoders:
    module, variables, cfg = load_encoder(folder, model_config, image_size,
                                          seed)
    feature = pick_feature(module, variables, shape, names)
    init = folder.startswith(INIT)
    results[label] = dict(
        folder=(INIT if init else "") + os.path.abspath(
            folder.removeprefix(INIT)), model=cfg, feature=feature,
        image_size=int(image_size), size=size(module, shape),
        speed=speed(forward(module, feature), variables, shape,
                    batch=speed_batch, repeats=speed_repeats, warmup=warmup,
                    runs=latency_runs),
        sets=probe_encoder(module, variables, sets, feature=feature,
                           batch_size=batch_size, cs=cs, k=k,
                           val_fraction=val_fraction, seed=seed))
  if reference:
    add_kept(results, reference)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "probe.json"), "w") as f:
    json.dump(results, f, indent=1, default=str)
  with open(os.path.join(out, "probe.md"), "w") as f:
    f.write(markdown(results))
  plot(results, os.path.join(out, "probe.png"))
  return results


def main(argv):
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from kd_jax import convert  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  # Orbax logs every restore at INFO through absl: lines for its developers.
  logging.set_verbosity(logging.WARNING)
  try:
    model = (dict(name=f.model, **convert.parse_model_args(f.model_args))
             if f.model else None)
    results = run(parse_encoders(f.encoders), f.sets, f.out,
                  image_size=f.image_size, model_config=model,
                  feature=f.feature, batch_size=f.batch_size,
                  cs=[float(c) for c in f.cs], k=f.k,
                  val_fraction=f.val_fraction, seed=f.seed,
                  root=f.data_root, speed_batch=f.speed_batch,
                  speed_repeats=f.speed_repeats, warmup=f.warmup,
                  latency_runs=f.latency_runs, reference=f.reference)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  print(markdown(results), end="")
  print(f"written {os.path.join(f.out, 'probe.json')} and probe.md")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_list("encoders", None, "Encoder folders (a kd_jax.convert "
                    "output, a stage folder, a kd_jax.export folder), each "
                    "optionally label=folder; init:<folder> is its model "
                    "freshly initialised.")
  flags.DEFINE_list("sets", ["pneumoniamnist", "palm", "idrid"],
                    f"Labelled sets: {', '.join(SETS)}.")
  flags.DEFINE_string("out", None, "Folder for probe.json and probe.md.")
  flags.DEFINE_integer("image_size", 224, "Input side the encoders see.")
  flags.DEFINE_string("model", None, "Registered model of every encoder "
                      "(default: what each folder records).")
  flags.DEFINE_string("model_args", "", "Its fields, e.g. num_classes=0.")
  flags.DEFINE_list("feature", ["embedding"], "Feature to probe: "
                    "'embedding', or a map / tokens name, mean-pooled; a "
                    "list: the first each model offers.")
  flags.DEFINE_integer("batch_size", 64, "Batch of the embedding pass.")
  flags.DEFINE_list("cs", [str(c) for c in DEFAULT_CS],
                    "Logistic-regression C grid (one value: fixed C).")
  flags.DEFINE_integer("k", 20, "Neighbours of the k-NN classifier.")
  flags.DEFINE_float("val_fraction", 0.2, "Share of train that chooses C.")
  flags.DEFINE_integer("seed", 0, "Seed of the C split, the probe and "
                       "init: encoders.")
  flags.DEFINE_string("data_root", "", "Shared data folder (default "
                      "$KD_JAX_DATA or ../shared/data).")
  flags.DEFINE_integer("speed_batch", 256, "Batch of the throughput test.")
  flags.DEFINE_integer("speed_repeats", 5, "Timed throughput calls.")
  flags.DEFINE_integer("warmup", 10, "Untimed batch-1 calls first.")
  flags.DEFINE_integer("latency_runs", 100, "Timed batch-1 calls.")
  flags.DEFINE_string("reference", None, "Encoder label (e.g. teacher) "
                      "whose balanced accuracy the others are divided by.")
  flags.mark_flags_as_required(["encoders", "out"])
  app.run(main)
