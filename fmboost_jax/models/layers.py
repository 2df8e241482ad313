"""Layers the SD autoencoder and the UNet share: PyTorch's default initialisers, convolutions as
one matrix product, the nearest x2 + conv3x3 Upsample computed as four 2x2 phase convolutions, and
the parameter keys that networks are built with inside a trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
Dtype = Any
M = TypeVar('M')

# PyTorch's default weight init, kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
zeros_init = nnx.initializers.zeros_init()


class ParamKeys:
  """The parameter keys of `nnx.Rngs(key)` (the n-th draw is fold_in(key, n)), counted in Python:
  pass it as `rngs=` to build a network inside jit or eval_shape.

  nnx.Rngs keeps its count in an nnx Variable. Inside a trace, each draw replaces that count with a
  tracer, and flax compares the shardings of the two; asking a tracer for its sharding makes JAX
  search the whole trace for the tracer's origin. Building a network that way takes time quadratic
  in its layers (under eval_shape UNet-base took 4.7 s instead of 0.7 s, the SD autoencoder 2.4 s
  instead of 0.3 s: benchmarks/results.md item 16).
  """

  def __init__(self, key: jax.Array | int):
    self._key = jax.random.key(key) if isinstance(key, int) else key
    self._count = 0

  def params(self) -> jax.Array:
    key = jax.random.fold_in(self._key, self._count)
    self._count += 1
    return key


def abstract(build: Callable[..., M], /, *args, **kwargs) -> M:
  """`build(*args, **kwargs, rngs=...)` under nnx.eval_shape: the network's structure and parameter
  shapes and dtypes, no weights computed."""
  return nnx.eval_shape(lambda: build(*args, **kwargs, rngs=ParamKeys(0)))


def torch_bias_init(fan_in: int) -> nnx.Initializer:
  """PyTorch's default bias initialiser U(+-1/sqrt(fan_in)).

  Args:
    fan_in: Fan-in of the layer the bias belongs to (in_features, or kh*kw*in for a conv).

  Returns:
    An initialiser `init(key, shape, dtype)`.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv_as_matmul(lhs: Array, rhs: Array, window_strides, padding, lhs_dilation=None,
                   rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                   precision=None, preferred_element_type=None, out_sharding=None) -> Array:
  """`lax.conv_general_dilated` for NHWC x HWIO convolutions as one matrix product (im2col).

  The kh*kw shifted (strided) views of the padded input are concatenated along the channels and
  multiplied by the kernel reshaped to [kh*kw*in, out]. Same result as the convolution up to
  float rounding; on CPUs XLA's matrix product is 2-3x faster than its convolution at the UNet's
  shapes (benchmarks/results.md), at the price of a kh*kw times larger activation buffer.
  Dilations and feature groups are not supported (the UNet uses neither).
  """
  del dimension_numbers, out_sharding  # nnx.Conv passes NHWC / HWIO; shardings propagate (Auto).
  if feature_group_count != 1 or any(d != 1 for d in (lhs_dilation or ())) or any(
      d != 1 for d in (rhs_dilation or ())):
    raise ValueError('conv_as_matmul supports plain convolutions only.')
  kh, kw, cin, cout = rhs.shape
  sh, sw = window_strides
  x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  b, hp, wp, _ = x.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  if kh == kw == 1 and sh == sw == 1:
    cols = x
  else:
    cols = jnp.concatenate([x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
                            for i in range(kh) for j in range(kw)], axis=-1)
  out = jnp.dot(cols.reshape(b * ho * wo, kh * kw * cin), rhs.reshape(kh * kw * cin, cout),
                precision=precision, preferred_element_type=preferred_element_type)
  return out.reshape(b, ho, wo, cout)


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    strides: int = 1,
    zero_init: bool = False,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
  """A 2-D conv with symmetric padding (k-1)/2 and PyTorch (or zero) initialisation."""
  pad = (kernel_size - 1) // 2
  fan_in = kernel_size * kernel_size * in_channels
  return nnx.Conv(
      in_channels,
      out_channels,
      (kernel_size, kernel_size),
      strides=(strides, strides),
      padding=((pad, pad), (pad, pad)),
      kernel_init=zeros_init if zero_init else torch_kernel_init,
      bias_init=zeros_init if zero_init else torch_bias_init(fan_in),
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
  )


def _phase_taps(kernel: Array, axis: int) -> tuple[Array, Array]:
  """The two 2-tap kernels along `axis` that a 3-tap kernel becomes after a nearest x2 upsample.

  Output row 2i reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i (taps w0 | w1+w2 on
  rows i-1, i); output row 2i+1 reads input rows i, i, i+1 (taps w0+w1 | w2 on rows i, i+1).
  """
  w0, w1, w2 = (jax.lax.index_in_dim(kernel, i, axis) for i in range(3))
  return (jnp.concatenate([w0, w1 + w2], axis), jnp.concatenate([w0 + w1, w2], axis))


# Zero padding (before, after) of the input for output phase 0 (rows i-1, i) and 1 (rows i, i+1).
_PHASE_PADDING = ((1, 0), (0, 1))


class Upsample(nnx.Module):
  """Nearest x2 then Conv3x3 with padding 1 (reference 3.5): `[B, H, W, C] -> [B, 2H, 2W, C]`.

  Computed without building the upsampled map: each of the four output phases (2i+a, 2j+b) is a
  2x2 convolution of the input with the 3x3 taps summed as `_phase_taps` says, and the phases are
  interleaved. Equal to the convolution of the upsampled map up to float rounding (the zero border
  of the upsampled map is the zero border of the input), with 4/9 of its multiply-adds.
  """

  def __init__(self, channels: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    conv = self.conv
    b, h, w, _ = x.shape
    kernels = [_phase_taps(rows, 1) for rows in _phase_taps(conv.kernel[...], 0)]
    x, bias = conv.promote_dtype((x, conv.bias[...]), dtype=conv.dtype)
    phases = [[conv.conv_general_dilated(
        x, kernels[a][c].astype(x.dtype), (1, 1), (_PHASE_PADDING[a], _PHASE_PADDING[c]),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=conv.precision)
               for c in range(2)] for a in range(2)]
    y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # [B, H, 2, W, 2, C]
    return y.reshape(b, 2 * h, 2 * w, -1) + bias
