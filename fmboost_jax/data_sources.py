"""The sources of a dataset (random-access images or precomputed latents) and its held-out split.

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
  * 'folder': every .jpg/.jpeg/.png/.webp/.bmp file under `config.data.path` (a local folder or a
    gs:// URL; recursive, case-insensitive, local symlinks followed). At start-up the header of
    each file (size, mode; nothing is decoded) sorts out non-images and too small and too large
    images; an index in `config.data.index_dir` (main.py: the workdir) keeps the sizes, so a restart
    reads the headers of new and changed files only. Training decodes lazily; a file whose pixel
    data turns out truncated or corrupt is replaced by another image and counted.
  * 'tfds': `tfds.data_source(config.data.tfds_name, ...)` (random access, ArrayRecord), its 'image'
    feature, decoded lazily; too small images are skipped on the fly. Nothing is ever downloaded.
  * 'latents': the (x1, x_up) shards written by `main.py --mode=precompute` (`_LatentRecords`),
    memory-mapped (read in ranges from a bucket); `latents_metadata` checks that they match the
    config.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from fmboost_jax import errors, images, storage

SOURCES = ('skimage', 'folder', 'tfds', 'latents')
HOLDOUTS = ('images', 'strips')
LATENTS_METADATA = 'metadata.json'
# The folder of `config.data.index_dir` (by default the workdir) that holds the folder source's
# indexes of image sizes (`scan_image_folder`).
INDEX_FOLDER = 'folder_index'
LATENTS_VALIDATION = 'validation_images.npy'
# The first-stage settings a precomputed dataset must share with the config that trains on it.
LATENTS_FIRST_STAGE_FIELDS = ('name', 'ch', 'ch_mult', 'num_res_blocks', 'z_channels',
                              'scale_factor')


class DataError(errors.UserError, ValueError):
  """A user-facing data problem: one sentence naming the problem and the fix."""


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
  def from_config(cls, config: ml_collections.ConfigDict) -> Geometry:
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


# ----------------------------------------------------------------------------------------------
# Sources. Each is a random-access sequence of uint8 [H, W, 3] images (None = skip this record).


@dataclasses.dataclass(frozen=True)
class FolderScan:
  """What a scan of an image folder found.

  Attributes:
    root: The scanned folder.
    usable: [(path, height, width)] of usable images (`Geometry.usable`), sorted by path.
    unreadable: [(path, error message)] of files with an image extension whose header Pillow
      cannot read (not an image, or not one it knows).
    too_small: [(path, height, width)] of images below the geometry's minimum.
    too_large: [(path, height, width)] of images above `max_pixels`.
    num_ignored: Files without an image extension (never opened).
    num_probed: Files whose header this scan read; the others' sizes came from the index (or from
      this process's earlier scan).
    index: The index file read and written ('' without one).
    stats: {path: (size in bytes, version)} of every listed image file, as the listing found them
      (the version is the mtime in ns on a local disk, the object's generation in a bucket).
  """
  root: str
  usable: list[tuple[str, int, int]]
  unreadable: list[tuple[str, str]]
  too_small: list[tuple[str, int, int]]
  too_large: list[tuple[str, int, int]]
  num_ignored: int
  num_probed: int = 0
  index: str = ''
  stats: dict[str, tuple[int, Any]] = dataclasses.field(default_factory=dict)

  def summary(self, geometry: Geometry, max_pixels: int) -> str:
    return (f'{len(self.usable)} usable, {len(self.unreadable)} unreadable, {len(self.too_small)} '
            f'too small (below {geometry.minimum()}), {len(self.too_large)} too large (above '
            f'config.data.max_pixels={max_pixels}), {self.num_ignored} non-image files ignored')


# A listed file: (path, size in bytes, version); the version is the mtime in ns on a local disk, the
# object's generation in a bucket. A file whose size and version are unchanged is not read again.
_Listed = tuple[str, int, Any]


def _is_image(name: str) -> bool:
  return name.lower().endswith(images.IMAGE_EXTENSIONS)


def _list_local(root: str) -> tuple[list[_Listed], int]:
  """Recursively lists image files with their sizes and mtimes and counts other files; follows
  symlinks, each real folder once (a symlink cycle ends)."""
  files, num_ignored, seen = [], 0, set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:  # Symlink cycle.
      dirnames[:] = []
      continue
    seen.add(real)
    for filename in filenames:
      if not _is_image(filename):
        num_ignored += 1
        continue
      path = os.path.join(dirpath, filename)
      try:
        st = os.stat(path)
        files.append((path, st.st_size, st.st_mtime_ns))
      except OSError:  # A dangling symlink: listed, and unreadable when probed.
        files.append((path, -1, -1))
  return files, num_ignored


def _list_remote(root: str) -> tuple[list[_Listed], int]:
  """The same for a bucket: one listing of every object under `root` with its size and generation
  (a request per thousand objects, none per object)."""
  import fsspec  # noqa: PLC0415  (bucket roots only; epath's gs:// client)

  fs, prefix = fsspec.core.url_to_fs(root)
  protocol = root.split('://', 1)[0]
  files, num_ignored = [], 0
  for name, info in fs.find(prefix, detail=True).items():
    if info.get('type') == 'directory' or name.endswith('/'):
      continue
    if not _is_image(name):
      num_ignored += 1
      continue
    version = info.get('generation') or info.get('etag') or str(info.get('mtime', ''))
    files.append((f'{protocol}://{name}', int(info.get('size') or 0), version))
  return files, num_ignored


def _probe_file(path: str) -> tuple[int, int] | str:
  """(height, width) of an image as `images.decode_image_file` returns it (EXIF orientation
  applied), from its header alone; or the error message of a file Pillow cannot open.

  The pixel data is not read: a file whose header is fine and whose data is corrupt or truncated
  passes here and fails when it is decoded (`_FolderImages`, which skips it).
  """
  try:
    with warnings.catch_warnings():  # Pillow warns about large images; the limit is ours.
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      with storage.open_binary(path) as f, Image.open(f) as img:
        width, height = img.size
        # EXIF that the header holds (JPEG, WebP; PNG's before the pixel data). `getexif` of a PNG
        # without it would decode the image to look for one after the pixels.
        orientation = img.getexif().get(_ORIENTATION, 1) if 'exif' in img.info else 1
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'
  return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


_ORIENTATION = 0x0112  # The EXIF tag; values 5-8 turn the image by 90 degrees.
_INDEX_FORMAT = 'fmboost_jax folder index'
_INDEX_VERSION = 1
_PROBE_CHUNK = 32  # Files per thread-pool task.
_SCAN_CACHE: dict[Any, tuple[dict[str, Any], int]] = {}


def index_file(index_dir: str, root: str) -> str:
  """Where the index of the folder `root` lives in `index_dir`: INDEX_FOLDER/NAME-HASH.json (the
  folder's name and a hash of its absolute path)."""
  root = os.fspath(storage.path(root))
  name = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in os.path.basename(
      root.rstrip('/')))[:40]
  digest = hashlib.sha256(root.encode('utf-8')).hexdigest()[:16]
  return storage.join(index_dir, INDEX_FOLDER, f'{name}-{digest}.json')


def _read_index(path: str, root: str) -> dict[str, list]:
  """The index's entries {relative path: [size, version, height, width] or [size, version,
  message]}; empty when there is none or it belongs to another folder or format."""
  try:
    text = storage.path(path).read_text()
  except FileNotFoundError:
    return {}
  except Exception as e:  # pylint: disable=broad-except  (an unreachable index: scan it all)
    logging.warning('Cannot read the folder index %s (%s: %s); reading every header.', path,
                    type(e).__name__, e)
    return {}
  try:
    index = json.loads(text)
    if (index.get('format'), index.get('version'), index.get('root')) == (
        _INDEX_FORMAT, _INDEX_VERSION, os.fspath(storage.path(root))):
      return dict(index['files'])
  except (ValueError, TypeError, AttributeError, KeyError):
    pass
  logging.warning('Ignoring the folder index %s: not an index of %s in this format.', path, root)
  return {}


def _write_index(path: str, root: str, entries: dict[str, list]) -> None:
  """Writes the index atomically (readers see the old or the new one). A failure is logged, not
  raised: the index only saves time."""
  text = json.dumps({'format': _INDEX_FORMAT, 'version': _INDEX_VERSION,
                     'root': os.fspath(storage.path(root)), 'files': entries},
                    separators=(',', ':'))
  try:
    storage.path(path).parent.mkdir(parents=True, exist_ok=True)
    storage.write_text_atomically(path, text)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Cannot write the folder index %s (%s: %s); the next start reads every header '
                    'again.', path, type(e).__name__, e)


def _writes_index() -> bool:
  """Whether this process writes indexes: process 0 of a JAX job (every process scans the same
  folder and finds the same sizes; one writer, so that no two replace the file at once). A process
  that has not imported JAX is no part of a job."""
  jax = sys.modules.get('jax')
  return jax is None or jax.process_index() == 0


def scan_image_folder(root: str, geometry: Geometry, num_threads: int = 8,
                      max_pixels: int = 2**62, index_dir: str | None = None) -> FolderScan:
  """Reads the header (size, mode) of every image file under `root` and sorts the files by
  usability; no image is decoded.

  With `index_dir`, the sizes are kept in an index file there (`index_file`): relative path, file
  size and mtime (a bucket object's generation) -> height and width, or the error of an unreadable
  file. A later scan reads the headers of new and changed files only and drops deleted ones;
  process 0 writes the updated index. Results are also cached per process while no file changes,
  so the training iterator and the validation images share one scan.

  A file whose header is valid and whose pixel data is not (truncated, corrupt) is usable here; it
  fails when it is decoded and the training stream replaces it (`_FolderImages`).

  Args:
    root: Folder to scan recursively: a local path or a gs:// URL.
    geometry: The crop size and size rules (`Geometry`).
    num_threads: Threads reading headers (0 means 1).
    max_pixels: Larger images are skipped.
    index_dir: Folder of the index (local or gs://; e.g. the workdir); None keeps none.

  Returns:
    A `FolderScan`.

  Raises:
    DataError: If `root` is not a folder or holds no file with an image extension.
  """
  remote = storage.is_remote(root)
  if not (storage.path(root).is_dir() if remote else os.path.isdir(root)):
    raise DataError(
        f'Image folder {root!r} does not exist or is not a folder; set config.data.path to an '
        'existing folder of images.')
  files, num_ignored = _list_remote(root) if remote else _list_local(root)
  files.sort()
  if not files:
    raise DataError(
        f'Image folder {root!r} holds no {"/".join(images.IMAGE_EXTENSIONS)} files (searched '
        f'recursively, {num_ignored} other files); put images there or point config.data.path '
        'at a folder of images.')
  index = index_file(index_dir, root) if index_dir else ''
  key = (os.fspath(storage.path(root)) if remote else os.path.realpath(root), index,
         tuple(files))
  if key in _SCAN_CACHE:
    entries, num_probed = _SCAN_CACHE[key][0], 0
  else:
    known = _read_index(index, root) if index else {}
    entries, todo = {}, []
    for path, size, version in files:
      relative = storage.relative(path, root)
      entry = known.get(relative)
      if isinstance(entry, list) and len(entry) in (3, 4) and entry[:2] == [size, version]:
        entries[relative] = entry
      else:
        todo.append((relative, path, size, version))
    if todo:  # Threads for slow storage (a bucket, a network disk), in chunks of files.
      paths = [path for _, path, _, _ in todo]
      chunks = [paths[i:i + _PROBE_CHUNK] for i in range(0, len(paths), _PROBE_CHUNK)]
      with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(num_threads, 32))) as pool:
        probed = [r for chunk in pool.map(lambda c: [_probe_file(p) for p in c], chunks)
                  for r in chunk]
      for (relative, _, size, version), result in zip(todo, probed):
        entries[relative] = [size, version, *result] if isinstance(result, tuple) else [
            size, version, result]
    num_probed = len(todo)
    if index and (todo or len(known) != len(entries)) and _writes_index():
      _write_index(index, root, entries)
    if len(_SCAN_CACHE) >= 4:
      _SCAN_CACHE.pop(next(iter(_SCAN_CACHE)))
    _SCAN_CACHE[key] = (entries, num_probed)

  found = {'usable': [], 'unreadable': [], 'too_small': [], 'too_large': []}
  for path, _, _ in files:
    entry = entries[storage.relative(path, root)]
    if len(entry) == 3:
      found['unreadable'].append((path, entry[2]))
      continue
    height, width = entry[2:]
    kind = ('too_large' if height * width > max_pixels else
            'usable' if geometry.usable(height, width) else 'too_small')
    found[kind].append((path, height, width))
  return FolderScan(root, num_ignored=num_ignored, num_probed=num_probed, index=index,
                    stats={path: (size, version) for path, size, version in files}, **found)


class _FolderImages:
  """Random access to the usable images of a scanned folder, decoded on every access.

  An image that fails to decode (its header read fine at the scan; its pixel data is truncated or
  corrupt, or the file changed since) is None: the training stream replaces it with another image,
  the validation crops skip it. Each such file is logged once and counted (`skipped`).
  """

  def __init__(self, paths: Sequence[str], root: str = '',
               stats: dict[str, tuple[int, Any]] | None = None):
    self._paths = list(paths)
    self._skipped: set[str] = set()
    self.root = root
    self.stats = stats or {}

  @property
  def paths(self) -> list[str]:
    return list(self._paths)

  def identity(self) -> list[str]:
    """One line per image: its path relative to the folder, its size in bytes and its version
    (mtime in ns, or a bucket object's generation) as the scan listed them; no file is read."""
    return [f'{storage.relative(p, self.root)}\t{self.stats.get(p, ("?", "?"))[0]}\t'
            f'{self.stats.get(p, ("?", "?"))[1]}' for p in self._paths]

  @property
  def skipped(self) -> list[str]:
    """The files that failed to decode so far, sorted."""
    return sorted(self._skipped)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> np.ndarray | None:
    path = self._paths[index]
    try:
      return images.decode_image_file(path)  # A local file or a bucket object.
    except Exception as e:  # pylint: disable=broad-except
      if path not in self._skipped:
        self._skipped.add(path)
        logging.warning('Skipping %s, which does not decode (%s: %s); another image replaces it '
                        '(files skipped so far: %d).', path, type(e).__name__, e,
                        len(self._skipped))
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
    image = images.to_rgb_uint8(self._source[index]['image'])
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
  import tensorflow_datasets as tfds  # noqa: PLC0415  (only the tfds source needs it)

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
        f'{where} ({type(e).__name__}: {reason}); {check_name}prepare it offline with its '
        f"builder, `tfds.builder('{data.tfds_name}', data_dir=DIR, file_format='array_record')"
        '.download_and_prepare()` (a builder of your own: docs/training.md, "A tfds dataset of '
        'your own"), and set config.data.tfds_data_dir=DIR (nothing is downloaded here), or name '
        'another split in config.data.tfds_split / tfds_val_split.') from None
  features = getattr(getattr(source, 'dataset_info', None), 'features', None)
  if features is not None and 'image' not in features:
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


def held_out_description(config: ml_collections.ConfigDict) -> str:
  """Where the held-out images come from, in words (the evaluation results' `data`)."""
  data = config.data
  if data.source == 'latents':
    return f'latents {data.path} (the held-out crops precompute saved)'
  train = {'skimage': 'skimage', 'folder': f'folder {data.path}',
           'tfds': f'tfds {data.tfds_name} split {data.tfds_split}'}[data.source]
  if data.holdout == 'strips':
    return f'{train}, the bottom strips'
  if data.source == 'folder' and data.val_path:
    return f'folder {data.val_path}'
  if data.source == 'tfds':
    return f'tfds {data.tfds_name} split {data.tfds_val_split}'
  return f'{train}, val_fraction {data.val_fraction} by name'


def held_out_names(images) -> list[str]:
  """The held-out files of a folder source, relative to their folder ([] for other sources)."""
  if not isinstance(images, _FolderImages):
    return []
  return [storage.relative(p, images.root) for p in images.paths]


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
  if data.source == 'skimage':
    photos = images.load_skimage_photos()
    if by_hash:
      photos = [(n, im) for n, im in photos if is_held_out(n, data.val_fraction) == held_out]
    usable = [image for _, image in photos if geometry.usable(*image.shape[:2])]
    logging.info('skimage photographs (%s): %d usable, %d too small (below %s).', what,
                 len(usable), len(photos) - len(usable), geometry.minimum())
    if not usable:
      largest = max(min(image.shape[:2]) for _, image in images.load_skimage_photos())
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
    scan = scan_image_folder(root, geometry, data.num_threads, data.max_pixels,
                             index_dir=data.index_dir or None)
    paths = [path for path, _, _ in scan.usable]
    if by_hash:
      paths = [p for p in paths if is_held_out(storage.relative(p, root), data.val_fraction)
               == held_out]
    logging.info('Image folder %s: %s; %d %s images (headers read: %d; index: %s).', root,
                 scan.summary(geometry, data.max_pixels), len(paths), what, scan.num_probed,
                 scan.index or 'none, config.data.index_dir is empty')
    if scan.unreadable:
      logging.warning('Unreadable files (first %d of %d): %s', min(5, len(scan.unreadable)),
                      len(scan.unreadable), '; '.join(f'{p} ({m})' for p, m in scan.unreadable[:5]))
    if not paths and by_hash and scan.usable:  # Usable images, all on the other side.
      fix = (f'raise config.data.val_fraction (none of the {len(scan.usable)} usable images is '
             f'held out at {data.val_fraction}), or set config.data.val_path to a folder of '
             'held-out images' if held_out else
             f'lower config.data.val_fraction (all {len(scan.usable)} usable images are held out '
             f'at {data.val_fraction})')
    if not paths:
      raise DataError(
          f'Image folder {root!r} has no {what} image ({scan.summary(geometry, data.max_pixels)}'
          f'{", val_fraction=" + str(data.val_fraction) if by_hash else ""}); {fix}.')
    return _FolderImages(paths, root=root, stats={p: scan.stats[p] for p in paths})
  name = data.tfds_val_split if held_out and not geometry.strips else data.tfds_split
  return _open_tfds(config, name)


def _check_separate(path: str, val_path: str) -> None:
  """The held-out folder must not be, contain, or lie inside the training folder."""
  a, b = (os.fspath(p) if storage.is_remote(p) else os.path.realpath(p) for p in (path, val_path))
  if a == b or b.startswith(a.rstrip('/') + '/') or a.startswith(b.rstrip('/') + '/'):
    raise DataError(
        f'config.data.val_path={val_path!r} overlaps config.data.path={path!r} (one lies inside '
        'the other), so held-out images would be trained on; use two separate folders, or leave '
        'val_path empty to hold out config.data.val_fraction of data.path.')


def _npy_header(file) -> tuple[tuple[int, ...], np.dtype, int]:
  """(shape, dtype, offset of the data) of the .npy file open in `file` (C order only)."""
  version = np.lib.format.read_magic(file)
  read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
          else np.lib.format.read_array_header_2_0)
  shape, fortran_order, dtype = read(file)
  if fortran_order:
    raise DataError(f'{getattr(file, "name", file)} is a Fortran-order array; precompute again.')
  return shape, dtype, file.tell()


def npy_shape(path: storage.PathLike) -> tuple[int, ...]:
  """The shape of a .npy file, from its header."""
  with storage.open_binary(path) as f:
    return _npy_header(f)[0]


def load_npy(path: storage.PathLike) -> np.ndarray:
  """A .npy file: memory-mapped when local, read whole from a bucket."""
  if not storage.is_remote(path):
    return np.load(os.fspath(path), mmap_mode='r')
  with storage.open_binary(path) as f:
    return np.load(f, allow_pickle=False)


class NpyRows:
  """Random access to the rows (first axis) of a .npy file: memory-mapped when local, one ranged
  read per row from a bucket (an open file per thread, reopened in a forked worker)."""

  def __init__(self, path: storage.PathLike):
    self._path = os.fspath(path)
    self._array = None
    if not storage.is_remote(path):
      self._array = np.load(self._path, mmap_mode='r')
      self.shape = self._array.shape
    else:
      with storage.open_binary(path) as f:
        self.shape, self._dtype, self._offset = _npy_header(f)
      self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self._dtype.itemsize
    self._local = threading.local()

  def __getstate__(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if k != '_local'}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _local=threading.local())

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index: int) -> np.ndarray:
    if self._array is not None:
      return np.array(self._array[index])
    file = getattr(self._local, 'file', None)
    if file is None:
      file = self._local.file = storage.open_binary(self._path)
    file.seek(self._offset + index * self._row_bytes)
    data = file.read(self._row_bytes)
    if len(data) != self._row_bytes:
      raise DataError(f'{self._path} ends before row {index}; precompute again.')
    return np.frombuffer(data, self._dtype).reshape(self.shape[1:])


class _LatentRecords:
  """Random access over precomputed latent shards (.npy files, see `NpyRows`).

  Record i is `{'x1': float32 [h, w, C], 'x_up': float32 [h, w, C]}`: the scaled latent of a
  high-res crop and of its low-res version brought to the same grid (written by precompute.py).
  """

  def __init__(self, path: str, shards: Sequence[dict[str, Any]]):
    self._arrays = [(NpyRows(storage.join(path, sh['x1'])),
                     NpyRows(storage.join(path, sh['x_up']))) for sh in shards]
    self._ends = np.cumsum([len(a) for a, _ in self._arrays])

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    shard = int(np.searchsorted(self._ends, index, side='right'))
    offset = index - (int(self._ends[shard - 1]) if shard else 0)
    x1, x_up = self._arrays[shard]
    return {'x1': x1[offset], 'x_up': x_up[offset]}


def latents_metadata(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Reads and checks the metadata of the precomputed latents in `config.data.path`."""
  path = storage.path(config.data.path) / LATENTS_METADATA
  if not path.is_file():
    raise DataError(f'{config.data.path!r} holds no {LATENTS_METADATA}; write precomputed latents '
                    'there with main.py --mode=precompute first.')
  meta = json.loads(path.read_text())
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
  from fmboost_jax import first_stages  # noqa: PLC0415  (the autoencoder's weights: only here)
  first_stages.check_fingerprint(config, meta.get('first_stage_sha256'),
                                 meta.get('first_stage_weights'),
                                 f'the latents in {config.data.path!r}')
  return meta
