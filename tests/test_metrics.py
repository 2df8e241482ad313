"""Specification of the image metrics."""

import dm_pix
import jax
import numpy as np

from fmboost_jax import metrics


def test_psnr_matches_dm_pix_and_is_capped_for_exact_copies():
  k0, k1 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.uniform(k0, (3, 8, 8, 3), minval=-1, maxval=1)
  b = jax.numpy.clip(a + 0.1 * jax.random.normal(k1, a.shape), -1, 1)
  np.testing.assert_allclose(metrics.psnr(a, b), dm_pix.psnr(a * 0.5 + 0.5, b * 0.5 + 0.5),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics.psnr(a, a), 100.0)
  # A uniform error of 0.1 in [0, 1] units is 20 dB.
  np.testing.assert_allclose(metrics.psnr(a * 0 + 0.2, a * 0), 20.0, rtol=1e-5)


def test_ssim_is_one_for_identical_images_and_lower_for_noise():
  a = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
  np.testing.assert_allclose(metrics.ssim(a, a), 1.0, rtol=1e-5)
  noisy = a + 0.3 * jax.random.normal(jax.random.PRNGKey(1), a.shape)
  assert float(metrics.ssim(noisy, a).max()) < 0.9


def test_to_uint8_rounds_and_clips():
  np.testing.assert_array_equal(metrics.to_uint8(np.array([-2.0, -1.0, 0.0, 1.0, 3.0])),
                                [0, 0, 128, 255, 255])
