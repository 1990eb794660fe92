"""Pure-JAX forms of flax layers that XLA:CPU runs slowly, for CPU runs only.

kd_jax's models use flax's own layers and take them as module fields
(`conv`, `norm`, `conv_transpose`, and any field whose default is an
`nn.Conv` subclass, such as TransUNet's `std_conv`). `apply(model)` returns
the model with the forms below in those fields when the backend is a CPU, and
the model unchanged on any other backend. A config chooses it with
`config.layers = "cpu"` (the CPU demo and presets do); the default is flax's.

Each form has the flax layer's variables, names and values (within float32
rounding; `tests/test_cpu_layers.py`) and stays only while it makes a whole
training step of a shipped config measurably faster on the CPU
(`benchmarks/cpu_forms.py`, numbers in `benchmarks/README.md`):

- `BatchNorm`: training-mode batch statistics with a closed-form backward
  whose per-channel sums are matmuls (autodiff of flax's makes XLA:CPU reduce
  over the batch several times, single-threaded).
- `Conv`: `nn.Conv` whose stride-1 1×1 convolutions are a matmul (XLA:CPU
  computes a 1×1 convolution's kernel gradient as a convolution with an
  image-sized window).
- `ConvTranspose`: one ordinary convolution per output phase (XLA:CPU
  computes a transposed convolution's kernel gradient through an
  image-sized window).
"""
import dataclasses
import functools
from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

FORMS = ("conv", "norm", "conv_transpose")


def _channel_sums(x2d):
  """Σ over the rows of a (n, C) float32 array, as a (1, n) @ (n, C) matmul
  (XLA:CPU threads its dot kernel; its row reductions run on one thread)."""
  ones = jnp.ones((1, x2d.shape[0]), x2d.dtype)
  return jnp.matmul(ones, x2d, precision=jax.lax.Precision.HIGHEST)[0]


def _stats(x):
  x2d = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  n = x2d.shape[0]
  mean = _channel_sums(x2d) / n
  return mean, _channel_sums(x2d * x2d) / n - mean * mean


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_train(x, scale, bias, epsilon: float):
  """Batch statistics over all axes but the last, and the normalised `x`.

  Returns `(y, mean, var)`: y = (x − mean)·(var + ε)^-1/2·scale + bias in
  float32, var = E[x²] − E[x]² clipped at 0 (flax's fast variance).
  Gradients flow to x, scale and bias through y and through mean and var.
  """
  return _normalize(x, scale, bias, epsilon)[0]


def _normalize_fwd(x, scale, bias, epsilon):
  # With symbolic_zeros the primals arrive wrapped (`.value`).
  return _normalize(x.value, scale.value, bias.value, epsilon)


def _normalize(x, scale, bias, epsilon):
  mean, raw_var = _stats(x)
  var = jnp.maximum(raw_var, 0.0)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = (x.astype(jnp.float32) - mean) * (rstd * scale) + bias
  return (y, mean, var), (x, mean, rstd, raw_var > 0, scale)


def _normalize_bwd(epsilon, res, cotangents):
  # With y = x̂·γ + β, x̂ = (x − μ)·r, r = (σ² + ε)^-1/2 and n values per
  # channel: dβ = Σ dy, dγ = r·Σ dy·(x − μ), dx = γ·r·(dy − dβ/n − x̂·dγ/n).
  del epsilon  # rstd carries it.
  x, mean, rstd, var_positive, scale = res
  dy, dmean, dvar = cotangents
  channels = x.shape[-1]
  xc = x.astype(jnp.float32) - mean
  n = xc.size // channels
  if isinstance(dy, SymbolicZero):
    dx = jnp.zeros_like(xc)
    dscale = dbias = jnp.zeros_like(mean)
  else:
    dbias = _channel_sums(dy.reshape(-1, channels))
    dscale = rstd * _channel_sums((dy * xc).reshape(-1, channels))
    # The x̂·dγ/n term is the path through var; it is absent where var was
    # clipped at 0, as in autodiff of the clipped forward.
    dvar_term = jnp.where(var_positive, rstd * dscale / n, 0.0)
    dx = (scale * rstd) * (dy - dbias / n - xc * dvar_term)
  if not isinstance(dmean, SymbolicZero):
    dx = dx + dmean / n
  if not isinstance(dvar, SymbolicZero):
    dx = dx + xc * jnp.where(var_positive, 2.0 * dvar / n, 0.0)
  return dx.astype(x.dtype), dscale, dbias


normalize_train.defvjp(_normalize_fwd, _normalize_bwd, symbolic_zeros=True)


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over the last axis, trained with `normalize_train`.

  The same variables and auto-name as flax's. `axis_name` is not offered:
  kd_jax jits the step over a mesh, where the batch is one global array and
  the statistics cover every device already; a model given
  `norm=partial(nn.BatchNorm, axis_name=...)` keeps it (`apply` replaces only
  flax's default).
  """
  use_running_average: Optional[bool] = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None):
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    channels = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, channels,
                            jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, channels,
                           jnp.float32)
    scale = (self.param("scale", nn.initializers.ones, channels,
                        self.param_dtype) if self.use_scale
             else jnp.ones(channels, jnp.float32))
    bias = (self.param("bias", nn.initializers.zeros, channels,
                       self.param_dtype) if self.use_bias
            else jnp.zeros(channels, jnp.float32))
    dtype = self.dtype or jnp.result_type(x, self.param_dtype)
    scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
    if use_running_average:
      mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      return ((x.astype(jnp.float32) - ra_mean.value) * mul
              + bias).astype(dtype)
    y, mean, var = normalize_train(x, scale, bias, float(self.epsilon))
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(dtype)


def _pads(x_shape, window, strides, padding):
  """((lo, hi), (lo, hi)) of 'SAME', 'VALID' or explicit pairs, as ints."""
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x_shape[1:3], window, strides, padding)
  return tuple(tuple(int(v) for v in p) for p in padding)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv_1x1(lhs, rhs, pads, precision, preferred_element_type):
  """A stride-1 1×1 NHWC × HWIO convolution as an einsum."""
  return jnp.einsum("bhwc,co->bhwo", jnp.pad(lhs, ((0, 0), *pads, (0, 0))),
                    rhs[0, 0], precision=precision,
                    preferred_element_type=preferred_element_type)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`jax.lax.conv_general_dilated`; a 2-D NHWC stride-1 1×1 convolution
  (no dilation, groups or cropping) is computed as `_conv_1x1`."""
  ones = (1,) * (lhs.ndim - 2)
  if (lhs.ndim == 4 and dimension_numbers == jax.lax.conv_dimension_numbers(
          lhs.shape, rhs.shape, _NHWC)
      and tuple(window_strides) == ones
      and tuple(lhs_dilation or ones) == ones
      and tuple(rhs_dilation or ones) == ones
      and feature_group_count == batch_group_count == 1
      and rhs.shape[:2] == (1, 1)):
    pads = _pads(lhs.shape, rhs.shape[:2], ones, padding)
    if min(min(p) for p in pads) >= 0:
      return _conv_1x1(lhs, rhs, pads, precision, preferred_element_type)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type)


Conv = partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def _transpose_pads(kernel, strides, padding):
  """The padding of the stride-dilated input that `jax.lax.conv_transpose`
  uses for `padding` ('SAME', 'VALID' or explicit (lo, hi) pairs)."""
  if not isinstance(padding, str):
    return tuple(tuple(int(v) for v in p) for p in padding)
  pads = []
  for k, s in zip(kernel, strides):
    if padding == "SAME":
      total = k + s - 2
      lo = k - 1 if s > k - 1 else -(-total // 2)
    elif padding == "VALID":
      total, lo = k + s - 2 + max(k - s, 0), k - 1
    else:
      raise ValueError(f"padding {padding!r}: give 'SAME', 'VALID' or pairs")
    pads.append((lo, total - lo))
  return tuple(pads)


def _phase(size, k, s, lo, hi, p):
  """For output phase p of one axis: (outputs, first tap, taps, input
  offset d) with y[s·q + p] = Σ_m x[q + m + d]·kernel[t0 + s·m]."""
  out = (size - 1) * s + 1 + lo + hi - k + 1
  count = max(-(-(out - p) // s), 0)
  t0 = (lo - p) % s
  taps = max(-(-(k - t0) // s), 0)
  return count, t0, taps, (p + t0 - lo) // s


def conv_transpose(x, kernel, strides, padding, precision=None):
  """`jax.lax.conv_transpose(x, kernel, strides, padding)` for NHWC `x` and
  an HWIO kernel, as one stride-1 convolution per output phase (the kernel
  taps that land on it) interleaved by a depth-to-space."""
  (kh, kw), (sh, sw) = kernel.shape[:2], strides
  pads = _transpose_pads((kh, kw), strides, padding)
  rows = [_phase(x.shape[1], kh, sh, *pads[0], p) for p in range(sh)]
  cols = [_phase(x.shape[2], kw, sw, *pads[1], p) for p in range(sw)]
  qh, qw = max(r[0] for r in rows), max(c[0] for c in cols)
  cout = kernel.shape[3]
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, _NHWC)
  zero = jnp.zeros((), x.dtype)
  phases = []
  for _, th, mh, dh in rows:
    for _, tw, mw, dw in cols:
      if not (mh and mw):  # No tap lands on this phase: only the bias.
        phases.append(jnp.zeros((x.shape[0], qh, qw, cout), x.dtype))
        continue
      # Pad (or crop) x so that a VALID convolution gives outputs 0..q - 1.
      xp = jax.lax.pad(x, zero, ((0, 0, 0),
                                 (-dh, qh + mh - 1 - x.shape[1] + dh, 0),
                                 (-dw, qw + mw - 1 - x.shape[2] + dw, 0),
                                 (0, 0, 0)))
      sub = kernel[th::sh, tw::sw][:mh, :mw]
      phases.append(conv_general_dilated(xp, sub, (1, 1), "VALID",
                                         dimension_numbers=dn,
                                         precision=precision))
  y = jnp.stack(phases, axis=0).reshape(sh, sw, x.shape[0], qh, qw, cout)
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(x.shape[0], qh * sh, qw * sw, cout)
  out_h = (x.shape[1] - 1) * sh + 1 + sum(pads[0]) - kh + 1
  out_w = (x.shape[2] - 1) * sw + 1 + sum(pads[1]) - kw + 1
  return y[:, :out_h, :out_w]


class ConvTranspose(nn.Module):
  """`nn.ConvTranspose` for 2-D NHWC inputs (its parameters, initialisers
  and auto-name; no kernel dilation, mask, circular padding or
  `transpose_kernel`), computed by `conv_transpose`."""
  features: int
  kernel_size: Any
  strides: Any = None
  padding: Any = "SAME"
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kernel_size = tuple(self.kernel_size)
    strides = tuple(self.strides or (1,) * len(kernel_size))
    if x.ndim != 4 or len(kernel_size) != 2:
      raise ValueError(f"cpu_layers.ConvTranspose takes NHWC input and a 2-D "
                       f"kernel; got {x.shape} and {kernel_size}")
    kernel = self.param("kernel", self.kernel_init,
                        kernel_size + (x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    padding = nn.linear.canonicalize_padding(self.padding, 2)
    y = conv_transpose(x, kernel, strides, padding, self.precision)
    return y if bias is None else y + bias


def _form(default, forms):
  """The CPU form for a module field whose flax default is `default`."""
  if not isinstance(default, type):
    return None
  if issubclass(default, nn.BatchNorm):
    return BatchNorm if "norm" in forms else None
  if issubclass(default, nn.ConvTranspose):
    return ConvTranspose if "conv_transpose" in forms else None
  if issubclass(default, nn.Conv):
    return _cpu_conv(default) if "conv" in forms else None
  return None


@functools.lru_cache(maxsize=None)
def _cpu_conv(default):
  """One partial per conv class: two builds of a model then compare and hash
  equal, so jit caches keyed on the module (`explain.explainer`) hit."""
  return partial(default, conv_general_dilated=conv_general_dilated)


def apply(model: nn.Module, forms=FORMS, backend: Optional[str] = None):
  """`model` with the CPU forms named in `forms` in its layer fields.

  Only a field still holding flax's layer is replaced (a variant the user
  chose stays). On a backend other than the CPU (`jax.default_backend()`
  unless `backend` says) the model is returned unchanged: these forms are
  never used on an accelerator.
  """
  if (backend or jax.default_backend()) != "cpu":
    return model
  unknown = set(forms) - set(FORMS)
  if unknown:
    raise ValueError(f"unknown CPU forms {sorted(unknown)}; choose from "
                     f"{list(FORMS)}")
  updates = {}
  for field in dataclasses.fields(model):
    value = getattr(model, field.name)
    if field.default is not dataclasses.MISSING and value is field.default:
      form = _form(value, forms)
      if form is not None:
        updates[field.name] = form
  return model.clone(**updates) if updates else model
