"""Tests for kd_jax.losses.objective: composition, names, config errors."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses as L

RNG = np.random.RandomState(7)
LOGITS = RNG.randn(2, 4, 4, 5).astype(np.float32)
TEACHER = RNG.randn(2, 4, 4, 5).astype(np.float32)
LABELS = RNG.randint(0, 5, (2, 4, 4)).astype(np.int32)
MASK = RNG.rand(2, 4, 4) > 0.3
FEAT_S = RNG.randn(2, 4, 4, 3).astype(np.float32)
FEAT_T = RNG.randn(2, 4, 4, 3).astype(np.float32)
ALPHA = RNG.randn(3).astype(np.float32)

TERMS = [
    dict(fn="cross_entropy", weight=1.0, ignore_index=255),
    dict(fn="dice", weight=0.5),
    dict(fn="kd_kl", weight=0.25, temperature=4.0),
    dict(fn="dkd", weight=0.1, beta=2.0),
    dict(fn="hint_l1", weight=2.0, student="bottleneck", teacher="encoder",
         connector="conv1x1", name="latent"),
    dict(fn="vid", weight=0.3),
]


def inputs(**overrides):
  x = dict(logits=LOGITS, labels=LABELS, teacher_logits=TEACHER,
           features={"latent": (FEAT_S, FEAT_T),
                     "vid": (FEAT_S, FEAT_T, {"alpha": ALPHA})},
           mask=MASK)
  x.update(overrides)
  return x


def test_total_is_weighted_sum_of_unweighted_terms():
  total, metrics = L.objective(TERMS)(inputs())
  want = {
      "cross_entropy": L.cross_entropy(LOGITS, LABELS, ignore_index=255,
                                       mask=MASK),
      "dice": L.dice_loss(LOGITS, LABELS, mask=MASK),
      "kd_kl": L.kd_kl(LOGITS, TEACHER, temperature=4.0, mask=MASK),
      "dkd": L.dkd(LOGITS, TEACHER, LABELS, beta=2.0, mask=MASK),
      "latent": L.hint_l1(FEAT_S, FEAT_T),
      "vid": L.vid(FEAT_S, FEAT_T, ALPHA),
  }
  assert list(metrics) == list(want) + ["total"]
  for name, value in want.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-6)
  weights = [t.get("weight", 1.0) for t in TERMS]
  np.testing.assert_allclose(
      total, sum(w * v for w, v in zip(weights, want.values())), rtol=1e-6)
  assert metrics["total"] is total
  for v in metrics.values():
    assert v.shape == () and v.dtype == jnp.float32


def test_jit_and_grad_of_objective():
  fn = L.objective(TERMS)

  def loss(logits, feat):
    x = inputs(logits=logits, features={"latent": (feat, FEAT_T),
                                        "vid": (feat, FEAT_T,
                                                {"alpha": ALPHA})})
    return fn(x)

  (total, metrics), grads = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(LOGITS, FEAT_S)
  np.testing.assert_allclose(total, fn(inputs())[0], rtol=1e-5)
  assert set(metrics) == set(L.term_names(TERMS)) | {"total"}
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads)


def test_mask_is_optional_and_only_reaches_losses_that_take_it():
  x = inputs()
  del x["mask"]
  _, metrics = L.objective(TERMS[:1])(x)
  np.testing.assert_allclose(metrics["cross_entropy"],
                             L.cross_entropy(LOGITS, LABELS), rtol=1e-6)
  _, metrics = L.objective([dict(fn="hint_l2")])(
      dict(features={"hint_l2": (FEAT_S, FEAT_T)}, mask=MASK))
  np.testing.assert_allclose(metrics["hint_l2"], L.hint_l2(FEAT_S, FEAT_T),
                             rtol=1e-6)


def test_only_needed_inputs_are_read():
  fn = L.objective([dict(fn="kd_kl", temperature=2.0)])
  total, _ = fn(dict(logits=LOGITS, teacher_logits=TEACHER))
  np.testing.assert_allclose(total, L.kd_kl(LOGITS, TEACHER, temperature=2.0),
                             rtol=1e-6)


def test_ensemble_and_dml_terms():
  stack = np.stack([TEACHER, LOGITS[::-1]])
  total, _ = L.objective([dict(fn="ensemble_kd", temperature=2.0)])(
      dict(logits=LOGITS, teacher_logits=stack))
  np.testing.assert_allclose(
      total, L.ensemble_kd(LOGITS, stack, temperature=2.0), rtol=1e-6)
  total, _ = L.objective([dict(fn="dml")])(
      dict(logits=LOGITS, teacher_logits=TEACHER))
  np.testing.assert_allclose(total, L.dml(LOGITS, TEACHER), rtol=1e-6)


def test_convention_flags_pass_through_config():
  """The peers' conventions, chosen in a config, reach the losses."""
  terms = [dict(fn="dice", squared_denominator=True, average="all",
                name="dice_transunet"),
           dict(fn="kd_kl", temperature=2.0, reduction="batchmean",
                scale_by_tau_squared=False, name="kd_torchdistill"),
           dict(fn="attention_transfer", form="paper", weight=500.0)]
  x = dict(logits=LOGITS, labels=LABELS, teacher_logits=TEACHER,
           features={"attention_transfer": (FEAT_S, FEAT_T[..., :2])})
  total, metrics = jax.jit(L.objective(terms))(x)
  want = {
      "dice_transunet": L.dice_loss(LOGITS, LABELS, squared_denominator=True,
                                    average="all"),
      "kd_torchdistill": L.kd_kl(LOGITS, TEACHER, temperature=2.0,
                                 reduction="batchmean",
                                 scale_by_tau_squared=False),
      "attention_transfer": L.attention_transfer(FEAT_S, FEAT_T[..., :2],
                                                 form="paper"),
  }
  for name, value in want.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5)
  # (tau^2 = 4 against H * W = 16: the conventions give other values.)
  assert float(want["kd_torchdistill"]) != pytest.approx(
      float(L.kd_kl(LOGITS, TEACHER, temperature=2.0)))
  np.testing.assert_allclose(
      total, want["dice_transunet"] + want["kd_torchdistill"]
      + 500.0 * want["attention_transfer"], rtol=1e-5)


def test_term_names_resolve_duplicates_in_order():
  terms = [dict(fn="kd_kl"), dict(fn="kd_kl", temperature=2.0),
           dict(fn="hint_l1", name="latent"), dict(fn="hint_l2",
                                                   name="latent"),
           dict(fn="kd_kl", name="kd_kl_1")]
  assert L.term_names(terms) == ["kd_kl", "kd_kl_1", "latent", "latent_1",
                                 "kd_kl_1_1"]


def test_config_dict_terms_are_accepted():
  ml_collections = pytest.importorskip("ml_collections")
  config = ml_collections.ConfigDict()
  config.losses = [dict(fn="cross_entropy"),
                   dict(fn="kd_kl", weight=0.5, temperature=4.0)]
  assert L.term_names(config.losses) == ["cross_entropy", "kd_kl"]
  terms = [ml_collections.ConfigDict(t) for t in config.losses]
  assert L.term_names(terms) == ["cross_entropy", "kd_kl"]


@pytest.mark.parametrize("terms,match", [
    ([dict(fn="kd_kll")], r"unknown fn 'kd_kll'.*cross_entropy.*kd_kl"),
    ([dict(weight=1.0)], r"no 'fn' key.*kd_kl"),
    ([dict(fn="kd_kl", temprature=4.0)],
     r"unknown keyword 'temprature'.*accepts: temperature"),
    ([dict(fn="cross_entropy", ignore=255)],
     r"'ignore'.*ignore_index, class_weights"),
    ([dict(fn="wgan_critic")], r"'custom' loss"),
    ([dict(fn="medtex")], r"'custom' loss"),
    ([dict(fn="kd_kl", mask=MASK)], r"'mask' is an array input"),
    ([dict(fn="dkd", labels=LABELS)], r"'labels' is an array input"),
    ([dict(fn="vid", alpha=ALPHA)], r"'alpha' is an array input"),
    ([dict(fn="kd_kl", temperature=0.0)], r"temperature must be a number > 0"),
    ([dict(fn="kd_kl", temperature="4")], r"temperature must be a number"),
    ([dict(fn="kd_kl", temperature=-4)], r"temperature must be a number > 0"),
    ([dict(fn="kd_kl", reduction="batch")], r"reduction must be one of"),
    ([dict(fn="kd_kl", weight="1")], r"weight must be a number"),
    ([dict(fn="kd_kl", name="total")], r"'total' is reserved"),
    ([dict(fn="kd_kl", name="")], r"name must be a non-empty string"),
    ([], r"at least one loss term"),
    ("kd_kl", r"sequence of loss terms"),
    ([["fn", "kd_kl"]], r"must be a mapping"),
])
def test_bad_configs_raise_at_construction(terms, match):
  with pytest.raises(ValueError, match=match):
    L.objective(terms)


@pytest.mark.parametrize("terms,x,match", [
    ([dict(fn="kd_kl")], dict(logits=LOGITS), r"inputs\['teacher_logits'\]"),
    ([dict(fn="cross_entropy")], dict(logits=LOGITS, labels=None),
     r"inputs\['labels'\]"),
    ([dict(fn="dkd")], dict(logits=LOGITS, teacher_logits=TEACHER),
     r"'dkd' \(dkd\) needs inputs\['labels'\]"),
    ([dict(fn="hint_l1", name="latent")], dict(features={}),
     r"inputs\['features'\]\['latent'\]"),
    ([dict(fn="hint_l1")], dict(), r"inputs\['features'\]"),
    ([dict(fn="vid")], dict(features={"vid": (FEAT_S, FEAT_T)}),
     r"needs the array 'alpha'"),
])
def test_missing_inputs_raise_a_key_and_value_error(terms, x, match):
  fn = L.objective(terms)
  with pytest.raises(L.MissingInputError, match=match) as info:
    fn(x)
  assert isinstance(info.value, KeyError)
  assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("entry,match", [
    ((FEAT_S,), "must be \\(student_array, teacher_array\\)"),
    ((FEAT_S, FEAT_T, {"beta": ALPHA}), "extra arrays \\['beta'\\]"),
])
def test_malformed_feature_entries_raise(entry, match):
  fn = L.objective([dict(fn="hint_l1")])
  with pytest.raises(ValueError, match=match):
    fn(dict(features={"hint_l1": entry}))


def test_registry_specs_are_well_formed():
  assert set(L.KINDS) == {"task", "logits", "features", "custom"}
  for name, spec in L.REGISTRY.items():
    assert isinstance(spec, L.LossSpec) and spec.kind in L.KINDS, name
    assert spec.fn.__doc__ and "Reduction" in spec.fn.__doc__ or (
        spec.kind == "custom"), name
    if spec.kind != "custom":
      params = list(inspect.signature(spec.fn).parameters.values())
      assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params[:2]), name
      L.objective([dict(fn=name)])  # Every composable loss composes.


def test_a_term_reads_an_extra_output_in_place_of_the_logits():
  """PSPNet's auxiliary loss: CE + 0.4 · CE(aux_logits), numpy golden."""
  rng = np.random.default_rng(0)
  main = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  aux = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(2, 3, 3))

  def ce(z):  # mean over pixels of -log softmax at the label
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.mean(np.take_along_axis(logp, labels[..., None], -1))

  fn = L.objective([dict(fn="cross_entropy"),
                    dict(fn="cross_entropy", weight=0.4, output="aux_logits",
                         name="aux")])
  total, m = fn({"logits": main, "labels": labels,
                 "outputs": {"aux_logits": aux, "layer4": main[..., :1]}})
  np.testing.assert_allclose(float(m["aux"]), ce(aux), rtol=1e-5)
  np.testing.assert_allclose(float(total), ce(main) + 0.4 * ce(aux),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="reads output 'aux_logits'; the "
                     r"model offers \['layer4'\]"):
    fn({"logits": main, "labels": labels, "outputs": {"layer4": main}})
  with pytest.raises(ValueError, match="output= names an extra output"):
    L.objective([dict(fn="kd_kl", output="aux_logits")])


# Each loss with a teacher view, and options that change its view.
VIEW_TERMS = [
    dict(fn="attention_transfer", form="paper", p=3),
    dict(fn="pairwise_similarity", pool_size=2),
    dict(fn="pairwise_similarity", convention="official", scale=0.5),
    dict(fn="embedding_cosine"),
    dict(fn="embedding_l2", normalize=True),
]


def test_every_view_is_declared_with_its_loss():
  """The losses whose teacher side starts with a reduction of its own
  declare it; the others (dense, or relating a batch's examples) do not."""
  viewed = {k for k, s in L.REGISTRY.items() if s.view is not None}
  assert viewed == {"attention_transfer", "pairwise_similarity",
                    "embedding_cosine", "embedding_l2"}
  for spec in L.REGISTRY.values():
    assert (spec.view is None) == (spec.on_view is None)
    assert spec.view is None or spec.view in L.TEACHER_VIEWS


@pytest.mark.parametrize("term", VIEW_TERMS, ids=lambda t: t["fn"])
def test_a_term_fed_its_teacher_view_equals_the_term_fed_the_feature(term):
  """objective with `Viewed(view(t))` in place of t: the same loss and
  student gradient (channels differ between the two sides)."""
  (view, args), = L.teacher_views([term]).values()
  s = jnp.asarray(RNG.randn(3, 4, 6, 5), jnp.float32)
  t = jnp.asarray(RNG.randn(3, 4, 6, 5 if "embedding" in term["fn"] else 7),
                  jnp.float32)
  fn = L.objective([term])
  name = term["fn"]
  whole = jax.jit(jax.value_and_grad(
      lambda s: fn({"features": {name: (s, t)}})[0]))
  viewed = jax.jit(jax.value_and_grad(lambda s: fn({"features": {name: (
      s, L.Viewed(L.teacher_view(view, t, args)))}})[0]))
  (a, ga), (b, gb) = whole(s), viewed(s)
  np.testing.assert_allclose(b, a, rtol=1e-6)
  np.testing.assert_allclose(gb, ga, rtol=1e-5, atol=1e-8)
  with pytest.raises(ValueError, match="has no teacher view"):
    L.objective([dict(fn="hint_l2")])({"features": {"hint_l2": (
        s, L.Viewed(t))}})


def test_pool_averages_both_maps_before_the_loss():
  """hint_l2 with pool=2: the mean squared difference of the two maps
  averaged over 2 x 2 windows (numpy), fed the teacher's map or its
  pooled view; pool is refused where it cannot apply."""
  s = RNG.randn(2, 4, 6, 3).astype(np.float32)
  t = RNG.randn(2, 4, 6, 3).astype(np.float32)
  pooled = lambda x: x.reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4))
  want = np.mean((pooled(s) - pooled(t)) ** 2)
  fn = L.objective([dict(fn="hint_l2", pool=2)])
  assert L.teacher_views([dict(fn="hint_l2", pool=2)]) == {
      "hint_l2": ("average_pooled", {"size": 2})}
  view = L.teacher_view("average_pooled", jnp.asarray(t), {"size": 2})
  for teacher in (t, L.Viewed(view)):
    np.testing.assert_allclose(
        fn({"features": {"hint_l2": (s, teacher)}})[0], want, rtol=1e-6)
  for term, match in [
      (dict(fn="attention_transfer", pool=2), "its teacher view"),
      (dict(fn="kd_kl", pool=2), "reads logits"),
      (dict(fn="hint_l2", pool=0), "whole number >= 1")]:
    with pytest.raises(ValueError, match=match):
      L.objective([term])
  with pytest.raises(ValueError, match="pool=4 must divide"):
    L.objective([dict(fn="hint_l2", pool=4)])(
        {"features": {"hint_l2": (s, t)}})
