"""Specification of the image metrics."""

import dm_pix
import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage

from fmboost_jax import metrics


def test_psnr_matches_dm_pix_and_is_capped_for_exact_copies():
  k0, k1 = jax.random.split(jax.random.key(0))
  a = jax.random.uniform(k0, (3, 8, 8, 3), minval=-1, maxval=1)
  b = jax.numpy.clip(a + 0.1 * jax.random.normal(k1, a.shape), -1, 1)
  np.testing.assert_allclose(metrics.psnr(a, b), dm_pix.psnr(a * 0.5 + 0.5, b * 0.5 + 0.5),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics.psnr(a, a), 100.0)
  # A uniform error of 0.1 in [0, 1] units is 20 dB.
  np.testing.assert_allclose(metrics.psnr(a * 0 + 0.2, a * 0), 20.0, rtol=1e-5)


def test_ssim_is_one_for_identical_images_and_lower_for_noise():
  a = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  np.testing.assert_allclose(metrics.ssim(a, a), 1.0, rtol=1e-5)
  noisy = a + 0.3 * jax.random.normal(jax.random.key(1), a.shape)
  assert float(metrics.ssim(noisy, a).max()) < 0.9


def test_mse_is_per_image_in_minus_one_one_units():
  a = np.zeros((2, 4, 4, 3), np.float32)
  b = a.copy()
  b[1] = 0.5  # 0.25 everywhere in image 1.
  np.testing.assert_allclose(metrics.mse(b, a), [0.0, 0.25])


def test_to_uint8_rounds_and_clips():
  np.testing.assert_array_equal(metrics.to_uint8(np.array([-2.0, -1.0, 0.0, 1.0, 3.0])),
                                [0, 0, 128, 255, 255])


def _random_covariance(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_equals_the_closed_form_for_gaussians():
  rng = np.random.default_rng(0)
  d = 16
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
  a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
  closed = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  np.testing.assert_allclose(metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), closed,
                             rtol=1e-10)
  # Full, non-commuting covariances: pytorch-fid's formula with scipy's sqrtm of S1 S2.
  s1, s2 = _random_covariance(rng, d), _random_covariance(rng, d)
  closed = np.sum((mu1 - mu2)**2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), closed, rtol=1e-9)
  assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_fid_of_samples_converges_to_the_distance_of_their_gaussians():
  rng = np.random.default_rng(1)
  d, n = 8, 200_000
  s1, s2 = _random_covariance(rng, d), _random_covariance(rng, d)
  mu2 = np.full(d, 0.5)
  x = rng.multivariate_normal(np.zeros(d), s1, n)
  y = rng.multivariate_normal(mu2, s2, n)
  exact = metrics.frechet_distance(np.zeros(d), s1, mu2, s2)
  assert exact > 1.0
  np.testing.assert_allclose(metrics.fid(x, y), exact, rtol=0.02)


def test_fid_with_fewer_samples_than_dimensions_matches_regularised_sqrtm():
  """Singular covariances (10 samples, 64 dimensions): the value pytorch-fid gets from scipy's
  sqrtm after adding 1e-6 I to both covariances."""
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 1.0
  (m1, s1), (m2, s2) = metrics.feature_statistics(x), metrics.feature_statistics(y)
  offset = 1e-6 * np.eye(64)
  reference = (np.sum((m1 - m2)**2) + np.trace(s1) + np.trace(s2) -
               2 * np.trace(np.real(scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset)))))
  np.testing.assert_allclose(metrics.fid(x, y), reference, rtol=1e-5)
  # fid's route for few samples (singular values of an [N1, N2] product) against the
  # eigendecompositions of the [D, D] covariances, with 12 samples on one side (their square roots
  # of round-off where the eigenvalues are 0 differ by about 1e-8 relative).
  y12 = np.concatenate([y, rng.normal(size=(2, 64))])
  np.testing.assert_allclose(metrics.fid(x, y12), metrics.frechet_distance(
      *metrics.feature_statistics(x), *metrics.feature_statistics(y12)), rtol=1e-7)
  assert abs(metrics.fid(x, x)) < 1e-9
  with pytest.raises(ValueError, match='at least 2'):
    metrics.fid(x[:1], y)


def test_crop_boxes_are_seeded_in_bounds_and_shared():
  boxes = metrics.crop_boxes(3, num_images=5, height=32, width=48, crop_size=16, num_crops=4)
  assert boxes.shape == (5, 4, 2)
  assert boxes[..., 0].max() <= 16 and boxes[..., 1].max() <= 32 and boxes.min() >= 0
  np.testing.assert_array_equal(boxes, metrics.crop_boxes(3, 5, 32, 48, 16, 4))
  assert not np.array_equal(boxes, metrics.crop_boxes(4, 5, 32, 48, 16, 4))
  images = np.arange(5 * 32 * 48 * 3, dtype=np.float32).reshape(5, 32, 48, 3)
  crops = metrics.crops(images, boxes, 16)
  assert crops.shape == (20, 16, 16, 3)
  y, x = boxes[2, 1]
  np.testing.assert_array_equal(crops[2 * 4 + 1], images[2, y:y + 16, x:x + 16])
  with pytest.raises(ValueError, match='crop_size=40'):
    metrics.crop_boxes(0, 1, 32, 48, 40, 1)


def test_radial_spectrum_finds_a_single_frequency():
  s, k = 32, 5
  x = np.cos(2 * np.pi * k * np.arange(s) / s)[None, :, None, None] * np.ones((2, s, s, 3))
  spectrum = metrics.radial_power_spectrum(x.transpose(0, 2, 1, 3))
  assert spectrum.shape == (s // 2,)
  assert np.argmax(spectrum) == k - 1  # Bins are k = 1 .. S/2.
  assert spectrum[k - 1] > 1e6 * np.delete(spectrum, k - 1).max()


def test_spectral_detail_sees_blur_as_negative_and_noise_as_positive():
  rng = np.random.default_rng(0)
  target = np.clip(rng.normal(scale=0.3, size=(4, 32, 32, 3)), -1, 1)
  blurred = np.stack([scipy.ndimage.gaussian_filter(t, sigma=(1.5, 1.5, 0)) for t in target])
  noisy = target + rng.normal(scale=0.3, size=target.shape)
  spectrum = metrics.radial_power_spectrum
  same = metrics.spectral_detail(spectrum(target), spectrum(target), 16)
  assert same == {'spectral_distance': 0.0, 'hf_energy_db': 0.0}
  blur = metrics.spectral_detail(spectrum(blurred), spectrum(target), 16)
  noise = metrics.spectral_detail(spectrum(noisy), spectrum(target), 16)
  assert blur['hf_energy_db'] < -10 and noise['hf_energy_db'] > 2
  assert blur['spectral_distance'] > 0.5 and 0.1 < noise['spectral_distance'] < 0.5
