"""Training and validation images: grain pipelines over folders, bundled photos and tfds.

Every batch is `{'image': float32 [B_local, S, S, 3] in [-1, 1]}` with
`S = config.data.high_res_size` and `B_local = config.data.batch_size // jax.process_count()`.
Low-res inputs are synthesised on device elsewhere (`fmboost_jax/upsampling.py`); this module only
produces high-res crops.

Held-out split (`config.data.holdout`, rules in `Geometry`):
  * 'images' (the default; real datasets): the held-out set is whole images that are never trained
    on: the folder `config.data.val_path`, the tfds split `config.data.tfds_val_split`, or the
    share `config.data.val_fraction` of `config.data.path` chosen by a hash of each file's relative
    path (`is_held_out`: stable, adding files never moves another across the split). An image is
    usable when its shorter side is at least S (a 1024 x 1024 photo at S = 1024 is one crop);
    smaller ones are skipped and counted, or scaled up with `config.data.resize_small`. Training
    crops are random; the validation crop of a held-out image is its centre S x S square.
  * 'strips' (the bundled photographs of the demo, which are few): the bottom S rows of every image
    are held out and training crops come from the top H - S rows; usable images have H >= 2 S and
    W >= S; validation tiles are the S x S squares along the bottom strips.
Images above `config.data.max_pixels` are skipped and counted without ever being decoded (a
12000 x 12000 PNG takes seconds and gigabytes to decode, at every access).

Sources (`config.data.source`):
  * 'skimage': colour and grayscale photographs bundled inside scikit-image (no download), decoded
    once and cached in memory.
  * 'folder': every .jpg/.jpeg/.png/.webp/.bmp file under `config.data.path` (recursive,
    case-insensitive, symlinks followed). Each file is fully decoded once at start-up to drop
    unreadable (non-image, corrupt, truncated), too small and too large files; training decodes
    lazily.
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
import hashlib
import os
import warnings
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
HOLDOUTS = ('images', 'strips')
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
  if data.holdout not in HOLDOUTS:
    raise DataError(f'Unknown config.data.holdout={data.holdout!r}; set it to images (whole '
                    'held-out images) or strips (the bottom strip of every image, for the bundled '
                    'photographs).')
  by_hash = data.holdout == 'images' and data.source in ('folder', 'skimage') and not data.val_path
  if by_hash and not 0 < data.val_fraction < 1:
    raise DataError(
        f'config.data.val_fraction={data.val_fraction} must lie strictly between 0 and 1 (the '
        'share of images held out, e.g. 0.02), or set config.data.val_path to a folder of '
        'held-out images.')
  if data.val_path and data.source != 'folder':
    raise DataError(f"config.data.val_path is set but config.data.source={data.source!r}; it "
                    "holds the held-out images of source='folder' only, so clear it.")
  if data.max_pixels < size * size:
    raise DataError(f'config.data.max_pixels={data.max_pixels} is below one {size}x{size} crop; '
                    'raise it (the default is 64000000).')
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
# Held-out geometry: which images are usable, where training crops and validation crops lie.


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Crop size, held-out layout and size rules of a dataset (`config.data`).

  holdout='images' (real datasets): held-out images are whole images of their own; an image is
  usable when its shorter side is at least S (or always, with `resize_small`, which scales smaller
  images up so that their shorter side is S); training crops lie anywhere in the image and the
  validation crop of a held-out image is its centre S x S square.

  holdout='strips' (the bundled photographs): every image lends its bottom S rows to the held-out
  set; an image is usable when H >= 2 S and W >= S, training crops lie in its top H - S rows and
  the validation tiles are the non-overlapping S x S squares along its bottom strip.
  """
  size: int
  strips: bool = False
  resize_small: bool = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Geometry':
    data = config.data
    return cls(data.high_res_size, data.holdout == 'strips', data.resize_small)

  def usable(self, height: int, width: int) -> bool:
    if self.strips:
      return height >= 2 * self.size and width >= self.size
    return self.resize_small or min(height, width) >= self.size

  def minimum(self) -> str:
    """The size rule, for messages."""
    if self.strips:
      return (f'{2 * self.size}x{self.size} px (H x W: {self.size} px crops above a held-out '
              'strip)')
    return f'{self.size} px on the shorter side'

  def prepare(self, image: np.ndarray) -> np.ndarray:
    """The image as crops are taken from it: scaled up (bicubic) to a shorter side of S when it is
    smaller and `resize_small` is set; otherwise unchanged."""
    height, width = image.shape[:2]
    if self.strips or min(height, width) >= self.size:
      return image
    k = self.size / min(height, width)
    target = (max(self.size, round(width * k)), max(self.size, round(height * k)))
    return np.asarray(Image.fromarray(image).resize(target, Image.Resampling.BICUBIC))

  def train_crop_offset(self, height: int, width: int,
                        rng: np.random.Generator) -> tuple[int, int]:
    """Draws the top-left corner (top, left) of a training crop, uniformly: the row, then the
    column. With strips, the crop's rows lie in [0, H - S)."""
    if not self.usable(height, width) or min(height, width) < self.size:
      raise ValueError(f'Image {height}x{width} is smaller than {self.minimum()}.')
    bottom = height - (2 if self.strips else 1) * self.size
    top = int(rng.integers(0, bottom + 1))
    left = int(rng.integers(0, width - self.size + 1))
    return top, left

  def train_crop(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random S x S training crop [S, S, C] of `image` (prepared first)."""
    image = self.prepare(image)
    top, left = self.train_crop_offset(image.shape[0], image.shape[1], rng)
    return image[top:top + self.size, left:left + self.size]

  def validation_offsets(self, height: int, width: int) -> list[tuple[int, int]]:
    """Top-left corners of the validation crops of one (prepared) image: the tiles along the bottom
    strip, left to right, or the centre square; [] for an unusable image."""
    s = self.size
    if not self.usable(height, width) or min(height, width) < s:
      return []
    if self.strips:
      return [(height - s, left) for left in range(0, width - s + 1, s)]
    return [((height - s) // 2, (width - s) // 2)]


def is_held_out(relative_path: str, fraction: float) -> bool:
  """Whether a file belongs to the held-out share `fraction` of a folder, by a hash of its path
  relative to the folder ('/'-separated): the same answer on every machine and run, and adding or
  removing other files never moves a file across the split."""
  digest = hashlib.sha256(relative_path.replace(os.sep, '/').encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') < fraction * 2.0**64


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
    usable: [(path, height, width)] of usable images (`Geometry.usable`), sorted by path.
    unreadable: [(path, error message)] of files with an image extension that failed to decode.
    too_small: [(path, height, width)] of decodable images below the geometry's minimum.
    too_large: [(path, height, width)] of images above `max_pixels` (never decoded).
    num_ignored: Files without an image extension (not decoded).
  """
  root: str
  usable: list[tuple[str, int, int]]
  unreadable: list[tuple[str, str]]
  too_small: list[tuple[str, int, int]]
  too_large: list[tuple[str, int, int]]
  num_ignored: int

  def summary(self, geometry: Geometry, max_pixels: int) -> str:
    return (f'{len(self.usable)} usable, {len(self.unreadable)} unreadable, {len(self.too_small)} '
            f'too small (below {geometry.minimum()}), {len(self.too_large)} too large (above '
            f'config.data.max_pixels={max_pixels}), {self.num_ignored} non-image files ignored')


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


def _probe_file(path: str, max_pixels: int) -> tuple[str, Any]:
  """('size', (height, width)) of a fully decodable image, ('too_large', (height, width)) of one
  above `max_pixels` (read from its header, never decoded), or ('unreadable', message)."""
  try:
    with warnings.catch_warnings():  # Pillow warns about large images; the limit is ours.
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      with Image.open(path) as img:
        width, height = img.size
      if height * width > max_pixels:
        return 'too_large', (height, width)
      image = decode_image_file(path)
  except Exception as e:  # pylint: disable=broad-except
    return 'unreadable', f'{type(e).__name__}: {e}'
  return 'size', (image.shape[0], image.shape[1])


_SCAN_CACHE: dict[Any, FolderScan] = {}


def scan_image_folder(root: str, geometry: Geometry, num_threads: int = 8,
                      max_pixels: int = 2**62) -> FolderScan:
  """Decodes every image file under `root` once (thread pool) and sorts the files by usability.

  Images above `max_pixels` are counted from their header and never decoded. Results are cached
  per process while no file changes (same paths, sizes and mtimes), so the training iterator and
  the validation images share one scan.

  Args:
    root: Folder to scan recursively.
    geometry: The crop size and size rules (`Geometry`).
    num_threads: Decoding threads (0 means 1).
    max_pixels: Larger images are skipped.

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
  key = (os.path.realpath(root), geometry, max_pixels, num_ignored, tuple(stats))
  if key in _SCAN_CACHE:
    return _SCAN_CACHE[key]

  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(num_threads, 32))) as pool:
    results = list(pool.map(functools.partial(_probe_file, max_pixels=max_pixels), files))
  found = {'usable': [], 'unreadable': [], 'too_small': [], 'too_large': []}
  for path, (kind, value) in zip(files, results):
    if kind == 'size':
      kind = 'usable' if geometry.usable(*value) else 'too_small'
    found[kind].append((path, value) if kind == 'unreadable' else (path, *value))
  scan = FolderScan(root, num_ignored=num_ignored, **found)
  if len(_SCAN_CACHE) >= 4:
    _SCAN_CACHE.pop(next(iter(_SCAN_CACHE)))
  _SCAN_CACHE[key] = scan
  return scan


class _FolderImages:
  """Random access to the usable images of a scanned folder, decoded on every access."""

  def __init__(self, paths: Sequence[str]):
    self._paths = list(paths)

  @property
  def paths(self) -> list[str]:
    return list(self._paths)

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
  """Random access to the 'image' feature of a tfds data source, as uint8 RGB (None: skip)."""

  def __init__(self, source: Any, geometry: Geometry, max_pixels: int):
    self._source = source
    self._geometry = geometry
    self._max_pixels = max_pixels

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray | None:
    image = to_rgb_uint8(self._source[index]['image'])
    height, width = image.shape[:2]
    if not self._geometry.usable(height, width) or height * width > self._max_pixels:
      logging.log_first_n(
          logging.WARNING, 'Skipping tfds image %d of %dx%d px: it must be at least %s and at '
          'most config.data.max_pixels=%d pixels.', 5, index, height, width,
          self._geometry.minimum(), self._max_pixels)
      return None
    return image


def _open_tfds(config: ml_collections.ConfigDict, split: str) -> _TfdsImages:
  """Opens a tfds split as a random-access source (never downloads)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data = config.data
  geometry = Geometry.from_config(config)
  data_dir = data.tfds_data_dir or None
  where = f'data_dir {data_dir!r}' if data_dir else 'the default TFDS data_dir'
  try:
    source = tfds.data_source(data.tfds_name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).strip().splitlines()[0].rstrip(' :.') if str(e).strip() else 'no details'
    check_name = ('check config.data.tfds_name, or ' if type(e).__name__ == 'DatasetNotFoundError'
                  else '')
    raise DataError(
        f'TFDS dataset {data.tfds_name!r} (split {split!r}) could not be opened from '
        f'{where} ({type(e).__name__}: {reason}); {check_name}prepare it offline with `tfds build '
        f'{data.tfds_name} --file_format=array_record --data_dir=DIR` and set '
        'config.data.tfds_data_dir=DIR (nothing is downloaded here), or name another split in '
        'config.data.tfds_split / tfds_val_split.') from None
  features = getattr(getattr(source, 'dataset_info', None), 'features', None)
  if features is not None and 'image' not in features.keys():
    raise DataError(
        f'TFDS dataset {data.tfds_name!r} has no "image" feature (it has '
        f'{sorted(features.keys())}); choose an image dataset for config.data.tfds_name.')
  if features is not None:
    shape = tuple(features['image'].shape)
    if len(shape) == 3 and shape[0] is not None and shape[1] is not None and not geometry.usable(
        shape[0], shape[1]):
      raise DataError(
          f'TFDS dataset {data.tfds_name!r} has {shape[0]}x{shape[1]} images, smaller than '
          f'{geometry.minimum()}; lower config.data.high_res_size or choose a larger-image '
          'dataset.')
  if not len(source):
    raise DataError(
        f'TFDS split {data.tfds_name}/{split} is empty; choose a non-empty split.')
  return _TfdsImages(source, geometry, data.max_pixels)


def _split_name(split: str) -> str:
  return 'held-out' if split == 'validation' else 'training'


def open_images(config: ml_collections.ConfigDict,
                split: str = 'train') -> Sequence[np.ndarray | None]:
  """Returns the images of one split as a random-access sequence of uint8 [H, W, 3] (or None).

  With holdout='strips' both splits are the same images (their regions differ, see `Geometry`).
  With holdout='images', 'validation' is `config.data.val_path` (a folder of its own), the tfds
  split `config.data.tfds_val_split`, or the files of the folder (the photographs' names for
  skimage) that `is_held_out` assigns to the held-out share `config.data.val_fraction`; 'train'
  is the rest.

  Raises:
    DataError: When the split has no usable image, or the held-out folder overlaps the training
      folder.
  """
  if split not in ('train', 'validation'):
    raise ValueError(f'split={split!r}; use train or validation.')
  data = config.data
  geometry = Geometry.from_config(config)
  held_out = split == 'validation'
  by_hash = not geometry.strips and not (data.source == 'folder' and data.val_path)
  what = _split_name(split) if not geometry.strips else 'usable'
  fix = (f'lower config.data.high_res_size, set config.data.resize_small=True, or add images of '
         f'at least {geometry.minimum()}')
  if held_out and by_hash:
    fix += ' or raise config.data.val_fraction'
  if data.source == 'skimage':
    photos = load_skimage_photos()
    if by_hash:
      photos = [(n, im) for n, im in photos if is_held_out(n, data.val_fraction) == held_out]
    usable = [image for _, image in photos if geometry.usable(*image.shape[:2])]
    logging.info('skimage photographs (%s): %d usable, %d too small (below %s).', what,
                 len(usable), len(photos) - len(usable), geometry.minimum())
    if not usable:
      largest = max(min(image.shape[:2]) for _, image in load_skimage_photos())
      raise DataError(
          f'None of the {len(photos)} {"" if geometry.strips else what + " "}bundled '
          f'scikit-image photographs is at least '
          f'{geometry.minimum()} (the largest shorter side is {largest} px); {fix}, or use a '
          'folder/tfds source.')
    return usable
  if data.source == 'folder':
    root = data.val_path if held_out and not by_hash and not geometry.strips else data.path
    if data.val_path and not geometry.strips:
      _check_separate(data.path, data.val_path)
    scan = scan_image_folder(root, geometry, data.num_threads, data.max_pixels)
    paths = [path for path, _, _ in scan.usable]
    if by_hash:
      paths = [p for p in paths if is_held_out(os.path.relpath(p, root), data.val_fraction)
               == held_out]
    logging.info('Image folder %s: %s; %d %s images.', root,
                 scan.summary(geometry, data.max_pixels), len(paths), what)
    if scan.unreadable:
      logging.warning('Unreadable files (first %d of %d): %s', min(5, len(scan.unreadable)),
                      len(scan.unreadable), '; '.join(f'{p} ({m})' for p, m in scan.unreadable[:5]))
    if not paths:
      raise DataError(
          f'Image folder {root!r} has no {what} image ({scan.summary(geometry, data.max_pixels)}'
          f'{", val_fraction=" + str(data.val_fraction) if by_hash else ""}); {fix}.')
    return _FolderImages(paths)
  name = data.tfds_val_split if held_out and not geometry.strips else data.tfds_split
  return _open_tfds(config, name)


def _check_separate(path: str, val_path: str) -> None:
  """The held-out folder must not be, contain, or lie inside the training folder."""
  a, b = os.path.realpath(path), os.path.realpath(val_path)
  if os.path.commonpath([a, b]) in (a, b):
    raise DataError(
        f'config.data.val_path={val_path!r} overlaps config.data.path={path!r} (one lies inside '
        'the other), so held-out images would be trained on; use two separate folders, or leave '
        'val_path empty to hold out config.data.val_fraction of data.path.')


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
  for field, wanted in (('high_res_size', config.data.high_res_size),
                        ('low_res_size', config.data.low_res_size),
                        ('upsampling_mode', config.flow.upsampling_mode)):
    if meta[field] != wanted:
      section = 'flow' if field == 'upsampling_mode' else 'data'
      raise DataError(f'the latents in {config.data.path!r} were made with {field}={meta[field]}, '
                      f'but config.{section}.{field}={wanted}; use the same value.')
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
                   geometry: Geometry | None) -> dict[str, np.ndarray]:
  """random_map transform of one global stream position: the record at `index` (precomputed latents
  as they are; images randomly cropped in the training region and flipped). A missing or unusable
  image (tfds checks sizes lazily) is replaced by a deterministic substitute, so that every stream
  position yields an example and the stream never depends on how it is split over processes."""
  for attempt in range(_MAX_SUBSTITUTES):
    record = source[(index + attempt * _SUBSTITUTE_STRIDE) % len(source)]
    if geometry is None:
      return record
    if record is not None and geometry.usable(record.shape[0], record.shape[1]):
      crop = geometry.train_crop(record, rng)
      if rng.random() < 0.5:
        crop = crop[:, ::-1]
      return {'image': normalize(crop)}
  raise DataError(f'{_MAX_SUBSTITUTES} images in a row near record {index} are all smaller than '
                  f'{geometry.minimum()}; lower config.data.high_res_size or use larger images.')


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
    source, geometry = _LatentRecords(data.path, latents_metadata(config)['shards']), None
  else:
    source, geometry = open_images(config, 'train'), Geometry.from_config(config)
  if not len(source):
    raise DataError(f'No training records in config.data.source={data.source!r}.')
  if data.source == 'tfds':
    probe = range(min(len(source), _TFDS_PROBE_LIMIT))
    if all(source[i] is None for i in probe):
      raise DataError(
          f'The first {len(probe)} images of TFDS {data.tfds_name}/{data.tfds_split} are all '
          f'smaller than {geometry.minimum()}; lower config.data.high_res_size or choose a '
          'larger-image dataset.')
  ds = grain.MapDataset.range(len(source)).shuffle(seed=_seed(config, 0)).repeat(None)
  ds = ds.random_map(functools.partial(_train_example, source=source, geometry=geometry),
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
  """Returns the deterministic held-out validation crops (the same on every process and run).

  holdout='images': the centre S x S crop of each held-out image, in order (sorted paths, the tfds
  validation split's order), until `config.data.num_val_images` are collected. holdout='strips':
  the non-overlapping S x S tiles along the bottom S rows of the images, taken round-robin (one per
  image per round, spread over each image's width). Flat crops (std below 0.02) are skipped. No
  training crop overlaps them. Precomputed latents keep the crops of the images they were made
  from (`LATENTS_VALIDATION`).

  Args:
    config: Experiment config.

  Returns:
    float32 [num_val_images, S, S, 3] in [-1, 1].

  Raises:
    DataError: On a bad config, unusable data, or fewer crops than `num_val_images`.
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
  if not wanted:
    return np.zeros((0, size, size, 3), np.float32)
  geometry = Geometry.from_config(config)
  images = open_images(config, 'validation')
  # Round-robin over the images, one crop per image per round, so that the held-out set spans as
  # many images as possible; within an image, successive rounds spread over its width (strips).
  tiles, num_images, cache, exhausted = [], 0, {}, set()
  for round_index in range(len(images) and max(1, wanted)):
    for i in range(len(images)):
      if len(tiles) >= wanted:
        break
      if i in exhausted:
        continue
      if i not in cache:
        image = images[i]
        cache[i] = None if image is None else geometry.prepare(image)
        num_images += cache[i] is not None
      image = cache[i]
      offsets = [] if image is None else geometry.validation_offsets(*image.shape[:2])
      if round_index >= len(offsets):
        exhausted.add(i)
        cache[i] = None  # Done with it: free the memory.
        continue
      top, left = offsets[_spread_order(len(offsets))[round_index]]
      tile = normalize(image[top:top + size, left:left + size])
      if tile.std() >= _MIN_VAL_TILE_STD:
        tiles.append(tile)
      if round_index + 1 >= len(offsets):
        exhausted.add(i)
        cache[i] = None
    if len(tiles) >= wanted or len(exhausted) == len(images):
      break
  if len(tiles) < wanted:
    where = ('along the bottom strips of' if geometry.strips else 'from')
    if geometry.strips:
      more = 'add more (or wider) images'
    elif data.source == 'tfds':
      more = f'choose a larger config.data.tfds_val_split than {data.tfds_val_split!r}'
    elif data.source == 'folder' and data.val_path:
      more = 'add images to config.data.val_path'
    else:
      more = 'raise config.data.val_fraction'
    raise DataError(
        f'Only {len(tiles)} validation crops of {size}x{size} px come {where} the {num_images} '
        f'usable held-out images, fewer than config.data.num_val_images={wanted}; lower '
        f'num_val_images to at most {len(tiles)} or {more}.')
  return np.stack(tiles)
