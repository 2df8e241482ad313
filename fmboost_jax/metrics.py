"""Image metrics on float images in [-1, 1], NHWC: PSNR, SSIM, MSE, FID and patch-FID from Inception
features (models/inception.py), and a spectral detail measure that needs no weights."""

import jax
import jax.numpy as jnp
import numpy as np


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
  import dm_pix  # noqa: PLC0415  (here: boosting and the train step run without dm_pix)
  return dm_pix.ssim(to_unit(pred), to_unit(target), max_val=1.0)


def to_uint8(images) -> jax.Array:
  """[-1, 1] float -> uint8 in [0, 255] (rounded)."""
  return jnp.round(to_unit(jnp.asarray(images)) * 255).astype(jnp.uint8)


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Per-image mean squared error [B] in [-1, 1] units (reference 6.4), unclipped."""
  return jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))


# ----------------------------------------------------------------------------- FID


def _centred(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and the centred features over sqrt(N - 1) [N, D]: A, with covariance A^T A."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise ValueError(f'feature statistics need at least 2 feature vectors [N, D]; got {f.shape}.')
  mean = f.mean(axis=0)
  return mean, (f - mean) / np.sqrt(len(f) - 1)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
  mean, a = _centred(features)
  return mean, a.T @ a


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (eigh; round-off below
  zero clipped)."""
  w, v = np.linalg.eigh(m)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Frechet distance of two Gaussians, ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

  float64 throughout. Tr (S1 S2)^(1/2) is computed as the trace of the symmetric square root
  (S1^(1/2) S2 S1^(1/2))^(1/2) (the same eigenvalues), with two symmetric eigendecompositions: the
  same value as pytorch-fid's scipy `sqrtm` of S1 S2 (tests/test_metrics.py), also when fewer
  samples than dimensions make the covariances singular, and about 4x faster at 2048-d.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  root1 = _psd_sqrt(sigma1)
  inner = root1 @ sigma2 @ root1
  trace_root = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def fid(real_features: np.ndarray, fake_features: np.ndarray) -> float:
  """FID between two sets of Inception pool features [N, 2048] (any N >= 2 each).

  With fewer feature vectors than dimensions in either set (a small evaluation, p-FID of few
  crops), the covariances A^T A and B^T B (`_centred`) have rank below D, and Tr (S1 S2)^(1/2) is
  the sum of the singular values of the [N1, N2] matrix A B^T (S1 S2 and A B^T B A^T share their
  non-zero eigenvalues): the same value as `frechet_distance` (tests/test_metrics.py) without its
  two D x D eigendecompositions (about 2 s each at D = 2048 on 2 CPU cores).
  """
  (mean1, a), (mean2, b) = _centred(real_features), _centred(fake_features)
  if min(len(a), len(b)) > a.shape[1]:
    return frechet_distance(mean1, a.T @ a, mean2, b.T @ b)
  diff = mean1 - mean2
  trace_root = np.sum(np.linalg.svd(a @ b.T, compute_uv=False))
  return float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2.0 * trace_root)


def crop_boxes(seed: int, num_images: int, height: int, width: int, crop_size: int,
               num_crops: int) -> np.ndarray:
  """Top-left corners [num_images, num_crops, 2] of uniformly random crop_size squares.

  Patch-FID (reference 6.1) applies the same boxes to the real and the generated images.
  """
  if not 0 < crop_size <= min(height, width):
    raise ValueError(f'crop_size={crop_size} must be in [1, {min(height, width)}] for '
                     f'{height}x{width} images.')
  rng = np.random.default_rng(seed)
  top = rng.integers(0, height - crop_size + 1, (num_images, num_crops))
  left = rng.integers(0, width - crop_size + 1, (num_images, num_crops))
  return np.stack([top, left], axis=-1)


def crops(images: np.ndarray, boxes: np.ndarray, crop_size: int) -> np.ndarray:
  """images [N, H, W, C], boxes [N, K, 2] -> crops [N * K, crop_size, crop_size, C], image-major."""
  return np.stack([images[i, y:y + crop_size, x:x + crop_size]
                   for i in range(len(images)) for y, x in boxes[i]])


# ----------------------------------------------------------------------------- detail


def radial_power_spectrum(images: np.ndarray) -> np.ndarray:
  """Mean radially averaged power spectrum [S // 2] of square images [N, S, S, C] in [-1, 1].

  Per image and channel: |FFT2|^2 of the mean-free image, averaged over rings of integer radius
  k = 1 .. S/2 (in cycles per image; k = S/2 is the Nyquist frequency), then over images and
  channels.
  """
  x = np.asarray(images, np.float64)
  n, h, w, _ = x.shape
  if h != w:
    raise ValueError(f'the radial spectrum needs square images; got {h}x{w}.')
  x = x - x.mean(axis=(1, 2), keepdims=True)
  power = np.abs(np.fft.fft2(x, axes=(1, 2)))**2 / (h * w)
  fy, fx = np.meshgrid(np.fft.fftfreq(h) * h, np.fft.fftfreq(w) * w, indexing='ij')
  radius = np.rint(np.hypot(fy, fx)).astype(int)
  mean_power = power.mean(axis=(0, 3))
  bins = np.arange(1, h // 2 + 1)
  return np.array([mean_power[radius == k].mean() for k in bins])


def spectral_detail(pred_spectrum: np.ndarray, target_spectrum: np.ndarray,
                    low_res_size: int) -> dict[str, float]:
  """How the outputs' detail compares with the ground truth's, without any learned network.

  Args:
    pred_spectrum, target_spectrum: `radial_power_spectrum` of the outputs and of the ground truth.
    low_res_size: side of the low-res input; frequencies above its Nyquist (k > low_res_size / 2)
      are the detail the upsampler has to add.

  Returns:
    spectral_distance: mean over frequencies k = 1 .. S/2 of |log10 P_pred(k) - log10 P_target(k)|
      (0 = the same power at every frequency; 0.1 = 26 % off on average).
    hf_energy_db: 10 log10 of the ratio of power above the low-res Nyquist frequency, pred over
      target: negative = blurrier than the ground truth (what regression does), positive = more
      high-frequency energy than it (invented detail or noise).
  """
  p, t = np.asarray(pred_spectrum), np.asarray(target_spectrum)
  high = np.arange(1, len(t) + 1) > low_res_size // 2
  return {
      'spectral_distance': float(np.mean(np.abs(np.log10(p) - np.log10(t)))),
      'hf_energy_db': float(10 * np.log10(p[high].sum() / t[high].sum())) if high.any() else 0.0,
  }
