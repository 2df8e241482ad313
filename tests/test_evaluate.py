"""`main.py --mode=evaluate` (fmboost_jax/evaluate.py) on tiny checkpoints trained here, 8 fake
devices: the Table 2 rows, the NFE sweep, the figure, and one clear line for every bad input."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import demo
from fmboost_jax import evaluate, held_out, input_pipeline, metrics, upsampling
from fmboost_jax.errors import UserError
from tests import runs

# Each test samples or evaluates trained checkpoints: the full suite runs them, the fast tier not.
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory, tiny_cfm_workdir):
  """Tiny pixel-space CFM and L2-regression checkpoints (8 -> 16 px, 2 steps each)."""
  root = tmp_path_factory.mktemp('eval')
  return {'cfm': tiny_cfm_workdir,
          'l2': runs.train_tiny(root / 'l2', flow__objective='l2', flow__noising_step=0)}


def _config(checkpoints, **eval_overrides):
  config = demo.get_config('tiny')
  config.data.num_val_images = 12  # Not a multiple of the devices: the last batch is padded.
  config.eval.checkpoints = tuple(checkpoints)
  for k, v in eval_overrides.items():
    config.eval[k] = v
  return config


def test_evaluate_writes_table_sweep_and_figure(checkpoints, tmp_path):
  config = _config([checkpoints['cfm'], checkpoints['l2']])
  results = evaluate.evaluate(config, str(tmp_path))
  assert [r['method'] for r in results['rows']] == ['bilinear', 'CFM', 'L2']
  bilinear, cfm, l2 = results['rows']

  # The bilinear row is the metrics of bilinear upsampling, computed here independently.
  images = input_pipeline.validation_images(config)
  assert results['num_images'] == len(images) == 12
  up = upsampling.resize(upsampling.low_res_images(images, 8), (16, 16), 'linear')
  np.testing.assert_allclose(bilinear['psnr'], np.mean(metrics.psnr(up, images)), rtol=1e-5)
  np.testing.assert_allclose(bilinear['ssim'], np.mean(metrics.ssim(up, images)), rtol=1e-5)
  np.testing.assert_allclose(bilinear['mse'], np.mean(metrics.mse(up, images)), rtol=1e-5)
  for row in results['rows']:
    assert 'fid' not in row and row['spectral_distance'] >= 0
    assert np.isfinite([row['psnr'], row['ssim'], row['hf_energy_db']]).all()
  # Bilinear interpolation loses the high frequencies of the 16 px ground truth.
  assert bilinear['hf_energy_db'] < -3
  assert cfm['nfe'] == config.sample.nfe and l2['nfe'] == 1
  assert cfm['step'] == 2 and cfm['checkpoint'] == checkpoints['cfm']

  # The sweep covers the flow, not the regression. Its entry at NFE 1 is what an evaluation
  # sampling with Euler at 1 NFE gives as its main row (computed by a run of its own, not the
  # sweep), and differs from the row at the config's 2 NFE.
  assert list(results['nfe_sweep']) == ['CFM'] and results['nfe_sweep_nfe'] == [1, 2]
  sweep = results['nfe_sweep']['CFM']
  assert [s['nfe'] for s in sweep] == [1, 2]
  one = _config([checkpoints['cfm']], nfe_sweep=(1,))
  one.sample.nfe = 1
  (_, at_one), = [evaluate.evaluate(one, str(tmp_path / 'one'))['rows']]
  for k in ('psnr', 'ssim', 'mse'):
    np.testing.assert_allclose(sweep[0][k], at_one[k], rtol=1e-6, err_msg=k)
  assert abs(sweep[0]['psnr'] - cfm['psnr']) > 1e-3

  out = tmp_path / 'eval'
  assert json.loads((out / 'results.json').read_text()) == json.loads(json.dumps(results))
  table = (out / 'results.md').read_text()
  assert '| method | FID | p-FID | SSIM | PSNR (dB) |' in table
  needs = f'needs `{held_out.FID_FLAG}`'
  assert f"| CFM | {needs} | {needs} | {cfm['ssim']:.4f} |" in table
  assert 'NFE sweep (Euler, 12 images)' in table
  # Figure: 4 images x (full row + zoomed-crop row), 5 columns, 16 px enlarged 8x to 128 px,
  # a 16 px header.
  figure = Image.open(out / 'figure.png')
  assert figure.size == (5 * 128, 16 + 4 * 2 * 128)
  assert Image.open(out / 'nfe_sweep.png').size[0] > 400


def test_evaluate_is_deterministic(checkpoints, tmp_path):
  config = _config([checkpoints['cfm']], nfe_sweep=(2,))
  first = evaluate.evaluate(config, str(tmp_path / 'a'))
  second = evaluate.evaluate(config, str(tmp_path / 'b'))
  assert first['rows'] == second['rows']


@pytest.mark.parametrize('change, message', [
    (dict(checkpoints='EMPTY'), 'holds no checkpoint'),
    (dict(checkpoints='NOCONFIG'), 'holds no saved config'),
    (dict(nfe_sweep=(0, 2)), 'config.eval.nfe_sweep=(0, 2) must be'),
    (dict(sample_nfe=0), 'config.sample.nfe=0 must be an integer of at least 1'),
    (dict(num_val_images=10_000), 'fewer than config.data.num_val_images=10000'),
    (dict(crop_size=17), 'config.eval.crop_size=17 must be in [1, config.data.high_res_size=16]'),
    (dict(inception_weights='/nonexistent/pt_inception.pth'), 'does not exist'),
    (dict(num_figure_images=0), 'config.eval.num_figure_images=0 must be at least 1'),
])
def test_bad_input_is_one_clear_error(checkpoints, tmp_path, change, message):
  config = _config([checkpoints['cfm']], nfe_sweep=(2,))
  for key, value in change.items():
    if key == 'checkpoints':
      (tmp_path / 'run').mkdir()
      if value == 'NOCONFIG':  # A checkpoint of an older version, without the config item.
        shutil.copytree(os.path.join(checkpoints['cfm'], 'checkpoints'),
                        tmp_path / 'run' / 'checkpoints')
        for step in os.listdir(tmp_path / 'run' / 'checkpoints'):
          shutil.rmtree(tmp_path / 'run' / 'checkpoints' / step / 'config')
      config.eval.checkpoints = (str(tmp_path / 'run'),)
    elif key == 'sample_nfe':
      config.sample.nfe = value
    elif key == 'num_val_images':
      config.data.num_val_images = value
    else:
      config.eval[key] = value
  with pytest.raises(UserError, match=message.replace('[', r'\[').replace('(', r'\(')
                     .replace(')', r'\)')):
    evaluate.evaluate(config, str(tmp_path / 'out'))
  assert not (tmp_path / 'out' / 'eval' / 'results.json').exists()


def test_main_evaluate_reports_a_bad_nfe_in_one_line(checkpoints, tmp_path):
  result = runs.run_main(tmp_path, f"--config.eval.checkpoints={checkpoints['cfm']}",
                         '--config.sample.nfe=0', mode='evaluate')
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('error: ') and 'config.sample.nfe=0' in lines[-1]
  assert 'Traceback' not in result.stderr


def test_fid_columns_with_inception_weights(checkpoints, tmp_path):
  """With (random) FID Inception weights in the real key layout, FID and p-FID are numbers: the
  FID of the images' own features against the ground truth's, computed here from the features."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  from fmboost_jax import weights  # noqa: PLC0415
  from tests.test_inception import _random_state_dict  # noqa: PLC0415

  path = tmp_path / 'inception.safetensors'
  save_file(_random_state_dict(seed=1), str(path))
  config = _config([checkpoints['l2']], inception_weights=str(path), num_crops=1,
                   num_figure_images=1)
  config.data.num_val_images = 4
  results = evaluate.evaluate(config, str(tmp_path))
  bilinear, l2 = results['rows']
  images = input_pipeline.validation_images(config)
  model = weights.inception_from_weights(path)
  up = upsampling.resize(upsampling.low_res_images(images, 8), (16, 16), 'linear')
  features = lambda x: held_out.inception_features(model, np.asarray(x), 4)  # noqa: E731
  np.testing.assert_allclose(bilinear['fid'], metrics.fid(features(images), features(up)),
                             rtol=1e-3)
  boxes = metrics.crop_boxes(0, 4, 16, 16, 8, 1)
  np.testing.assert_allclose(
      bilinear['pfid'], metrics.fid(features(metrics.crops(images, boxes, 8)),
                                    features(metrics.crops(np.asarray(up), boxes, 8))), rtol=1e-3)
  assert l2['fid'] > 0 and l2['pfid'] > 0
  table = (tmp_path / 'eval' / 'results.md').read_text()
  assert f"| L2 | {l2['fid']:.2f} | {l2['pfid']:.2f} |" in table


def test_training_validation_is_the_same_evaluator_as_evaluate(tmp_path):
  """Training's held-out evaluation at its last step and --mode=evaluate of that checkpoint are one
  evaluator: the same rows (with the same batch size, the same numbers), results.md's table
  layout, and the val/* scalars of its rows."""
  from fmboost_jax import train  # noqa: PLC0415

  config = demo.get_config('tiny')
  config.train.num_steps = config.train.eval_every = 2
  workdir = tmp_path / 'train'
  trained = train.train_and_evaluate(config, str(workdir))
  assert [r['method'] for r in trained['rows']] == ['bilinear', 'CFM']
  assert trained['rows'][1]['step'] == 2 and trained['rows'][1]['checkpoint'] == str(workdir)
  assert json.loads((workdir / 'results.json').read_text()) == json.loads(json.dumps(trained))
  assert (workdir / 'samples' / 'step_0000002.png').exists()
  bilinear, model = trained['rows']
  for key in ('psnr', 'ssim', 'mse'):
    assert runs.scalars(workdir, f'val/{key}_model')[2] == pytest.approx(model[key], rel=1e-6)
    assert runs.scalars(workdir, f'val/{key}_bilinear')[2] == pytest.approx(bilinear[key],
                                                                             rel=1e-6)
  assert runs.scalars(workdir, 'val/nfe') == {2: config.sample.nfe}

  config.eval.checkpoints = (str(workdir),)
  config.sample.batch_size = config.data.batch_size
  evaluated = evaluate.evaluate(config, str(tmp_path))
  assert evaluated['rows'] == trained['rows']
  table = lambda path: path.read_text().split('\n\n')[1]  # noqa: E731
  assert table(workdir / 'results.md') == table(tmp_path / 'eval' / 'results.md')
