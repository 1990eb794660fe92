"""Applying linen models in train and eval mode with BatchNorm and dropout."""


def apply_train(model, params, batch_stats, images, rng):
  """Forward in train mode; returns ((logits, features), new_batch_stats)."""
  out, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, images, train=True,
      rngs={"dropout": rng}, mutable=["batch_stats"])
  return out, updates.get("batch_stats", batch_stats)


def apply_eval(model, params, batch_stats, images):
  """Forward in eval mode (running BatchNorm averages, no dropout)."""
  return model.apply({"params": params, "batch_stats": batch_stats}, images,
                     train=False)
