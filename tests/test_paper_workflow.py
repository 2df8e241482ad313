"""A rehearsal of the paper workflow at the paper's resolution, through main.py, command by command
as README's "The paper workflow" section shows it.

The test writes a folder of 1024 px photographs (four bundled ones scaled, a portrait,
a landscape, one too small) and an SD-architecture autoencoder (factor 8, slimmer widths 32-128
and one residual block per level for speed) with random weights, saved by diffusers itself as
`diffusion_pytorch_model.safetensors`. Then it runs README's commands with the placeholder paths
replaced and only size overrides appended (a tiny UNet, a few steps, no held-out evaluation while
training: step 4 evaluates): convert -> precompute in 2 processes -> train from the latents, killed
with SIGKILL once and resumed -> evaluate -> sample 512 px images and a 64^2 latent to 1024 px -> a
two-stage cascade, run on the workdir after it was moved to another place together with the
autoencoder (`--config.first_stage.weights`). The cascade lifts a 16^2 latent (128 px) through 256
to 512 px rather than a 64^2 one to 2048 px: the same commands and code at a sixteenth of the
pixels (at 2048 px the slim autoencoder's untiled encoding, with attention over 256^2 latent
positions, and the tiled decoding took 102 of the step's 171 s on 2 cores; at 1024 px 76 s).
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from fmboost_jax import data_sources, images
from tests import runs

pytestmark = pytest.mark.slow

VAE = ['--config.first_stage.ch=32', '--config.first_stage.num_res_blocks=1']
# 4 levels, so that attention (at the lowest level and in the middle) sees 16^2 tokens of a 128^2
# latent, not 64^2 (which alone made a training step take 6 s here).
UNET = ['--config.model.model_channels=32', '--config.model.channel_mult=(1,2,2,2)',
        '--config.model.num_res_blocks=1', '--config.model.attention_levels=(3,)',
        '--config.model.num_heads=2', '--config.model.head_dim=16']
DATA = ['--config.data.batch_size=2', '--config.data.num_val_images=2',
        '--config.data.num_threads=2', '--config.data.val_fraction=0.3']
SIZES = {  # Appended to each README command, by mode.
    'convert': VAE,
    'precompute': [*VAE, *DATA, '--config.precompute.crops_per_image=1',
                   '--config.precompute.shard_size=2', '--config.precompute.batch_size=2'],
    'train': [*VAE, *UNET, *DATA, '--config.train.num_steps=4', '--config.train.checkpoint_every=2',
              '--config.train.log_every=1', runs.NO_EVAL,
              '--config.train.num_grid_images=2', '--config.optim.warmup_steps=2',
              '--config.ema.start_step=2', '--config.sample.nfe=2'],
    'evaluate': [*DATA, '--config.eval.nfe_sweep=(2,)', '--config.eval.num_figure_images=1',
                 '--config.sample.nfe=2', '--config.sample.batch_size=2'],
    'sample': ['--config.sample.nfe=2', '--config.sample.batch_size=2'],
}
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'retina')  # chelsea and retina are held out.


def readme_commands() -> list[list[str]]:
  """The commands of README's paper-workflow block, continuation lines joined."""
  return runs.readme_commands('paper workflow')


def write_photos(folder) -> None:
  """1024 px photographs: four bundled ones scaled to 1024 x 1024, a portrait, a landscape, and
  one too small; JPEG, as datasets come."""
  folder.mkdir()
  photos = dict(images.load_skimage_photos())
  for name in PHOTOS:
    Image.fromarray(photos[name]).resize((1024, 1024), Image.Resampling.BICUBIC).save(
        folder / f'{name}.jpg', quality=90)
  Image.fromarray(photos['coffee']).resize((1024, 1536)).save(folder / 'portrait.jpg', quality=90)
  Image.fromarray(photos['rocket']).resize((1280, 1024)).save(folder / 'landscape.png')
  Image.fromarray(photos['chelsea']).resize((800, 600)).save(folder / 'small.jpg', quality=90)


def write_diffusers_vae(path) -> None:
  from safetensors.torch import save_file  # noqa: PLC0415

  from tests.test_autoencoder import _diffusers_vae  # noqa: PLC0415
  vae = _diffusers_vae((32, 64, 128, 128), 1, seed=4)
  path.parent.mkdir(parents=True)
  save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))


def test_readme_paper_workflow_at_1024_px(tmp_path):
  commands = readme_commands()
  assert [c[0] for c in commands] == ['.venv/bin/python', 'launch/local_multiprocess.sh',
                                      *['.venv/bin/python'] * 4]
  write_photos(tmp_path / 'photos')
  write_diffusers_vae(tmp_path / 'sd-vae-ft-mse' / 'diffusion_pytorch_model.safetensors')
  (tmp_path / 'lowres').mkdir()
  photos = dict(images.load_skimage_photos())
  Image.fromarray(photos['astronaut']).save(tmp_path / 'lowres' / 'astronaut.png')  # 512 px.
  rng = np.random.default_rng(0)
  np.save(tmp_path / 'lowres' / 'latent.npy', rng.normal(size=(1, 4, 64, 64)).astype(np.float32))
  # Which photographs the hash split holds out (whole images, at least 2 for evaluation).
  held = [n for n in sorted(os.listdir(tmp_path / 'photos'))
          if n != 'small.jpg' and data_sources.is_held_out(n, 0.3)]
  assert 2 <= len(held) <= 4

  where = {'/data/sd-vae-ft-mse': str(tmp_path / 'sd-vae-ft-mse'),
           '/data/photos': str(tmp_path / 'photos'), '/data/lowres': str(tmp_path / 'lowres'),
           'workdirs/paper_2048': str(tmp_path / 'workdirs' / 'paper'),
           **{d: f'{tmp_path}/{d}' for d in ('weights/', 'latents/', 'workdirs/', 'boosted/')}}

  def place(argument: str) -> str:
    """Replaces the placeholders in one pass (the longest first)."""
    pattern = '|'.join(re.escape(k) for k in sorted(where, key=len, reverse=True))
    return re.sub(pattern, lambda m: where[m.group()], argument)

  # Precomputing encodes 1024 px photographs, where XLA's optimised code repays its compile time
  # (47 s against 62 s compiled quickly); the other steps compile more than they run (the whole
  # test 309 s with XLA's defaults everywhere, 294 s compiled quickly everywhere, 2026-12-03).
  env = runs.env(devices=1)
  env['PYTHON'] = sys.executable
  optimised = {**env, 'XLA_FLAGS': runs.xla_flags(1, fast_compile=False)}
  times = {}

  def run(index, *extra, background=False):
    command = [place(a) for a in commands[index]]
    mode = next((a.split('=')[1] for a in command if a.startswith('--mode=')), 'train')
    if command[0].endswith('python'):
      command[0] = sys.executable
    else:
      command = ['bash', *command]
    command += SIZES[mode] + list(extra)
    run_env = optimised if mode in ('convert', 'precompute') else env
    if background:
      return subprocess.Popen(command, cwd=runs.ROOT, env=run_env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=runs.ROOT, env=run_env, capture_output=True, text=True,
                          timeout=600)
    times[f'{index + 1}. {mode}'] = time.perf_counter() - t0
    assert proc.returncode == 0, f'{shlex.join(command)}\n{proc.stderr[-4000:]}'
    return proc

  # 1. Convert.
  run(0)
  assert os.path.isdir(tmp_path / 'weights' / 'sd_vae')
  # 2. Precompute in 2 processes: every training photograph once, the held-out ones never.
  run(1)
  meta = json.loads((tmp_path / 'latents' / 'photos' / 'metadata.json').read_text())
  num_train = len(PHOTOS) + 2 - len(held)  # With the portrait and the landscape.
  assert meta['num_records'] == num_train and meta['num_images'] == num_train
  assert meta['latent_shape'] == [128, 128, 4] and len(meta['shards']) == -(-num_train // 2)
  assert meta['upsampling_mode'] == 'psu' and meta['num_validation_images'] == 2
  val = np.load(tmp_path / 'latents' / 'photos' / 'validation_images.npy')
  assert val.shape == (2, 1024, 1024, 3)
  # The held-out crops are the centres of the first held-out photographs, never trained on.
  first = np.asarray(Image.open(tmp_path / 'photos' / held[0]).convert('RGB'))
  top, left = (first.shape[0] - 1024) // 2, (first.shape[1] - 1024) // 2
  np.testing.assert_array_equal(val[0], images.normalize(
      first[top:top + 1024, left:left + 1024]))

  # 3. Train, killed (SIGKILL) once a checkpoint exists, then started again: it resumes.
  workdir = tmp_path / 'workdirs' / 'paper'
  t0 = time.perf_counter()
  proc = run(2, background=True)
  deadline = time.time() + 300
  while not os.path.isdir(workdir / 'checkpoints' / '2') and proc.poll() is None:
    assert time.time() < deadline, 'no checkpoint at step 2 after 300 s'
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  resumed = run(2)
  times['3. train'] = time.perf_counter() - t0
  assert re.search(r'Resuming from the checkpoint at step [24]', resumed.stderr)
  assert runs.checkpoint_steps(workdir)[-1] == 4
  assert sorted(runs.scalars(workdir, 'loss'))[-1] == 4
  # 4. Evaluate on the 2 held-out crops (the sweep's 2 NFE is the sampler's setting: one run).
  run(3)
  results = json.loads((workdir / 'eval' / 'results.json').read_text())
  assert [r['method'] for r in results['rows']] == ['bilinear', 'CFM']
  assert results['num_images'] == 2 and results['image_size'] == 1024
  assert all(np.isfinite(r['psnr']) for r in results['rows'])
  # 5. Sample: 512 px images and a 64^2 latent to 1024 px.
  run(4)
  boosted = tmp_path / 'boosted' / '1024'
  assert Image.open(boosted / 'astronaut.png').size == (1024, 1024)
  assert Image.open(boosted / 'latent.png').size == (1024, 1024)

  # The workdir and the autoencoder moved elsewhere (another machine): one clear line, then the
  # override. 6. The two-stage cascade (the 1024 px model twice) from a 16^2 latent to 512 px, on
  # the moved workdir.
  shutil.move(tmp_path / 'weights', tmp_path / 'elsewhere_weights')
  shutil.move(tmp_path / 'workdirs', tmp_path / 'elsewhere')
  os.remove(tmp_path / 'lowres' / 'astronaut.png')
  np.save(tmp_path / 'lowres' / 'latent.npy', rng.normal(size=(1, 4, 16, 16)).astype(np.float32))
  where['workdirs/'] = f'{tmp_path}/elsewhere/'
  where['workdirs/paper_2048'] = str(tmp_path / 'elsewhere' / 'paper')
  command = [sys.executable, 'main.py', '--mode=sample', '--config=configs/default.py',
             f'--workdir={tmp_path / "elsewhere" / "paper"}', f'--inputs={tmp_path / "lowres"}']
  gone = subprocess.run(command, cwd=runs.ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert gone.returncode == 1 and 'Traceback' not in gone.stderr
  assert gone.stderr.strip().splitlines()[-1] == (
      f'error: {tmp_path / "elsewhere" / "paper"} was trained with the first-stage weights '
      f'{tmp_path / "weights" / "sd_vae"}, which no longer exist there; pass the same autoencoder '
      'with --config.first_stage.weights=PATH.')
  run(5, f'--config.first_stage.weights={tmp_path / "elsewhere_weights" / "sd_vae"}')
  summary = json.loads((tmp_path / 'boosted' / '2048' / 'summary.json').read_text())
  assert [s['scale'] for s in summary['stages']] == [2, 2]
  assert Image.open(tmp_path / 'boosted' / '2048' / 'latent.png').size == (512, 512)
  print('rehearsal seconds:', json.dumps({k: round(v, 1) for k, v in times.items()}))
