"""Layers kd_jax computes its own way because XLA:CPU runs flax's slowly:
the same variables, names and outputs as the flax layer they replace.

`BatchNorm`: a drop-in for `flax.linen.BatchNorm` over the last axis. Same
variables (`params`: `scale`, `bias`; `batch_stats`: `mean`, `var`), same
auto-name (`BatchNorm_0`), same statistics as flax's default (float32,
var = E[x²] − E[x]² clipped at 0, running averages updated with `momentum`
except during `init`), so checkpoints of either restore into the other.
In training, autodiff of flax's normalisation makes XLA reduce over the
batch several times (the mean, E[x²], and again for each gradient term),
and XLA:CPU runs those reductions on one thread; they were the largest item
of the default distill step's profile. Here the backward is the closed form
(y = x̂·γ + β, x̂ = (x − μ)·r, r = (σ² + ε)^-1/2, n values per channel):

    dβ = Σ dy          dγ = r · Σ dy·(x − μ)
    dx = γ·r · (dy − dβ/n − x̂ · dγ/n)

and on CPU every per-channel sum is a (1, n) @ (n, C) matmul, which XLA
hands to its multi-threaded dot kernel (on a 16×64×64×64 batch, forward and
backward 2.1× faster than flax's on the 2-core VM). Other platforms sum with
`jnp.sum`.

`max_pool_2x2`: `nn.max_pool(x, (2, 2), strides=(2, 2))` as a reshape and a
max. XLA:CPU computes the reduce-window's gradient by carrying argmax iotas
through another reduce-window and a scatter; the reshaped max's gradient is
an elementwise mask. `max_pool`, for any window (ResNet's and TransUNet's
3×3 stride-2 stem pools): the maximum of the window taps' strided views,
and a closed-form gradient from the same views.

`Conv`: `flax.linen.Conv` (the same module, parameters and auto-names) whose
convolution is `conv_general_dilated` below. On CPU, a stride-1 3×3 float32
convolution with padding 1 and 8, 16 or 32 channels on each side, or 64 on
maps of at least 32² (the
UNets' outer levels, where XLA:CPU spends most of a convolution packing
image patches) runs on kd_jax's own direct kernels, forward and both
gradients (`native_conv3x3`, `kd_jax.native`, compiled on first use; with
gradients 2-3× faster than XLA's at 64², and the default distill step
1.24× PyTorch eager's instead of 0.91×, 2026-12-02). Otherwise, a stride-1 convolution
whose input has one channel (a grey-scale image into the first layer), or
whose kernel is 1×1, is computed as a matmul over the kernel taps. XLA:CPU
runs a one-channel 3×3 convolution several times slower than the same
convolution with eight input channels, and computes a 1×1 convolution's
kernel gradient as a convolution with an image-sized window; as a matmul
both directions are dots (on 16×64×64 inputs, the one-channel 3×3 forward
went from 2.4-3.2 ms to 0.6-0.7 ms, a 1×1 kernel gradient from 1.2 to
0.5 ms; 2-core VM, 2026-12-01). Every convolution whose output is at
most 2×2 (`TINY_OUTPUT`; a ResNet's last stage on inputs up to 64²) is a
matmul over the taps too, as XLA:CPU's convolution falls off a cliff
there: a 3×3 512 → 512 convolution on a 16×2×2 batch took 162 ms
forward, 5 ms as the matmul, and ResNet-18's training forward and backward
at 64², batch 16, went from 1151 ms to 163 ms (PyTorch eager 137 ms;
`benchmarks/backbone_step.py`, 2026-12-02). Depthwise and grouped
convolutions are worse: XLA:CPU ran a depthwise 3×3 forward 15-60× slower than the same
shifted multiply-adds fused into one loop, and a grouped 1×1 convolution's
gradient 50-100× slower than a batched einsum; `depthwise_conv` and the
einsum replace them on CPU (EfficientViT-B0's training forward and backward
at 64², batch 16: 314 ms → 41 ms, PyTorch eager 48 ms). A 3×3
convolution with 2-16 input and at most 16 output channels on a wide input
(the UNets' outer levels) runs over pairs of columns: XLA:CPU spends most of
such a convolution packing image patches for 8-16 output channels, and at
twice the channels on half the width is in its good range, which more than
pays for the pair kernel's zero blocks (`_paired_conv`; the default distill
step 2.6-6.7 % faster in five of six interleaved runs, 2.5 % slower in one).

`ConvTranspose`: `flax.linen.ConvTranspose` (same parameters and
auto-name) as one ordinary convolution per output phase; XLA:CPU computes a
transposed convolution's kernel gradient 5-10× slower than that (see
`conv_transpose`).
"""
from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from kd_jax import native


def _sum_matmul(x2d):
  ones = jnp.ones((1, x2d.shape[0]), x2d.dtype)
  return jnp.matmul(ones, x2d, precision=jax.lax.Precision.HIGHEST)[0]


def _sum_reduce(x2d):
  return jnp.sum(x2d, axis=0)


def channel_sums(x2d):
  """Σ over rows of a (n, C) float32 array: a matmul on CPU, a reduction
  elsewhere (chosen when XLA lowers for its platform)."""
  return jax.lax.platform_dependent(x2d, cpu=_sum_matmul, default=_sum_reduce)


def _stats(x):
  x2d = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  n = x2d.shape[0]
  mean = channel_sums(x2d) / n
  raw_var = channel_sums(x2d * x2d) / n - mean * mean
  return mean, raw_var


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_train(x, scale, bias, epsilon: float):
  """Batch statistics over all axes but the last, and the normalised `x`.

  Returns `(y, mean, var)`: y = (x − mean)·(var + ε)^-1/2·scale + bias in
  float32, var the biased variance E[x²] − E[x]² clipped at 0. Gradients
  flow to x, scale and bias through y and through mean and var.
  """
  return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
  mean, raw_var = _stats(x)
  var = jnp.maximum(raw_var, 0.0)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = (x.astype(jnp.float32) - mean) * (rstd * scale) + bias
  return (y, mean, var), (x, mean, rstd, raw_var > 0, scale)


def _fwd(x, scale, bias, epsilon):
  return _forward(x.value, scale.value, bias.value, epsilon)


def _bwd(epsilon, res, cotangents):
  del epsilon  # rstd carries it.
  x, mean, rstd, var_positive, scale = res
  dy, dmean, dvar = cotangents
  channels = x.shape[-1]
  xc = x.astype(jnp.float32) - mean
  if isinstance(dy, SymbolicZero):
    dx = jnp.zeros_like(xc)
    dscale = dbias = jnp.zeros_like(mean)
  else:
    n = xc.size // channels
    dbias = channel_sums(dy.reshape(-1, channels))
    dscale = rstd * channel_sums((dy * xc).reshape(-1, channels))
    # The x̂·dγ/n term is the path through var; it is absent where var was
    # clipped at 0, as in autodiff of the clipped forward.
    dvar_term = jnp.where(var_positive, rstd * dscale / n, 0.0)
    dx = (scale * rstd) * (dy - dbias / n - xc * dvar_term)
  n = xc.size // channels
  if not isinstance(dmean, SymbolicZero):
    dx = dx + dmean / n
  if not isinstance(dvar, SymbolicZero):
    dx = dx + xc * jnp.where(var_positive, 2.0 * dvar / n, 0.0)
  return dx.astype(x.dtype), dscale, dbias


normalize_train.defvjp(_fwd, _bwd, symbolic_zeros=True)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over the last axis (its defaults and variables),
  trained with `normalize_train`'s closed-form gradient.

  The output has `dtype` (default: x's promoted with `param_dtype`, as in
  flax); statistics, scale and bias are
  float32 (`param_dtype`).
  """
  use_running_average: Optional[bool] = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None):
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    channels = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,),
                            jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (channels,),
                           jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (channels,),
                       self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (channels,),
                      self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, self.param_dtype)
    if use_running_average:
      mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      y = (x.astype(jnp.float32) - ra_mean.value) * mul + bias
      return y.astype(dtype)
    y, mean, var = normalize_train(
        x, scale.astype(jnp.float32), bias.astype(jnp.float32),
        float(self.epsilon))
    if not self.is_initializing():
      ra_mean.value = (self.momentum * ra_mean.value
                       + (1 - self.momentum) * mean)
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(dtype)


def max_pool_2x2(x):
  """2×2 max-pooling with stride 2 over (B, H, W, C), VALID like flax's (an
  odd last row or column is dropped).

  The values equal `nn.max_pool`'s. The gradient differs only at tied
  maxima, which share it equally (jnp.max's rule) instead of one of them
  taking it all; after a ReLU the common tie is at 0, where ReLU's own
  gradient is 0 either way.
  """
  b, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _pads(x_shape, window, strides, padding):
  """((lo, hi), (lo, hi)) of 'SAME', 'VALID' or explicit pairs, as ints."""
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x_shape[1:3], window, strides, padding)
  return tuple(tuple(int(v) for v in p) for p in padding)


def _max_pool_views(x, window, strides, pads):
  """The −inf-padded input's views that the window taps meet."""
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
  out_hw = _out_hw(x.shape, window, strides, pads)
  return [_tap_view(xp, i, j, strides, out_hw) for i in range(window[0])
          for j in range(window[1])]


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
  views = _max_pool_views(x, window, strides, pads)
  y = views[0]
  for v in views[1:]:
    y = jnp.maximum(y, v)
  return y


def _max_pool_fwd(x, window, strides, pads):
  y = _max_pool(x, window, strides, pads)
  return y, (x, y)


def _max_pool_bwd(window, strides, pads, res, dy):
  x, y = res
  views, to_x = jax.vjp(
      lambda x: _max_pool_views(x, window, strides, pads), x)
  hits = [v == y for v in views]
  share = dy / sum(h.astype(dy.dtype) for h in hits)  # ≥ 1: y is a view.
  # Each tap's share goes back to the input pixels its view read.
  return to_x([jnp.where(h, share, 0).astype(dy.dtype) for h in hits])


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window, strides, padding="VALID"):
  """`nn.max_pool(x, window, strides, padding)` for NHWC `x` (padding with
  −inf, as flax's): the maximum of the window taps' strided views, one
  fused loop.

  XLA:CPU differentiates flax's reduce-window through a select-and-scatter
  that ran 4-5× slower than the forward and backward here (ResNet's 3×3
  stride-2 stem pool on 16×112×112×64: 245-296 ms against 86-113 ms; 2-core
  VM, 2026-12-02). The values equal flax's; the gradient differs only at
  tied maxima, which share it equally (as `max_pool_2x2`'s) instead of one
  of them taking it all.
  """
  window, strides = tuple(window), tuple(strides)
  return _max_pool(x, window, strides,
                   _pads(x.shape, window, strides, padding))


def _conv_as_matmul(lhs, rhs, strides, pads, precision,
                    preferred_element_type):
  """An NHWC × HWIO convolution as one einsum over the kernel taps: the
  padded input's views that the taps meet, concatenated on the channel axis
  (the input itself for a 1×1 stride-1 kernel)."""
  kh, kw, cin, cout = rhs.shape
  x = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
  if kh == kw == 1 and strides == (1, 1):
    taps = x
  else:
    out_hw = _out_hw(lhs.shape, (kh, kw), strides, pads)
    taps = jnp.concatenate([_tap_view(x, i, j, strides, out_hw)
                            for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.einsum("bhwk,ko->bhwo", taps, rhs.reshape(kh * kw * cin, cout),
                    precision=precision,
                    preferred_element_type=preferred_element_type)


def _acc_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _tap_view(xp, i, j, strides, out_hw):
  """xp[:, i + s·o, j + s·p] for o, p over the output: the input pixels
  that kernel tap (i, j) meets."""
  (sh, sw), (ho, wo) = strides, out_hw
  return xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]


def _taps(xp, w, strides, out_hw):
  """Σ over kernel taps (i, j) of `_tap_view` times w[i, j]: a depthwise
  convolution of the padded input, accumulated in at least float32."""
  acc = _acc_dtype(xp.dtype)
  y = jnp.zeros((xp.shape[0], *out_hw, xp.shape[3]), acc)
  for i in range(w.shape[0]):
    for j in range(w.shape[1]):
      view = _tap_view(xp, i, j, strides, out_hw)
      y = y + view.astype(acc) * w[i, j].astype(acc)
  return y


def _out_hw(x_shape, k_hw, strides, pads):
  return tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi)
               in zip(x_shape[1:3], k_hw, strides, pads))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x, w, strides, pads):
  """Depthwise convolution (channel multiplier 1) of NHWC `x` with the HWIO
  kernel `w` of shape (kh, kw, 1, C), as shifted multiply-adds that XLA
  fuses into one loop; `pads` are ((lo, hi), (lo, hi)), non-negative.

  The gradients are closed forms rather than autodiff of the strided views:
  dx is the same tap sum over the stride-dilated, padded cotangent with the
  flipped kernel, and each tap's kernel gradient a per-channel sum (a matmul
  on CPU, see `channel_sums`).
  """
  out_hw = _out_hw(x.shape, w.shape[:2], strides, pads)
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  return _taps(xp, w[:, :, 0], strides, out_hw).astype(x.dtype)


def _depthwise_fwd(x, w, strides, pads):
  return depthwise_conv(x, w, strides, pads), (x, w)


def _depthwise_bwd(strides, pads, res, dy):
  x, w = res
  kh, kw = w.shape[:2]
  (sh, sw), (ho, wo) = strides, dy.shape[1:3]
  hp = x.shape[1] + pads[0][0] + pads[0][1]
  wp = x.shape[2] + pads[1][0] + pads[1][1]
  # dxp[p] = Σ_t dy_dilated[p - t]·w[t]: a stride-1 tap sum with the flipped
  # kernel over dy dilated by the stride and padded by k - 1 in front.
  zero = jnp.zeros((), dy.dtype)
  dyd = jax.lax.pad(dy, zero, ((0, 0, 0),
                               (kh - 1, hp - sh * (ho - 1) - 1, sh - 1),
                               (kw - 1, wp - sw * (wo - 1) - 1, sw - 1),
                               (0, 0, 0)))
  dxp = _taps(dyd, w[::-1, ::-1, 0], (1, 1), (hp, wp))
  dx = dxp[:, pads[0][0]:pads[0][0] + x.shape[1],
           pads[1][0]:pads[1][0] + x.shape[2]].astype(x.dtype)
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  acc = _acc_dtype(x.dtype)
  dy_acc = dy.astype(acc)
  rows = []
  for i in range(kh):
    for j in range(kw):
      view = _tap_view(xp, i, j, strides, (ho, wo))
      prod = view.astype(acc) * dy_acc
      rows.append(channel_sums(prod.reshape(-1, prod.shape[-1])))
  dw = jnp.stack(rows).reshape(w.shape).astype(w.dtype)
  return dx, dw


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


def _grouped_1x1(lhs, rhs, precision, preferred_element_type):
  """A 1×1 convolution in G = C_in / rhs.shape[2] groups as one einsum with
  the groups as a batch axis (output channel g·(C_out/G) + o of group g)."""
  n, h, w, cin = lhs.shape
  cin_g, cout = rhs.shape[2:]
  groups = cin // cin_g
  kernel = rhs[0, 0].reshape(cin_g, groups, cout // groups).transpose(1, 0, 2)
  y = jnp.einsum("nhwgc,gco->nhwgo", lhs.reshape(n, h, w, groups, cin_g),
                 kernel, precision=precision,
                 preferred_element_type=preferred_element_type)
  return y.reshape(n, h, w, cout)


_NHWC = ("NHWC", "HWIO", "NHWC")

# Outputs up to TINY_OUTPUT × TINY_OUTPUT are computed as a matmul over the
# kernel taps on CPU: there XLA:CPU's convolution falls off a cliff (a
# ResNet's last stage on small inputs, 10-40× slower than the matmul).
TINY_OUTPUT = 2


def _pair_kernel(rhs):
  """The (kh, kw, C, O) kernel as the kernel over column pairs that
  `_paired_conv` uses: (kh, kw // 2 + 1, 2C, 2O), where input pair tap b
  and sub-column s meet output sub-column t through original tap
  2b + s − t (a zero block where that is outside the kernel)."""
  kh, kw, cin, cout = rhs.shape
  zero = jnp.zeros((kh, cin, cout), rhs.dtype)
  taps = []
  for b in range(kw // 2 + 1):
    blocks = [[rhs[:, 2 * b + s - t] if 0 <= 2 * b + s - t < kw else zero
               for t in range(2)] for s in range(2)]
    # (kh, s, cin, t, cout): input channel s·C + c, output t·O + o.
    taps.append(jnp.stack([jnp.stack(row, axis=2) for row in blocks],
                          axis=1).reshape(kh, 2 * cin, 2 * cout))
  return jnp.stack(taps, axis=1)


def _paired_conv(lhs, rhs, pads, precision, preferred_element_type):
  """A stride-1 NHWC × HWIO convolution that keeps the width, computed over
  pairs of adjacent columns: the padded input reshaped (free in NHWC) to
  half the width and twice the channels, convolved with `_pair_kernel`,
  and the output reshaped back. XLA:CPU's convolution runs far below its
  speed for 8-16 channels at large sides (its im2col packing dominates);
  with 16-32 channels it is in its good range, which pays for the 4/3 ×
  multiply-adds of the pair kernel's zero blocks for 3×3 kernels."""
  n, h, w, cin = lhs.shape
  kw, cout = rhs.shape[1], rhs.shape[3]
  taps = kw // 2 + 1
  (lo, _), width = pads[1], 2 * (w // 2 + taps - 1)
  x = jnp.pad(lhs, ((0, 0), (0, 0), (lo, width - w - lo), (0, 0)))
  y = jax.lax.conv_general_dilated(
      x.reshape(n, h, width // 2, 2 * cin), _pair_kernel(rhs), (1, 1),
      (pads[0], (0, 0)), dimension_numbers=_NHWC, precision=precision,
      preferred_element_type=preferred_element_type)
  return y.reshape(n, y.shape[1], w, cout)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _paired_forward(lhs, rhs, pads, precision, preferred_element_type):
  """`_paired_conv` forward, XLA's own convolution's gradients: for 16 → 16
  channels the pairs' forward was faster, their gradients slower (on the
  2-core VM, 2026-12-01, at 32² and 64²)."""
  return _paired_conv(lhs, rhs, pads, precision, preferred_element_type)


def _paired_forward_fwd(lhs, rhs, pads, precision, preferred_element_type):
  return (_paired_forward(lhs, rhs, pads, precision, preferred_element_type),
          (lhs, rhs))


def _paired_forward_bwd(pads, precision, preferred_element_type, res, dy):
  lhs, rhs = res
  _, vjp = jax.vjp(partial(
      jax.lax.conv_general_dilated, window_strides=(1, 1), padding=pads,
      dimension_numbers=_NHWC, precision=precision,
      preferred_element_type=preferred_element_type), lhs, rhs)
  return vjp(dy)


_paired_forward.defvjp(_paired_forward_fwd, _paired_forward_bwd)


def _pair_form(lhs_shape, rhs_shape, pads):
  """`_paired_conv`, `_paired_forward` or None (XLA's convolution) for a
  stride-1 convolution. Pairs for 3×3 kernels with 2-16 input and at most
  16 output channels on an even width of at least 32 that the padding
  keeps; their gradients too while one side has at most 8 channels
  (measured on the 2-core VM, 2026-12-01: with gradients, 64² 8 → 8
  channels 35-40 % faster, 16 → 8 and 32² 8 → 16 10-40 %; at 32 input or
  output channels the pairs were slower; at 16 → 16 only their forward
  was faster)."""
  w, cin = lhs_shape[2], lhs_shape[3]
  kh, kw, _, cout = rhs_shape
  lo, hi = pads[1]
  if not (kh == kw == 3 and 2 <= cin <= 16 and cout <= 16 and w % 2 == 0
          and w >= 32 and lo + hi == kw - 1):
    return None
  return _paired_conv if min(cin, cout) <= 8 else _paired_forward


_PAD1 = ((0, 0), (1, 1), (1, 1), (0, 0))


@jax.custom_vjp
def native_conv3x3(x, w):
  """A stride-1 3×3 NHWC × HWIO float32 convolution with padding 1, both
  directions computed by kd_jax's direct CPU kernels (`kd_jax.native`):
  8, 16, 32 or 64 channels on each side. CPU only; `conv_general_dilated`
  chooses it where it pays (`_native_form`)."""
  return _native_fwd(x, w)[0]


def _native_fwd(x, w):
  xp = jnp.pad(x, _PAD1)
  return native.conv3x3_forward(xp, w), (xp, w)


def _native_bwd(res, dy):
  xp, w = res
  # The input gradient is the forward convolution of the padded output
  # gradient with the kernel flipped in space and transposed in channels.
  w_t = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))
  dx = native.conv3x3_forward(jnp.pad(dy, _PAD1), w_t)
  return dx, native.conv3x3_kernel_grad(xp, dy)


native_conv3x3.defvjp(_native_fwd, _native_bwd)

# Channel counts on each side that the direct kernels take (their vector
# blocks). With 64 channels they beat XLA's convolution from 32² up (with
# gradients 1.2-1.5×, AVX-512; at 16² and below as fast), so 64 needs that
# side and 16-float vectors; from 128 channels on XLA's was as fast or
# faster.
NATIVE_CHANNELS = (8, 16, 32, 64)
NATIVE_MIN_SIDE_64 = 32


def _native_form(lhs, rhs, pads, feature_group_count, preferred_element_type):
  """`native_conv3x3` where it applies (and the kernels compiled), else
  None: float32, 3×3, padding 1, one group, 8, 16, 32 or (on sides of at
  least NATIVE_MIN_SIDE_64, with AVX-512) 64 channels on each side, a CPU
  backend with a single device (the custom call has no
  sharding rule: with the batch sharded over several devices XLA's own
  convolution is partitioned instead)."""
  wide = max(lhs.shape[3], rhs.shape[3]) == 64
  if not (lhs.dtype == rhs.dtype == jnp.float32
          and preferred_element_type in (None, jnp.float32)
          and rhs.shape[:2] == (3, 3) and pads == ((1, 1), (1, 1))
          and feature_group_count == 1
          and lhs.shape[3] in NATIVE_CHANNELS
          and rhs.shape[3] in NATIVE_CHANNELS
          and (not wide or min(lhs.shape[1:3]) >= NATIVE_MIN_SIDE_64)
          and jax.default_backend() == "cpu" and jax.device_count() == 1):
    return None
  # vector_width() is 0 without the library (no compiler, KD_JAX_NATIVE=0).
  if native.vector_width() < (16 if wide else 1):
    return None
  return native_conv3x3


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`jax.lax.conv_general_dilated`, with the cases XLA:CPU runs slowly (see
  the module docstring) computed another way on CPU; same values.

  Rewritten, for 2-D NHWC/HWIO/NHWC convolutions without dilation or batch
  groups, with non-negative padding: stride-1 convolutions with one input
  channel or a 1×1 kernel, and any convolution whose output is at most 2×2
  (a matmul over the kernel taps), stride-1 3×3 convolutions with few
  channels on wide inputs (over column pairs, `_paired_conv`), grouped
  stride-1 1×1 convolutions (a batched einsum), and depthwise convolutions
  with channel multiplier 1 at any stride (`depthwise_conv`). Everything
  else, and every other platform, is `jax.lax.conv_general_dilated` itself.
  """
  def conv(lhs, rhs):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type)

  ones = (1,) * (lhs.ndim - 2)
  nhwc = lhs.ndim == 4 and dimension_numbers == jax.lax.conv_dimension_numbers(
      lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  if not (nhwc and tuple(lhs_dilation or ones) == ones
          and tuple(rhs_dilation or ones) == ones and batch_group_count == 1):
    return conv(lhs, rhs)
  strides = tuple(window_strides)
  pads = _pads(lhs.shape, rhs.shape[:2], strides, padding)
  if min(min(p) for p in pads) < 0:  # Cropping: left to XLA.
    return conv(lhs, rhs)
  cin, cin_g, cout = lhs.shape[-1], rhs.shape[2], rhs.shape[3]
  one_by_one = rhs.shape[:2] == (1, 1)
  out_hw = _out_hw(lhs.shape, rhs.shape[:2], strides, pads)
  tiny = 1 <= min(out_hw) and max(out_hw) <= TINY_OUTPUT
  if strides == ones and (direct := _native_form(
      lhs, rhs, pads, feature_group_count, preferred_element_type)):
    fast = direct
  elif feature_group_count == 1 and (
      tiny or (strides == ones and (cin == 1 or one_by_one))):
    fast = partial(_conv_as_matmul, strides=strides, pads=pads,
                   precision=precision,
                   preferred_element_type=preferred_element_type)
  elif (feature_group_count == 1 and strides == ones
        and (paired := _pair_form(lhs.shape, rhs.shape, pads))):
    fast = partial(paired, pads=pads, precision=precision,
                   preferred_element_type=preferred_element_type)
  elif (feature_group_count == cin == cout and cin_g == 1
        and preferred_element_type is None):
    fast = partial(depthwise_conv, strides=strides, pads=pads)
  elif (feature_group_count > 1 and one_by_one and strides == ones
        and pads == ((0, 0), (0, 0))):
    fast = partial(_grouped_1x1, precision=precision,
                   preferred_element_type=preferred_element_type)
  else:
    return conv(lhs, rhs)
  return jax.lax.platform_dependent(lhs, rhs, cpu=fast, default=conv)


# flax's convolution module with the convolution above.
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
  """`jax.lax.conv_transpose(x, kernel, strides, padding,
  transpose_kernel=False)` for NHWC `x` and an HWIO kernel, as one
  stride-1 convolution per output phase (the kernel taps that land on it)
  interleaved by a depth-to-space.

  XLA:CPU differentiates a transposed convolution's kernel through a
  convolution with an image-sized window (on a 16×64×64×24 input, 3×3
  stride 2: 17 ms forward, 144 ms kernel gradient); the phase convolutions
  are ordinary ones, and their gradients too.
  """
  (kh, kw), (sh, sw) = kernel.shape[:2], strides
  pads = _transpose_pads((kh, kw), strides, padding)
  rows = [_phase(x.shape[1], kh, sh, *pads[0], p) for p in range(sh)]
  cols = [_phase(x.shape[2], kw, sw, *pads[1], p) for p in range(sw)]
  qh, qw = max(r[0] for r in rows), max(c[0] for c in cols)
  cout = kernel.shape[3]
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape,
                                      ("NHWC", "HWIO", "NHWC"))
  zero = jnp.zeros((), x.dtype)
  phases = []
  for nh, th, mh, dh in rows:
    for nw, tw, mw, dw in cols:
      if not (mh and mw):  # No tap lands on this phase: only the bias.
        phases.append(jnp.zeros((x.shape[0], qh, qw, cout), x.dtype))
        continue
      # Pad (or crop) x so that a VALID convolution gives outputs 0..n - 1.
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
  """`flax.linen.ConvTranspose` for 2-D NHWC inputs (its parameters,
  initialisers and auto-name; no kernel dilation, mask, or circular
  padding, and `transpose_kernel=False`), computed by `conv_transpose`."""
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
      raise ValueError(f"ConvTranspose takes NHWC input and a 2-D kernel; "
                       f"got {x.shape} and {kernel_size}")
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
