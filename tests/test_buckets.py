"""The paper workflow with every path in a Cloud Storage bucket, against an emulator on loopback.

README's paper-workflow commands run with each placeholder path replaced by a `gs://` path and
small shapes appended (128 px photographs, 64 px low-res, the slim SD-architecture autoencoder of
tests/test_paper_workflow.py): convert an autoencoder read from a bucket -> precompute in 2
processes from a bucket's image folder into a bucket -> train from the latents, killed and resumed
(JAX's compilation cache in the bucket; ending with the held-out evaluation: its PNGs, results and
TensorBoard events) -> evaluate ->
export -> sample with the export (the cascade, step 6, takes the same paths and runs in
tests/test_paper_workflow.py). The emulator
(fake-gcs-server) and every command run in a network namespace with only loopback
(`tests/buckets.py`), each under strace: the test asserts that every connection went to 127.0.0.1
and that the objects are in the emulator's storage (nothing was written to a local `gs:` folder).
Then bad input: a bucket that does not exist, an output path under an object, no credentials
without an emulator, a missing image folder.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from fmboost_jax import data_sources, images
from tests import buckets, runs
from tests.test_paper_workflow import SIZES, readme_commands

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not runs.installed('torch'), reason='the autoencoder file is '
                                 'written by diffusers (torch)')]

SMALL = ['--config.data.high_res_size=128', '--config.data.low_res_size=64']
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field', 'retina')


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
  reason = buckets.unavailable()
  if reason:
    pytest.skip(reason)
  folder = tmp_path_factory.mktemp('emulator')
  seed = folder / 'seed'
  photos = seed / 'data' / 'photos'
  photos.mkdir(parents=True)
  bundled = dict(images.load_skimage_photos())
  for name in PHOTOS:
    Image.fromarray(bundled[name]).resize((128, 128), Image.Resampling.BICUBIC).save(
        photos / f'{name}.jpg', quality=90)
  Image.fromarray(bundled['coffee']).resize((128, 192)).save(photos / 'portrait.jpg', quality=90)
  Image.fromarray(bundled['chelsea']).resize((100, 80)).save(photos / 'small.jpg', quality=90)
  from tests.test_paper_workflow import write_diffusers_vae  # noqa: PLC0415  (torch)
  write_diffusers_vae(seed / 'data' / 'sd-vae-ft-mse' / 'diffusion_pytorch_model.safetensors')
  lowres = seed / 'data' / 'lowres'
  lowres.mkdir()
  Image.fromarray(bundled['astronaut']).resize((64, 64)).save(lowres / 'astronaut.png')
  np.save(lowres / 'latent.npy',
          np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32))
  (seed / 'runs').mkdir()
  (seed / 'runs' / 'notes.txt').write_text('an object, not a folder')
  server = buckets.Emulator(folder, seed)
  yield server
  server.close()


def _json(emulator, name: str):
  """The JSON object gs://runs/NAME, read from the emulator's storage."""
  with open(emulator.object('runs', name)) as f:
    return json.load(f)


def _main(mode: str, *flags: str) -> list[str]:
  return [sys.executable, 'main.py', f'--mode={mode}', '--config=configs/default.py', *flags]


def test_paper_workflow_with_every_path_in_a_bucket(emulator):
  commands = readme_commands()
  where = {'/data/': 'gs://data/', 'weights/': 'gs://runs/weights/',
           'latents/': 'gs://runs/latents/', 'workdirs/paper_2048': 'gs://runs/export',
           'workdirs/': 'gs://runs/workdirs/', 'boosted/': 'gs://runs/boosted/'}
  pattern = '|'.join(re.escape(k) for k in sorted(where, key=len, reverse=True))
  env = emulator.env()
  times = {}

  def command(index: int, *extra: str) -> list[str]:
    line = [re.sub(pattern, lambda m: where[m.group()], a) for a in commands[index]]
    mode = next((a.split('=')[1] for a in line if a.startswith('--mode=')), 'train')
    line = [sys.executable, *line[1:]] if line[0].endswith('python') else ['bash', *line]
    small = {'precompute': SMALL, 'train': SMALL,
             'evaluate': [*SMALL, '--config.eval.crop_size=64']}
    return [*line, *SIZES[mode], *small.get(mode, ()), *extra]

  def run(name: str, line: list[str]) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    proc, _ = emulator.run(line, {**env, 'PYTHON': sys.executable})
    times[name] = round(time.perf_counter() - t0, 1)
    assert proc.returncode == 0, f'{name}: {line}\n{proc.stderr[-3000:]}'
    return proc

  held = [n for n in sorted(os.listdir(os.path.join(emulator.folder, 'seed', 'data', 'photos')))
          if n != 'small.jpg' and data_sources.is_held_out(n, 0.3)]
  # 1. Convert the autoencoder file of one bucket into a Flax checkpoint in another.
  run('convert', command(0))
  assert os.path.isfile(emulator.object('runs', 'weights/sd_vae/_CHECKPOINT_METADATA'))
  # 2. Precompute in 2 processes from the bucket's photographs into the bucket.
  run('precompute', command(1))
  meta = _json(emulator, 'latents/photos/metadata.json')
  assert meta['num_records'] == meta['num_images'] == 7 - len(held)
  assert meta['latent_shape'] == [16, 16, 4] and meta['source']['path'] == 'gs://data/photos'
  assert np.load(emulator.object('runs', 'latents/photos/validation_images.npy')).shape == (
      2, 128, 128, 3)
  # 3. Train from the bucket's latents into a bucket workdir, with JAX's persistent compilation
  # cache in the bucket too; killed (SIGKILL) once its step-2 checkpoint is committed, then started
  # again: it resumes, loads the step from the bucket's cache, and ends with the held-out
  # evaluation, whose sample grid, results and TensorBoard events land in the bucket.
  four = ('--config.train.num_steps=4', '--config.train.eval_every=4',
          '--config.train.compilation_cache_dir=gs://runs/cache')
  line, _ = emulator.command(command(2, *four))
  t0 = time.perf_counter()
  proc = subprocess.Popen(line, cwd=runs.ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  committed = emulator.object('runs', 'workdirs/paper/checkpoints/2/commit_success.txt')
  deadline = time.time() + 300
  while not os.path.isfile(committed) and proc.poll() is None:
    assert time.time() < deadline, 'no checkpoint at step 2 after 300 s'
    time.sleep(0.2)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  resumed = run('train', command(2, *four))
  times['train'] = round(time.perf_counter() - t0, 1)
  assert re.search(r'Resuming from the checkpoint at step [24] in gs://runs/workdirs/paper/',
                   resumed.stderr)
  assert re.search(r'Compiled the train step in .* \(from the persistent compilation cache\)',
                   resumed.stderr), resumed.stderr[-3000:]
  cached = [f for _, _, files in os.walk(emulator.object('runs', 'cache')) for f in files]
  assert len(cached) >= 2  # At least the initialisation and the train step.
  assert os.path.isfile(emulator.object('runs', 'workdirs/paper/checkpoints/4/commit_success.txt'))
  scores = _json(emulator, 'workdirs/paper/results.json')
  (_, model) = scores['rows']
  assert model['step'] == 4 and scores['num_images'] == 2 and np.isfinite(model['psnr'])
  grid = Image.open(emulator.object('runs', 'workdirs/paper/samples/step_0000004.png'))
  assert grid.size == (4 * 128, 2 * 128)
  events = [n for n in os.listdir(emulator.object('runs', 'workdirs/paper'))
            if n.startswith('events.out.tfevents')]
  assert events
  # 4. Evaluate the bucket workdir on the bucket's held-out latents.
  run('evaluate', command(3))
  results = _json(emulator, 'workdirs/paper/eval/results.json')
  assert [r['method'] for r in results['rows']] == ['bilinear', 'CFM']
  assert results['num_images'] == 2 and results['image_size'] == 128
  assert os.path.isfile(emulator.object('runs', 'workdirs/paper/eval/figure.png'))
  # Export the workdir into the bucket.
  run('export', _main('export', '--workdir=gs://runs/workdirs/paper', '--outdir=gs://runs/export'))
  info = _json(emulator, 'export/export.json')
  assert info['step'] == 4 and info['source'] == 'gs://runs/workdirs/paper'
  # 5. Sample the bucket's 64 px image and 8^2 latent to 128 px into the bucket, with the export.
  # (Step 6, the cascade, takes the same paths: tests/test_paper_workflow.py runs it.)
  run('sample', [a.replace('gs://runs/workdirs/paper', 'gs://runs/export')
                 if a.startswith('--workdir=') else a for a in command(4)])
  for name in ('astronaut', 'latent'):
    assert Image.open(emulator.object('runs', f'boosted/1024/{name}.png')).size == (128, 128)
  summary = _json(emulator, 'boosted/1024/summary.json')
  assert [s['workdir'] for s in summary['stages']] == ['gs://runs/export']

  # Every connection of every command went to the emulator (or a local socket).
  found = emulator.all_connections()
  assert ('AF_INET', '127.0.0.1') in found
  assert not buckets.outside_loopback(found), found
  assert not os.path.exists(os.path.join(runs.ROOT, 'gs:'))
  print('bucket rehearsal seconds:', json.dumps(times))


def _refused(emulator, line: list[str], env: dict[str, str]) -> str:
  proc, found = emulator.run(line, env, timeout=300)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert not buckets.outside_loopback(found), found
  return proc.stderr.strip().splitlines()[-1]


def test_bad_bucket_paths_are_one_line(emulator):
  tiny = ['--config=configs/demo.py:tiny', runs.NO_EVAL]
  env = emulator.env()
  line = [sys.executable, 'main.py', '--workdir=gs://no-such-bucket/run', *tiny]
  assert _refused(emulator, line, env) == (
      'error: --workdir=gs://no-such-bucket/run: the bucket gs://no-such-bucket does not exist (or '
      'you may not list it); create it with `gcloud storage buckets create gs://no-such-bucket` or '
      'fix the path.')
  line = [sys.executable, 'main.py', '--workdir=gs://runs/notes.txt/run', *tiny]
  assert _refused(emulator, line, env) == (
      'error: the output directory gs://runs/notes.txt/run lies under the object '
      'gs://runs/notes.txt; choose another --workdir.')
  line = [sys.executable, 'main.py', '--workdir=gs://runs/missing', *tiny,
          '--config.data.source=folder', '--config.data.path=gs://data/no-photos']
  assert _refused(emulator, line, env) == (
      "error: Image folder 'gs://data/no-photos' does not exist or is not a folder; set "
      'config.data.path to an existing folder of images.')
  # No emulator and no credentials: one line naming what to set, and no connection but loopback
  # (the metadata server's address is a closed loopback port).
  line = [sys.executable, 'main.py', '--workdir=gs://my-team-bucket/run', *tiny]
  assert _refused(emulator, line, emulator.env(emulator=False)) == (
      'error: --workdir=gs://my-team-bucket/run: no Google Cloud credentials found to reach '
      'gs://my-team-bucket; run `gcloud auth application-default login`, set '
      'GOOGLE_APPLICATION_CREDENTIALS to a service account key file, or run on a Cloud VM whose '
      'service account may use the bucket (for a Cloud Storage emulator set STORAGE_EMULATOR_HOST '
      'and TENSORSTORE_GCS_HTTP_URL to its address).')
  # Nothing was left in the bucket (the emulator keeps empty folders of deleted objects on disk).
  assert not [f for _, _, files in os.walk(emulator.object('runs', 'missing')) for f in files]
