"""One model trained alone on the task loss: a teacher, or a baseline student."""
from kd_jax import losses, tasks
from kd_jax.methods import common


class Supervised:
  model_key = "model"
  stage_keys = frozenset()  # Only the common ones (kd_jax.methods.base).

  @classmethod
  def from_config(cls, stage, ctx):
    """(method, {}) from `dict(method="supervised", model=..., losses=...)`."""
    return cls(model=ctx.build_model(stage["model"]),
               loss_terms=stage["losses"], heads=ctx.heads), {}

  def __init__(self, model, loss_terms, heads=None):
    self.model = model
    self.heads = heads  # kd_jax.tasks heads; None: one output, "label".
    self.objective = losses.objective(loss_terms)  # Validates the terms.
    for term in loss_terms:
      if losses.REGISTRY[term["fn"]].kind != "task":
        raise ValueError(
            f"method 'supervised' trains one model on labels only, but the "
            f"loss {term['fn']!r} needs a teacher; use method 'distill' or "
            f"drop that term")

  def init(self, rng, images):
    variables = self.model.init(rng, images, train=False)
    return {"params": {"model": variables["params"]},
            "batch_stats": {"model": variables.get("batch_stats", {})}}

  def loss_fn(self, params, batch_stats, frozen, batch, rng):
    del frozen
    (logits, feats), new_stats = common.apply_train(
        self.model, params["model"], batch_stats["model"], batch["image"], rng)
    loss, metrics = self.objective(
        tasks.objective_inputs(self.heads, logits, batch, feats))
    return loss, ({"model": new_stats}, metrics)

  def predict(self, params, batch_stats, images):
    return common.apply_eval(self.model, params["model"],
                             batch_stats["model"], images)[0]
