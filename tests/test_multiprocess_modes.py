"""Evaluate, sample, export and convert in two processes of one fake CPU device each give what one
process of two devices gives (the same global mesh, so the same programs: equal bit for bit)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import runs

pytestmark = pytest.mark.multiprocess


def _two_processes(workdir, mode, *flags, timeout=300):
  env = runs.env()
  env['PYTHON'] = sys.executable
  env['PORT'] = str(runs.free_port())
  return subprocess.run(
      ['bash', 'launch/local_multiprocess.sh', '2', '1', '--config=configs/demo.py:tiny',
       f'--workdir={workdir}', f'--mode={mode}', *flags],
      cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _one_process(workdir, mode, *flags):
  return runs.run_main(workdir, *flags, mode=mode, devices=2, timeout=300)


def _both(tmp_path, mode, *flags, model=None):
  """Runs `mode` in one process of 2 devices and in two of 1 device; returns their output folders
  (the workdir, or the --outdir for the `model` workdir) and the two processes' output."""
  outs = []
  for name, run in (('one', _one_process), ('two', _two_processes)):
    out = tmp_path / name
    proc = run(model or out, mode, *flags, *([f'--outdir={out}'] if model else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs.append(out)
  return (*outs, proc)


@pytest.mark.slow
def test_two_processes_evaluate_to_the_same_table_as_one(tiny_cfm_workdir, tmp_path):
  one, two, proc = _both(tmp_path, 'evaluate',
                         f"--config.eval.checkpoints=('{tiny_cfm_workdir}',)")
  assert proc.stderr.count('evaluating CFM') == 1  # Process 0 reports and writes.
  assert proc.stdout.count('| method | FID') == 1
  a = json.loads((one / 'eval' / 'results.json').read_text())
  b = json.loads((two / 'eval' / 'results.json').read_text())
  assert a == b and a['num_images'] == 8 and len(a['rows']) == 2
  assert (one / 'eval' / 'figure.png').read_bytes() == (two / 'eval' / 'figure.png').read_bytes()


@pytest.mark.slow
def test_two_processes_sample_the_same_images_as_one(tiny_cfm_workdir, tmp_path):
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):  # 3 inputs in batches of 2: the second batch is padded to fill the devices.
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(inputs / f'in{i}.png')
  one, two, proc = _both(tmp_path, 'sample', f'--inputs={inputs}',
                         '--config.sample.batch_size=2', model=tiny_cfm_workdir)
  assert proc.stdout.count('Boosted 3 inputs') == 1
  for i in range(3):
    a = np.asarray(Image.open(one / f'in{i}.png'))
    b = np.asarray(Image.open(two / f'in{i}.png'))
    assert a.shape == (16, 16, 3)
    np.testing.assert_array_equal(a, b)
  summary = json.loads((two / 'summary.json').read_text())
  assert summary['num_images'] == 3 and summary['devices'] == 2


@pytest.mark.slow
def test_two_processes_export_the_same_weights_as_one(tiny_cfm_workdir, tmp_path):
  from fmboost_jax import model_files, trained_model  # noqa: PLC0415

  one, two, proc = _both(tmp_path, 'export', model=tiny_cfm_workdir)
  assert proc.stdout.count('Exported step 2') == 1
  infos = [json.loads((d / 'export.json').read_text()) for d in (one, two)]
  assert infos[0] == infos[1]
  config, _ = model_files.read_export_config(str(two))
  _, abstract = trained_model.abstract_network(config, 3, trained_model.sharding.data_mesh())
  a, b = (runs.flat(model_files.read_export_params(str(d), abstract)) for d in (one, two))
  assert a.keys() == b.keys() and len(a) > 10
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_processes_with_different_held_out_data_are_refused_in_one_line(tiny_cfm_workdir,
                                                                          tmp_path):
  port = runs.free_port()
  procs = []
  for i, num_val_images in enumerate((8, 16)):  # The launcher passes the same flags to all.
    env = runs.env()
    env['JAX_PLATFORMS'] = 'cpu'
    procs.append(subprocess.Popen(
        runs.command(tmp_path / 'w', f"--config.eval.checkpoints=('{tiny_cfm_workdir}',)",
                     f'--config.data.num_val_images={num_val_images}', mode='evaluate') +
        [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
        cwd=runs.ROOT, env=env, stderr=subprocess.PIPE, text=True))
  errors = [p.communicate(timeout=120)[1] for p in procs]
  assert [p.returncode for p in procs] == [1, 1], errors
  lines = [x for e in errors for x in e.splitlines() if x.startswith('error:')]
  assert lines == ['error: the processes of this run got different --config.data (process 1 '
                   'differs from process 0 in num_val_images); start every process with the '
                   'same flags.'], errors
  assert 'Traceback' not in ''.join(errors)


def test_two_processes_convert_the_autoencoder_weights_once(tmp_path):
  from flax import nnx  # noqa: PLC0415
  from safetensors.numpy import save_file  # noqa: PLC0415

  from fmboost_jax import weights  # noqa: PLC0415
  from fmboost_jax.models import autoencoder, layers  # noqa: PLC0415
  from tests.test_autoencoder import random_model  # noqa: PLC0415
  from tests.test_latent_training import VAE, vae_flags  # noqa: PLC0415
  from tests.test_weights import _ldm_state  # noqa: PLC0415

  source = tmp_path / 'vae.safetensors'
  save_file(_ldm_state(random_model(seed=7, **VAE)), str(source))
  out = tmp_path / 'converted'
  proc = _two_processes(out, 'convert', *vae_flags(source))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count(f'--config.first_stage.weights={out}') == 1
  abstract = layers.abstract(autoencoder.AutoencoderKL, **VAE)
  original, converted = (runs.flat(nnx.to_pure_dict(weights.load_autoencoder_weights(p, abstract)))
                         for p in (source, out))
  assert original.keys() == converted.keys() and len(original) > 20
  for k in original:
    np.testing.assert_array_equal(original[k], converted[k], err_msg=k)
