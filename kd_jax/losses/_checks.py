"""Argument checks, masked reductions and the `jit_loss` decorator.

Shapes are static under `jax.jit`, so every shape check runs in Python and
raises a ValueError while tracing, before anything is computed. Values
(temperatures, masks) are checked by `jit_loss` only when they are concrete,
i.e. outside `jit`/`grad`/`vmap`; inside a trace they cannot be seen and the
documented fallback applies instead (an all-ignored mask gives 0).
"""

import functools
import inspect

import jax
import jax.numpy as jnp


def is_traced(x) -> bool:
  """True when `x` is an abstract value inside a jit/grad/vmap trace."""
  return isinstance(x, jax.core.Tracer)


def as_float(x, name: str) -> jax.Array:
  """`x` as a floating array of at least float32 precision.

  bfloat16/float16 inputs are upcast so that the softmaxes, logs and sums of
  every loss run in float32; float64 stays float64.
  """
  x = jnp.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.floating)
          or jnp.issubdtype(x.dtype, jnp.integer)):
    raise ValueError(f"{name} must be a real floating array, got dtype "
                     f"{x.dtype}.")
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def same_shape(name_a: str, a, name_b: str, b, what: str = "") -> None:
  """Raises a ValueError unless `a` and `b` have the same shape."""
  if jnp.shape(a) != jnp.shape(b):
    hint = what or (f"project one of them (e.g. with a connector from "
                    f"kd_jax.models.connectors) or resize so they match")
    raise ValueError(
        f"{name_a} has shape {jnp.shape(a)} but {name_b} has shape "
        f"{jnp.shape(b)}; they must be equal: {hint}.")


def min_ndim(name: str, x, ndim: int, layout: str) -> None:
  """Raises a ValueError unless `x` has at least `ndim` dimensions."""
  if jnp.ndim(x) < ndim:
    raise ValueError(f"{name} must have layout {layout} (at least {ndim} "
                     f"dimensions), got shape {jnp.shape(x)}.")


def positive(name: str, value) -> None:
  """Raises a ValueError when a concrete scalar `value` is not > 0."""
  if is_traced(value):
    return
  try:
    v = float(value)
  except TypeError as e:
    raise ValueError(f"{name} must be a positive scalar, got "
                     f"{value!r}.") from e
  if not v > 0:  # Also catches NaN.
    raise ValueError(f"{name} must be > 0, got {value!r}; pass a positive "
                     f"number (1.0 means no softening).")


def non_negative(name: str, value) -> None:
  """Raises a ValueError when a concrete scalar `value` is not >= 0."""
  if is_traced(value):
    return
  if not float(value) >= 0:
    raise ValueError(f"{name} must be >= 0, got {value!r}.")


def check_labels(logits, labels, logits_name: str = "logits") -> None:
  """Labels must be integers shaped like `logits` without its class axis."""
  if jnp.shape(labels) != jnp.shape(logits)[:-1]:
    raise ValueError(
        f"labels has shape {jnp.shape(labels)} but {logits_name} has shape "
        f"{jnp.shape(logits)}; labels must have shape {logits_name}.shape[:-1]"
        f" = {jnp.shape(logits)[:-1]} (integer class ids, classes last in "
        f"{logits_name}).")
  if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids, got dtype "
                     f"{jnp.asarray(labels).dtype}; for soft targets use "
                     f"soft_cross_entropy or kd_kl.")


def valid_positions(shape, *, mask=None, labels=None, ignore_index=None,
                    fn_name: str = "loss") -> jax.Array:
  """Boolean array of `shape` marking the positions a loss averages over.

  Args:
    shape: positions shape, e.g. (B,) for classification or (B, H, W) for
      dense outputs (the logits shape without its class axis).
    mask: optional array whose shape is a prefix of `shape` (e.g. (B,) to
      drop whole examples or (B, H, W) to drop pixels); nonzero = valid.
    labels: optional integer labels of `shape`, used with `ignore_index`.
    ignore_index: label value marking ignored positions.
    fn_name: used in error messages.

  Returns:
    A boolean array of `shape`.

  Raises:
    ValueError: if the mask shape does not fit. (An all-ignored mask is
      caught by `jit_loss` when it is concrete; otherwise the masked means
      return 0.)
  """
  shape = tuple(shape)
  valid = jnp.ones(shape, bool)
  if mask is not None:
    mshape = jnp.shape(mask)
    if mshape != shape[:len(mshape)]:
      raise ValueError(
          f"{fn_name}: mask has shape {mshape}, which is not a prefix of the "
          f"positions shape {shape} (the logits shape without its class "
          f"axis); pass a (B,) mask to drop examples or a {shape} mask to "
          f"drop pixels.")
    m = jnp.asarray(mask) != 0
    valid = valid & m.reshape(mshape + (1,) * (len(shape) - len(mshape)))
  if ignore_index is not None and labels is not None:
    valid = valid & (jnp.asarray(labels) != ignore_index)
  return valid


def masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of `values` over `valid` positions; 0 when none is valid."""
  values = jnp.where(valid, values, 0.0)
  count = jnp.sum(valid, dtype=values.dtype)
  return jnp.sum(values) / jnp.maximum(count, 1.0)


def _concrete(x):
  return x is not None and not is_traced(x)


def check_not_all_ignored(fn_name: str, mask=None, labels=None,
                          ignore_index=None) -> None:
  """Raises a ValueError when concrete inputs leave no valid position.

  Looks at the concrete parts only, on the host (no compilation); a traced
  mask or label array is treated as all-valid, so under jit nothing is
  raised and the masked means return 0.
  """
  # device_get gives host (numpy) arrays, and leaves numpy arrays as they
  # are: comparisons there compile and trace nothing. (jnp.asarray would
  # be staged into an enclosing trace.) Lists and scalars are not checked.
  def host(x):
    x = jax.device_get(x)
    return x if hasattr(x, "shape") and hasattr(x, "any") else None

  valid = None
  if _concrete(mask):
    valid = host(mask)
    valid = None if valid is None else valid != 0
  if ignore_index is not None and _concrete(labels) and (
      host(labels) is not None):
    keep = host(labels) != ignore_index
    if valid is None:
      valid = keep
    elif valid.shape == keep.shape[:valid.ndim]:
      valid = valid.reshape(valid.shape + (1,) * (keep.ndim - valid.ndim))
      valid = valid & keep
    else:
      return  # Bad mask shape: the loss itself raises a clearer error.
  if valid is not None and not valid.any():
    raise ValueError(
        f"{fn_name}: every position is ignored (mask all zero"
        f"{f' or every label == ignore_index={ignore_index}' if ignore_index is not None else ''}"
        f"); there is nothing to average. Check the mask / ignore_index "
        f"(inside jit this cannot be seen and the loss is 0).")


def jit_loss(*, static=(), positive_args=(), non_negative_args=()):
  """Decorator: validates concrete values, then runs the loss as one jit.

  Called eagerly, a loss then costs one XLA compilation per input shape
  (not one per jnp operation) and later calls reuse it; inside a user's
  jit/grad/vmap the inner jit is simply inlined. Scalar hyperparameters
  (temperature, alpha, ...) are traced, so changing them does not
  recompile; `static` names the arguments that change shapes or Python
  control flow. Because traced values cannot be inspected, the value checks
  run here, before the jit: `positive_args` must be > 0,
  `non_negative_args` >= 0, and a concrete `mask` (with `labels` and
  `ignore_index` when the loss takes them) must leave a valid position.
  """
  def decorate(fn):
    signature = inspect.signature(fn)
    jitted = jax.jit(fn, static_argnames=static)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      try:
        bound = signature.bind(*args, **kwargs)
      except TypeError as e:
        raise TypeError(f"{fn.__name__}{signature}: {e}") from None
      bound.apply_defaults()
      given = bound.arguments
      for name in positive_args:
        positive(name, given[name])
      for name in non_negative_args:
        non_negative(name, given[name])
      if "mask" in given:
        check_not_all_ignored(fn.__name__, given["mask"], given.get("labels"),
                              given.get("ignore_index"))
      return jitted(*args, **kwargs)

    return wrapper
  return decorate
