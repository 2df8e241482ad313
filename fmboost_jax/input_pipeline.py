"""Training and validation images: grain pipelines over folders, bundled photos and tfds.

Every batch is `{'image': float32 [B_local, S, S, 3] in [-1, 1]}` with
`S = config.data.high_res_size` and `B_local = config.data.batch_size // jax.process_count()`.
Low-res inputs are synthesised on device elsewhere (`fmboost_jax/upsampling.py`); this module only
produces high-res crops.

Held-out split. For every image of height H and width W, the bottom S rows are the validation
strip and training crops are drawn only from the top H - S rows, so a training crop never overlaps a
validation tile. An image is usable only if H >= 2 S and W >= S. Validation images are the
non-overlapping S x S tiles taken left to right along the bottom strip of each usable image, image
after image in source order, until `config.data.num_val_images` tiles are collected.

Sources (`config.data.source`):
  * 'skimage': colour and grayscale photographs bundled inside scikit-image (no download), decoded
    once and cached in memory.
  * 'folder': every .jpg/.jpeg/.png/.webp/.bmp file under `config.data.path` (recursive,
    case-insensitive, symlinks followed). Each file is fully decoded once at start-up to drop
    unreadable (non-image, corrupt, truncated) and too small files; training decodes lazily.
  * 'tfds': `tfds.data_source(config.data.tfds_name, ...)` (random access, ArrayRecord), its 'image'
    feature, decoded lazily; too small images are skipped on the fly. Nothing is ever downloaded.

Training pipeline (grain, checkpointable with `grain.checkpoint.CheckpointSave/CheckpointRestore`):
  MapDataset.range -> shuffle -> repeat(None) -> random_map (read the record; random crop in the
  training region + random horizontal flip) -> batch(B_local) -> this process's local batches
  [p::P] -> to_iter_dataset(ReadOptions). The stream and its global batches do not depend on the
  number of processes (`create_train_dataset`); worker threads prepare whole local batches.

Pixel conversion: grayscale -> RGB by replication; alpha (RGBA, LA, palette with transparency) is
composited on white; 16-bit images keep their high byte (v >> 8, as Pillow does for 16-bit colour
PNGs); bool / 1-bit images map to {0, 255}; float arrays are taken as [0, 1]. Then
x / 127.5 - 1 gives float32 in [-1, 1].
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, Sequence

from absl import logging
import grain
import jax
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageOps

from fmboost_jax import errors

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')
SOURCES = ('skimage', 'folder', 'tfds', 'latents')
LATENTS_METADATA = 'metadata.json'
LATENTS_VALIDATION = 'validation_images.npy'
# The first-stage settings a precomputed dataset must share with the config that trains on it.
LATENTS_FIRST_STAGE_FIELDS = ('name', 'ch', 'ch_mult', 'num_res_blocks', 'z_channels',
                              'scale_factor')

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

# Validation tiles flatter than this (std in [-1, 1] units, about 2.5/255) are skipped: they hold no
# detail to upsample and bilinear reproduces them exactly (infinite PSNR).
_MIN_VAL_TILE_STD = 0.02

# How many shard records are probed at start-up for one usable tfds image before giving up.
_TFDS_PROBE_LIMIT = 64
# A too small (tfds) image at stream position i is replaced by record i + k * stride, k = 1, 2, ...
_MAX_SUBSTITUTES = 64
_SUBSTITUTE_STRIDE = 7919


class DataError(errors.UserError, ValueError):
  """A user-facing data problem: one sentence naming the problem and the fix."""


# ----------------------------------------------------------------------------------------------
# Configuration.


def local_batch_size(config: ml_collections.ConfigDict) -> int:
  """Returns the per-process batch size `config.data.batch_size // jax.process_count()`."""
  return config.data.batch_size // jax.process_count()


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks the data fields of `config` before any file is touched.

  Args:
    config: The experiment config; reads `config.data.*` and `config.seed`.

  Raises:
    DataError: On an unknown source, non-positive or non-dividing sizes, a global batch size that
      does not split evenly over the processes, or a missing folder path / tfds name.
  """
  data = config.data
  if data.source not in SOURCES:
    raise DataError(
        f'Unknown config.data.source={data.source!r}; set it to one of {", ".join(SOURCES)}.')
  size, low = data.high_res_size, data.low_res_size
  if size <= 0 or low <= 0:
    raise DataError(
        f'config.data.high_res_size={size} and config.data.low_res_size={low} must both be '
        'positive; set them to pixel sizes such as 1024 and 512.')
  if size % low:
    raise DataError(
        f'config.data.low_res_size={low} does not divide config.data.high_res_size={size}; choose '
        f'a low-res size that divides it (e.g. {size // 2}).')
  num_processes = jax.process_count()
  if data.batch_size <= 0 or data.batch_size % num_processes:
    raise DataError(
        f'config.data.batch_size={data.batch_size} (global) is not a positive multiple of the '
        f'{num_processes} processes; set it to a multiple of {num_processes}.')
  if data.num_val_images < 0:
    raise DataError(
        f'config.data.num_val_images={data.num_val_images} is negative; set it to 0 or more.')
  if data.num_threads < 0 or data.prefetch_buffer_size < 0:
    raise DataError(
        f'config.data.num_threads={data.num_threads} and config.data.prefetch_buffer_size='
        f'{data.prefetch_buffer_size} must be non-negative; set them to 0 or more.')
  if data.source in ('folder', 'latents') and not data.path:
    raise DataError(
        f"config.data.path is empty but config.data.source={data.source!r}; set it to a folder of "
        f"{'images' if data.source == 'folder' else 'precomputed latents (--mode=precompute)'}.")
  if data.source == 'folder' and not data.path:
    raise DataError(
        "config.data.path is empty but config.data.source='folder'; set it to a folder of images.")
  if data.source == 'tfds' and not data.tfds_name:
    raise DataError(
        "config.data.tfds_name is empty but config.data.source='tfds'; set it to a prepared TFDS "
        "dataset name such as 'oxford_flowers102'.")
  if not 0 <= config.seed < 2**63:
    raise DataError(f'config.seed={config.seed} must be a non-negative integer; set it to e.g. 0.')


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
  with Image.open(path) as img:
    img.load()  # Decodes every byte: truncated files raise here.
    img = ImageOps.exif_transpose(img)
    return pil_to_rgb_uint8(img)


def normalize(image: np.ndarray) -> np.ndarray:
  """Maps uint8 [..., 3] in [0, 255] to float32 in [-1, 1] (x / 127.5 - 1, exact at both ends)."""
  return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


# ----------------------------------------------------------------------------------------------
# Held-out geometry: training region (top H - S rows) and validation strip (bottom S rows).


def is_usable(height: int, width: int, size: int) -> bool:
  """Whether an image of `height` x `width` holds a training region and a validation strip."""
  return height >= 2 * size and width >= size


def train_crop_offset(
    height: int, width: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
  """Draws the top-left corner of a training crop.

  Args:
    height: Image height H, at least 2 * size.
    width: Image width W, at least size.
    size: Crop size S.
    rng: Numpy generator; draws the row, then the column.

  Returns:
    (top, left) with 0 <= top <= H - 2 S (so the crop's rows lie in [0, H - S)) and
    0 <= left <= W - S, each uniform.
  """
  if not is_usable(height, width, size):
    raise ValueError(f'Image {height}x{width} is smaller than {2 * size}x{size}.')
  top = int(rng.integers(0, height - 2 * size + 1))
  left = int(rng.integers(0, width - size + 1))
  return top, left


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """Crops a random S x S window from the training region (top H - S rows) of `image`.

  Args:
    image: [H, W, C] with H >= 2 S and W >= S.
    size: Crop size S.
    rng: Numpy generator (see `train_crop_offset`).

  Returns:
    A view [S, S, C] of `image`.
  """
  top, left = train_crop_offset(image.shape[0], image.shape[1], size, rng)
  return image[top:top + size, left:left + size]


def validation_tile_offsets(height: int, width: int, size: int) -> list[tuple[int, int]]:
  """Top-left corners of the validation tiles of one image, left to right.

  Args:
    height: Image height H.
    width: Image width W.
    size: Tile size S.

  Returns:
    [(H - S, 0), (H - S, S), ...]: floor(W / S) non-overlapping tiles along the bottom S rows,
    or [] for an image that is not usable (H < 2 S or W < S).
  """
  if not is_usable(height, width, size):
    return []
  return [(height - size, left) for left in range(0, width - size + 1, size)]


def _spread_order(n: int) -> list[int]:
  """A permutation of range(n) whose prefixes spread evenly: 0, n/2, n/4, 3n/4, ..."""
  def bit_reversed(j):
    bits = max(1, (n - 1).bit_length())
    return int(format(j, f'0{bits}b')[::-1], 2)
  return sorted(range(n), key=lambda j: (bit_reversed(j), j))


# ----------------------------------------------------------------------------------------------
# Sources. Each is a random-access sequence of uint8 [H, W, 3] images (None = skip this record).


@functools.lru_cache(maxsize=1)
def _load_skimage_photos() -> tuple[tuple[str, np.ndarray], ...]:
  import skimage.data  # pylint: disable=g-import-not-at-top

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


@dataclasses.dataclass(frozen=True)
class FolderScan:
  """What a scan of an image folder found.

  Attributes:
    root: The scanned folder.
    usable: [(path, height, width)] of images with H >= 2 S and W >= S, sorted by path.
    unreadable: [(path, error message)] of files with an image extension that failed to decode.
    too_small: [(path, height, width)] of decodable images below 2 S x S.
    num_ignored: Files without an image extension (not decoded).
  """
  root: str
  usable: list[tuple[str, int, int]]
  unreadable: list[tuple[str, str]]
  too_small: list[tuple[str, int, int]]
  num_ignored: int


def _list_folder(root: str) -> tuple[list[str], int]:
  """Recursively lists image files (sorted) and counts other files; follows symlinks once."""
  files, num_ignored, seen = [], 0, set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:  # Symlink cycle.
      dirnames[:] = []
      continue
    seen.add(real)
    for filename in filenames:
      if filename.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(dirpath, filename))
      else:
        num_ignored += 1
  return sorted(files), num_ignored


def _probe_file(path: str) -> tuple[int, int] | str:
  """Returns (height, width) of a fully decodable image, or the error message."""
  try:
    image = decode_image_file(path)
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'
  return image.shape[0], image.shape[1]


_SCAN_CACHE: dict[Any, FolderScan] = {}


def scan_image_folder(root: str, size: int, num_threads: int = 8) -> FolderScan:
  """Decodes every image file under `root` once (thread pool) and sorts the files by usability.

  Results are cached per process while no file changes (same paths, sizes and mtimes), so the
  training iterator and the validation images share one scan.

  Args:
    root: Folder to scan recursively.
    size: Crop size S; usable images are at least 2 S x S.
    num_threads: Decoding threads (0 means 1).

  Returns:
    A `FolderScan`.

  Raises:
    DataError: If `root` is not a folder or holds no file with an image extension.
  """
  if not os.path.isdir(root):
    raise DataError(
        f'Image folder {root!r} does not exist or is not a folder; set config.data.path to an '
        'existing folder of images.')
  files, num_ignored = _list_folder(root)
  if not files:
    raise DataError(
        f'Image folder {root!r} holds no {"/".join(IMAGE_EXTENSIONS)} files (searched '
        f'recursively, {num_ignored} other files); put images there or point config.data.path '
        'at a folder of images.')
  stats = []
  for path in files:
    try:
      st = os.stat(path)
      stats.append((path, st.st_size, st.st_mtime_ns))
    except OSError:
      stats.append((path, -1, -1))
  key = (os.path.realpath(root), size, num_ignored, tuple(stats))
  if key in _SCAN_CACHE:
    return _SCAN_CACHE[key]

  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(num_threads, 32))) as pool:
    results = list(pool.map(_probe_file, files))
  usable, unreadable, too_small = [], [], []
  for path, result in zip(files, results):
    if isinstance(result, str):
      unreadable.append((path, result))
    elif is_usable(*result, size):
      usable.append((path, *result))
    else:
      too_small.append((path, *result))
  scan = FolderScan(root, usable, unreadable, too_small, num_ignored)
  if len(_SCAN_CACHE) >= 4:
    _SCAN_CACHE.pop(next(iter(_SCAN_CACHE)))
  _SCAN_CACHE[key] = scan
  return scan


class _FolderImages:
  """Random access to the usable images of a scanned folder, decoded on every access."""

  def __init__(self, paths: Sequence[str]):
    self._paths = list(paths)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> np.ndarray | None:
    path = self._paths[index]
    try:
      return decode_image_file(path)
    except Exception as e:  # pylint: disable=broad-except
      # The file decoded at start-up, so it changed on disk during training: skip it, loudly.
      logging.warning('Skipping %s, which no longer decodes (%s: %s).', path, type(e).__name__, e)
      return None


class _TfdsImages:
  """Random access to the 'image' feature of a tfds data source, as uint8 RGB."""

  def __init__(self, source: Any, size: int):
    self._source = source
    self._size = size

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray | None:
    image = to_rgb_uint8(self._source[index]['image'])
    if not is_usable(image.shape[0], image.shape[1], self._size):
      logging.log_first_n(
          logging.WARNING, 'Skipping tfds image %d of %dx%d px, smaller than %dx%d px.', 5, index,
          image.shape[0], image.shape[1], 2 * self._size, self._size)
      return None
    return image


def _open_tfds(config: ml_collections.ConfigDict) -> _TfdsImages:
  """Opens the configured tfds split as a random-access source (never downloads)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data = config.data
  size = data.high_res_size
  data_dir = data.tfds_data_dir or None
  where = f'data_dir {data_dir!r}' if data_dir else 'the default TFDS data_dir'
  try:
    source = tfds.data_source(data.tfds_name, split=data.tfds_split, data_dir=data_dir,
                              download=False)
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).strip().splitlines()[0].rstrip(' :.') if str(e).strip() else 'no details'
    check_name = ('check config.data.tfds_name, or ' if type(e).__name__ == 'DatasetNotFoundError'
                  else '')
    raise DataError(
        f'TFDS dataset {data.tfds_name!r} (split {data.tfds_split!r}) could not be opened from '
        f'{where} ({type(e).__name__}: {reason}); {check_name}prepare it offline with `tfds build '
        f'{data.tfds_name} --file_format=array_record --data_dir=DIR` and set '
        'config.data.tfds_data_dir=DIR (nothing is downloaded here).') from None
  features = getattr(getattr(source, 'dataset_info', None), 'features', None)
  if features is not None and 'image' not in features.keys():
    raise DataError(
        f'TFDS dataset {data.tfds_name!r} has no "image" feature (it has '
        f'{sorted(features.keys())}); choose an image dataset for config.data.tfds_name.')
  if features is not None:
    shape = tuple(features['image'].shape)
    if len(shape) == 3 and shape[0] is not None and shape[1] is not None and not is_usable(
        shape[0], shape[1], size):
      raise DataError(
          f'TFDS dataset {data.tfds_name!r} has {shape[0]}x{shape[1]} images, smaller than the '
          f'{2 * size}x{size} px needed for {size} px crops plus a held-out strip; lower '
          'config.data.high_res_size or choose a larger-image dataset.')
  if not len(source):
    raise DataError(
        f'TFDS split {data.tfds_name}/{data.tfds_split} is empty; choose a non-empty '
        'config.data.tfds_split.')
  return _TfdsImages(source, size)


def open_images(config: ml_collections.ConfigDict) -> Sequence[np.ndarray | None]:
  """Returns the configured images as a random-access sequence of uint8 [H, W, 3] (or None)."""
  data = config.data
  size = data.high_res_size
  if data.source == 'skimage':
    photos = load_skimage_photos()
    usable = [image for _, image in photos if is_usable(image.shape[0], image.shape[1], size)]
    logging.info('skimage photographs: %d usable, %d too small (below %dx%d px).',
                 len(usable), len(photos) - len(usable), 2 * size, size)
    if not usable:
      largest = max(image.shape[0] for _, image in photos)
      raise DataError(
          f'None of the {len(photos)} bundled scikit-image photographs is at least {2 * size}x'
          f'{size} px (the tallest is {largest} px) for {size} px crops plus a held-out strip; set '
          f'config.data.high_res_size to at most {largest // 2} or use a folder/tfds source.')
    return usable
  if data.source == 'folder':
    scan = scan_image_folder(data.path, size, data.num_threads)
    logging.info(
        'Image folder %s: %d usable, %d unreadable, %d too small (below %dx%d px), %d non-image '
        'files ignored.', data.path, len(scan.usable), len(scan.unreadable), len(scan.too_small),
        2 * size, size, scan.num_ignored)
    if scan.unreadable:
      logging.warning('Unreadable files (first %d of %d): %s', min(5, len(scan.unreadable)),
                      len(scan.unreadable), '; '.join(f'{p} ({m})' for p, m in scan.unreadable[:5]))
    if not scan.usable:
      raise DataError(
          f'Image folder {data.path!r} has no usable image: {len(scan.unreadable)} unreadable and '
          f'{len(scan.too_small)} smaller than the minimum {2 * size}x{size} px (H x W, for '
          f'{size} px crops plus a held-out strip); add larger images or lower '
          'config.data.high_res_size.')
    return _FolderImages([path for path, _, _ in scan.usable])
  return _open_tfds(config)


class _LatentRecords:
  """Random access over precomputed latent shards (memory-mapped .npy files).

  Record i is `{'x1': float32 [h, w, C], 'x_up': float32 [h, w, C]}`: the scaled latent of a
  high-res crop and of its low-res version brought to the same grid (written by precompute.py).
  """

  def __init__(self, path: str, shards: Sequence[dict[str, Any]]):
    self._arrays = [(np.load(os.path.join(path, sh['x1']), mmap_mode='r'),
                     np.load(os.path.join(path, sh['x_up']), mmap_mode='r')) for sh in shards]
    self._ends = np.cumsum([len(a) for a, _ in self._arrays])

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    shard = int(np.searchsorted(self._ends, index, side='right'))
    offset = index - (int(self._ends[shard - 1]) if shard else 0)
    x1, x_up = self._arrays[shard]
    return {'x1': np.array(x1[offset]), 'x_up': np.array(x_up[offset])}


def latents_metadata(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Reads and checks the metadata of the precomputed latents in `config.data.path`."""
  import json  # pylint: disable=import-outside-toplevel
  path = os.path.join(config.data.path, LATENTS_METADATA)
  if not os.path.isfile(path):
    raise DataError(f'{config.data.path!r} holds no {LATENTS_METADATA}; write precomputed latents '
                    'there with main.py --mode=precompute first.')
  with open(path) as f:
    meta = json.load(f)
  for field in ('high_res_size', 'low_res_size'):
    if meta[field] != config.data[field]:
      raise DataError(f'the latents in {config.data.path!r} were made with {field}={meta[field]}, '
                      f'but config.data.{field}={config.data[field]}; use the same value.')
  for field in LATENTS_FIRST_STAGE_FIELDS:
    made, wanted = meta['first_stage'][field], config.first_stage[field]
    if (list(made) if isinstance(made, (list, tuple)) else made) != (
        list(wanted) if isinstance(wanted, (list, tuple)) else wanted):
      raise DataError(f'the latents in {config.data.path!r} were made with first_stage.{field}='
                      f'{made}, but config.first_stage.{field}={wanted}; use the same first stage.')
  return meta


# ----------------------------------------------------------------------------------------------
# Public creators.


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Shape and dtype of each entry of a GLOBAL training batch."""
  b, s = config.data.batch_size, config.data.high_res_size
  if config.data.source != 'latents':
    return {'image': ((b, s, s, 3), np.float32)}
  shape = tuple(latents_metadata(config)['latent_shape'])
  return {'x1': ((b, *shape), np.float32), 'x_up': ((b, *shape), np.float32)}


def _seed(config: ml_collections.ConfigDict, *salt: int) -> int:
  """A uint32 seed derived from `config.seed` and `salt`."""
  return int(np.random.SeedSequence([config.seed, *salt]).generate_state(1)[0])


def _train_example(index: int, rng: np.random.Generator, *, source: Sequence[Any],
                   size: int | None) -> dict[str, np.ndarray]:
  """random_map transform of one global stream position: the record at `index` (precomputed latents
  as they are; images randomly cropped in the training region and flipped). A missing or too small
  image (tfds checks sizes lazily) is replaced by a deterministic substitute, so that every stream
  position yields an example and the stream never depends on how it is split over processes."""
  for attempt in range(_MAX_SUBSTITUTES):
    record = source[(index + attempt * _SUBSTITUTE_STRIDE) % len(source)]
    if size is None:
      return record
    if record is not None and is_usable(record.shape[0], record.shape[1], size):
      crop = random_crop(record, size, rng)
      if rng.random() < 0.5:
        crop = crop[:, ::-1]
      return {'image': normalize(crop)}
  raise DataError(f'{_MAX_SUBSTITUTES} images in a row near record {index} are all smaller than '
                  f'{2 * size}x{size} px; lower config.data.high_res_size or use larger images.')


def create_train_dataset(config: ml_collections.ConfigDict) -> grain.IterDataset:
  """Builds this process's share of the infinite training stream.

  There is one global stream of examples for a seed (shuffled, reshuffled every epoch, randomly
  cropped per position). Global batch k is its examples [k B, (k+1) B); process p reads the B_local
  consecutive examples [k B + p B_local, k B + (p+1) B_local) of every global batch and decodes only
  those. So the global batches are the same for any number of processes, and the iterator
  position (local batches read) is the same number on every process: a checkpoint of N processes
  resumes with M (checkpointing.py).

  Args:
    config: Experiment config (`config.data.*`, `config.seed`).

  Returns:
    A grain `IterDataset` of `{'image': float32 [B_local, S, S, 3] in [-1, 1]}` batches (or
    `{'x1', 'x_up'}` from precomputed latents).

  Raises:
    DataError: On a bad config or unusable data (see `check_config` and the module docstring).
  """
  check_config(config)
  data = config.data
  count, index = jax.process_count(), jax.process_index()
  local_batch = local_batch_size(config)
  if data.source == 'latents':
    source, size = _LatentRecords(data.path, latents_metadata(config)['shards']), None
  else:
    source, size = open_images(config), data.high_res_size
  if not len(source):
    raise DataError(f'No training records in config.data.source={data.source!r}.')
  if data.source == 'tfds':
    probe = range(min(len(source), _TFDS_PROBE_LIMIT))
    if all(source[i] is None for i in probe):
      raise DataError(
          f'The first {len(probe)} images of TFDS {data.tfds_name}/{data.tfds_split} are all '
          f'smaller than {2 * size}x{size} px; lower config.data.high_res_size or choose a '
          'larger-image dataset.')
  ds = grain.MapDataset.range(len(source)).shuffle(seed=_seed(config, 0)).repeat(None)
  ds = ds.random_map(functools.partial(_train_example, source=source, size=size),
                     seed=_seed(config, 1))
  ds = ds.batch(local_batch, drop_remainder=True)[index::count]
  # Each worker thread prepares whole local batches; the buffer is given in images, and holds at
  # least one batch per thread.
  buffered = max(data.num_threads, data.prefetch_buffer_size // local_batch)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=data.num_threads,
                                              prefetch_buffer_size=buffered))


def create_train_iterator(config: ml_collections.ConfigDict) -> grain.DatasetIterator:
  """Returns this process's training iterator.

  Batches are `{'image': np.float32 [B_local, S, S, 3] in [-1, 1]}` with
  `B_local = config.data.batch_size // jax.process_count()` and `S = config.data.high_res_size`.
  The iterator has `get_state()` / `set_state()` and checkpoints with
  `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` in Orbax.

  Args:
    config: Experiment config.

  Raises:
    DataError: On a bad config or unusable data.
  """
  return iter(create_train_dataset(config))


def validation_images(config: ml_collections.ConfigDict) -> np.ndarray:
  """Returns the deterministic held-out validation tiles (the same on every process).

  Tiles are non-overlapping S x S squares along the bottom S rows of the usable images, taken
  round-robin (one per image per round, spread over each image's width) until
  `config.data.num_val_images` are collected. Flat tiles (std below 0.02) are skipped.
  No training crop overlaps them.

  Args:
    config: Experiment config.

  Returns:
    float32 [num_val_images, S, S, 3] in [-1, 1].

  Raises:
    DataError: On a bad config, unusable data, or fewer tiles than `num_val_images`.
  """
  check_config(config)
  data = config.data
  size, wanted = data.high_res_size, data.num_val_images
  if data.source == 'latents':
    latents_metadata(config)
    tiles = np.load(os.path.join(data.path, LATENTS_VALIDATION), mmap_mode='r')
    if len(tiles) < wanted:
      raise DataError(f'{data.path!r} holds {len(tiles)} validation images, fewer than '
                      f'config.data.num_val_images={wanted}; lower it or precompute again.')
    return np.array(tiles[:wanted])
  images = open_images(config)
  # Round-robin over the images, one tile per image per round, so that the held-out set spans as
  # many photographs as possible; within an image, successive rounds spread over its width.
  tiles, num_images, cache, exhausted = [], 0, {}, set()
  for round_index in range(len(images) and max(1, wanted)):
    for i in range(len(images)):
      if len(tiles) >= wanted:
        break
      if i in exhausted:
        continue
      if i not in cache:
        cache[i] = images[i]
        num_images += cache[i] is not None
      image = cache[i]
      offsets = [] if image is None else validation_tile_offsets(image.shape[0], image.shape[1],
                                                                 size)
      if round_index >= len(offsets):
        exhausted.add(i)
        continue
      top, left = offsets[_spread_order(len(offsets))[round_index]]
      tile = normalize(image[top:top + size, left:left + size])
      if tile.std() >= _MIN_VAL_TILE_STD:
        tiles.append(tile)
    if len(tiles) >= wanted or len(exhausted) == len(images):
      break
  if len(tiles) < wanted:
    raise DataError(
        f'Only {len(tiles)} validation tiles of {size}x{size} px exist along the bottom strips of '
        f'the {num_images} usable images, fewer than config.data.num_val_images={wanted}; lower '
        f'num_val_images to at most {len(tiles)} or add more (or wider) images.')
  if not tiles:
    return np.zeros((0, size, size, 3), np.float32)
  return np.stack(tiles)
