"""Tests for kd_jax.probe: read-outs against scikit-learn called directly,
embedding extraction (shape and order), encoder loading and its one-line
error, and one small run over the shared PneumoniaMNIST (skipped where the
shared folder is absent)."""
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import (linear_model, metrics, neighbors, preprocessing)

from kd_jax import checkpoint, models, probe
from kd_jax.data import sources

ROOT = Path(__file__).parents[1]
DATA = Path(os.environ.get(sources.DATA_ENV, ROOT.parent / "shared" / "data"))
SIZE = 16
TINY = dict(name="vit_tiny", width=16, depth=1, num_heads=2, patch=8,
            image_size=SIZE)


def _blobs(n, num_classes, dim, seed):
  """Gaussian clusters, one per class (centres fixed by the class count),
  overlapping enough to err."""
  centres = np.random.default_rng(num_classes).normal(
      size=(num_classes, dim)) * 0.6
  rng = np.random.default_rng(seed)
  y = np.arange(n) % num_classes
  return centres[y] + rng.normal(size=(n, dim)), y


@pytest.mark.parametrize("num_classes", [2, 3])
def test_linear_probe_and_scores_equal_sklearn(num_classes):
  x, y = _blobs(120, num_classes, 6, seed=num_classes)
  tx, ty = _blobs(60, num_classes, 6, seed=10 + num_classes)
  pred, proba, c, val = probe.linear_probe(x, y, tx, num_classes,
                                           cs=(0.01, 1.0), seed=0)
  assert set(val) == {0.01, 1.0}
  # C is chosen on a stratified fifth of train: by balanced accuracy, then
  # by log-loss, each recomputed here with scikit-learn.
  fit, held = probe._val_split(y, 0.2, 0)  # pylint: disable=protected-access
  assert sorted(np.bincount(y[held])) == sorted(np.bincount(y)[:] // 5)
  want = {}
  for cc in (0.01, 1.0):
    sc = preprocessing.StandardScaler().fit(x[fit])
    m = linear_model.LogisticRegression(C=cc, max_iter=2000, random_state=0)
    m.fit(sc.transform(x[fit]), y[fit])
    p_held = m.predict_proba(sc.transform(x[held]))
    want[cc] = (metrics.balanced_accuracy_score(y[held], p_held.argmax(1)),
                metrics.log_loss(y[held], p_held))
    assert val[cc] == pytest.approx(want[cc], abs=1e-12)
  assert c == max(want, key=lambda k: (want[k][0], -want[k][1]))
  # The same probe, by hand: standardise on train, fit at the chosen C.
  scaler = preprocessing.StandardScaler().fit(x)
  ref = linear_model.LogisticRegression(C=c, max_iter=2000, random_state=0)
  ref.fit(scaler.transform(x), y)
  ref_pred = ref.predict(scaler.transform(tx))
  ref_proba = ref.predict_proba(scaler.transform(tx))
  np.testing.assert_array_equal(pred, ref_pred)
  np.testing.assert_allclose(proba, ref_proba, atol=1e-12)
  got = probe.scores(ty, pred, proba, num_classes)
  assert got["balanced_accuracy"] == metrics.balanced_accuracy_score(
      ty, ref_pred)
  assert got["macro_f1"] == metrics.f1_score(ty, ref_pred, average="macro")
  auc = (metrics.roc_auc_score(ty, ref_proba[:, 1]) if num_classes == 2
         else metrics.roc_auc_score(ty, ref_proba, multi_class="ovr",
                                    average="macro"))
  assert got["auc"] == pytest.approx(auc, abs=1e-12)
  assert 0.5 < got["balanced_accuracy"] < 1.0  # Neither chance nor trivial.


def test_knn_equals_sklearn_and_numpy_votes():
  x, y = _blobs(90, 3, 5, seed=1)
  tx, ty = _blobs(30, 3, 5, seed=2)
  pred, proba = probe.knn_probe(x, y, tx, 3, k=20)
  ref = neighbors.KNeighborsClassifier(20, metric="cosine").fit(x, y)
  np.testing.assert_array_equal(pred, ref.predict(tx))
  # Independent numpy: the vote fractions of the 20 most cosine-similar.
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  tn = tx / np.linalg.norm(tx, axis=1, keepdims=True)
  nearest = np.argsort(-(tn @ xn.T), axis=1, kind="stable")[:, :20]
  votes = np.stack([np.bincount(y[r], minlength=3) / 20 for r in nearest])
  np.testing.assert_allclose(proba, votes, atol=1e-12)
  got = probe.scores(ty, pred, proba, 3)
  assert got["macro_f1"] == metrics.f1_score(ty, pred, average="macro")


def test_kept_divides_by_the_reference_and_names_a_wrong_one():
  def enc(acc):
    return {"sets": {"palm": {r: {"balanced_accuracy": acc}
                              for r in ("linear", "knn")}}}
  results = {"teacher": enc(0.8), "student": enc(0.6)}
  probe.add_kept(results, "teacher")
  assert results["student"]["sets"]["palm"]["linear"]["kept"] == 0.6 / 0.8
  assert results["teacher"]["sets"]["palm"]["knn"]["kept"] == 1.0
  with pytest.raises(ValueError, match="not one of the encoders"):
    probe.add_kept(results, "nope")


def test_auc_is_null_when_the_test_split_lacks_a_class():
  y = np.array([0, 1, 0, 1])
  proba = np.full((4, 3), 1 / 3)
  assert probe.scores(y, y, proba, 3)["auc"] is None


def test_pool_means_maps_and_tokens():
  x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
  np.testing.assert_allclose(probe.pool(jnp.asarray(x)), x.mean((1, 2)))
  t = x.reshape(2, 12, 5)
  np.testing.assert_allclose(probe.pool(jnp.asarray(t)), t.mean(1))
  np.testing.assert_array_equal(probe.pool(jnp.asarray(x[:, 0, 0])),
                                x[:, 0, 0])


@pytest.fixture(scope="module")
def tiny():
  cfg = dict(TINY)
  module = models.build(cfg.pop("name"), **cfg)
  # One jitted init: an eager one compiles op by op.
  variables = jax.jit(lambda x: module.init(jax.random.key(0), x,
                                            train=False))(
                                                jnp.zeros((1, SIZE, SIZE, 3)))
  return module, variables


def test_extract_keeps_order_and_shape_with_a_padded_last_batch(tiny):
  module, variables = tiny
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
  labels = np.array([1, 0, 2, 2, 1])
  source = sources.ArraySource(images, labels, 3)
  emb, got_labels = probe.extract(probe.forward(module, "embedding"),
                                  variables, source, "label", batch_size=2)
  assert emb.shape == (5, 16) and emb.dtype == np.float32
  np.testing.assert_array_equal(got_labels, labels)
  # Each row is that image's [CLS] embedding, computed alone.
  for i in (0, 4):
    _, feats = module.apply(variables, source[i]["image"][None], train=False)
    np.testing.assert_allclose(emb[i], feats["embedding"][0], atol=1e-5)
  tokens, _ = probe.extract(probe.forward(module, "tokens"), variables,
                            source, "label", batch_size=2)
  _, feats = module.apply(variables, source[3]["image"][None], train=False)
  np.testing.assert_allclose(tokens[3], feats["tokens"][0].mean(0),
                             atol=1e-5)


def test_a_feature_list_takes_the_first_the_model_offers(tiny):
  module, variables = tiny
  shape = (SIZE, SIZE, 3)
  assert probe.pick_feature(module, variables, shape,
                            ["stage4", "tokens"]) == "tokens"
  with pytest.raises(ValueError, match="offers none of them"):
    probe.pick_feature(module, variables, shape, ["stage4"])


def _save_convert_folder(folder, variables, model_cfg):
  """A folder laid out as kd_jax.convert writes one."""
  state = {"params": {"model": variables["params"]},
           "batch_stats": {"model": {}}}
  with checkpoint.manager(os.path.join(folder, "checkpoints"),
                          save_every=1) as mngr:
    checkpoint.save(mngr, 0, state, force=True)
    mngr.wait_until_finished()
  with open(os.path.join(folder, "model.json"), "w") as f:
    json.dump({"model": model_cfg}, f)


@pytest.fixture(scope="module")
def encoder_folder(tiny, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("teacher"))
  _save_convert_folder(folder, tiny[1], TINY)
  return folder


def test_load_encoder_reads_a_converted_teacher(tiny, encoder_folder):
  module, variables, cfg = probe.load_encoder(encoder_folder,
                                              image_size=SIZE)
  assert cfg == TINY and module.width == 16
  np.testing.assert_array_equal(
      variables["params"]["norm"]["scale"],
      tiny[1]["params"]["norm"]["scale"])


def test_load_encoder_reads_the_model_of_a_stage_from_its_run_record(
    tiny, encoder_folder, tmp_path):
  import ml_collections
  import shutil
  from kd_jax import record
  c = ml_collections.ConfigDict(dict(
      seed=0, steps=1, optimizer=dict(name="adamw", lr=1e-3),
      data=dict(name="image_folder"), stage_order=("enc",),
      stages=dict(enc=dict(method="distill", model=TINY))))
  stage = str(tmp_path / "enc")
  shutil.copytree(os.path.join(encoder_folder, "checkpoints"),
                  os.path.join(stage, "checkpoints"))
  record.write(stage, record.new_record(c, "enc"))
  module, variables, cfg = probe.load_encoder(stage, image_size=SIZE)
  assert cfg == TINY and module.patch == 8
  np.testing.assert_array_equal(variables["params"]["cls_token"],
                                tiny[1]["params"]["cls_token"])


def test_init_is_the_folders_model_freshly_initialised(tiny, encoder_folder):
  import jax  # pylint: disable=import-outside-toplevel
  module, variables, cfg = probe.load_encoder("init:" + encoder_folder,
                                              image_size=SIZE, seed=3)
  assert cfg["name"] == TINY["name"]
  want = module.init(jax.random.key(3), np.zeros((1, SIZE, SIZE, 3),
                                                 np.float32), train=False)
  got, trained = (jax.tree.leaves(v["params"]) for v in (variables, tiny[1]))
  assert len(got) == len(trained)
  for a, b in zip(got, jax.tree.leaves(want["params"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(got, trained))
  assert probe.parse_encoders([f"random=init:{encoder_folder}"]) == [
      ("random", f"init:{encoder_folder}")]
  with pytest.raises(ValueError, match="is not a folder"):
    probe.parse_encoders(["init:/no/such/folder"])


def test_a_checkpoint_of_another_architecture_is_one_line(encoder_folder):
  other = dict(TINY, width=8)
  with pytest.raises(ValueError) as e:
    probe.load_encoder(encoder_folder, other, image_size=SIZE)
  msg = str(e.value)
  assert "\n" not in msg
  # The first differing path (sorted) and both shapes.
  assert "block0/attn/key/bias is (2, 8) in the checkpoint, (2, 4) in the " \
      "model" in msg


def test_a_folder_naming_no_model_is_one_line(tmp_path):
  with pytest.raises(ValueError, match="give --model"):
    probe.load_encoder(str(tmp_path))


@pytest.mark.skipif(not (DATA / "pneumoniamnist").is_dir(),
                    reason="shared data folder absent")
def test_run_writes_json_and_table(encoder_folder, tmp_path):
  out = str(tmp_path / "probe")
  results = probe.run([("tiny", encoder_folder)], ["pneumoniamnist"], out,
                      image_size=SIZE, batch_size=256, cs=(1.0,),
                      speed_batch=8, speed_repeats=1, warmup=1,
                      latency_runs=3, root=str(DATA), reference="tiny")
  r = results["tiny"]["sets"]["pneumoniamnist"]
  assert (r["num_train"], r["num_test"], r["test_is_val"]) == (2428, 270,
                                                                True)
  assert r["linear"]["C"] == 1.0 and r["embedding_dim"] == 16
  assert results["tiny"]["feature"] == "embedding"
  assert r["linear"]["kept"] == 1.0 and r["knn"]["kept"] == 1.0
  for readout in ("linear", "knn"):
    assert 0 <= r[readout]["balanced_accuracy"] <= 1
  assert results["tiny"]["size"]["params"] == models.summary(
      probe.load_encoder(encoder_folder)[0], (1, SIZE, SIZE, 3))["params"]
  with open(os.path.join(out, "probe.json")) as f:
    assert json.load(f)["tiny"]["speed"]["latency_runs"] == 3
  with open(os.path.join(out, "probe.md")) as f:
    assert "| tiny | pneumoniamnist |" in f.read()
  with open(os.path.join(out, "probe.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
