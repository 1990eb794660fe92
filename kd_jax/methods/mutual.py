"""Deep Mutual Learning (Zhang et al., CVPR 2018): two peers trained
together from scratch, each taught by the other.

Peer k's loss is its task loss plus a distillation term toward the other
peer's current prediction, held fixed (stop-gradient):

    L_student = task(z_s, y) + w · KL(sg(p_peer) || p_student)
    L_peer    = task(z_p, y) + w · KL(sg(p_student) || p_peer)

The parameters of the two peers are disjoint and each loss only reaches its
own peer, so one gradient of L_student + L_peer is exactly the two gradients
the paper applies (it alternates the two updates; here they are simultaneous,
as most implementations do).

Loss terms are the stage's usual list. Task terms (cross_entropy, dice, ...)
are applied to each peer. One-way logit terms (kd_kl, soft_cross_entropy,
...) are applied in both directions, each peer's logits against the other's
detached logits. A `dml` term is already symmetric (both KLs, each with the
other side detached), so it is applied once to the pair. Feature terms are
not supported: mutual learning exchanges predictions only.

    losses=dict(ce=dict(fn="cross_entropy"), dice=dict(fn="dice"),
                kl=dict(fn="kd_kl", temperature=1.0))   # the paper: tau = 1

The deployable model is the student (`model_key = "student"`); the peer's
variables sit beside it under "peer" and are saved with it, so either can be
read back from the checkpoint.
"""
import jax

from kd_jax import losses, models, tasks
from kd_jax.methods import common


class Mutual:
  model_key = "student"
  # peer=dict(name=<model>, **fields): the second model, built like `model`.
  stage_keys = frozenset({"peer"})

  @staticmethod
  def _peer_config(stage) -> dict:
    peer = stage.get("peer")
    if not isinstance(peer, dict) or not peer.get("name"):
      raise ValueError(f"a mutual stage needs peer=dict(name=<model>, ...), "
                       f"e.g. peer=dict(name='transunet_tiny'); got "
                       f"peer={peer!r}; models: {', '.join(models.names())}")
    return peer

  @classmethod
  def check(cls, stage, ctx):
    del ctx
    cls._peer_config(stage)

  @classmethod
  def from_config(cls, stage, ctx):
    """(method, {}) from `dict(method="mutual", model=..., peer=...,
    losses=...)`: nothing is frozen, both peers train."""
    peer = cls._peer_config(stage)
    model = ctx.build_model(stage["model"])
    try:
      peer_model = ctx.build_model(peer)
    except (ValueError, TypeError) as e:
      raise ValueError(f"peer {peer}: {e}") from None
    return cls(model=model, peer=peer_model, loss_terms=stage["losses"],
               heads=ctx.heads), {}

  def __init__(self, model, peer, loss_terms, heads=None):
    self.model = model
    self.heads = heads  # kd_jax.tasks heads; None: one output, "label".
    self.peer = peer
    losses.objective(loss_terms)  # Validates every term and its keywords.
    names = losses.term_names(loss_terms)
    per_peer, pair = [], []
    for name, term in zip(names, loss_terms):
      kind = losses.REGISTRY[term["fn"]].kind
      if kind not in ("task", "logits"):
        raise ValueError(
            f"method 'mutual': loss term {name!r} ({term['fn']}) is a "
            f"{kind} loss; mutual learning combines task terms and logit "
            "terms (kd_kl, dml, ...) only")
      # Explicit names keep the metric keys of each objective stable.
      term = dict(term, name=name)
      (pair if term["fn"] == "dml" else per_peer).append(term)
    if not any(losses.REGISTRY[t["fn"]].kind == "task" for t in per_peer):
      raise ValueError(
          "method 'mutual' needs task terms for each peer, e.g. "
          "ce=dict(fn='cross_entropy'), dice=dict(fn='dice')")
    if not any(losses.REGISTRY[t["fn"]].kind == "logits"
               for t in per_peer + pair):
      raise ValueError(
          "method 'mutual' needs a logit term that couples the peers, e.g. "
          "kl=dict(fn='kd_kl', temperature=1.0) (or fn='dml'); without one "
          "the two models train independently")
    self.per_peer = losses.objective(per_peer)
    self.pair = losses.objective(pair) if pair else None

  def init(self, rng, images):
    s_rng, p_rng = jax.random.split(rng)
    s_vars = self.model.init(s_rng, images, train=False)
    p_vars = self.peer.init(p_rng, images, train=False)
    self._check_shapes(s_vars, p_vars, images)
    return {"params": {"student": s_vars["params"], "peer": p_vars["params"]},
            "batch_stats": {"student": s_vars.get("batch_stats", {}),
                            "peer": p_vars.get("batch_stats", {})}}

  def _check_shapes(self, s_vars, p_vars, images):
    s = jax.eval_shape(lambda v: self.model.apply(v, images, train=False)[0],
                       s_vars)
    p = jax.eval_shape(lambda v: self.peer.apply(v, images, train=False)[0],
                       p_vars)
    shapes = [jax.tree.map(lambda x: x.shape, t) for t in (s, p)]
    if shapes[0] != shapes[1]:
      raise ValueError(
          f"method 'mutual' needs peer logits of one shape; the student gives "
          f"{shapes[0]}, the peer {shapes[1]}: give both models the same "
          "num_classes and output size")

  def peer_logits(self, params, batch_stats, images, rng):
    """Both peers in train mode: ((z_student, z_peer), new batch_stats)."""
    s_rng, p_rng = jax.random.split(rng)
    (z_s, _), s_stats = common.apply_train(
        self.model, params["student"], batch_stats["student"], images, s_rng)
    (z_p, _), p_stats = common.apply_train(
        self.peer, params["peer"], batch_stats["peer"], images, p_rng)
    return ((tasks.as_float32(z_s), tasks.as_float32(z_p)),
            {"student": s_stats, "peer": p_stats})

  def loss_fn(self, params, batch_stats, frozen, batch, rng):
    del frozen  # Nothing is frozen: both peers train.
    (z_s, z_p), new_stats = self.peer_logits(params, batch_stats,
                                             batch["image"], rng)
    labels = tasks.labels(self.heads, batch)
    labelled = batch.get("labelled")
    sg = jax.lax.stop_gradient
    loss_s, m_s = self.per_peer({"logits": z_s, "labels": labels,
                                 "teacher_logits": sg(z_p),
                                 "labelled": labelled})
    loss_p, m_p = self.per_peer({"logits": z_p, "labels": labels,
                                 "teacher_logits": sg(z_s),
                                 "labelled": labelled})
    metrics = {f"student/{k}": v for k, v in m_s.items()}
    metrics.update({f"peer/{k}": v for k, v in m_p.items()})
    loss = loss_s + loss_p
    if self.pair is not None:
      loss_pair, m_pair = self.pair({"logits": z_s, "labels": labels,
                                     "teacher_logits": z_p,
                                     "labelled": labelled})
      metrics.update({f"pair/{k}": v for k, v in m_pair.items()})
      loss = loss + loss_pair
    return loss, (new_stats, metrics)

  def predict(self, params, batch_stats, images):
    return common.apply_eval(self.model, params["student"],
                             batch_stats["student"], images)[0]

  def predict_peer(self, params, batch_stats, images):
    return common.apply_eval(self.peer, params["peer"], batch_stats["peer"],
                             images)[0]
