"""MED-TEX: a frozen teacher, and an explainer and a student trained jointly
on the explained input.

Nguyen-Duc, Zhao, Cai & Phung, "MED-TEX: Transferring and Explaining
Knowledge with Less Data from Pretrained Medical Imaging Models" (ISBI 2022,
arXiv 2008.02593). The explainer E gives a mask Θ = E(X) ∈ [0, 1] with the
image's height and width; the student S sees X' = Θ ⊙ X; the frozen teacher
T sees X. Both E and S minimise

    L = CE_τ(T(X) ‖ S(X')) + Σ_l λ_l · VID(T^l(X), S^l(X'))

(`kd_jax.losses.medtex_objective`: the paper's soft cross-entropy, without
Hinton's τ², and VID with a learned per-channel variance over the named
layer pairs). The gradient reaches E only through the student's input.
MED-EX, the paper's ablation, is the same stage without vid terms.

    method="explain", model=dict(name="medtex_student"),
    explainer=dict(model=dict(name="medtex_explainer")),
    teacher=dict(model=dict(name="medtex_teacher"), stage="teacher"),
    losses=dict(soft_ce=dict(fn="soft_cross_entropy", temperature=1.0),
                vid2=dict(fn="vid", weight=0.01, student="block2",
                          teacher="block2"),           # connector: conv1x1
                vid4=dict(fn="vid", weight=0.01, student="block4",
                          teacher="block4")),
    optimizers=dict(explainer=dict(name="adam", lr=1e-3)),  # optional

The terms follow method 'distill' (names, `student`/`teacher` features,
`connector`), restricted to the objective's two kinds: one
`soft_cross_entropy` term (weight 1: λ weighs the vid terms against it) and
any number of `vid` terms, whose `weight` is λ (0.01 in the paper). A feature
a vid term names must exist in its model, and the explainer's output must
have the image's height and width; both are checked before the first step.

Parameter groups: "explainer", and "student" (the student and the VID
connectors with their variances); each takes the stage's `optimizer` with
its `optimizers.<group>` entries over it (the paper: Adam 1e-3 for both).
One gradient step of each per training step (`common.default_update`).
Per step it logs the soft-CE term (under its term name), `vid` (the
unweighted sum over layers, when there are vid terms), `total`, and
`mask_mean` (the mean of Θ: how much of the image the student sees). At
each evaluation the trainer logs `eval_images`: Θ of the first 4 val images
under them (clu's `write_images`, "theta", in the stage's TensorBoard
events).

What is deployed is explainer + student, `deployed` (a
`kd_jax.models.medtex.MedTexExplained` over the params' `deployed_keys`):
it gives the prediction and Θ. `predict` is the student's logits on X'.
"""
import jax
import jax.numpy as jnp

from kd_jax import losses, tasks
from kd_jax.methods import common
from kd_jax.methods.distill import Distill
from kd_jax.models.medtex import MedTexExplained, explain_input

# The two kinds of terms of MED-TEX's objective.
SOFT_CE, VID = "soft_cross_entropy", "vid"


class Explain(Distill):
  model_key = "student"
  # teacher=dict(...) as in method 'distill' (one teacher, no ensemble);
  # explainer=dict(model=dict(name=...)).
  stage_keys = frozenset({"teacher", "explainer"})
  param_groups = {"explainer": ("explainer",),
                  "student": ("student", "connectors")}
  # The top-level keys of params (and batch_stats) that `deployed` reads.
  deployed_keys = ("explainer", "student")
  # Features of `deployed` that the exported inference returns beside the
  # prediction (kd_jax.export): Θ.
  deployed_features = ("mask",)

  @classmethod
  def check(cls, stage, ctx):
    super().check(stage, ctx)
    cls._module_config(stage, "explainer", "medtex_explainer")

  @classmethod
  def _more_modules(cls, stage, ctx) -> dict:
    config = cls._module_config(stage, "explainer", "medtex_explainer")
    return {"explainer": cls._build_module(ctx, "explainer", config)}

  def __init__(self, model, teacher, loss_terms, heads=None, *, explainer):
    names = losses.term_names(loss_terms)
    for name, term in zip(names, loss_terms):
      if term.get("fn") not in (SOFT_CE, VID):
        raise ValueError(
            f"loss term {name!r} ({term.get('fn')}): method 'explain' "
            f"trains on MED-TEX's objective, one {SOFT_CE} term and vid "
            "terms; remove it (or use method 'distill')")
      if term.get("pool", 1) != 1:
        raise ValueError(
            f"loss term {name!r} ({term['fn']}): method 'explain' computes "
            "MED-TEX's objective on the whole maps; drop pool=")
      if term["fn"] == VID and term.get("connector") == "none":
        raise ValueError(
            f"loss term {name!r} (vid) regresses the teacher's feature "
            "through a learned connector: give connector='conv1x1' (the "
            "default), not 'none'")
    soft = [(n, t) for n, t in zip(names, loss_terms) if t["fn"] == SOFT_CE]
    if len(soft) != 1:
      raise ValueError(
          f"method 'explain' needs exactly one {SOFT_CE} term (the "
          f"transfer to the teacher), e.g. soft_ce=dict(fn='{SOFT_CE}', "
          f"temperature=1.0); got {len(soft)}")
    self.soft_name, term = soft[0]
    if term.get("weight", 1.0) != 1.0:
      raise ValueError(
          f"loss term {self.soft_name!r} ({SOFT_CE}): weight="
          f"{term['weight']!r}; MED-TEX weighs the vid terms against it: "
          "leave it at 1 and set the vid terms' weight (λ)")
    if not tasks.is_single(heads):
      raise ValueError("method 'explain' distils one classifier output; the "
                       "run must have one head (no config.heads)")
    super().__init__(model, teacher, loss_terms, heads)
    self.temperature = float(term.get("temperature", 1.0))
    # In the order of feature_terms (all are vid terms).
    self.vid_weights = [float(t.get("weight", 1.0))
                        for n, t in zip(names, loss_terms) if t["fn"] == VID]
    self.objective = self.medtex_objective
    self.explainer = explainer
    self.deployed = MedTexExplained(explainer=explainer, student=model)

  def medtex_objective(self, inputs):
    """(total, metrics) of `losses.medtex_objective` from the inputs that
    `Distill.student_loss` composes (the student on X', the teacher on X)."""
    triples = [inputs["features"][name][:2]
               + (inputs["features"][name][2]["alpha"],)
               for name, *_ in self.feature_terms]
    total, parts = losses.medtex_objective(
        inputs["logits"], inputs["teacher_logits"], triples,
        lam=self.vid_weights, temperature=self.temperature)
    metrics = {self.soft_name: parts["soft_ce"], "total": total}
    if triples:
      metrics["vid"] = parts["vid"]
    return total, metrics

  def init(self, rng, images):
    mask = jax.eval_shape(lambda: self.explainer.init_with_output(
        rng, images, train=False))[0][0]
    shape = tuple(images.shape)
    if not hasattr(mask, "shape") or (
        tuple(mask.shape[:3]) != shape[:3]
        or mask.shape[3:] not in ((1,), shape[3:])):
      got = (tuple(mask.shape) if hasattr(mask, "shape")
             else type(mask).__name__)
      raise ValueError(
          f"explainer.model gives a mask of shape {got} for images "
          f"{shape}: it must have the image's height and width and 1 or "
          f"{shape[-1]} channels (medtex_explainer does; check its depth "
          "against the image size)")
    variables = super().init(rng, images)
    ev = self.explainer.init(jax.random.fold_in(rng, 11), images,
                             train=False)
    variables["params"]["explainer"] = ev["params"]
    variables["batch_stats"]["explainer"] = ev.get("batch_stats", {})
    return variables

  def loss_fn(self, params, batch_stats, frozen, batch, rng):
    e_rng, s_rng = jax.random.split(rng)
    images = batch["image"]
    (mask, _), e_stats = common.apply_train(
        self.explainer, params["explainer"], batch_stats["explainer"], images,
        e_rng)
    # The teacher sees X (cached outputs, when the batch has them, are of X).
    teacher = batch.get("teacher")
    if teacher is None:
      teacher = self.teacher_outputs(frozen, images)
    loss, (stats, metrics, _, _) = self.student_loss(
        params, batch_stats, frozen,
        dict(batch, image=explain_input(mask, images), teacher=teacher),
        s_rng)
    metrics["mask_mean"] = jnp.mean(mask.astype(jnp.float32))
    return loss, (dict(stats, explainer=e_stats), metrics)

  def explain(self, params, batch_stats, images):
    """(student logits on X', Θ), eval mode: what the deployed pair gives."""
    outputs, features = self.deployed.apply(
        {"params": {k: params[k] for k in self.deployed_keys},
         "batch_stats": {k: batch_stats[k] for k in self.deployed_keys}},
        images, train=False)
    return outputs, features["mask"]

  def predict(self, params, batch_stats, images):
    return self.explain(params, batch_stats, images)[0]

  def eval_images(self, params, batch_stats, images):
    """{"theta": one (1, 2H, N·W, 3) grid}: the N images on top, their
    masks Θ (mean over channels, grey) below; logged at each evaluation
    (jitted once by the trainer, `train.make_images_step`)."""
    mask = self.explain(params, batch_stats, images)[1].astype(jnp.float32)
    mask = jnp.broadcast_to(mask.mean(-1, keepdims=True),
                            images.shape[:3] + (3,))
    rgb = jnp.clip(images.astype(jnp.float32), 0, 1)
    if rgb.shape[-1] == 1:
      rgb = jnp.broadcast_to(rgb, mask.shape)
    rows = [jnp.concatenate(list(a[..., :3]), axis=1) for a in (rgb, mask)]
    return {"theta": jnp.concatenate(rows, axis=0)[None]}
