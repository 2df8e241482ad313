"""Tests for fmboost_jax/images.py: pixel conversion, file decoding, the bundled photographs."""

import socket
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fmboost_jax import data_sources as ds
from fmboost_jax import images
from fmboost_jax import input_pipeline as ip
from tests.data_helpers import make_config


def write_png16(path, array):
  """Writes a 16-bit PNG ([H, W, 1|3|4] uint16) by hand: Pillow cannot write 16-bit colour."""
  height, width, channels = array.shape
  color_type = {1: 0, 3: 2, 4: 6}[channels]
  raw = b''.join(b'\x00' + array[y].astype('>u2').tobytes() for y in range(height))

  def chunk(tag, body):
    return struct.pack('>I', len(body)) + tag + body + struct.pack('>I', zlib.crc32(tag + body))

  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n'
            + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, color_type, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


# ----------------------------------------------------------------------------------------------
# Pixel conversion.


def test_array_conversion_and_range():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  np.testing.assert_array_equal(images.to_rgb_uint8(gray), np.stack([gray] * 3, -1))
  rgba = np.array([[[100, 50, 0, 0], [100, 50, 0, 255], [100, 50, 0, 128]]], np.uint8)
  np.testing.assert_array_equal(images.to_rgb_uint8(rgba)[0],
                                [[255, 255, 255], [100, 50, 0], [177, 152, 127]])
  np.testing.assert_array_equal(images.to_rgb_uint8(np.array([[True, False]]))[0, :, 0], [255, 0])
  np.testing.assert_array_equal(images.to_rgb_uint8(np.array([[0.0, 0.5, 1.0]]))[0, :, 1],
                                [0, 128, 255])
  np.testing.assert_array_equal(
      images.to_rgb_uint8(np.array([[0, 257, 65535, 300]], np.uint16))[0, :, 2], [0, 1, 255, 1])
  x = images.normalize(np.array([0, 1, 254, 255], np.uint8))
  assert x.dtype == np.float32 and x[0] == -1.0 and x[-1] == 1.0
  np.testing.assert_allclose(x[1:3], [1 / 127.5 - 1, 254 / 127.5 - 1], rtol=1e-6)


def test_file_conversion_modes(tmp_path):
  gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1))
  Image.fromarray(gray, 'L').save(tmp_path / 'gray.png')
  np.testing.assert_array_equal(images.decode_image_file(tmp_path / 'gray.png'),
                                np.stack([gray] * 3, -1))

  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[..., :3] = (200, 100, 50)
  rgba[..., 3] = [[0, 255], [128, 64]]
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
  out = images.decode_image_file(tmp_path / 'rgba.png')
  np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # Transparent -> white.
  np.testing.assert_array_equal(out[0, 1], [200, 100, 50])  # Opaque -> unchanged.
  alpha = 128 / 255
  np.testing.assert_array_equal(out[1, 0], np.round(np.array([200, 100, 50]) * alpha
                                                    + 255 * (1 - alpha)))

  la = np.stack([np.full((2, 2), 40, np.uint8), np.array([[0, 255], [255, 0]], np.uint8)], -1)
  Image.fromarray(la, 'LA').save(tmp_path / 'la.png')
  np.testing.assert_array_equal(images.decode_image_file(tmp_path / 'la.png')[..., 0],
                                [[255, 40], [40, 255]])

  v16 = (np.arange(30, dtype=np.uint16).reshape(5, 6) * 2000 + 7)
  Image.fromarray(v16).save(tmp_path / 'gray16.png')
  assert Image.open(tmp_path / 'gray16.png').mode == 'I;16'
  np.testing.assert_array_equal(images.decode_image_file(tmp_path / 'gray16.png'),
                                np.stack([v16 >> 8] * 3, -1))
  rgb16 = np.stack([v16, v16 // 2, 65535 - v16], -1)
  write_png16(tmp_path / 'rgb16.png', rgb16)
  np.testing.assert_array_equal(images.decode_image_file(tmp_path / 'rgb16.png'), rgb16 >> 8)

  palette = Image.new('P', (3, 1))
  palette.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60] + [0] * (253 * 3))
  palette.putdata([0, 1, 2])
  palette.save(tmp_path / 'palette.png', transparency=0)
  np.testing.assert_array_equal(images.decode_image_file(tmp_path / 'palette.png')[0],
                                [[255, 255, 255], [10, 20, 30], [40, 50, 60]])

  Image.fromarray(np.array([[True, False, True]])).convert('1').save(tmp_path / 'bits.bmp')
  np.testing.assert_array_equal(images.decode_image_file(tmp_path / 'bits.bmp')[0, :, 0],
                                [255, 0, 255])


# ----------------------------------------------------------------------------------------------
# The photographs bundled with scikit-image.


def test_skimage_photos_load_offline(monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError('network access attempted')

  monkeypatch.setattr(socket.socket, 'connect', no_network)
  images._load_skimage_photos.cache_clear()
  photos = images.load_skimage_photos()
  assert [name for name, _ in photos] == list(images.SKIMAGE_PHOTOS)
  assert len(photos) == 15
  for _, image in photos:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
  usable = [name for name, image in photos if ds.Geometry(64, strips=True).usable(*image.shape[:2])]
  assert len(usable) >= 10 and len(usable) == 15
  import skimage.data  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(photos[0][1], skimage.data.astronaut())
  np.testing.assert_array_equal(photos[-1][1][..., 2], skimage.data.coins())

  with pytest.raises(ds.DataError, match='None of the 15 bundled scikit-image photographs'):
    ip.create_train_iterator(make_config(size=1024))
