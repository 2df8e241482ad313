"""Single images: file decoding, pixel conversion, and the photographs bundled with scikit-image.

Pixel conversion: grayscale -> RGB by replication; alpha (RGBA, LA, palette with transparency) is
composited on white; 16-bit images keep their high byte (v >> 8, as Pillow does for 16-bit colour
PNGs); bool / 1-bit images map to {0, 255}; float arrays are taken as [0, 1]. Then
x / 127.5 - 1 gives float32 in [-1, 1].
"""

from __future__ import annotations

import functools
import io
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from fmboost_jax import storage

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')

# Photographs shipped inside scikit-image that need no download (grayscale ones become RGB).
# Sizes (H x W): astronaut 512x512, coffee 400x600, chelsea 300x451, rocket 427x640,
# hubble_deep_field 872x1000, retina 1411x1411, stereo_motorcycle 500x741 (x2),
# immunohistochemistry 512x512; grayscale camera, brick, grass, gravel, moon 512x512, coins 303x384.
SKIMAGE_PHOTOS = (
    'astronaut',
    'coffee',
    'chelsea',
    'rocket',
    'hubble_deep_field',
    'retina',
    'stereo_motorcycle_left',
    'stereo_motorcycle_right',
    'immunohistochemistry',
    'camera',
    'brick',
    'grass',
    'gravel',
    'moon',
    'coins',
)


# ----------------------------------------------------------------------------------------------
# Pixel conversion.


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
  """Converts a decoded image array to 8-bit RGB.

  Args:
    image: [H, W], [H, W, 1] (gray), [H, W, 2] (gray + alpha), [H, W, 3] (RGB) or [H, W, 4]
      (RGBA) array of dtype bool ({0, 1}), uint8 ([0, 255]), uint16 / int32 ([0, 65535], 16-bit)
      or float ([0, 1]).

  Returns:
    uint8 [H, W, 3] in [0, 255]. Alpha is composited on white; 16-bit values keep their high
    byte (v >> 8).

  Raises:
    ValueError: If the array does not have one of the shapes above.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f'Expected an [H, W], [H, W, 1|2|3|4] image, got shape {image.shape}.')
  if image.dtype == np.bool_:
    image = image.astype(np.uint8) * 255
  elif image.dtype == np.uint8:
    pass
  elif np.issubdtype(image.dtype, np.integer):
    # 16-bit (Pillow 'I;16' is uint16, 'I' is int32): keep the high byte.
    image = (np.clip(image, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
  elif np.issubdtype(image.dtype, np.floating):
    image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
  else:
    raise ValueError(f'Unsupported image dtype {image.dtype}.')
  channels = image.shape[-1]
  if channels in (2, 4):
    color, alpha = image[..., :-1].astype(np.float32), image[..., -1:].astype(np.float32) / 255.0
    image = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    channels -= 1
  if channels == 1:
    image = np.repeat(image, 3, axis=-1)
  return np.ascontiguousarray(image)


def pil_to_rgb_uint8(img: Image.Image) -> np.ndarray:
  """Converts a loaded PIL image of any mode to uint8 RGB [H, W, 3] (see `to_rgb_uint8`)."""
  mode = img.mode
  if mode == 'P':
    img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
  elif mode == 'PA':
    img = img.convert('RGBA')
  elif mode == '1':
    img = img.convert('L')
  elif mode not in ('L', 'LA', 'RGB', 'RGBA', 'I', 'F') and not mode.startswith('I;16'):
    # CMYK, YCbCr, LAB, HSV, RGBX, RGBa, La, ...
    img = img.convert('RGBA' if mode in ('RGBa', 'La') else 'RGB')
  array = np.asarray(img)
  if img.mode == 'F':  # 32-bit float (e.g. some BMP/PNG exports); values taken in [0, 255].
    array = np.clip(array, 0, 255) / 255.0
  return to_rgb_uint8(array)


def decode_image_file(path: str | os.PathLike[str]) -> np.ndarray:
  """Fully decodes an image file (EXIF orientation applied).

  Args:
    path: Image file readable by Pillow.

  Returns:
    uint8 [H, W, 3] in [0, 255].

  Raises:
    OSError, ValueError, ...: Whatever Pillow raises for a non-image, corrupt or truncated file.
  """
  with storage.open_binary(path) as file, Image.open(file) as img:
    img.load()  # Decodes every byte: truncated files raise here.
    img = ImageOps.exif_transpose(img)
    return pil_to_rgb_uint8(img)


def write_png(path: str | os.PathLike[str], image: Image.Image | np.ndarray) -> None:
  """Writes `image` (a PIL image, or uint8 [H, W, 3]) as a PNG file, on disk or in a bucket."""
  image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  storage.path(path).write_bytes(buffer.getvalue())


def normalize(image):
  """Maps uint8 [..., 3] in [0, 255] to float32 in [-1, 1] (x / 127.5 - 1, exact at both ends):
  NumPy on the host, or a JAX array where it lies (the training step normalises its uint8 batches
  on the devices)."""
  xp = np if isinstance(image, np.ndarray) else jnp
  return image.astype(xp.float32) / xp.float32(127.5) - xp.float32(1.0)


# ----------------------------------------------------------------------------------------------
# The photographs bundled with scikit-image.


@functools.lru_cache(maxsize=1)
def _load_skimage_photos() -> tuple[tuple[str, np.ndarray], ...]:
  import skimage.data  # noqa: PLC0415  (only the bundled photographs need it)

  photos = []
  for name in SKIMAGE_PHOTOS:
    if name.startswith('stereo_motorcycle'):
      left, right, _ = skimage.data.stereo_motorcycle()
      image = left if name.endswith('left') else right
    else:
      image = getattr(skimage.data, name)()
    image = to_rgb_uint8(image)
    image.setflags(write=False)
    photos.append((name, image))
  return tuple(photos)


def load_skimage_photos() -> list[tuple[str, np.ndarray]]:
  """Loads the photographs bundled with scikit-image (no network; cached in memory).

  Returns:
    [(name, uint8 [H, W, 3] read-only array in [0, 255])] in `SKIMAGE_PHOTOS` order; grayscale
    photographs are replicated to RGB.
  """
  return list(_load_skimage_photos())
