"""The FMBoost velocity network: an ADM-style UNet in Flax NNX (NHWC).

Layout, constants and initialisation follow the official EfficientUNet (reference
`official_fmboost.md`, sections 3.1-3.10), with one deliberate difference: the attention is real
spatial multi-head attention over the H*W tokens. The official code splits heads with a raw memory
reshape and therefore attends over mixed channel/pixel groups (reference 3.4); no official
checkpoint exists, so nothing needs to stay compatible with that bug.

The per-head channel layout of the fused qkv projection is the one the official code intended:
the 3*num_heads*head_dim output channels are `num_heads` contiguous blocks of `3*head_dim`, each
block holding that head's q | k | v. The attention output is concatenated head-major before the
output projection.

Shapes: images and latents are `[B, H, W, C]`; the flow time `t` is `[B]` in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fmboost_jax.models.backends import (
  AUTO,
  CONV_IMPLS,
  DTYPES,
  attention,
  backend_settings,
  platform,
)
from fmboost_jax.models.layers import Upsample, conv, torch_bias_init, torch_kernel_init, zeros_init

Array = jax.Array
Dtype = Any

_GN_GROUPS = 32
_GN_EPS = 1e-5  # PyTorch's default, used by the official UNet (Flax's default is 1e-6).

def _dense(
    in_features: int,
    out_features: int,
    *,
    zero_init: bool = False,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.Linear:
  """A dense layer with PyTorch (or zero) initialisation."""
  return nnx.Linear(
      in_features,
      out_features,
      kernel_init=zeros_init if zero_init else torch_kernel_init,
      bias_init=zeros_init if zero_init else torch_bias_init(in_features),
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
  )


def _group_norm(
    channels: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
) -> nnx.GroupNorm:
  """GroupNorm(32 groups, eps 1e-5), scale 1 and bias 0 (statistics in float32)."""
  return nnx.GroupNorm(
      channels,
      num_groups=_GN_GROUPS,
      epsilon=_GN_EPS,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
  )


def timestep_embedding(t: Array, dim: int) -> Array:
  """Sinusoidal embedding of the raw flow time, `[cos(t*f), sin(t*f)]` (reference 3.2).

  `t` is used as is (not multiplied by 1000) and the cos block comes first, as in the official code.
  The frequencies are f_i = exp(-ln(10000) * i / (dim // 2)) for i = 0 .. dim//2 - 1.

  Args:
    t: `[B]` flow times (any real dtype; computed in float32).
    dim: Embedding width (even).

  Returns:
    `[B, dim]` float32 embedding.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class ResBlock(nnx.Module):
  """ADM residual block with scale-shift GroupNorm conditioning (reference 3.3).

  `h = conv(silu(GN(x)))`; `scale, shift = dense(silu(emb))`;
  `h = zero_conv(silu(GN(h) * (1 + scale) + shift))`; output `skip(x) + h`, where `skip` is the
  identity if the widths match, else a 1x1 conv.
  """

  def __init__(
      self,
      in_channels: int,
      out_channels: int,
      emb_dim: int,
      *,
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_norm = _group_norm(in_channels, **kw)
    self.in_conv = conv(in_channels, out_channels, 3, **kw)
    self.emb_dense = _dense(emb_dim, 2 * out_channels, **kw)
    self.out_norm = _group_norm(out_channels, **kw)
    self.out_conv = conv(out_channels, out_channels, 3, zero_init=True, **kw)
    if in_channels == out_channels:
      self.skip = None
    else:
      self.skip = conv(in_channels, out_channels, 1, **kw)

  def __call__(self, x: Array, emb: Array) -> Array:
    """Applies the block.

    Args:
      x: `[B, H, W, in_channels]`.
      emb: `[B, emb_dim]` time embedding.

    Returns:
      `[B, H, W, out_channels]`.
    """
    h = self.in_conv(nnx.silu(self.in_norm(x)))
    scale, shift = jnp.split(self.emb_dense(nnx.silu(emb)), 2, axis=-1)
    h = self.out_norm(h) * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
    h = self.out_conv(nnx.silu(h))
    skip = x if self.skip is None else self.skip(x)
    return skip + h


class SpatialSelfAttention(nnx.Module):
  """Multi-head softmax self-attention over the H*W positions (reference 3.4, bug fixed).

  GroupNorm -> Dense(C -> 3*num_heads*head_dim) -> per-head q, k, v over the row-major H*W tokens
  -> softmax attention with scale 1/sqrt(head_dim) -> zero-initialised Dense(inner -> C) ->
  residual. The qkv channels are laid out as `num_heads` blocks of [q | k | v] (each head_dim wide).
  """

  def __init__(
      self,
      channels: int,
      num_heads: int,
      head_dim: int,
      *,
      attention_impl: str = 'xla',
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.attention_impl = attention_impl
    inner = num_heads * head_dim
    self.norm = _group_norm(channels, **kw)
    self.qkv = _dense(channels, 3 * inner, **kw)
    self.proj_out = _dense(inner, channels, zero_init=True, **kw)

  def __call__(self, x: Array) -> Array:
    """Applies the block.

    Args:
      x: `[B, H, W, C]`.

    Returns:
      `[B, H, W, C]`.
    """
    b, h, w, c = x.shape
    qkv = self.qkv(self.norm(x)).reshape(b, h * w, self.num_heads, 3 * self.head_dim)
    q, k, v = jnp.split(qkv, 3, axis=-1)  # Each [B, L, heads, head_dim].
    out = attention(q, k, v, 1.0 / math.sqrt(self.head_dim), self.attention_impl)
    out = self.proj_out(out.reshape(b, h * w, self.num_heads * self.head_dim))
    return x + out.reshape(b, h, w, c)


class Downsample(nnx.Module):
  """Conv3x3, stride 2, symmetric padding 1 (reference 3.5): `[B, H, W, C] -> [B, H/2, W/2, C]`."""

  def __init__(self, channels: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, strides=2, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.conv(x)


class UNetBlock(nnx.Module):
  """A ResBlock, optionally followed by attention and (decoder only) an Upsample."""

  def __init__(
      self,
      in_channels: int,
      out_channels: int,
      emb_dim: int,
      *,
      attention: bool,
      upsample: bool,
      num_heads: int,
      head_dim: int,
      attention_impl: str = 'xla',
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.res = ResBlock(in_channels, out_channels, emb_dim, **kw)
    self.attn = (SpatialSelfAttention(out_channels, num_heads, head_dim,
                                      attention_impl=attention_impl, **kw) if attention else None)
    self.upsample = Upsample(out_channels, **kw) if upsample else None

  def __call__(self, x: Array, emb: Array) -> Array:
    """Applies the block.

    Args:
      x: `[B, H, W, in_channels]`.
      emb: `[B, emb_dim]` time embedding.

    Returns:
      `[B, H', W', out_channels]`; H' = 2H, W' = 2W with upsampling, else H, W.
    """
    h = self.res(x, emb)
    if self.attn is not None:
      h = self.attn(h)
    if self.upsample is not None:
      h = self.upsample(h)
    return h


class UNet(nnx.Module):
  """The velocity network v_theta(x, t) (reference 3.7).

  Encoder: conv3x3, then per level `num_res_blocks` ResBlocks (+ attention at `attention_levels`)
  and a Downsample except at the deepest level; every encoder output is pushed on a skip stack.
  Middle: ResBlock -> attention -> ResBlock. Decoder, deepest level first: `num_res_blocks + 1`
  ResBlocks per level, each taking `concat[h, skip.pop()]` (+ attention at `attention_levels`),
  the last one of each level except level 0 followed by an Upsample. Head: GN -> SiLU ->
  zero-initialised conv3x3, so the output is exactly 0 at initialisation.

  Spatial sizes must be divisible by 2**(len(channel_mult) - 1).
  """

  def __init__(
      self,
      *,
      in_channels: int,
      out_channels: int,
      model_channels: int,
      channel_mult: Sequence[int],
      num_res_blocks: int,
      attention_levels: Sequence[int],
      num_heads: int,
      head_dim: int,
      compute_dtype: str = 'auto',
      conv_impl: str = 'auto',
      attention_impl: str = 'auto',
      remat: str = 'none',
      rngs: nnx.Rngs,
  ):
    check_arguments(model_channels=model_channels, channel_mult=channel_mult,
                    attention_levels=attention_levels, head_dim=head_dim,
                    compute_dtype=compute_dtype, conv_impl=conv_impl,
                    attention_impl=attention_impl, remat=remat)
    settings = backend_settings(platform(), compute_dtype=compute_dtype,
                                conv_impl=conv_impl, attention_impl=attention_impl,
                                head_dim=head_dim)
    channel_mult = tuple(channel_mult)
    attention_levels = tuple(attention_levels)
    num_levels = len(channel_mult)
    dtype = DTYPES[settings['compute_dtype']]
    kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    attn = dict(num_heads=num_heads, head_dim=head_dim, attention_impl=settings['attention_impl'])
    blk = dict(**attn, **kw)
    self.model_channels = model_channels
    self.num_levels = num_levels
    self.dtype = dtype
    self.remat = remat
    emb_dim = 4 * model_channels

    self.time_dense1 = _dense(model_channels, emb_dim, **kw)
    self.time_dense2 = _dense(emb_dim, emb_dim, **kw)

    # Encoder. input_blocks[0] is the stem conv; the rest are UNetBlocks or Downsamples.
    input_blocks: list[nnx.Module] = [conv(in_channels, model_channels, 3, **kw)]
    skip_channels = [model_channels]
    ch = model_channels
    for level, mult in enumerate(channel_mult):
      for _ in range(num_res_blocks):
        input_blocks.append(UNetBlock(ch, mult * model_channels, emb_dim,
                                      attention=level in attention_levels, upsample=False, **blk))
        ch = mult * model_channels
        skip_channels.append(ch)
      if level != num_levels - 1:
        input_blocks.append(Downsample(ch, **kw))
        skip_channels.append(ch)
    self.input_blocks = nnx.List(input_blocks)

    self.middle_res1 = ResBlock(ch, ch, emb_dim, **kw)
    self.middle_attn = SpatialSelfAttention(ch, **attn, **kw)
    self.middle_res2 = ResBlock(ch, ch, emb_dim, **kw)

    # Decoder.
    output_blocks: list[nnx.Module] = []
    for level, mult in reversed(list(enumerate(channel_mult))):
      for i in range(num_res_blocks + 1):
        out_ch = mult * model_channels
        output_blocks.append(UNetBlock(
            ch + skip_channels.pop(), out_ch, emb_dim, attention=level in attention_levels,
            upsample=(level != 0 and i == num_res_blocks), **blk))
        ch = out_ch
    self.output_blocks = nnx.List(output_blocks)

    self.out_norm = _group_norm(ch, **kw)
    self.out_conv = conv(ch, out_channels, 3, zero_init=True, **kw)
    for _, module in nnx.iter_modules(self):
      if isinstance(module, nnx.Conv):
        module.conv_general_dilated = CONV_IMPLS[settings['conv_impl']]

  def __call__(self, x: Array, t: Array) -> Array:
    """Predicts the velocity.

    Args:
      x: `[B, H, W, in_channels]` network input (x_t concatenated with the context).
      t: `[B]` flow time in [0, 1].

    Returns:
      `[B, H, W, out_channels]` float32 velocity.
    """
    factor = 2 ** (self.num_levels - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
          f'UNet input of spatial size {x.shape[1]}x{x.shape[2]} is not divisible by {factor} '
          f'(2**(levels-1)); crop or pad the input to a multiple of {factor}.')
    emb = timestep_embedding(t, self.model_channels)
    emb = self.time_dense2(nnx.silu(self.time_dense1(emb)))

    def call(block, *args):
      return block(*args)

    # With remat, each residual block's activations are recomputed in the backward pass (those the
    # policy saves aside).
    apply = call if self.remat == 'none' else nnx.remat(call, policy=REMAT_POLICIES[self.remat])

    h = x.astype(self.dtype)
    skips = []
    for block in self.input_blocks:
      h = apply(block, h, emb) if isinstance(block, UNetBlock) else block(h)
      skips.append(h)

    h = apply(self.middle_res1, h, emb)
    h = self.middle_attn(h)
    h = apply(self.middle_res2, h, emb)

    for block in self.output_blocks:
      h = apply(block, jnp.concatenate([h, skips.pop()], axis=-1), emb)

    h = self.out_conv(nnx.silu(self.out_norm(h)))
    return h.astype(jnp.float32)


# Rematerialisation (gradient checkpointing) of every UNetBlock and middle ResBlock: 'none' keeps
# all activations for the backward pass; 'full' keeps only each block's input and recomputes the
# rest; 'dots' also keeps the outputs of matrix products without batch dimensions (dense layers and
# convolutions with conv_impl='matmul'; attention's batched products are recomputed).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_arguments(*, model_channels: int, channel_mult: Sequence[int],
                    attention_levels: Sequence[int], head_dim: int = 64,
                    compute_dtype: str = AUTO, conv_impl: str = AUTO, attention_impl: str = AUTO,
                    remat: str = 'none', **unused) -> None:
  """Raises ValueError with one sentence, starting with the argument's name, for UNet arguments
  that cannot build a network (checked before anything is built)."""
  del unused
  for name, value, choices in (('compute_dtype', compute_dtype, (*DTYPES, AUTO)),
                               ('conv_impl', conv_impl, (*CONV_IMPLS, AUTO)),
                               ('attention_impl', attention_impl, ('xla', 'cudnn', AUTO)),
                               ('remat', remat, REMAT_POLICIES)):
    if value not in choices:
      raise ValueError(f'{name}={value!r} is not supported; use one of {sorted(choices)}.')
  if head_dim < 1:
    raise ValueError(f'head_dim={head_dim} must be at least 1.')
  widths = sorted({model_channels * m for m in channel_mult} | {model_channels})
  if any(w % _GN_GROUPS for w in widths):
    suggestion = _GN_GROUPS * max(1, model_channels // _GN_GROUPS)
    raise ValueError(
        f'model_channels={model_channels} with channel_mult={tuple(channel_mult)} gives the widths '
        f'{widths}, which the {_GN_GROUPS} GroupNorm groups do not all divide; use a multiple of '
        f'{_GN_GROUPS} for model_channels (e.g. {suggestion}).')
  if any(not 0 <= level < len(channel_mult) for level in attention_levels):
    raise ValueError(f'attention_levels={tuple(attention_levels)} must be level indices in '
                     f'[0, {len(channel_mult)}) (one per entry of channel_mult).')


def count_params(model_or_state: Any) -> int:
  """Number of parameter scalars of a module (concrete or from `nnx.eval_shape`) or a state/pytree.

  Args:
    model_or_state: An `nnx.Module` (its `nnx.Param`s are counted), or any pytree of arrays /
      `jax.ShapeDtypeStruct`s (e.g. an `nnx.State`).

  Returns:
    The total number of scalars.
  """
  tree = model_or_state
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)))
