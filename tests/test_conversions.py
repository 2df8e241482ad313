"""`conversions`: what users hold <-> the model layer's float32 NHWC arrays, against values worked
out by hand (no model is built)."""

import numpy as np
import pytest
from PIL import Image

from fmboost_jax import conversions
from fmboost_jax.errors import UserError


def test_images_in_maps_pil_uint8_and_float_to_minus_one_one():
  pixels = np.array([[[0, 51, 255], [255, 102, 0]]], np.uint8)  # [1, 2, 3]
  # x / 127.5 - 1: 0 -> -1, 51 -> -0.6, 102 -> -0.2, 255 -> 1.
  expected = np.array([[[-1.0, -0.6, 1.0], [1.0, -0.2, -1.0]]], np.float32)
  from_pil, from_uint8, from_float = conversions.images_in(
      [Image.fromarray(pixels), pixels, pixels / 255.0])
  for got in (from_pil, from_uint8, from_float):
    assert got.dtype == np.float32 and got.shape == (1, 2, 3)
    np.testing.assert_allclose(got, expected, atol=1e-6)
  # A greyscale PIL image becomes three equal channels; a batch [N, h, w, 3] becomes N images.
  grey = conversions.images_in(Image.fromarray(np.full((2, 2), 51, np.uint8), 'L'))
  np.testing.assert_allclose(grey[0], np.full((2, 2, 3), -0.6), atol=1e-6)
  assert len(conversions.images_in(np.zeros((5, 4, 4, 3), np.uint8))) == 5


def test_latents_in_reads_nchw_and_nhwc_and_applies_the_scale_factor():
  nchw = np.arange(2 * 4 * 2 * 3, dtype=np.float64).reshape(2, 4, 2, 3)  # [N, C, h, w]
  got = conversions.latents_in(nchw, channels=4, scale_factor=0.5, scaled=False)
  assert len(got) == 2 and got[0].shape == (2, 3, 4) and got[0].dtype == np.float32
  # Element (n=1, c=2, y=1, x=0) of NCHW is at [y, x, c] of latent n, times 0.5.
  assert got[1][1, 0, 2] == nchw[1, 2, 1, 0] * 0.5 == (24 + 2 * 6 + 3) * 0.5
  nhwc = conversions.latents_in([nchw[0].transpose(1, 2, 0)], 4, 0.5, scaled=True)
  np.testing.assert_array_equal(nhwc[0], nchw[0].transpose(1, 2, 0))  # Already scaled.
  with pytest.raises(UserError, match=r'latent 0 holds latents of shape \(1, 3, 5, 5\) without '
                                      'the 4 channels'):
    conversions.latents_in(np.zeros((3, 5, 5)), 4, 0.5, scaled=True)
  with pytest.raises(UserError, match='holds a <U1 array'):
    conversions.latents_in(np.array(['a']), 4, 0.5, scaled=True)


def test_outputs_as_pil_np_and_latent():
  image = np.array([[[-1.0, 0.0, 1.0], [-3.0, 0.5, 2.0]]], np.float32)  # [1, 2, 3] in ~[-1, 1]
  latent = np.arange(6, dtype=np.float32).reshape(1, 2, 3)  # [h, w, C]
  np.testing.assert_allclose(conversions.output(image, latent, 'np'),
                             [[[0.0, 0.5, 1.0], [0.0, 0.75, 1.0]]])
  # (x + 1) * 127.5 rounded and clipped: -1 -> 0, 0 -> 128 (127.5 rounds to even), 0.5 -> 191.
  pil = conversions.output(image, latent, 'pil')
  assert isinstance(pil, Image.Image) and pil.size == (2, 1)
  np.testing.assert_array_equal(np.asarray(pil), [[[0, 128, 255], [0, 191, 255]]])
  chw = conversions.output(image, latent, 'latent')
  assert chw.shape == (3, 1, 2) and chw[2, 0, 1] == latent[0, 1, 2] == 5
  same = [np.zeros((2, 2)), np.ones((2, 2))]
  assert conversions.outputs(same, 'np').shape == (2, 2, 2)
  assert isinstance(conversions.outputs([np.zeros((2, 2)), np.zeros((3, 2))], 'np'), list)
  with pytest.raises(UserError, match=r"output_type='tensor' is unknown; use one of \('pil'"):
    conversions.check_output_type('tensor')
