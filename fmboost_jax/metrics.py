"""Image metrics on float images in [-1, 1], NHWC."""

import dm_pix  # SSIM; PSNR is checked against dm_pix.psnr in tests/test_metrics.py.
import jax
import jax.numpy as jnp


def to_unit(images: jax.Array) -> jax.Array:
  """[-1, 1] -> [0, 1], clipped."""
  return jnp.clip(images * 0.5 + 0.5, 0.0, 1.0)


def psnr(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Per-image PSNR in dB [B] of images in [-1, 1], both clipped to [0, 1] first.

  Capped at 100 dB (MSE 1e-10), so an exact reconstruction cannot make a mean infinite.
  """
  mse = jnp.mean(jnp.square(to_unit(pred) - to_unit(target)), axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def ssim(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Per-image SSIM [B] (Gaussian 11x11, sigma 1.5, data range 1) of images in [-1, 1]."""
  return dm_pix.ssim(to_unit(pred), to_unit(target), max_val=1.0)


def to_uint8(images) -> jax.Array:
  """[-1, 1] float -> uint8 in [0, 255] (rounded)."""
  return jnp.round(to_unit(jnp.asarray(images)) * 255).astype(jnp.uint8)
