"""Tiled application of a convolutional network to images larger than one call should see: the
SD autoencoder encodes and decodes 1024 px and larger images as overlapping tiles blended with
weights that sum to one at every output pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def tiles_1d(length: int, tile: int, overlap: int) -> tuple[int, list[int]]:
  """Tile size (clamped to `length`) and start offsets covering [0, length); the last is flush."""
  tile = min(tile, length)
  if tile == length:
    return tile, [0]
  starts = list(range(0, length - tile, tile - overlap)) + [length - tile]
  return tile, starts


def blend_weights_1d(length: int, tile: int, starts: Sequence[int], scale: int) -> np.ndarray:
  """Per-tile 1-D blending weights `[num_tiles, tile*scale]` that sum to 1 at every output pixel.

  Each tile's weight ramps linearly, (i+1)/(n+1), across the n output pixels it shares with its
  left (top) neighbour, and mirrored towards its right (bottom) neighbour; it is 1 elsewhere.
  Normalising by the sum over tiles makes the weights a partition of unity even where more than
  two tiles overlap (the flush last tile).
  """
  size = tile * scale
  weights = np.ones((len(starts), size), np.float64)
  ramp = lambda n: (np.arange(n) + 1.0) / (n + 1.0)
  for i in range(len(starts)):
    if i > 0:
      n = (starts[i - 1] + tile - starts[i]) * scale
      weights[i, :n] *= ramp(n)
    if i < len(starts) - 1:
      n = (starts[i] + tile - starts[i + 1]) * scale
      weights[i, size - n:] *= ramp(n)[::-1]
  total = np.zeros(length * scale, np.float64)
  for i, s in enumerate(starts):
    total[s * scale:s * scale + size] += weights[i]
  for i, s in enumerate(starts):
    weights[i] /= total[s * scale:s * scale + size]
  return weights.astype(np.float32)


def tiled_apply(fn, x: Array, tile: int, overlap: int, unit: int, scale_num: int,
                 scale_den: int, out_channels: int) -> Array:
  """Applies `fn` to overlapping spatial tiles of `x` in a `lax.scan` and blends the outputs.

  Args:
    fn: Maps `[B, th, tw, C]` to `[B, th*scale_num/scale_den, tw*..., out_channels]` float32.
    x: `[B, H, W, C]` input.
    tile: Tile edge in input pixels (clamped to H and W).
    overlap: Overlap of neighbouring tiles in input pixels.
    unit: Tile starts, tile and overlap are multiples of this (the input pixels of one output
      pixel when encoding, 1 when decoding).
    scale_num, scale_den: Output pixels per input pixel, as a fraction.
    out_channels: Channels of the output.

  Returns:
    `[B, H*scale, W*scale, out_channels]` float32.
  """
  b, h, w, _ = x.shape
  th, starts_h = tiles_1d(h, tile, overlap)
  tw, starts_w = tiles_1d(w, tile, overlap)
  for value in (th, tw, *starts_h, *starts_w):
    assert value % unit == 0, (value, unit)
  # Blending happens on the output grid; a unit of `unit` input pixels is one output pixel there.
  out_per_unit = scale_num * unit // scale_den
  wh = blend_weights_1d(h // unit, th // unit, [s // unit for s in starts_h], out_per_unit)
  ww = blend_weights_1d(w // unit, tw // unit, [s // unit for s in starts_w], out_per_unit)
  grid = [(i, j) for i in range(len(starts_h)) for j in range(len(starts_w))]
  index_h = jnp.asarray([i for i, _ in grid], jnp.int32)
  index_w = jnp.asarray([j for _, j in grid], jnp.int32)
  start_h = jnp.asarray(starts_h, jnp.int32)
  start_w = jnp.asarray(starts_w, jnp.int32)
  out_th, out_tw = th * scale_num // scale_den, tw * scale_num // scale_den
  wh, ww = jnp.asarray(wh), jnp.asarray(ww)

  def body(acc, ij):
    i, j = ij
    sh, sw = start_h[i], start_w[j]
    x_tile = jax.lax.dynamic_slice(x, (0, sh, sw, 0), (b, th, tw, x.shape[-1]))
    y = fn(x_tile) * (wh[i][:, None, None] * ww[j][None, :, None])
    oh, ow = sh * scale_num // scale_den, sw * scale_num // scale_den
    cur = jax.lax.dynamic_slice(acc, (0, oh, ow, 0), (b, out_th, out_tw, out_channels))
    return jax.lax.dynamic_update_slice(acc, cur + y, (0, oh, ow, 0)), None

  acc = jnp.zeros((b, h * scale_num // scale_den, w * scale_num // scale_den, out_channels),
                  jnp.float32)
  acc, _ = jax.lax.scan(body, acc, (index_h, index_w))
  return acc
