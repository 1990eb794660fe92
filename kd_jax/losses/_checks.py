"""Static argument checks and masked reductions shared by the losses.

Every check here looks only at shapes, dtypes and Python-level options, which
are static under `jax.jit`: it runs in Python while tracing (or on every
eager call) and raises a ValueError before anything is computed. Nothing
here looks at array values: that would need the values on the host, which a
trace cannot give and an eager call pays for with a device sync. Numeric
hyperparameters given in a config (temperature > 0, ...) are validated once,
when `losses.objective` is built.
"""

import jax
import jax.numpy as jnp


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
    ValueError: if the mask shape does not fit. (A mask that leaves no
      valid position is a value, not a shape: it is not an error, and the
      masked means return 0.)
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


def one_of(fn_name: str, name: str, value, options) -> None:
  """Raises a ValueError unless the Python option `value` is in `options`."""
  if isinstance(value, bool) or value not in options:
    raise ValueError(f"{fn_name}: {name} must be one of "
                     f"{', '.join(map(repr, options))}, got {value!r}.")
