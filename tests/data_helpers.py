"""Helpers for the data tests (test_images, test_data_sources, test_input_pipeline): a small
config and images whose pixels name the image, the row and the column."""

import numpy as np

from configs import default


def make_config(source='skimage', size=16, batch_size=4, num_val_images=2, holdout='strips',
                **data):
  config = default.get_config()
  config.data.holdout = holdout
  config.seed = 7
  config.data.source = source
  config.data.high_res_size = size
  config.data.low_res_size = size // 2
  config.data.batch_size = batch_size
  config.data.num_val_images = num_val_images
  config.data.num_threads = 2
  config.data.prefetch_buffer_size = 4
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


def coded_image(k, height, width):
  """uint8 [H, W, 3]: channel 0 names the image (10 + 30 k), channel 1 is the row, 2 the column."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  return np.stack([np.full((height, width), 10 + 30 * k), rows, cols], -1).astype(np.uint8)


def to_uint8(x):
  """Pixels in [0, 255] (int64) of uint8 batches, or of float images in [-1, 1]."""
  x = np.asarray(x)
  return x.astype(np.int64) if x.dtype == np.uint8 else np.round((x + 1.0) * 127.5).astype(
      np.int64)


def image_ids(images):
  """Which coded image each [N, S, S, 3] crop in [-1, 1] came from (robust to JPEG noise)."""
  return np.round((to_uint8(images[:, 0, 0, 0]) - 10) / 30).astype(np.int64).tolist()
