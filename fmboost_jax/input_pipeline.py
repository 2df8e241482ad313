"""Training and validation batches: grain pipelines over the sources of `data_sources.py`.

Every batch is `{'image': uint8 [B_local, S, S, 3]}` (the pixels: a quarter of float32's bytes
from host to device, normalised to [-1, 1] on the devices by the training step) with
`S = config.data.high_res_size` and `B_local = config.data.batch_size // jax.process_count()`.
Low-res inputs are synthesised on device elsewhere (`fmboost_jax/upsampling.py`); this module only
produces high-res crops.

Training pipeline (grain, checkpointable with `grain.checkpoint.CheckpointSave/CheckpointRestore`):
  MapDataset.range -> shuffle -> repeat(None) -> random_map (read the record; random crop in the
  training region + random horizontal flip) -> batch(B_local) -> this process's local batches
  [p::P] -> to_iter_dataset(ReadOptions). The stream and its global batches do not depend on the
  number of processes (`create_train_dataset`); worker threads prepare whole local batches.

Validation crops (`validation_images`) come from the held-out split of `data_sources.py`, the same
on every process and run.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from absl import logging

from fmboost_jax import storage
from fmboost_jax.data_sources import (
  HOLDOUTS,
  LATENTS_VALIDATION,
  SOURCES,
  DataError,
  Geometry,
  _LatentRecords,
  held_out_names,
  latents_metadata,
  load_npy,
  open_images,
)
from fmboost_jax.images import normalize

if TYPE_CHECKING:  # grain is imported where the training stream is built, so that the model
  import grain  # layer (which imports this module's checks through config_checks) runs without it.

# Validation tiles flatter than this (std in [-1, 1] units, about 2.5/255) are skipped: they hold no
# detail to upsample and bilinear reproduces them exactly (infinite PSNR).
_MIN_VAL_TILE_STD = 0.02

# How many shard records are probed at start-up for one usable tfds image before giving up.
_TFDS_PROBE_LIMIT = 64
# A too small (tfds) image at stream position i is replaced by record i + k * stride, k = 1, 2, ...
_MAX_SUBSTITUTES = 64
_SUBSTITUTE_STRIDE = 7919


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
  if data.batch_size <= 0:
    raise DataError(f'config.data.batch_size={data.batch_size} must be positive; set it to the '
                    'global batch of images per step, e.g. 64 (the paper).')
  if data.batch_size % num_processes:
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
  if data.source == 'tfds' and data.holdout == 'strips' and data.tfds_val_split:
    raise DataError(
        f'config.data.tfds_val_split={data.tfds_val_split!r} is not used with config.data.holdout='
        "'strips' (the held-out set is the bottom strip of every image of config.data.tfds_split); "
        "clear it with --config.data.tfds_val_split='', or set holdout=images to hold that split "
        'out.')
  if not 0 <= config.seed < 2**63:
    raise DataError(f'config.seed={config.seed} must be a non-negative integer; set it to e.g. 0.')


# ----------------------------------------------------------------------------------------------
# Public creators.


def batch_spec(config: ml_collections.ConfigDict,
               latent_shape: tuple[int, ...] | None = None) -> dict[str, tuple[tuple, Any]]:
  """Shape and dtype of each entry of a GLOBAL training batch. Precomputed latents have the
  shape their metadata records, or `latent_shape` [h, w, C] when given (compiling, no data)."""
  b, s = config.data.batch_size, config.data.high_res_size
  if config.data.source != 'latents':
    return {'image': ((b, s, s, 3), np.uint8)}
  shape = tuple(latent_shape or latents_metadata(config)['latent_shape'])
  return {'x1': ((b, *shape), np.float32), 'x_up': ((b, *shape), np.float32)}


def _seed(config: ml_collections.ConfigDict, *salt: int) -> int:
  """A uint32 seed derived from `config.seed` and `salt`."""
  return int(np.random.SeedSequence([config.seed, *salt]).generate_state(1)[0])


def _train_example(index: int, rng: np.random.Generator, *, source: Sequence[Any],
                   geometry: Geometry | None) -> dict[str, np.ndarray]:
  """random_map transform of one global stream position: the record at `index` (precomputed latents
  as they are; images randomly cropped in the training region and flipped). A missing or unusable
  image (None: a file that fails to decode; tfds checks sizes lazily) is replaced by a deterministic
  substitute, so that every stream position yields an example and the stream never depends on how
  it is split over processes."""
  for attempt in range(_MAX_SUBSTITUTES):
    record = source[(index + attempt * _SUBSTITUTE_STRIDE) % len(source)]
    if geometry is None:
      return record
    if record is not None and geometry.usable(record.shape[0], record.shape[1]):
      crop = geometry.train_crop(record, rng)
      if rng.random() < 0.5:
        crop = crop[:, ::-1]
      return {'image': crop}
  raise DataError(f'{_MAX_SUBSTITUTES} images in a row near record {index} are all smaller than '
                  f'{geometry.minimum()} or fail to decode (the log names those); lower '
                  'config.data.high_res_size, use larger images or remove the broken files.')


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
    A grain `IterDataset` of `{'image': uint8 [B_local, S, S, 3]}` batches (or
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
  import grain  # noqa: PLC0415  (here: the model layer imports this module's checks only)
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

  Batches are `{'image': np.uint8 [B_local, S, S, 3]}` with
  `B_local = config.data.batch_size // jax.process_count()` and `S = config.data.high_res_size`.
  The iterator has `get_state()` / `set_state()` and checkpoints with
  `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` in Orbax.

  Args:
    config: Experiment config.

  Raises:
    DataError: On a bad config or unusable data.
  """
  return iter(create_train_dataset(config))


def _spread_order(n: int) -> list[int]:
  """A permutation of range(n) whose prefixes spread evenly: 0, n/2, n/4, 3n/4, ..."""
  def bit_reversed(j):
    bits = max(1, (n - 1).bit_length())
    return int(format(j, f'0{bits}b')[::-1], 2)
  return sorted(range(n), key=lambda j: (bit_reversed(j), j))


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
    tiles = load_npy(storage.join(data.path, LATENTS_VALIDATION))
    if len(tiles) < wanted:
      raise DataError(f'{data.path!r} holds {len(tiles)} validation images, fewer than '
                      f'config.data.num_val_images={wanted}; lower it or precompute again.')
    return np.array(tiles[:wanted])
  if not wanted:
    return np.zeros((0, size, size, 3), np.float32)
  geometry = Geometry.from_config(config)
  images = open_images(config, 'validation')
  names = held_out_names(images)
  if names and not geometry.strips:
    logging.info('Held out (never trained on): %d images of %s: %s%s', len(names), images.root,
                 ', '.join(names[:10]), ', ...' if len(names) > 10 else '')
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
    most, batch = len(tiles), data.batch_size
    fit = most - most % batch
    while_training = (
        '' if fit == most else
        f' ({fit} for evaluation while training, a multiple of config.data.batch_size={batch})'
        if fit else
        f' (evaluation while training needs a multiple of config.data.batch_size={batch}: '
        'set config.train.eval_every=0 to train without it)')
    raise DataError(
        f'Only {most} validation crops of {size}x{size} px come {where} the {num_images} '
        f'usable held-out images, fewer than config.data.num_val_images={wanted}; lower '
        f'num_val_images to at most {most}{while_training} or {more}.')
  return np.stack(tiles)
