"""Specification of the low-res synthesis and the upsampling modes (reference 1.5, 9.6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax import first_stages, upsampling


class ScaledFirstStage:
  """A stand-in autoencoder: 2x2 average pooling to 4 channels, nearest upsampling back."""

  channels, factor = 4, 2

  def encode(self, images):
    b, h, w, _ = images.shape
    pooled = images.reshape(b, h // 2, 2, w // 2, 2, 3).mean(axis=(2, 4))
    return jnp.concatenate([pooled, pooled.mean(-1, keepdims=True)], -1)

  def decode(self, latents):
    return jnp.repeat(jnp.repeat(latents[..., :3], 2, axis=1), 2, axis=2)


def images(shape=(2, 16, 16, 3), seed=0):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1, maxval=1)


def test_2x_bilinear_downsampling_is_2x2_average_pooling():
  x = images()
  pooled = x.reshape(2, 8, 2, 8, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(upsampling.low_res_images(x, 8), pooled, atol=1e-6)


def test_bilinear_matches_half_pixel_interpolation():
  # 1-D check of torch's align_corners=False rule: output i samples input (i + 0.5) / 2 - 0.5.
  x = jnp.arange(4.0).reshape(1, 1, 4, 1)
  up = upsampling.resize(x, (1, 8), 'linear')[0, 0, :, 0]
  np.testing.assert_allclose(up, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], atol=1e-6)


def test_nearest_x2_is_repeat():
  x = images((1, 4, 6, 3))
  np.testing.assert_array_equal(upsampling.resize(x, (8, 12), 'nearest'),
                                jnp.repeat(jnp.repeat(x, 2, 1), 2, 2))


def test_psu_in_pixel_space_is_bilinear_upsampling():
  x = images()
  lr = upsampling.low_res_images(x, 8)
  x1, x_up = upsampling.training_pair(first_stages.IdentityFirstStage(), {'image': x}, 8, 'psu')
  np.testing.assert_array_equal(x1, x)
  np.testing.assert_allclose(x_up, upsampling.resize(lr, (16, 16), 'linear'), atol=1e-6)


def test_psu_encodes_upsampled_pixels_and_decodes_latents_without_pixels():
  fs = ScaledFirstStage()
  lr_pixels = images((2, 8, 8, 3))
  from_pixels = upsampling.upsample(fs, 'psu', (8, 8), low_res_images=lr_pixels)
  np.testing.assert_allclose(from_pixels, fs.encode(upsampling.resize(lr_pixels, (16, 16),
                                                                      'linear')), atol=1e-6)
  z = fs.encode(lr_pixels)  # [2, 4, 4, 4]
  from_latents = upsampling.upsample(fs, 'psu', (8, 8), low_res_latents=z)
  expected = fs.encode(upsampling.resize(fs.decode(z), (16, 16), 'linear'))
  np.testing.assert_allclose(from_latents, expected, atol=1e-6)
  assert from_latents.shape == (2, 8, 8, 4)


def test_latent_space_modes_resize_the_encoded_low_res_input():
  fs = ScaledFirstStage()
  lr_pixels = images((2, 8, 8, 3))
  z = fs.encode(lr_pixels)
  for mode, method in (('bilinear', 'linear'), ('nearest', 'nearest')):
    np.testing.assert_allclose(upsampling.upsample(fs, mode, (8, 8), low_res_images=lr_pixels),
                               upsampling.resize(z, (8, 8), method), atol=1e-6)
  with pytest.raises(ValueError, match='unknown'):
    upsampling.upsample(fs, 'bicubic', (8, 8), low_res_latents=z)


def test_uint8_batches_are_normalised_on_the_device_as_x_over_127_5_minus_1():
  """The input pipeline sends pixels; the training pair of a uint8 batch is that of its pixels
  mapped to [-1, 1] by x / 127.5 - 1 (worked out here in float64: 0 -> -1, 255 -> 1)."""
  pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  pixels[0, 0, 0] = (0, 127, 255)
  identity = first_stages.IdentityFirstStage()
  x1, x_up = jax.jit(lambda b: upsampling.training_pair(identity, b, 8, 'psu'))(
      {'image': jnp.asarray(pixels)})
  expected = pixels.astype(np.float64) / 127.5 - 1
  np.testing.assert_allclose(np.asarray(x1), expected, rtol=0, atol=3e-7)  # float32 rounding.
  assert np.asarray(x1)[0, 0, 0].tolist() == [-1.0, pytest.approx(-1 / 255, abs=3e-7), 1.0]
  float_pair = upsampling.training_pair(identity, {'image': jnp.asarray(expected, jnp.float32)},
                                        8, 'psu')
  np.testing.assert_allclose(np.asarray(x_up), np.asarray(float_pair[1]), rtol=0, atol=1e-6)
