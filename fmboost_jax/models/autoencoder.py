"""The Stable Diffusion v1 KL-f8 autoencoder (the frozen first stage) in Flax NNX (NHWC).

Layout and constants follow the LDM `AutoencoderKL` used by the official code (reference
`official_fmboost.md`, section 4): ch 128, ch_mult (1, 2, 4, 4), 2 ResnetBlocks per level in the
encoder and 3 in the decoder, GroupNorm with 32 groups and eps 1e-6, a Downsample that pads the
bottom/right by one and then convolves 3x3 with stride 2 and no padding, a nearest-x2 Upsample
followed by a 3x3 conv, and a Res -> single-head attention -> Res middle block in both halves.

Attribute names mirror the LDM checkpoint keys (`encoder.down.0.block.1.conv1`, `decoder.up.3.
upsample.conv`, `encoder.mid.attn_1.q`, ...) so `fmboost_jax/weights.py` maps a PyTorch state dict
onto this module one name at a time. `decoder.up[0]` is the highest resolution level, as in LDM.

Images are `[B, H, W, 3]` in [-1, 1] with H and W divisible by `factor` (8 for SD); latents are
`[B, H/factor, W/factor, z_channels]`. `encode` returns the posterior *mean* times `scale_factor`
(0.18215), `decode` divides by it; this is the first-stage contract of FMBoost (reference 1.8).

The tiled variants (`encode_tiled`, `decode_tiled`) run the network on overlapping tiles inside a
`lax.scan`, so peak memory is one tile's activations plus the output, and blend the tiles with
linear ramps across each overlap. Per-tile GroupNorm statistics, per-tile mid-block attention and
zero padding at tile borders make the result differ from the untiled one (the tests state how much).

Building the model with random weights runs ~100 separate initialisers (slow on CPU); to use real
weights build it abstractly and load: `abstract = layers.abstract(autoencoder_from_config, cfg)`,
then `nnx.merge(nnx.graphdef(abstract), weights.load_autoencoder_weights(path, abstract))`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fmboost_jax.errors import UserError
from fmboost_jax.models import tiling
from fmboost_jax.models.backends import DTYPES
from fmboost_jax.models.layers import Upsample, conv_as_matmul, torch_bias_init, torch_kernel_init

Array = jax.Array
Dtype = Any

GN_EPS = 1e-6  # The LDM/SD value (PyTorch's default would be 1e-5).
SCALE_FACTOR = 0.18215  # SD v1 latent scale.
LOGVAR_RANGE = (-30.0, 20.0)

# Defaults of tiled processing: 64 latents = 512 px tiles, a quarter of a tile overlapping.
DECODE_TILE, DECODE_OVERLAP = 64, 16
ENCODE_TILE, ENCODE_OVERLAP = 512, 128


def _conv(in_channels: int, out_channels: int, kernel_size: int, *, strides: int = 1,
          padding: Any = None, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """A 2-D conv (default: symmetric padding (k-1)/2) with PyTorch's default initialisation.

  1x1 convolutions run as one matrix product (`conv_as_matmul`): XLA's CPU convolution takes 2-3x
  longer for them at the autoencoder's sizes (benchmarks/results.md, log 13); other sizes stay XLA
  convolutions, which are faster there than im2col products (log 6).
  """
  if padding is None:
    pad = (kernel_size - 1) // 2
    padding = ((pad, pad), (pad, pad))
  return nnx.Conv(
      in_channels,
      out_channels,
      (kernel_size, kernel_size),
      strides=(strides, strides),
      padding=padding,
      conv_general_dilated=conv_as_matmul if kernel_size == 1 else jax.lax.conv_general_dilated,
      kernel_init=torch_kernel_init,
      bias_init=torch_bias_init(kernel_size * kernel_size * in_channels),
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
  )


def _dense(features: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """A square dense layer (the 1x1 convs of the attention block) with PyTorch initialisation."""
  return nnx.Linear(features, features, kernel_init=torch_kernel_init,
                    bias_init=torch_bias_init(features), dtype=dtype, param_dtype=param_dtype,
                    rngs=rngs)


class GroupNorm(nnx.GroupNorm):
  """`nnx.GroupNorm` (same parameters, scale and bias) over `[B, ..., C]`, computed channel-first.

  Computed in float32 (cast to `dtype` at the end), with a two-pass variance: per-channel means
  over the positions, averaged within each group, then the same for the squared deviations from
  the group mean. Reducing over the positions first keeps the channels as the vectorised minor
  axis; at the autoencoder's large sizes on CPUs this is up to 1.45x faster than `nnx.GroupNorm`'s
  reduction over a `[B, positions, groups, group_size]` view (benchmarks/results.md, log 14), with
  the same result up to float rounding.
  """

  def __call__(self, x: Array) -> Array:
    shape, b, c = x.shape, x.shape[0], x.shape[-1]
    x, scale, bias = self.promote_dtype((x.reshape(b, -1, c), self.scale[...], self.bias[...]),
                                        dtype=self.dtype)
    x32 = x.astype(jnp.float32)

    def group_mean(per_channel: Array) -> Array:  # [B, C] -> [B, 1, C]
      groups = per_channel.reshape(b, self.num_groups, -1).mean(-1)
      return jnp.repeat(groups, self.group_size, axis=1)[:, None, :]

    mean = group_mean(x32.mean(1))
    var = group_mean(jnp.square(x32 - mean).mean(1))
    y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(x.dtype).reshape(shape)


def _group_norm(channels: int, num_groups: int, *, dtype: Dtype, param_dtype: Dtype,
                rngs: nnx.Rngs) -> GroupNorm:
  """GroupNorm(num_groups, eps 1e-6), scale 1 / bias 0; statistics in float32, two-pass variance."""
  if channels % num_groups:
    raise ValueError(f'GroupNorm over {channels} channels needs a channel count divisible by '
                     f'{num_groups} groups; choose ch / ch_mult accordingly.')
  return GroupNorm(channels, num_groups=num_groups, epsilon=GN_EPS, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
  """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus a skip (1x1 `nin_shortcut` if widths
  differ).

  No time embedding and no dropout (dropout is 0 in SD). `[B, H, W, in] -> [B, H, W, out]`.
  """

  def __init__(self, in_channels: int, out_channels: int, *, num_groups: int = 32,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = _group_norm(in_channels, num_groups, **kw)
    self.conv1 = _conv(in_channels, out_channels, 3, **kw)
    self.norm2 = _group_norm(out_channels, num_groups, **kw)
    self.conv2 = _conv(out_channels, out_channels, 3, **kw)
    self.nin_shortcut = (None if in_channels == out_channels
                         else _conv(in_channels, out_channels, 1, **kw))

  def __call__(self, x: Array) -> Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
    return skip + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over the H*W positions with a residual (LDM `AttnBlock`).

  GN -> q, k, v (1x1 convs, here Dense over channels) -> softmax(q k^T / sqrt(C)) v -> proj_out ->
  add to the input. `[B, H, W, C] -> [B, H, W, C]`.
  """

  def __init__(self, channels: int, *, num_groups: int = 32, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = _group_norm(channels, num_groups, **kw)
    self.q = _dense(channels, **kw)
    self.k = _dense(channels, **kw)
    self.v = _dense(channels, **kw)
    self.proj_out = _dense(channels, **kw)

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    y = self.norm(x).reshape(b, h * w, 1, c)  # One head of width C.
    out = query_chunked_attention(self.q(y), self.k(y), self.v(y), scale=1.0 / math.sqrt(c))
    return x + self.proj_out(out).reshape(b, h, w, c)


ATTENTION_QUERY_CHUNK = 2048


def query_chunked_attention(q: Array, k: Array, v: Array, *, scale: float,
                            chunk: int = ATTENTION_QUERY_CHUNK) -> Array:
  """Softmax attention (as `jax.nn.dot_product_attention`) over blocks of `chunk` queries in turn.

  Each block attends to all keys, so the result is the same up to float rounding; only a
  [chunk, L] block of logits exists at a time instead of [L, L]. At 1024 px the autoencoder attends
  over L = 16384 positions: the full logits are 1 GiB, and on a 2-core CPU the chunked attention
  takes 3.2 s instead of 7.4 s (L = 16384, C = 512; benchmarks/results.md, optimisation log).
  Shapes `[B, L, heads, D]`; L not a multiple of `chunk` (or at most `chunk`) is computed in one
  piece.
  """
  b, length, heads, d = q.shape
  if length <= chunk or length % chunk:
    return jax.nn.dot_product_attention(q, k, v, scale=scale)
  # Heads-major layouts, made once outside the loop: queries [n, B, H, chunk, D], keys [B, H, D, L],
  # values [B, H, L, D].
  blocks = q.reshape(b, length // chunk, chunk, heads, d).transpose(1, 0, 3, 2, 4)
  keys, values = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)

  def block(qb):  # Softmax in float32, as jax.nn.dot_product_attention computes it.
    logits = jnp.matmul(qb, keys, preferred_element_type=jnp.float32) * scale
    return jnp.matmul(jax.nn.softmax(logits, axis=-1).astype(v.dtype), values)

  out = jax.lax.map(block, blocks)  # [n, B, H, chunk, D]
  return out.transpose(1, 0, 3, 2, 4).reshape(b, length, heads, d)


class Downsample(nnx.Module):
  """Zero-pad bottom/right by 1, then conv3x3 stride 2 without padding.

  `[B, H, W, C] -> [B, H/2, W/2, C]`.
  """

  def __init__(self, channels: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, strides=2, padding=((0, 1), (0, 1)), dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.conv(x)


class Level(nnx.Module):
  """One resolution level: `block` (a list of ResnetBlocks), then `downsample` / `upsample`."""

  def __init__(self, in_channels: int, out_channels: int, num_blocks: int, *, resample: str | None,
               num_groups: int, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    blocks = []
    for _ in range(num_blocks):
      blocks.append(ResnetBlock(in_channels, out_channels, num_groups=num_groups, **kw))
      in_channels = out_channels
    self.block = nnx.List(blocks)
    self.downsample = Downsample(out_channels, **kw) if resample == 'down' else None
    self.upsample = Upsample(out_channels, **kw) if resample == 'up' else None

  def __call__(self, x: Array) -> Array:
    for block in self.block:
      x = block(x)
    if self.downsample is not None:
      x = self.downsample(x)
    if self.upsample is not None:
      x = self.upsample(x)
    return x


class Mid(nnx.Module):
  """The middle block: ResnetBlock `block_1` -> AttnBlock `attn_1` -> ResnetBlock `block_2`."""

  def __init__(self, channels: int, *, num_groups: int, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    kw = dict(num_groups=num_groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.block_1 = ResnetBlock(channels, channels, **kw)
    self.attn_1 = AttnBlock(channels, **kw)
    self.block_2 = ResnetBlock(channels, channels, **kw)

  def __call__(self, x: Array) -> Array:
    return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
  """Images `[B, H, W, in_channels]` -> moments `[B, H/f, W/f, 2*z_channels]`, f = 2**(levels-1).

  conv_in(in -> ch) -> per level `num_res_blocks` ResnetBlocks and a Downsample except at the last
  level -> mid -> GN -> SiLU -> conv_out(-> 2*z_channels) (double_z).
  """

  def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4),
               num_res_blocks: int = 2, z_channels: int = 4, in_channels: int = 3,
               num_groups: int = 32, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch_mult = tuple(ch_mult)
    self.dtype = dtype
    self.conv_in = _conv(in_channels, ch, 3, **kw)
    levels = []
    block_in = ch
    for level, mult in enumerate(ch_mult):
      levels.append(Level(block_in, ch * mult, num_res_blocks,
                          resample='down' if level != len(ch_mult) - 1 else None,
                          num_groups=num_groups, **kw))
      block_in = ch * mult
    self.down = nnx.List(levels)
    self.mid = Mid(block_in, num_groups=num_groups, **kw)
    self.norm_out = _group_norm(block_in, num_groups, **kw)
    self.conv_out = _conv(block_in, 2 * z_channels, 3, **kw)

  def __call__(self, x: Array) -> Array:
    h = self.conv_in(x.astype(self.dtype))
    for level in self.down:
      h = level(h)
    h = self.mid(h)
    return self.conv_out(nnx.silu(self.norm_out(h)))


class Decoder(nnx.Module):
  """Latents `[B, h, w, z_channels]` -> images `[B, h*f, w*f, out_channels]`, f = 2**(levels-1).

  conv_in(z -> ch*ch_mult[-1]) -> mid -> levels from deepest to shallowest, each with
  `num_res_blocks + 1` ResnetBlocks and an Upsample except at level 0 -> GN -> SiLU ->
  conv_out(-> out_channels). `up[i]` is level i (up[0] = full resolution), as in LDM checkpoints.
  """

  def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4),
               num_res_blocks: int = 2, z_channels: int = 4, out_channels: int = 3,
               num_groups: int = 32, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch_mult = tuple(ch_mult)
    self.dtype = dtype
    block_in = ch * ch_mult[-1]
    self.conv_in = _conv(z_channels, block_in, 3, **kw)
    self.mid = Mid(block_in, num_groups=num_groups, **kw)
    levels: list[Level | None] = [None] * len(ch_mult)
    for level in reversed(range(len(ch_mult))):
      levels[level] = Level(block_in, ch * ch_mult[level], num_res_blocks + 1,
                            resample='up' if level != 0 else None, num_groups=num_groups, **kw)
      block_in = ch * ch_mult[level]
    self.up = nnx.List(levels)
    self.norm_out = _group_norm(block_in, num_groups, **kw)
    self.conv_out = _conv(block_in, out_channels, 3, **kw)

  def __call__(self, z: Array) -> Array:
    h = self.mid(self.conv_in(z.astype(self.dtype)))
    for level in reversed(self.up):
      h = level(h)
    return self.conv_out(nnx.silu(self.norm_out(h)))


class AutoencoderKL(nnx.Module):
  """The SD KL-f8 autoencoder: Encoder, quant_conv 1x1, posterior, post_quant_conv 1x1, Decoder.

  Satisfies `first_stages.FirstStage`: `channels` = z_channels, `factor` = 2**(levels-1).
  Parameters are float32; `dtype` is the compute dtype (float32 or bfloat16); outputs are float32.
  """

  def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4),
               num_res_blocks: int = 2, z_channels: int = 4, num_groups: int = 32,
               scale_factor: float = SCALE_FACTOR, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    ch_mult = tuple(ch_mult)
    kw = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
              num_groups=num_groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.channels = z_channels
    self.factor = 2 ** (len(ch_mult) - 1)
    self.scale_factor = float(scale_factor)
    self.dtype = dtype
    self.encoder = Encoder(**kw)
    self.decoder = Decoder(**kw)
    conv_kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.quant_conv = _conv(2 * z_channels, 2 * z_channels, 1, **conv_kw)
    self.post_quant_conv = _conv(z_channels, z_channels, 1, **conv_kw)

  def _check_image_size(self, images: Array) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise UserError(f'the autoencoder encodes images of shape [B, H, W, 3], got '
                      f'{tuple(images.shape)}; pass NHWC RGB images.')
    h, w = images.shape[1:3]
    if h % self.factor or w % self.factor:
      raise UserError(
          f'image size {h}x{w} is not divisible by {self.factor}, the autoencoder\'s downsampling '
          f'factor; crop or resize images to a multiple of {self.factor} (e.g. '
          f'{h // self.factor * self.factor}x{w // self.factor * self.factor}).')

  def posterior(self, images: Array) -> tuple[Array, Array]:
    """The diagonal Gaussian posterior, unscaled.

    Args:
      images: `[B, H, W, 3]` in [-1, 1], H and W divisible by `factor`.

    Returns:
      `(mean, logvar)`, each `[B, H/factor, W/factor, z_channels]` float32; logvar clamped to
      [-30, 20].
    """
    self._check_image_size(images)
    moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def encode(self, images: Array) -> Array:
    """Scaled posterior mode: `[B, H, W, 3]` -> `[B, H/f, W/f, z_channels]` float32 (x 0.18215)."""
    mean, _ = self.posterior(images)
    return mean * self.scale_factor

  def decode(self, latents: Array) -> Array:
    """Scaled latents `[B, h, w, z_channels]` -> images `[B, h*f, w*f, 3]` float32 (not clamped)."""
    z = latents.astype(jnp.float32) / self.scale_factor
    return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

  def encode_tiled(self, images: Array, *, tile: int = ENCODE_TILE,
                   overlap: int = ENCODE_OVERLAP) -> Array:
    """`encode` over overlapping tiles (memory bounded by one tile); same shapes as `encode`.

    Args:
      images: `[B, H, W, 3]` in [-1, 1], H and W divisible by `factor`.
      tile: Tile edge in pixels, a multiple of `factor` (clamped to the image size).
      overlap: Overlap of neighbouring tiles in pixels, a multiple of `factor`, below `tile`.

    Returns:
      `[B, H/f, W/f, z_channels]` float32 scaled latents, tiles blended with linear ramps.
    """
    self._check_image_size(images)
    self._check_tiling(tile, overlap, self.factor, 'pixels')
    graphdef, state = nnx.split(self)
    fn = lambda x: nnx.merge(graphdef, state).encode(x)
    return tiling.tiled_apply(fn, images, tile, overlap, self.factor, 1, self.factor, self.channels)

  def decode_tiled(self, latents: Array, *, tile: int = DECODE_TILE,
                   overlap: int = DECODE_OVERLAP) -> Array:
    """`decode` over overlapping latent tiles (memory bounded by one tile); same shapes as `decode`.

    Args:
      latents: `[B, h, w, z_channels]` scaled latents.
      tile: Tile edge in latent pixels (clamped to the latent size).
      overlap: Overlap of neighbouring tiles in latent pixels, below `tile`.

    Returns:
      `[B, h*f, w*f, 3]` float32 images, tiles blended with linear ramps.
    """
    self._check_tiling(tile, overlap, 1, 'latent pixels')
    graphdef, state = nnx.split(self)
    fn = lambda z: nnx.merge(graphdef, state).decode(z)
    return tiling.tiled_apply(fn, latents, tile, overlap, 1, self.factor, 1, 3)

  def _check_tiling(self, tile: int, overlap: int, unit: int, what: str) -> None:
    if tile <= 0 or overlap < 0 or overlap >= tile or tile % unit or overlap % unit:
      raise UserError(
          f'tile={tile} and overlap={overlap} ({what}) are invalid; use 0 <= overlap < tile, both '
          f'multiples of {unit}.')


def autoencoder_from_config(first_stage_config, *, rngs: nnx.Rngs) -> AutoencoderKL:
  """Builds the autoencoder of `config.first_stage` with random weights (see weights.py).

  Args:
    first_stage_config: `config.first_stage` with `ch`, `ch_mult`, `num_res_blocks`, `z_channels`,
      `scale_factor` and `compute_dtype` in {'float32', 'bfloat16'}.
    rngs: Parameter RNG streams.

  Returns:
    The autoencoder, computing in `compute_dtype` with float32 parameters.
  """
  compute_dtype = first_stage_config.compute_dtype
  if compute_dtype not in DTYPES:
    raise UserError(f'config.first_stage.compute_dtype={compute_dtype!r} is not supported; use one '
                    f'of {sorted(DTYPES)}.')
  return AutoencoderKL(
      ch=first_stage_config.ch,
      ch_mult=tuple(first_stage_config.ch_mult),
      num_res_blocks=first_stage_config.num_res_blocks,
      z_channels=first_stage_config.z_channels,
      scale_factor=first_stage_config.scale_factor,
      dtype=DTYPES[compute_dtype],
      param_dtype=jnp.float32,
      rngs=rngs,
  )
