"""Training in the latent space of the (small, random-weight) SD autoencoder through main.py."""

import numpy as np
from safetensors.numpy import save_file as save_safetensors

from tests import runs
from tests.test_autoencoder import random_model
from tests.test_weights import _ldm_state

# A factor-2 autoencoder: 16 px crops become 8x8x4 latents (the tiny UNet has 2 levels).
VAE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)


def vae_flags(path) -> list[str]:
  return ['--config.first_stage.name=sd_vae', f'--config.first_stage.weights={path}',
          '--config.first_stage.ch=32', '--config.first_stage.ch_mult=(1,2)',
          '--config.first_stage.num_res_blocks=1']


def test_latent_training_runs_resumes_and_matches_an_uninterrupted_run(tmp_path):
  weights = tmp_path / 'vae.safetensors'
  save_safetensors(_ldm_state(random_model(seed=5, **VAE)), str(weights))

  straight = tmp_path / 'straight'
  proc = runs.run_main(straight, *vae_flags(weights), '--config.train.num_steps=4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed = tmp_path / 'resumed'
  proc = runs.run_main(resumed, *vae_flags(weights), '--config.train.num_steps=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = runs.run_main(resumed, *vae_flags(weights), '--config.train.num_steps=4')
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
