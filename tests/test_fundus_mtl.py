"""The multi-task fundus recipe's config, its study seeds and the plateau
learning-rate schedule of its full preset."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import fundus_mtl
from kd_jax import data, study, train

DATA = os.environ.get("KD_JAX_DATA") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.mark.parametrize("arg", ["cpu,synthetic", "full,synthetic"])
def test_presets_validate_and_the_arms_differ_only_in_teachers(arg, tmp_path):
  c = fundus_mtl.get_config(arg)
  train.validate(c, str(tmp_path), data.build(c.data))
  s = {n: train.stage_config(c, n) for n in c.stage_order}
  assert [len(s[n]["teachers"]) for n in ("kd_one", "kd_ensemble")] == [1, 3]
  assert s["kd_one"]["losses"] == s["kd_ensemble"]["losses"]
  assert s["kd_one"]["model"] == s["student"]["model"]
  # Ensemble members: one architecture, three seeds.
  assert len({s[f"teacher{i}"]["seed"] for i in range(3)}) == 3
  assert len({str(s[f"teacher{i}"]["model"]) for i in range(3)}) == 1


def test_sliding_window_evaluation_is_refused_without_a_segmentation_map(
    tmp_path):
  c = fundus_mtl.get_config("cpu,synthetic")
  c.eval_window = 64
  with pytest.raises(train.ConfigError,
                     match=r"config.eval_window=64: .* segmentation"):
    train.validate(c, str(tmp_path), data.build(c.data))


def test_idrid_preset_has_the_unlabelled_arm(tmp_path):
  if not os.path.isdir(os.path.join(DATA, "idrid")):
    pytest.skip("IDRiD is not in ../shared/data")
  c = fundus_mtl.get_config("cpu")
  c.data.root = DATA
  ds = data.build(c.data)
  train.validate(c, str(tmp_path), ds)
  pooled = train.stage_datasets(c, "kd_unlabelled", ds)
  assert pooled.unlabelled is not None and ds.unlabelled is None
  assert pooled.unlabelled_per_batch == c.batch_size // 4
  # The evaluation split is the run's: the pool changes training only.
  assert len(pooled.val) == len(ds.val) and len(pooled.train) == len(ds.train)


def test_bad_arg_names_the_choices():
  with pytest.raises(ValueError, match=r"expected <preset>\[,<data>\] with "
                     r"preset in cpu, full and data in idrid, synthetic"):
    fundus_mtl.get_config("gpu")


def test_study_seeds_move_every_stage_seed():
  c = fundus_mtl.get_config("cpu,synthetic")
  seeds = {k: study.seed_config(c, k) for k in (0, 1, 2)}
  members = {(k, i): int(seeds[k].stages[f"teacher{i}"].seed)
             for k in seeds for i in range(3)}
  assert len(set(members.values())) == 9  # All nine members differ.
  assert all(seeds[k].seed == k for k in seeds)
  assert "seed" not in seeds[1].stages.student  # It takes the run seed.


def test_plateau_schedule_cuts_the_step_after_patience_epochs():
  cfg = fundus_mtl.get_config("full,synthetic").optimizer
  cfg.plateau.epoch_steps = 2
  cfg.plateau.patience = 3
  tx = train.make_optimizer(cfg, total_steps=100)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  grads = {"w": jnp.ones(3)}
  sizes = []
  for step in range(20):
    # A loss that stops improving after the first epoch.
    loss = jnp.asarray(1.0 if step >= 2 else 2.0 - step)
    updates, state = tx.update(grads, state, params, value=loss)
    sizes.append(float(jnp.abs(updates["w"][0])))
  sizes = np.asarray(sizes)
  # Cut by 10× once the averaged loss has been flat for `patience` epochs,
  # and again every `patience` epochs while it stays flat (Nesterov SGD: the
  # step still grows a little while the momentum builds).
  cuts = np.flatnonzero(sizes[1:] < 0.5 * sizes[:-1]) + 1
  assert list(cuts) == [9, 15]
  np.testing.assert_allclose(sizes[cuts] / sizes[cuts - 1], 0.1, rtol=0.1)


def test_an_unknown_schedule_is_refused_with_the_choices():
  cfg = fundus_mtl.get_config("cpu,synthetic").optimizer
  cfg.schedule = "step"
  with pytest.raises(ValueError, match=r"optimizer.schedule 'step': choose "
                     r"one of \['cosine', 'poly', 'plateau'\]"):
    train.make_optimizer(cfg, 10)
