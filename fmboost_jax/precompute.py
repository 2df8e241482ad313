"""`main.py --mode=precompute`: write the (x1, x_up) latents of a dataset once, train from them.

For every usable image, `config.precompute.crops_per_image` seeded random crops of its training
region (random flips included) are encoded exactly as the training step would: x1 = E(crop) and
x_up = the low-res crop brought to the latent grid with `config.flow.upsampling_mode` (PSU by
default). Both are stored scaled, float32, in .npy shards of `config.precompute.shard_size`
records, with `metadata.json` and the held-out validation images. Training reads them back with
`--config.data.source=latents --config.data.path=DIR --config.flow.upsampling_mode=identity`.
"""

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from fmboost_jax import input_pipeline, upsampling
from fmboost_jax.errors import UserError


def crops(config: ml_collections.ConfigDict):
  """Yields the deterministic training crops, uint8 [S, S, 3], of every usable image in order."""
  size = config.data.high_res_size
  for i, image in enumerate(input_pipeline.open_images(config)):
    if image is None or not input_pipeline.is_usable(image.shape[0], image.shape[1], size):
      continue
    for k in range(config.precompute.crops_per_image):
      rng = np.random.default_rng([config.seed, i, k])
      crop = input_pipeline.random_crop(image, size, rng)
      yield crop[:, ::-1] if rng.random() < 0.5 else crop


def precompute(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes the latents of config.data's images to `workdir`; returns the metadata."""
  if jax.process_count() > 1:
    raise UserError('--mode=precompute runs in one process; start it without jax.distributed.')
  if config.data.source == 'latents':
    raise UserError('config.data.source=latents is already precomputed; precompute from images.')
  if config.precompute.crops_per_image < 1 or config.precompute.shard_size < 1:
    raise UserError('config.precompute.crops_per_image and shard_size must be at least 1.')
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and os.listdir(workdir):
    raise UserError(f'the output directory {workdir} is not empty; choose a new --workdir.')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create {workdir} ({e.strerror}); choose a writable --workdir.') \
        from None

  first_stage = upsampling.first_stage_from_config(config)
  graphdef, params = nnx.split(first_stage)
  batch_size = config.data.batch_size

  @jax.jit
  def encode(params, images):
    return upsampling.training_pair(nnx.merge(graphdef, params), {'image': images},
                                    config.data.low_res_size, config.flow.upsampling_mode)

  shards, pending, total = [], [], 0

  def write_shard(parts):
    x1, x_up = (np.concatenate([p[j] for p in parts]) for j in (0, 1))
    name = f'{len(shards):05d}'
    np.save(os.path.join(workdir, f'x1-{name}.npy'), x1)
    np.save(os.path.join(workdir, f'x_up-{name}.npy'), x_up)
    shards.append({'x1': f'x1-{name}.npy', 'x_up': f'x_up-{name}.npy', 'count': len(x1)})
    logging.info('Wrote shard %s with %d records.', name, len(x1))

  def flush(batch):
    nonlocal total
    n = len(batch)
    images = np.stack([input_pipeline.normalize(c) for c in batch])
    if n < batch_size:  # Pad the last batch: one compiled shape.
      images = np.concatenate([images, np.repeat(images[-1:], batch_size - n, axis=0)])
    x1, x_up = jax.device_get(encode(params, images))
    pending.append((x1[:n], x_up[:n]))
    total += n
    if sum(len(p[0]) for p in pending) >= config.precompute.shard_size:
      write_shard(pending)
      pending.clear()

  batch = []
  for crop in crops(config):
    batch.append(crop)
    if len(batch) == batch_size:
      flush(batch)
      batch = []
  if batch:
    flush(batch)
  if pending:
    write_shard(pending)

  np.save(os.path.join(workdir, input_pipeline.LATENTS_VALIDATION),
          input_pipeline.validation_images(config))
  latent_shape = list(np.load(os.path.join(workdir, shards[0]['x1']), mmap_mode='r').shape[1:])
  meta = {
      'num_records': total,
      'shards': shards,
      'latent_shape': latent_shape,
      'high_res_size': config.data.high_res_size,
      'low_res_size': config.data.low_res_size,
      'upsampling_mode': config.flow.upsampling_mode,
      'first_stage': {k: config.first_stage[k] for k in config.first_stage},
      'source': {k: config.data[k] for k in ('source', 'path', 'tfds_name', 'tfds_split')},
      'crops_per_image': config.precompute.crops_per_image,
      'seed': config.seed,
  }
  with open(os.path.join(workdir, input_pipeline.LATENTS_METADATA), 'w') as f:
    json.dump(meta, f, indent=2, default=list)
  return meta
