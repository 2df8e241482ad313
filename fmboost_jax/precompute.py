"""`main.py --mode=precompute`: write the (x1, x_up) latents of a dataset once, train from them.

For every usable training image, `config.precompute.crops_per_image` seeded random crops (random
flips included) are encoded exactly as the training step would: x1 = E(crop) and x_up = the
low-res crop brought to the latent grid with `config.flow.upsampling_mode` (PSU by default). Both
are stored scaled, float32, in .npy shards (memory-mapped by training: the fastest random access
measured, benchmarks/results.md), with `metadata.json` and the held-out validation crops. Training
reads them back with `--config.data.source=latents --config.data.path=DIR`.

Every check runs first, in every process, before any image is encoded (`_prepare`): the config,
the output folder, the training and held-out images (which files, how many), the validation crops
and the autoencoder; a problem is one error line, printed by one process.

A job at scale: run it in every process of a `jax.distributed` job (the same flags as training;
DIR on storage that every host sees). The images are cut into shards of whole images (shard j holds
the crops of images [j m, (j + 1) m), m = max(1, shard_size // crops_per_image)); process p encodes
the shards j = p, p + P, ..., batched over its own devices, and writes each one under a temporary
name that is renamed when complete (in a bucket, an object appears only when complete). A killed
precompute started again resumes: finished shards are kept and skipped. `precompute.json`, written
before any shard, records what the latents depend on (`manifest`): the data root, every training and
held-out image's relative path, size and modification time, the held-out choice, the sizes, the
upsampling mode, the first stage and its weights' fingerprint, the precompute's settings. A DIR
holding another dataset's latents, or finished latents of other files or settings, is refused with
nothing changed; an unfinished precompute of the same data root with other files or settings (one
killed, or stopped by a setting since corrected) is replaced, and the log says so. After a barrier,
process 0 checks that every shard is there and writes `metadata.json`, which also names the
held-out files.
"""

import concurrent.futures
import hashlib
import io
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from fmboost_jax import (
  config_checks,
  data_sources,
  first_stages,
  input_pipeline,
  sharding,
  storage,
  upsampling,
)
from fmboost_jax.errors import UserError

MANIFEST = 'precompute.json'


def _atomic_save(path: storage.Path, array: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.save(buffer, array)
  storage.write_bytes_atomically(path, buffer.getvalue())


def _atomic_json(path: storage.Path, value) -> None:
  storage.write_text_atomically(path, json.dumps(value, indent=2, default=list))


def shard_names(index: int) -> dict[str, str]:
  return {'x1': f'x1-{index:05d}.npy', 'x_up': f'x_up-{index:05d}.npy'}


def data_root(config: ml_collections.ConfigDict) -> str:
  """The dataset a config reads, as one string: the image folder's absolute path (or bucket URL),
  the tfds dataset and its data_dir, or 'skimage'."""
  data = config.data
  if data.source == 'folder':
    return os.fspath(storage.path(data.path))
  if data.source == 'tfds':
    return f'tfds:{data.tfds_name}@{data.tfds_data_dir or "default data_dir"}'
  return data.source


def split_identity(config: ml_collections.ConfigDict, images) -> dict:
  """What identifies the images of one split, read from no file: for a folder, its root and a hash
  of every image's relative path, size and modification time (a bucket object's generation), as
  the scan listed them; for tfds, the dataset, split, version and size; for the bundled
  photographs, a hash of their pixels."""
  data = config.data
  if hasattr(images, 'identity'):
    lines = images.identity()
    return {'root': os.fspath(storage.path(images.root)), 'num_images': len(lines),
            'files_sha256': hashlib.sha256('\n'.join(lines).encode('utf-8')).hexdigest()}
  if data.source == 'tfds':
    info = getattr(getattr(images, '_source', None), 'dataset_info', None)
    return {'num_images': len(images), 'version': str(getattr(info, 'version', ''))}
  digest = hashlib.sha256()
  for image in images:
    digest.update(repr(image.shape).encode('utf-8'))
    digest.update(np.ascontiguousarray(image).tobytes())
  return {'num_images': len(images), 'pixels_sha256': digest.hexdigest()}


def manifest(config: ml_collections.ConfigDict, images, held_out=None,
             first_stage_sha256: str | None = None) -> dict:
  """What the latents depend on: the dataset (its root, and every training and held-out image's
  relative path, size and modification time: `split_identity`), the held-out choice, the sizes, the
  upsampling mode, the first stage and its weights' fingerprint, and the precompute's settings."""
  data = config.data
  return {
      'data_root': data_root(config),
      'source': {k: data[k] for k in ('source', 'tfds_name', 'tfds_split', 'tfds_val_split',
                                      'holdout', 'val_path', 'val_fraction', 'resize_small',
                                      'max_pixels')},
      'num_images': len(images),
      'train_images': split_identity(config, images),
      'held_out_images': None if held_out is None else split_identity(config, held_out),
      'num_val_images': data.num_val_images,
      'high_res_size': data.high_res_size,
      'low_res_size': data.low_res_size,
      'upsampling_mode': config.flow.upsampling_mode,
      'first_stage': {k: config.first_stage[k] for k in data_sources.LATENTS_FIRST_STAGE_FIELDS},
      'first_stage_sha256': first_stage_sha256,
      'crops_per_image': config.precompute.crops_per_image,
      'shard_size': config.precompute.shard_size,
      'seed': config.seed,
  }


def crops(config: ml_collections.ConfigDict, images=None, indices=None):
  """Yields the deterministic training crops, uint8 [S, S, 3], of the usable training images
  (`indices` of them, default all) in order: crop k of image i uses the seed (seed, i, k)."""
  geometry = data_sources.Geometry.from_config(config)
  images = data_sources.open_images(config, 'train') if images is None else images
  for i in range(len(images)) if indices is None else indices:
    image = images[i]
    if image is None or not geometry.usable(image.shape[0], image.shape[1]):
      continue
    for k in range(config.precompute.crops_per_image):
      rng = np.random.default_rng([config.seed, i, k])
      crop = geometry.train_crop(image, rng)
      yield crop[:, ::-1] if rng.random() < 0.5 else crop


def _is_ours(name: str) -> bool:
  """Whether a file name is one a precompute writes (or the temporary of an interrupted write)."""
  name = name[1:].split('.tmp-')[0] if name.startswith('.') and '.tmp-' in name else name
  return name in (MANIFEST, data_sources.LATENTS_METADATA, data_sources.LATENTS_VALIDATION) or (
      name.endswith('.npy') and name.split('-')[0] in ('x1', 'x_up'))


def _read_manifest(workdir: storage.Path) -> dict | None:
  """The manifest of the precompute in `workdir`; None when the folder is new or empty; a UserError
  for a file, or a folder holding something else (read-only: every process checks the same)."""
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f'the output {workdir} is a file; choose a folder for --workdir.')
  if not workdir.is_dir() or not {p.name for p in workdir.iterdir()} - {data_sources.INDEX_FOLDER}:
    return None  # New, or holding only the index of the image folder (config.data.index_dir).
  path = workdir / MANIFEST
  if not path.is_file():
    raise UserError(f'the output directory {workdir} is not empty and holds no {MANIFEST} of a '
                    'precompute; choose a new --workdir.')
  return json.loads(path.read_text())


def _refuse_other_dataset(workdir: storage.Path, found: dict | None, root: str) -> None:
  """Refuses a folder holding the latents of another dataset (another data root), before that
  dataset is scanned."""
  if found is None or found.get('data_root') == root:
    return
  finished = (workdir / data_sources.LATENTS_METADATA).is_file()
  what = f'{"" if finished else "unfinished "}latents'
  if 'data_root' not in found:
    raise UserError(
        f'{workdir} holds {what} whose {MANIFEST} records no data root (an older format); nothing '
        'was changed there: choose a new --workdir, or delete that folder to precompute again.')
  raise UserError(
      f'{workdir} holds the {what} of another dataset ({found["data_root"]}, not {root}); '
      'nothing was changed there: choose a new --workdir.')


def _check_output(workdir: storage.PathLike, wanted: dict) -> str:
  """What to do with `workdir`: 'new' (new or empty), 'resume' (a precompute of `wanted`: its
  finished shards are kept), 'replace' (an unfinished precompute of the same dataset with other
  files or settings, e.g. stopped by a wrong setting); a UserError, with nothing changed, for
  finished latents of other files or settings, another dataset's latents, or other files."""
  workdir = storage.path(workdir)
  found = _read_manifest(workdir)
  if found is None:
    return 'new'
  _refuse_other_dataset(workdir, found, wanted['data_root'])
  found, wanted = json.loads(json.dumps(found)), json.loads(json.dumps(wanted, default=list))
  differ = sorted(k for k in found.keys() | wanted.keys() if found.get(k) != wanted.get(k))
  if not differ:
    return 'resume'
  if (workdir / data_sources.LATENTS_METADATA).is_file():
    raise UserError(
        f'{workdir} holds the finished latents of other files or settings of this dataset '
        f'({MANIFEST} differs in {", ".join(differ)}); nothing was changed there: choose a new '
        '--workdir, or precompute with the settings they were made with.')
  logging.info('%s holds an unfinished precompute of other files or settings of this dataset '
               '(%s differs in %s): it is replaced.', workdir, MANIFEST, ', '.join(differ))
  return 'replace'


def _remove_ours(workdir: storage.Path) -> int:
  """Removes the files a precompute wrote in `workdir` (nothing else); returns how many."""
  removed = 0
  for entry in workdir.iterdir():
    if entry.is_file() and _is_ours(entry.name) and entry.name != MANIFEST:
      entry.unlink()
      removed += 1
  if (workdir / MANIFEST).is_file():  # Last: a replacement stopped half-way is replaced again.
    (workdir / MANIFEST).unlink()
  return removed


def encoder_program(config: ml_collections.ConfigDict, first_stage,
                    mesh: jax.sharding.Mesh) -> tuple[jax.stages.Wrapped, jax.ShapeDtypeStruct]:
  """The encoding of a batch of crops on `mesh` (a process's own devices), jitted: (first-stage
  params, images) -> (x1, x_up) as the training step makes them; and the images it takes,
  uint8 [B, S, S, 3] pixels with B the config's precompute batch rounded up to a multiple of the
  devices."""
  graphdef = nnx.graphdef(first_stage)
  batch_sharding = sharding.batch_sharded(mesh)
  program = jax.jit(
      lambda params, x: upsampling.training_pair(nnx.merge(graphdef, params), {'image': x},
                                                 config.data.low_res_size,
                                                 config.flow.upsampling_mode),
      in_shardings=(sharding.replicated(mesh), batch_sharding))
  n, size = mesh.devices.size, config.data.high_res_size
  images = jax.ShapeDtypeStruct((sharding.round_up(config.precompute.batch_size, n), size, size, 3),
                                np.uint8, sharding=batch_sharding)
  return program, images


def _prepare(config: ml_collections.ConfigDict, workdir: storage.Path):
  """Every check of a precompute, before anything is written or encoded: the config, the output
  folder against the dataset, the training and held-out images (which files, how many), the
  validation crops and the first stage's weights."""
  config_checks.check(config, 'precompute')
  _refuse_other_dataset(workdir, _read_manifest(workdir), data_root(config))
  images = data_sources.open_images(config, 'train')
  held_out = None
  if config.data.holdout == 'images' and config.data.num_val_images:
    held_out = data_sources.open_images(config, 'validation')
  validation = input_pipeline.validation_images(config)
  first_stage = first_stages.first_stage_from_config(config)
  wanted = manifest(config, images, held_out, first_stages.weights_fingerprint(config))
  action = _check_output(workdir, wanted)
  return images, held_out, validation, first_stage, wanted, action


def precompute(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes this process's shards of config.data's latents to `workdir`; returns the metadata.

  Every check runs first, in every process (`_prepare`); a problem is one error, printed by one
  process, before any image is encoded.
  """
  p = config.precompute
  workdir = storage.path(workdir)
  error, prepared = None, None
  try:
    prepared = _prepare(config, workdir)
  except UserError as e:
    error = e
  sharding.raise_once(error)
  images, held_out, validation, first_stage, wanted, action = prepared
  process, count = jax.process_index(), jax.process_count()
  multihost_utils.sync_global_devices('precompute: output checked')
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    if process == 0 and action == 'replace':
      logging.info('Removed the %d files of the unfinished precompute in %s.',
                   _remove_ours(workdir), workdir)
    if process == 0 and action != 'resume':
      _atomic_json(workdir / MANIFEST, wanted)
    if process == 0 and not (workdir / data_sources.LATENTS_VALIDATION).is_file():
      _atomic_save(workdir / data_sources.LATENTS_VALIDATION, validation)
  except OSError as e:
    raise UserError(f'cannot write to {workdir} ({e.strerror}); choose a writable --workdir.') \
        from None
  multihost_utils.sync_global_devices('precompute: output ready')

  per_shard = max(1, p.shard_size // p.crops_per_image)
  num_shards = -(-len(images) // per_shard)
  mine = [j for j in range(process, num_shards, count)]
  todo = [j for j in mine if not all((workdir / name).is_file()
                                     for name in shard_names(j).values())]
  logging.info('Precompute: %d images in %d shards; process %d of %d has %d shards, %d of them '
               'done already.', len(images), num_shards, process, count, len(mine),
               len(mine) - len(todo))

  # Encoding: batches sharded over this process's own devices (no collectives between processes).
  mesh = sharding.data_mesh(jax.local_devices())
  encode, batch = encoder_program(config, first_stage, mesh)
  batch_size = batch.shape[0]
  params = jax.device_put(nnx.state(first_stage), sharding.replicated(mesh))  # Once, not per batch.

  def encode_all(crop_list):
    parts = []
    for start in range(0, len(crop_list), batch_size):
      chunk = np.stack(crop_list[start:start + batch_size])  # uint8: normalised on the devices.
      n = len(chunk)
      x1, x_up = jax.device_get(encode(params, sharding.pad_batch(chunk, batch_size)))
      parts.append((x1[:n], x_up[:n]))
    return (np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts]))

  t0, done_images = time.perf_counter(), 0
  with concurrent.futures.ThreadPoolExecutor(max(1, config.data.num_threads)) as pool:
    for n, j in enumerate(todo):
      indices = range(j * per_shard, min((j + 1) * per_shard, len(images)))
      decoded = list(pool.map(images.__getitem__, indices))
      crop_list = list(crops(config, images=dict(zip(indices, decoded)), indices=indices))
      if not crop_list:
        raise UserError(f'shard {j} (images {indices.start}-{indices.stop - 1}) has no usable '
                        'image left; an image changed on disk since the scan: precompute again.')
      x1, x_up = encode_all(crop_list)
      names = shard_names(j)
      _atomic_save(workdir / names['x_up'], x_up)
      _atomic_save(workdir / names['x1'], x1)  # Written last: marks the shard done.
      done_images += len(indices)
      seconds = time.perf_counter() - t0
      logging.info('Precompute, process %d: shard %d (%d of %d here), %d records; %.2f images/s.',
                   process, j, n + 1, len(todo), len(x1), done_images / seconds)

  multihost_utils.sync_global_devices('precompute: shards written')
  meta_path = workdir / data_sources.LATENTS_METADATA
  if process != 0:
    return {'num_records': None, 'shards': [shard_names(j) for j in mine]}
  shards = []
  for j in range(num_shards):
    names = shard_names(j)
    if not all((workdir / name).is_file() for name in names.values()):
      raise UserError(f'shard {j} is missing in {workdir} after every process finished; '
                      'precompute on storage that every host sees, and start it again to '
                      'finish (finished shards are kept).')
    shards.append({**names, 'count': data_sources.npy_shape(workdir / names['x1'])[0]})
  latent_shape = list(data_sources.npy_shape(workdir / shards[0]['x1'])[1:])
  meta = {
      'num_records': sum(s['count'] for s in shards),
      'shards': shards,
      'latent_shape': latent_shape,
      **{k: wanted[k] for k in ('high_res_size', 'low_res_size', 'upsampling_mode',
                                'first_stage', 'crops_per_image', 'seed')},
      'first_stage_weights': config.first_stage.weights,
      'first_stage_sha256': wanted['first_stage_sha256'],
      'data_root': wanted['data_root'],
      'source': {**wanted['source'], 'path': config.data.path},
      'held_out_root': getattr(held_out, 'root', ''),
      'held_out_files': data_sources.held_out_names(held_out),
      'num_images': len(images),
      'num_validation_images': data_sources.npy_shape(
          workdir / data_sources.LATENTS_VALIDATION)[0],
  }
  _atomic_json(meta_path, meta)
  return meta
