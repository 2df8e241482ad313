"""`main.py --mode=precompute` with wrong settings, other datasets and other autoencoders: each is
refused in seconds, before any image is encoded, with one line and nothing changed in the output
folder (its bytes hashed before and after); a corrected rerun reuses or replaces what was there."""

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file as save_safetensors

from fmboost_jax import data_sources
from tests import runs

NUM_IMAGES = 9


def _photos(folder, seed: int, size: int = 24) -> str:
  """NUM_IMAGES noise PNGs named 00000.png..., different pixels for each seed."""
  folder.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  for i in range(NUM_IMAGES):
    Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(folder / f'{i:05d}.png')
  return str(folder)


def _held_out(fraction: float) -> int:
  return sum(data_sources.is_held_out(f'{i:05d}.png', fraction) for i in range(NUM_IMAGES))


# A share that holds out 2 to 4 of the 9 names (the split is a hash of each name).
FRACTION = next(f for f in (0.3, 0.35, 0.4, 0.45, 0.5) if 2 <= _held_out(f) <= 4)


def _flags(path, *more) -> list[str]:
  return ['--config.data.source=folder', f'--config.data.path={path}',
          '--config.data.holdout=images', '--config.data.num_val_images=2',
          '--config.precompute.crops_per_image=1', '--config.precompute.shard_size=3', *more]


def _tree_hash(folder, skip: tuple[str, ...] = ()) -> str:
  """A hash of every file's relative path and bytes under `folder`."""
  digest = hashlib.sha256()
  for dirpath, dirnames, filenames in sorted(os.walk(folder)):
    dirnames.sort()
    for name in sorted(filenames):
      relative = os.path.relpath(os.path.join(dirpath, name), folder)
      if relative.split(os.sep)[0] in skip:
        continue
      digest.update(relative.encode())
      with open(os.path.join(dirpath, name), 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def _file_sha256(path) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _refused(proc, *phrases) -> str:
  """The one error line of a refused run (no traceback), holding each phrase."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, proc.stderr[-3000:]
  for phrase in phrases:
    assert phrase in errors[0], errors[0]
  return errors[0]


def _precompute(workdir, *flags, timeout=300):
  t0 = time.perf_counter()
  proc = runs.run_main(workdir, *flags, mode='precompute', timeout=timeout)
  return proc, time.perf_counter() - t0


def _shards(workdir) -> list[str]:
  return sorted(n for n in os.listdir(workdir) if n.endswith('.npy')) if os.path.isdir(
      workdir) else []


def test_wrong_settings_stop_before_encoding_and_the_corrected_rerun_works(tmp_path):
  photos = _photos(tmp_path / 'photos', seed=0)
  out = tmp_path / 'latents'
  assert _held_out(0.02) == 0  # The default share holds out none of 9 images.
  cases = [
      ((), 'has no held-out image'),
      (('--config.data.val_fraction=0',), 'must lie strictly between 0 and 1'),
      (('--config.data.val_fraction=1.5',), 'must lie strictly between 0 and 1'),
      (('--config.data.low_res_size=5',), 'does not divide'),
  ]
  for extra, phrase in cases:
    proc, _ = _precompute(out, *_flags(photos, *extra))
    _refused(proc, phrase)
    assert not os.path.exists(out), extra  # Nor the folder index the checks wrote in it.

  # Corrected: the run finishes, naming the held-out files in the log and the metadata.
  proc, _ = _precompute(out, *_flags(photos, f'--config.data.val_fraction={FRACTION}'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  meta = json.loads((out / 'metadata.json').read_text())
  held = [f'{i:05d}.png' for i in range(NUM_IMAGES)
          if data_sources.is_held_out(f'{i:05d}.png', FRACTION)]
  assert meta['held_out_files'] == held and meta['num_images'] == NUM_IMAGES - len(held)
  assert f'Held out (never trained on): {len(held)} images' in proc.stderr
  assert meta['data_root'] == photos

  # An unfinished precompute (killed: the metadata and a shard missing) of another share is
  # replaced, and says so; the finished one is refused with nothing changed.
  os.remove(out / 'metadata.json')
  os.remove(out / 'x1-00000.npy')
  other = next(f for f in (0.4, 0.45, 0.5, 0.55, 0.6) if 2 <= _held_out(f) != len(held))
  proc, _ = _precompute(out, *_flags(photos, f'--config.data.val_fraction={other}'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'holds an unfinished precompute of other files or settings of this dataset' in proc.stderr
  assert 'it is replaced' in proc.stderr
  meta = json.loads((out / 'metadata.json').read_text())
  assert len(meta['held_out_files']) == _held_out(other)
  before = _tree_hash(out)
  proc, _ = _precompute(out, *_flags(photos, f'--config.data.val_fraction={FRACTION}'))
  _refused(proc, 'holds the finished latents of other files or settings of this dataset',
           'differs in', 'held_out_images', 'nothing was changed')
  assert _tree_hash(out) == before


def test_another_datasets_latents_are_refused_whatever_the_names(tmp_path):
  set_a = _photos(tmp_path / 'setA', seed=1)
  set_b = _photos(tmp_path / 'setB', seed=2)  # The same names, other photographs.
  out = tmp_path / 'latents'
  proc, _ = _precompute(out, *_flags(set_a, f'--config.data.val_fraction={FRACTION}'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  before = _tree_hash(out)
  proc, seconds = _precompute(out, *_flags(set_b, f'--config.data.val_fraction={FRACTION}'))
  _refused(proc, 'holds the latents of another dataset', set_a, set_b, 'nothing was changed')
  assert _tree_hash(out) == before

  # The same folder with its photographs replaced (same names and sizes, other pixels): another
  # dataset too. The scan updates its index of image sizes; the latents are untouched.
  for i in range(NUM_IMAGES):
    os.replace(os.path.join(set_b, f'{i:05d}.png'), os.path.join(set_a, f'{i:05d}.png'))
  shards = _tree_hash(out, skip=(data_sources.INDEX_FOLDER,))
  proc, _ = _precompute(out, *_flags(set_a, f'--config.data.val_fraction={FRACTION}'))
  _refused(proc, 'holds the finished latents of other files or settings', 'train_images')
  assert _tree_hash(out, skip=(data_sources.INDEX_FOLDER,)) == shards


def test_two_processes_refuse_a_wrong_setting_with_one_line_before_encoding(tmp_path):
  photos = _photos(tmp_path / 'photos', seed=0)
  out = tmp_path / 'latents'
  env = runs.env()
  env['PYTHON'] = sys.executable
  env['PORT'] = str(runs.free_port())
  proc = subprocess.run(
      ['bash', 'launch/local_multiprocess.sh', '2', '1', '--config=configs/demo.py:tiny',
       f'--workdir={out}', '--mode=precompute', *_flags(photos)],
      cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'has no held-out image' in errors[0], proc.stderr[-3000:]
  assert _shards(out) == []


@pytest.fixture(name='two_autoencoders')
def _two_autoencoders(tmp_path):
  from tests.test_autoencoder import random_model  # noqa: PLC0415
  from tests.test_latent_training import VAE  # noqa: PLC0415
  from tests.test_weights import _ldm_state  # noqa: PLC0415

  paths = []
  for seed in (5, 6):
    path = tmp_path / f'vae{seed}.safetensors'
    save_safetensors(_ldm_state(random_model(seed=seed, **VAE)), str(path))
    paths.append(str(path))
  return paths


def test_latents_of_another_autoencoder_are_refused(tmp_path, two_autoencoders):
  from tests.test_latent_training import vae_flags  # noqa: PLC0415

  first, second = two_autoencoders
  photos = _photos(tmp_path / 'photos', seed=0)
  out = tmp_path / 'latents'
  proc, _ = _precompute(out, *vae_flags(first),
                        *_flags(photos, f'--config.data.val_fraction={FRACTION}'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  meta = json.loads((out / 'metadata.json').read_text())
  assert meta['first_stage_sha256'] == _file_sha256(first)

  latents = ['--config.data.source=latents', f'--config.data.path={out}',
             '--config.data.num_val_images=2', '--config.data.batch_size=2', runs.NO_EVAL,
             '--config.train.num_steps=1']
  proc = runs.run_main(tmp_path / 'train', *vae_flags(second), *latents, timeout=300)
  _refused(proc, f'the latents in {str(out)!r} were made with the autoencoder {first}',
           f'config.first_stage.weights={second} is another one')

  # Evaluation reads the held-out crops through the same check, with the checkpoint's autoencoder.
  from configs import demo  # noqa: PLC0415
  from fmboost_jax import input_pipeline  # noqa: PLC0415
  from fmboost_jax.errors import UserError  # noqa: PLC0415
  from tests.test_latent_training import VAE  # noqa: PLC0415

  config = demo.get_config('tiny')
  config.first_stage.update(name='sd_vae', weights=first, **VAE)
  config.data.update(source='latents', path=str(out), num_val_images=2)
  assert input_pipeline.validation_images(config).shape == (2, 16, 16, 3)
  config.first_stage.weights = second
  with pytest.raises(UserError, match='were made with the autoencoder'):
    input_pipeline.validation_images(config)


def test_a_converted_checkpoint_carries_the_fingerprint_of_its_file(tmp_path, two_autoencoders):
  from flax import nnx  # noqa: PLC0415

  from fmboost_jax import weights  # noqa: PLC0415
  from fmboost_jax.models import autoencoder, layers  # noqa: PLC0415
  from tests.test_latent_training import VAE  # noqa: PLC0415

  first, _ = two_autoencoders
  abstract = layers.abstract(autoencoder.AutoencoderKL, **VAE)
  state = weights.load_autoencoder_weights(first, abstract)
  t0 = time.perf_counter()
  fingerprint = weights.fingerprint(first)
  assert time.perf_counter() - t0 < 5
  converted = weights.save_flax_checkpoint(state, tmp_path / 'converted', fingerprint)
  assert weights.fingerprint(converted) == fingerprint == _file_sha256(first)
  restored = weights.load_autoencoder_weights(converted, abstract)  # The extra file is no hurdle.
  for (path, a), (_, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(restored)):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_training_records_its_autoencoder_and_refuses_another_on_resume(tmp_path, two_autoencoders):
  from configs import demo  # noqa: PLC0415
  from fmboost_jax import first_stages  # noqa: PLC0415
  from fmboost_jax.errors import UserError  # noqa: PLC0415

  first, second = two_autoencoders
  config = demo.get_config('tiny')
  config.first_stage.name, config.first_stage.weights = 'sd_vae', first
  workdir = str(tmp_path / 'run')
  first_stages.record_fingerprint(config, workdir)
  recorded = json.loads((tmp_path / 'run' / first_stages.RECORD).read_text())
  assert recorded == {'weights': first, 'sha256': _file_sha256(first)}
  first_stages.record_fingerprint(config, workdir)  # The same one: accepted.
  config.first_stage.weights = second
  with pytest.raises(UserError, match=f'was trained with the autoencoder {first} .*'
                     f'config.first_stage.weights={second} is another one'):
    first_stages.record_fingerprint(config, workdir)


def test_latents_of_an_older_format_are_refused_with_nothing_changed(tmp_path):
  from fmboost_jax import precompute  # noqa: PLC0415
  from fmboost_jax.errors import UserError  # noqa: PLC0415

  out = tmp_path / 'latents'
  out.mkdir()
  (out / 'precompute.json').write_text(json.dumps({'files_sha256': '0' * 64, 'num_images': 3}))
  (out / 'x1-00000.npy').write_bytes(b'shard')
  before = _tree_hash(out)
  with pytest.raises(UserError, match='records no data root .*delete that folder'):
    precompute._check_output(out, {'data_root': str(tmp_path / 'photos')})
  assert _tree_hash(out) == before
