"""Holistic (adversarial) distillation: a frozen teacher, a student and a
critic with its own optimizer, updated in turn inside one jitted step.

Structured KD (Liu et al., CVPR 2019) adds to the student's objective a
conditional Wasserstein critic D that scores (image, class-probability map)
pairs: the teacher's map is "real", the student's "fake". Each step:

  1. student (and connectors): one gradient step on
         objective(student, teacher)  +  λ_hol · wgan_generator(D(x ⊕ p_S))
     where objective is the stage's other terms (cross_entropy,
     pixelwise_kd, pairwise_similarity, ...) exactly as method 'distill'
     composes them, and D is scored with its current parameters (eval mode);
  2. critic, `critic.updates` times on the student's map from step 1
     (detached, computed before the student's update):
         λ_hol · (E[D(x ⊕ p_S)] − E[D(x ⊕ p_T)] + λ_gp · GP)
     GP the gradient penalty on random interpolates of the two maps, the
     image held fixed (`kd_jax.losses.gradient_penalty`).
This is the order and the scaling of the official code (student first, the
critic's loss multiplied by λ_hol = the holistic term's weight, λ_gp = 10).

    method="adversarial",
    teacher=dict(model=dict(name="pspnet_resnet101"), stage="teacher"),
    losses=dict(ce=dict(fn="cross_entropy"),
                pixel=dict(fn="pixelwise_kd", weight=10.0),
                pair=dict(fn="pairwise_similarity", weight=1.0,
                          student="layer4", teacher="layer4",
                          connector="none"),
                holistic=dict(fn="wgan_generator", weight=0.1)),
    critic=dict(model=dict(name="sagan_discriminator", conv_dim=64),
                gp_weight=10.0, updates=1),
    optimizers=dict(critic=dict(name="adamw", lr=4e-4, weight_decay=0.0)),

The parameter groups are "student" (the student and its connectors) and
"critic"; each has its own optimizer (`optimizers.<group>` over the stage's
`optimizer`), schedule and state, all in the one checkpointed state. The
critic is trained, checkpointed and never exported: the deployable model is
the student alone. Per step it logs `holistic` (the generator term,
unweighted), `critic/loss`, `critic/gradient_penalty`, `critic/wasserstein`
(E[D(real)] − E[D(fake)], the critic's Wasserstein estimate) and
`critic/grad_norm`.
"""
import jax
import jax.numpy as jnp
import optax

from kd_jax import losses, tasks
from kd_jax.methods.distill import Distill
from kd_jax.models.discriminator import discriminator_input

# critic=dict(...) keys and their defaults.
CRITIC_DEFAULTS = {"gp_weight": 10.0, "updates": 1}


class Adversarial(Distill):
  model_key = "student"
  stage_keys = Distill.stage_keys | {"critic"}
  param_groups = {"student": ("student", "connectors"), "critic": ("critic",)}

  @classmethod
  def _critic_config(cls, stage) -> dict:
    out = cls._module_config(stage, "critic", "sagan_discriminator",
                             CRITIC_DEFAULTS)
    gp = out["gp_weight"]
    if isinstance(gp, bool) or not isinstance(gp, (int, float)) or gp < 0:
      raise ValueError(f"critic.gp_weight={gp!r}: give a number >= 0 (10 in "
                       "WGAN-GP and Structured KD)")
    n = out["updates"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f"critic.updates={n!r}: give a whole number >= 1 "
                       "(critic updates per student update)")
    return out

  @classmethod
  def check(cls, stage, ctx):
    super().check(stage, ctx)
    cls._critic_config(stage)

  @classmethod
  def _more_modules(cls, stage, ctx) -> dict:
    critic = cls._critic_config(stage)
    return {"critic": cls._build_module(ctx, "critic", critic),
            "gp_weight": float(critic["gp_weight"]),
            "critic_updates": critic["updates"]}

  def __init__(self, model, teacher, loss_terms, heads=None, *, critic,
               gp_weight=10.0, critic_updates=1):
    holistic = [(t.get("name", t["fn"]), t) for t in loss_terms
                if t.get("fn") == "wgan_generator"]
    if len(holistic) != 1:
      raise ValueError(
          "method 'adversarial' needs exactly one holistic term, e.g. "
          "holistic=dict(fn='wgan_generator', weight=0.1); got "
          f"{len(holistic)}")
    self.holistic_name, term = holistic[0]
    weight = term.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or (
        weight <= 0):
      raise ValueError(f"loss term {self.holistic_name!r} (wgan_generator): "
                       f"weight={weight!r}; give a number > 0 (0.1 in "
                       "Structured KD)")
    extra = sorted(set(term) - {"fn", "weight", "name"})
    if extra:
      raise ValueError(f"loss term {self.holistic_name!r} (wgan_generator) "
                       f"takes fn and weight only, not {extra[0]!r}")
    self.holistic_weight = float(weight)
    rest = [t for t in loss_terms if t.get("fn") != "wgan_generator"]
    if not rest:
      raise ValueError("method 'adversarial' needs the student's other terms "
                       "too, e.g. ce=dict(fn='cross_entropy')")
    super().__init__(model, teacher, rest, heads)
    if self.ensemble:
      raise ValueError("method 'adversarial' scores one teacher's map; give "
                       "teacher=dict(...), not teachers=[...]")
    if not tasks.is_segmentation(heads):
      raise ValueError("method 'adversarial' scores a segmentation map; the "
                       "run's output must be one segmentation head")
    # The critic's "real" input is the teacher's map, whatever the terms.
    self.uses_teacher_logits = True
    self.critic = critic
    self.gp_weight = gp_weight
    self.critic_updates = critic_updates

  def init(self, rng, images):
    out, t_out = (jax.eval_shape(
        lambda m=m: m.init_with_output(rng, images, train=False))[0][0]
                  for m in (self.model, self.teacher))
    if out.shape != t_out.shape:
      raise ValueError(
          f"the critic scores image + class maps of one shape: the student "
          f"gives {out.shape[1:]} ({out.shape[-1]} classes), the teacher "
          f"{t_out.shape[1:]} ({t_out.shape[-1]} classes); give both models "
          "the same num_classes and output size")
    variables = super().init(rng, images)
    probs = jnp.zeros(out.shape, jnp.float32)
    try:
      cv = self.critic.init(jax.random.fold_in(rng, 7),
                            discriminator_input(images, probs), train=False)
    except ValueError as e:
      raise ValueError(f"critic on the {out.shape[1:3]} map with "
                       f"{images.shape[-1]} image + {out.shape[-1]} class "
                       f"channels: {e}") from None
    variables["params"]["critic"] = cv["params"]
    variables["batch_stats"]["critic"] = cv.get("batch_stats", {})
    return variables

  @staticmethod
  def probabilities(logits):
    """The map the critic scores: softmax over classes, float32."""
    return jax.nn.softmax(tasks.as_float32(logits), axis=-1)

  def _score(self, params, stats, images, probs):
    """Critic scores of image ⊕ probs, eval mode (its state does not move)."""
    return self.critic.apply({"params": params, "batch_stats": stats},
                             discriminator_input(images, probs),
                             train=False)[0]

  def update(self, opt, params, batch_stats, opt_state, frozen, batch, rng):
    s_rng, c_rng = jax.random.split(rng)
    images = batch["image"].astype(jnp.float32)
    c_stats = batch_stats["critic"]

    def student_objective(group):
      loss, (stats, metrics, logits, teacher) = self.student_loss(
          {**params, **group}, batch_stats, frozen, batch, s_rng)
      fake = self.probabilities(logits)
      holistic = losses.wgan_generator_loss(
          self._score(params["critic"], c_stats, images, fake))
      total = loss + self.holistic_weight * holistic
      metrics = dict(metrics, total=total, **{self.holistic_name: holistic})
      return total, (stats, metrics, fake, teacher)

    (loss, (stats, metrics, fake, teacher)), grads = jax.value_and_grad(
        student_objective, has_aux=True)(opt.part(params, "student"))
    params, opt_state = opt.apply("student", grads, opt_state, params, loss)

    real = self.probabilities(teacher["logits"])
    fake = jax.lax.stop_gradient(fake)
    pair = jnp.concatenate([images, images])
    n = images.shape[0]
    for i in range(self.critic_updates):

      def critic_objective(group, key=jax.random.fold_in(c_rng, i),
                           c_stats=c_stats):
        # One train-mode call on both halves: one spectral-norm power
        # iteration per critic update, as one forward of the batch would.
        scores, upd = self.critic.apply(
            {"params": group["critic"], "batch_stats": c_stats},
            discriminator_input(pair, jnp.concatenate([real, fake])),
            train=True, mutable=["batch_stats"])
        new_stats = upd.get("batch_stats", c_stats)
        w_loss = losses.wgan_critic_loss(scores[0][:n], scores[0][n:])
        gp = losses.gradient_penalty(
            lambda m: self._score(group["critic"], new_stats, images, m),
            real, fake, key)
        c_loss = self.holistic_weight * (w_loss + self.gp_weight * gp)
        return c_loss, (new_stats, w_loss, gp)

      (c_loss, (c_stats, w_loss, gp)), c_grads = jax.value_and_grad(
          critic_objective, has_aux=True)(opt.part(params, "critic"))
      params, opt_state = opt.apply("critic", c_grads, opt_state, params,
                                    c_loss)
    metrics.update({"loss": loss, "grad_norm": optax.global_norm(grads),
                    "critic/loss": c_loss, "critic/gradient_penalty": gp,
                    "critic/wasserstein": -w_loss,
                    "critic/grad_norm": optax.global_norm(c_grads)})
    return params, {**stats, "critic": c_stats}, opt_state, metrics
