"""Training in the latent space of the (small, random-weight) SD autoencoder through main.py."""

import os
import re

import numpy as np
import pytest
from safetensors.numpy import save_file as save_safetensors

from fmboost_jax import first_stages
from fmboost_jax.errors import UserError
from tests import runs
from tests.test_autoencoder import random_model
from tests.test_weights import _ldm_state

# A factor-2 autoencoder: 16 px crops become 8x8x4 latents (the tiny UNet has 2 levels).
VAE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)


def vae_flags(path) -> list[str]:
  return ['--config.first_stage.name=sd_vae', f'--config.first_stage.weights={path}',
          '--config.first_stage.ch=32', '--config.first_stage.ch_mult=(1,2)',
          '--config.first_stage.num_res_blocks=1']


@pytest.mark.slow
def test_latent_training_runs_resumes_and_matches_an_uninterrupted_run(tmp_path):
  weights = tmp_path / 'vae.safetensors'
  save_safetensors(_ldm_state(random_model(seed=5, **VAE)), str(weights))

  straight = tmp_path / 'straight'
  proc = runs.run_main(straight, *vae_flags(weights), '--config.train.num_steps=4', runs.NO_EVAL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed = tmp_path / 'resumed'
  proc = runs.run_main(resumed, *vae_flags(weights), '--config.train.num_steps=2', runs.NO_EVAL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = runs.run_main(resumed, *vae_flags(weights), '--config.train.num_steps=4', runs.NO_EVAL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 2' in proc.stderr

  # The UNet sees 4-channel latents: input 8 channels (x_t and context), output 4.
  a, b = runs.flat(runs.restore_state(straight, 4)), runs.flat(runs.restore_state(resumed, 4))
  assert a["['params']['input_blocks']['0']['kernel']"].shape == (3, 3, 8, 32)
  assert a["['params']['out_conv']['kernel']"].shape == (3, 3, 32, 4)
  assert runs.scalars(straight, 'loss') == runs.scalars(resumed, 'loss')
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_missing_autoencoder_weights_are_one_clear_line(tmp_path):
  proc = runs.run_main(tmp_path / 'w', '--config.first_stage.name=sd_vae', timeout=120)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      'error: config.first_stage.weights is not set; point it at the SD v1 autoencoder')
  proc = runs.run_main(tmp_path / 'w', *vae_flags(tmp_path / 'nope.ckpt'), timeout=120)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert 'nope.ckpt' in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_convert_writes_a_flax_checkpoint_that_loads_like_the_original(tmp_path):
  from flax import nnx  # noqa: PLC0415

  from fmboost_jax import weights as weights_lib  # noqa: PLC0415
  from fmboost_jax.models import autoencoder, layers  # noqa: PLC0415

  source = tmp_path / 'vae.safetensors'
  save_safetensors(_ldm_state(random_model(seed=7, **VAE)), str(source))
  out = tmp_path / 'converted'
  proc = runs.run_main(out, *vae_flags(source), mode='convert', timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'--config.first_stage.weights={out}' in proc.stdout
  # Orbax's progress lines (37 of them for this write) stay out of the log, as in training.
  orbax_lines = [line for line in proc.stderr.splitlines()
                 if re.match(r'[IW]\d{4} .*\] ', line) and 'main.py' not in line]
  assert not orbax_lines, orbax_lines

  abstract = layers.abstract(autoencoder.AutoencoderKL, **VAE)
  original = runs.flat(nnx.to_pure_dict(weights_lib.load_autoencoder_weights(source, abstract)))
  converted = runs.flat(nnx.to_pure_dict(weights_lib.load_autoencoder_weights(out, abstract)))
  assert original.keys() == converted.keys() and len(original) > 20
  for k in original:
    np.testing.assert_array_equal(original[k], converted[k], err_msg=k)
  # The checkpoint carries the fingerprint of the file it was converted from.
  assert weights_lib.fingerprint(out) == weights_lib.file_sha256(source) == weights_lib.fingerprint(
      source)

  # Converting into a non-empty directory never overwrites it.
  proc = runs.run_main(out, *vae_flags(source), mode='convert', timeout=300)
  assert proc.returncode == 1 and 'is not empty' in proc.stderr.strip().splitlines()[-1]
  # A converted checkpoint of another autoencoder is refused with one line.
  other = dict(VAE, ch_mult=(1, 1))
  abstract_other = layers.abstract(autoencoder.AutoencoderKL, **other)
  with pytest.raises(UserError, match='shape mismatches|not a converted checkpoint'):
    weights_lib.load_autoencoder_weights(out, abstract_other)


@pytest.mark.slow
def test_precomputed_latents_feed_the_step_the_same_tensors_and_train(tmp_path):
  import jax  # noqa: PLC0415

  from configs import demo  # noqa: PLC0415
  from fmboost_jax import data_sources, images, precompute, upsampling  # noqa: PLC0415

  weights = tmp_path / 'vae.safetensors'
  save_safetensors(_ldm_state(random_model(seed=9, **VAE)), str(weights))
  out = tmp_path / 'latents'
  flags = [*vae_flags(weights), '--config.precompute.crops_per_image=2',
           '--config.precompute.shard_size=10']
  proc = runs.run_main(out, *flags, mode='precompute', timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  config = demo.get_config('tiny')
  config.first_stage.update(name='sd_vae', weights=str(weights), ch=32, ch_mult=(1, 2),
                            num_res_blocks=1)
  config.precompute.update(crops_per_image=2, shard_size=10)
  crops = np.stack([images.normalize(c) for c in precompute.crops(config)])
  usable = len(data_sources.open_images(config, 'train'))
  assert len(crops) == 2 * usable
  meta = data_sources.latents_metadata(_latents_config(config, out))
  assert meta['num_records'] == 2 * usable and meta['latent_shape'] == [8, 8, 4]
  assert [s['count'] for s in meta['shards']][:-1] == [10] * (len(meta['shards']) - 1)

  # The image path of the training step, on the same crops, gives the stored tensors.
  first_stage = first_stages.first_stage_from_config(config)
  x1, x_up = jax.jit(lambda im: upsampling.training_pair(first_stage, {'image': im}, 8, 'psu'))(
      crops)
  stored = data_sources._LatentRecords(str(out), meta['shards'])  # pylint: disable=protected-access
  np.testing.assert_allclose(np.stack([stored[i]['x1'] for i in range(len(crops))]), x1,
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.stack([stored[i]['x_up'] for i in range(len(crops))]), x_up,
                             atol=1e-5, rtol=1e-5)

  # Training from the latents runs and resumes through main.py.
  train_flags = [*vae_flags(weights), '--config.data.source=latents', f'--config.data.path={out}']
  workdir = tmp_path / 'train'
  proc = runs.run_main(workdir, *train_flags, '--config.train.num_steps=2', runs.NO_EVAL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = runs.run_main(workdir, *train_flags, '--config.train.num_steps=4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 2' in proc.stderr
  assert sorted(runs.scalars(workdir, 'loss')) == [1, 2, 3, 4]
  assert np.isfinite(list(runs.scalars(workdir, 'val/psnr_model').values())).all()

  # Latents made with another first stage or size are refused with one line.
  proc = runs.run_main(tmp_path / 'w2', *train_flags, '--config.data.high_res_size=32',
                       '--config.data.low_res_size=16', timeout=120)
  assert proc.returncode == 1 and 'high_res_size=16' in proc.stderr.strip().splitlines()[-1]


def _latents_config(config, path):
  c = config.copy_and_resolve_references()
  c.data.source, c.data.path = 'latents', str(path)
  return c


def test_precompute_resumes_after_a_kill_and_refuses_another_datasets_shards(tmp_path, caplog):
  """Pixel space (identity first stage) for speed: the shard bookkeeping is the same."""
  import logging  # noqa: PLC0415

  from configs import demo  # noqa: PLC0415
  from fmboost_jax import data_sources, precompute  # noqa: PLC0415

  config = demo.get_config('tiny')
  config.precompute.update(crops_per_image=2, shard_size=6)  # 3 images per shard.
  out = str(tmp_path / 'latents')
  meta = precompute.precompute(config, out)
  num_images = len(data_sources.open_images(config, 'train'))
  assert len(meta['shards']) == -(-num_images // 3) >= 3
  assert meta['num_records'] == 2 * num_images
  reference = {n: np.load(os.path.join(out, n)) for n in os.listdir(out) if n.endswith('.npy')}

  # A run killed after the first shards: the last shard, half written, and the metadata missing.
  last = precompute.shard_names(len(meta['shards']) - 1)
  os.remove(os.path.join(out, last['x1']))
  os.remove(os.path.join(out, data_sources.LATENTS_METADATA))
  kept = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in reference if n != last['x1']}
  caplog.set_level(logging.INFO)
  again = precompute.precompute(config, out)
  assert again == meta
  assert f"has {len(meta['shards'])} shards, {len(meta['shards']) - 1} of them done already" in \
      caplog.text
  for name, mtime in kept.items():
    if name != last['x_up']:
      assert os.stat(os.path.join(out, name)).st_mtime_ns == mtime, name  # Not rewritten.
  for name, array in reference.items():
    np.testing.assert_array_equal(np.load(os.path.join(out, name)), array, err_msg=name)

  # Another dataset's (here: other settings') shards are never mixed in or touched.
  other = config.copy_and_resolve_references()
  other.seed = 1
  with pytest.raises(UserError, match=r'holds the finished latents of other files or settings of '
                     r'this dataset \(precompute.json differs in seed\); nothing was changed'):
    precompute.precompute(other, out)
  for name, array in reference.items():
    np.testing.assert_array_equal(np.load(os.path.join(out, name)), array, err_msg=name)
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'a.txt').write_text('mine')
  with pytest.raises(UserError, match='is not empty and holds no precompute.json'):
    precompute.precompute(config, str(tmp_path / 'notes'))
