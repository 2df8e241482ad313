"""`main.py --mode=sample` (fmboost_jax/inference.py) on checkpoints trained here, 8 fake devices.

The tiny demo config boosts 8 px to 16 px (scale 2) in pixel space; the latent stage uses a small
random-weight autoencoder with factor 2 (8x8 px <-> 4x4x4 latents).
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file as save_safetensors

from configs import demo
from fmboost_jax import first_stages, images, inference, metrics, trained_model, upsampling
from fmboost_jax.errors import UserError
from tests import runs
from tests.test_autoencoder import random_model
from tests.test_weights import _ldm_state

# Each test samples or evaluates trained checkpoints: the full suite runs them, the fast tier not.
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def stages(tmp_path_factory, tiny_cfm_workdir):
  """A pixel-space stage (trained on 8 -> 16 px crops) and a latent one (8 -> 16 px)."""
  root = tmp_path_factory.mktemp('stages')
  weights = root / 'vae.safetensors'
  save_safetensors(_ldm_state(random_model(seed=5, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                           z_channels=4)), str(weights))
  return {
      'pixel': tiny_cfm_workdir,
      'latent': runs.train_tiny(root / 'latent', first_stage__name='sd_vae',
                       first_stage__weights=str(weights), first_stage__ch=32,
                       first_stage__ch_mult=(1, 2), first_stage__num_res_blocks=1),
  }


def _sample_config(**sample):
  config = demo.get_config('tiny')
  for k, v in sample.items():
    config.sample[k] = v
  return config


def _write_png(path, h, w, seed, mode='RGB'):
  rng = np.random.default_rng(seed)
  array = rng.integers(0, 256, (h, w, 3 if mode == 'RGB' else 1), dtype=np.uint8)
  Image.fromarray(array if mode == 'RGB' else array[..., 0], mode).save(path)
  return array


def _png(path) -> np.ndarray:
  return np.asarray(Image.open(path))


def test_outputs_are_named_after_inputs_exactly_twice_the_size_and_summarised(stages, tmp_path,
                                                                             capsys):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  _write_png(inputs / 'a.png', 8, 8, 0)
  _write_png(inputs / 'b.png', 8, 8, 1)
  _write_png(inputs / 'odd.png', 7, 5, 2)  # Padded for the network, cropped back: 14 x 10.
  _write_png(inputs / 'gray.png', 8, 8, 3, mode='L')
  (inputs / 'broken.png').write_bytes(b'not an image')
  out = tmp_path / 'out'
  summary = inference.sample(_sample_config(figure=True), stages['pixel'], [str(inputs)], str(out))

  assert sorted(os.listdir(out)) == ['a.png', 'b.png', 'figures', 'gray.png', 'odd.png',
                                     'summary.json']
  assert _png(out / 'a.png').shape == (16, 16, 3)
  assert _png(out / 'odd.png').shape == (14, 10, 3)
  assert _png(out / 'figures' / 'odd.png').shape == (14, 30, 3)  # low-res | bilinear | model.
  assert 'skipping' in capsys.readouterr().err
  with open(out / 'summary.json') as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(summary))
  assert summary['devices'] == 8 and summary['num_images'] == 4
  assert summary['stages'][0]['step'] == 2 and summary['stages'][0]['weights'] == 'ema_params'
  by_name = {r['output']: r for r in summary['images']}
  assert by_name['odd.png']['input_size'] == [7, 5]
  assert by_name['odd.png']['output_size'] == [14, 10]
  for record in summary['images']:
    assert record['nfe'] == [2] and record['solver_ok'] == [True] and record['seconds'] > 0


def test_output_is_the_sampler_applied_to_the_source_built_as_in_training(stages, tmp_path):
  """One input, padded to the 8 devices: the PNG is the objective's sampler on x_up built as in
  training, with the documented key (batch 0 of seed 11, stage 0)."""
  image = _write_png(tmp_path / 'x.png', 8, 8, 7)
  config = _sample_config(seed=11)
  inference.sample(config, stages['pixel'], [str(tmp_path / 'x.png')], str(tmp_path / 'out'))

  stage = trained_model.load(stages['pixel'], sample=config.sample)
  x = np.repeat(images.normalize(image)[None], 8, axis=0)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(11), 0), 0)
  x_up = upsampling.upsample(first_stages.IdentityFirstStage(), 'psu', (16, 16), low_res_images=x)
  expected = stage.objective.sample(stage.velocity(), x_up, key, config.sample).x1
  expected = np.asarray(metrics.to_uint8(expected[0]))
  got = _png(tmp_path / 'out' / 'x.png')
  assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_same_seed_same_output_other_seed_other_output(stages, tmp_path):
  _write_png(tmp_path / 'x.png', 8, 8, 4)
  outputs = {}
  for name, seed in (('a', 3), ('b', 3), ('c', 4)):
    inference.sample(_sample_config(seed=seed), stages['pixel'], [str(tmp_path / 'x.png')],
                     str(tmp_path / name))
    outputs[name] = _png(tmp_path / name / 'x.png')
  np.testing.assert_array_equal(outputs['a'], outputs['b'])
  assert np.abs(outputs['a'].astype(int) - outputs['c'].astype(int)).max() > 0


def test_latent_files_nchw_and_nhwc_npy_and_npz(stages, tmp_path):
  rng = np.random.default_rng(0)
  np.save(tmp_path / 'batch.npy', rng.normal(size=(2, 3, 8, 8)).astype(np.float32))  # NCHW.
  np.save(tmp_path / 'one.npy', rng.normal(size=(6, 4, 3)).astype(np.float32))  # HWC.
  np.savez(tmp_path / 'z.npz', first=rng.normal(size=(3, 8, 8)), second=rng.normal(size=(3, 8, 8)))
  summary = inference.sample(_sample_config(), stages['pixel'], [str(tmp_path)],
                             str(tmp_path / 'out'))
  assert sorted(r['output'] for r in summary['images']) == [
      'batch_0.png', 'batch_1.png', 'one.png', 'z_first.png', 'z_second.png']
  assert _png(tmp_path / 'out' / 'one.png').shape == (12, 8, 3)
  assert _png(tmp_path / 'out' / 'z_first.png').shape == (16, 16, 3)


def test_two_stage_cascade_multiplies_the_sizes_with_per_stage_solvers(stages, tmp_path):
  """The same 2x checkpoint twice (the network is convolutional): 8 -> 16 -> 32 px."""
  _write_png(tmp_path / 'x.png', 8, 8, 5)
  config = _sample_config(stages=(stages['pixel'], {'workdir': stages['pixel'], 'solver': 'heun',
                                                    'nfe': 4}),
                          figure=True, trajectory=3)
  summary = inference.sample(config, 'unused', [str(tmp_path / 'x.png')], str(tmp_path / 'out'))
  assert _png(tmp_path / 'out' / 'x.png').shape == (32, 32, 3)
  # low-res | bilinear | model | 3 trajectory states of the last stage.
  assert _png(tmp_path / 'out' / 'figures' / 'x.png').shape == (32, 6 * 32, 3)
  assert summary['images'][0]['nfe'] == [2, 4]
  assert [s['solver'] for s in summary['stages']] == ['euler', 'heun']


def test_latent_stage_takes_unscaled_latents_and_images(stages, tmp_path):
  config = _sample_config(latents_scaled=False)
  rng = np.random.default_rng(1)
  np.save(tmp_path / 'z.npy', rng.normal(size=(1, 4, 4, 4)).astype(np.float32))
  _write_png(tmp_path / 'x.png', 8, 8, 6)
  summary = inference.sample(config, stages['latent'], [str(tmp_path)], str(tmp_path / 'out'))
  assert _png(tmp_path / 'out' / 'z.png').shape == (16, 16, 3)
  assert _png(tmp_path / 'out' / 'x.png').shape == (16, 16, 3)
  assert {r['kind'] for r in summary['images']} == {'image', 'latent'}
  np.save(tmp_path / 'bad.npy', np.zeros((1, 3, 5, 5), np.float32))
  with pytest.raises(UserError, match=r'without the 4 channels'):
    inference.sample(config, stages['latent'], [str(tmp_path / 'bad.npy')], str(tmp_path / 'o2'))


@pytest.mark.parametrize('case, match', [
    ('no_checkpoint', 'holds no checkpoint'),
    ('weights_gone', 'was trained with the first-stage weights .*gone.safetensors, which no longer '
     'exist there; pass the same autoencoder with --config.first_stage.weights=PATH'),
    ('empty_folder', 'holds no images'),
    ('missing_input', 'does not exist'),
    ('unreadable_only', 'none of the 1 input files could be read'),
    ('bad_stage_setting', 'stage 1 of config.sample.stages sets steps; a stage sets workdir'),
    ('bad_stage_type', 'stage 1 of config.sample.stages is 3; write a path or a dict'),
    ('bad_stage_nfe', 'stage 1 .*nfe=3 is odd'),
    ('trajectory_one', 'trajectory=1 must be'),
])
def test_bad_input_is_one_clear_error(stages, tmp_path, case, match):
  workdir, inputs, config = stages['pixel'], [str(tmp_path / 'x.png')], _sample_config()
  _write_png(tmp_path / 'x.png', 8, 8, 0)
  if case == 'no_checkpoint':
    workdir = str(tmp_path)
  elif case == 'weights_gone':  # The latent stage, moved away from its autoencoder file.
    shutil.copytree(stages['latent'], tmp_path / 'moved')
    workdir = str(tmp_path / 'moved')
    config_file = tmp_path / 'moved' / 'checkpoints' / '2' / 'config' / 'metadata'
    recorded = json.loads(config_file.read_text())
    recorded['first_stage']['weights'] = str(tmp_path / 'gone.safetensors')
    config_file.write_text(json.dumps(recorded))
  elif case == 'empty_folder':
    os.makedirs(tmp_path / 'empty')
    inputs = [str(tmp_path / 'empty')]
  elif case == 'missing_input':
    inputs = [str(tmp_path / 'nope.png')]
  elif case == 'unreadable_only':
    (tmp_path / 'bad.jpg').write_bytes(b'\xff\xd8 truncated')
    inputs = [str(tmp_path / 'bad.jpg')]
  elif case == 'bad_stage_setting':
    config.sample.stages = ({'workdir': workdir, 'steps': 3},)
  elif case == 'bad_stage_type':
    config.sample.stages = (3,)
  elif case == 'bad_stage_nfe':
    config.sample.stages = ({'workdir': workdir, 'solver': 'heun', 'nfe': 3},)
  elif case == 'trajectory_one':
    config.sample.trajectory = 1
  with pytest.raises(UserError, match=match):
    inference.sample(config, workdir, inputs, str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out' / 'summary.json')


def test_command_line_error_is_one_line_and_exit_code_1(tmp_path):
  (tmp_path / 'keep').mkdir()  # The refused run removes the folders it made, nothing else.
  proc = runs.run_main(tmp_path, '--inputs=x.png', f'--outdir={tmp_path / "new" / "out"}',
                       mode='sample', timeout=120)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert sorted(os.listdir(tmp_path)) == ['keep']
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: {tmp_path} holds no checkpoint (nothing in {tmp_path}/checkpoints); point '
      '--workdir (or a stage of config.sample.stages) at the workdir of a --mode=train run or at '
      f'a --mode=export directory, or train it first with --mode=train --workdir={tmp_path}.')


def test_sample_and_evaluate_use_the_ema_weights_unless_the_run_said_otherwise(stages, tmp_path):
  """Trained past ema.start_step, so the EMA and the online weights differ: load restores the EMA
  ones, and a copy whose saved config says ema.use_for_sampling=False samples and evaluates with
  the online ones, giving other images and other scores."""
  from fmboost_jax import evaluate  # noqa: PLC0415

  workdir = stages['pixel']
  state = runs.restore_state(workdir, 2)
  unquoted = lambda tree: {k.replace("'", ''): v for k, v in runs.flat(tree).items()}  # noqa: E731
  ema, online = unquoted(state['ema_params']), unquoted(state['params'])
  assert max(np.abs(ema[k] - online[k]).max() for k in ema) > 1e-4
  restored = unquoted(trained_model.load(workdir).params)
  assert restored.keys() == ema.keys() and len(ema) > 10
  for k, v in ema.items():
    np.testing.assert_array_equal(restored[k], v)

  shutil.copytree(workdir, tmp_path / 'ema')
  shutil.copytree(workdir, tmp_path / 'online')
  config_file = tmp_path / 'online' / 'checkpoints' / '2' / 'config' / 'metadata'
  recorded = json.loads(config_file.read_text())
  recorded['ema']['use_for_sampling'] = False
  config_file.write_text(json.dumps(recorded))
  restored = unquoted(trained_model.load(str(tmp_path / 'online')).params)
  for k, v in online.items():
    np.testing.assert_array_equal(restored[k], v)

  _write_png(tmp_path / 'x.png', 8, 8, 1)
  config = _sample_config()
  config.eval.nfe_sweep = (2,)
  config.data.num_val_images = 4
  outputs, rows = {}, {}
  for name in ('ema', 'online'):
    summary = inference.sample(config, str(tmp_path / name), [str(tmp_path / 'x.png')],
                               str(tmp_path / f'out_{name}'))
    assert summary['stages'][0]['weights'] == ('ema_params' if name == 'ema' else 'params')
    outputs[name] = _png(tmp_path / f'out_{name}' / 'x.png').astype(int)
    rows[name] = evaluate.evaluate(config, str(tmp_path / name))['rows'][1]
  assert np.abs(outputs['ema'] - outputs['online']).max() > 0
  assert rows['ema']['psnr'] != rows['online']['psnr']


def test_a_moved_latent_workdir_samples_and_evaluates_with_the_weights_overridden(stages,
                                                                                  tmp_path):
  """A copy of the latent stage whose recorded autoencoder path is gone (another machine): one
  clear error in both modes, then `first_stage.weights` points at the file's new place."""
  from fmboost_jax import evaluate  # noqa: PLC0415

  moved = tmp_path / 'moved'
  shutil.copytree(stages['latent'], moved)
  config_file = moved / 'checkpoints' / '2' / 'config' / 'metadata'
  recorded = json.loads(config_file.read_text())
  new_place = tmp_path / 'vae.safetensors'
  shutil.copy(recorded['first_stage']['weights'], new_place)
  recorded['first_stage']['weights'] = str(tmp_path / 'old' / 'vae.safetensors')
  config_file.write_text(json.dumps(recorded))
  _write_png(tmp_path / 'x.png', 8, 8, 3)

  config = _sample_config()
  config.eval.checkpoints = (str(moved),)
  config.eval.nfe_sweep = (2,)
  config.data.num_val_images = 4
  # The export holds none of the autoencoder's weights: it is written without the file, and
  # samples what the workdir samples once pointed at the file.
  proc = runs.run_main(moved, f'--outdir={tmp_path / "export"}', mode='export', timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for run in (lambda: inference.sample(config, str(moved), [str(tmp_path / 'x.png')],
                                       str(tmp_path / 'out')),
              lambda: evaluate.evaluate(config, str(tmp_path / 'eval'))):
    with pytest.raises(UserError, match='old/vae.safetensors, which no longer exist there; pass '
                       'the same autoencoder with --config.first_stage.weights=PATH'):
      run()
  config.first_stage.weights = str(new_place)
  summary = inference.sample(config, str(moved), [str(tmp_path / 'x.png')], str(tmp_path / 'out'))
  assert _png(tmp_path / 'out' / 'x.png').shape == (16, 16, 3)
  assert summary['stages'][0]['step'] == 2
  original = inference.sample(_sample_config(), stages['latent'], [str(tmp_path / 'x.png')],
                              str(tmp_path / 'original'))
  np.testing.assert_array_equal(_png(tmp_path / 'out' / 'x.png'),
                                _png(tmp_path / 'original' / 'x.png'))
  del original
  inference.sample(config, str(tmp_path / 'export'), [str(tmp_path / 'x.png')],
                   str(tmp_path / 'from_export'))
  np.testing.assert_array_equal(_png(tmp_path / 'from_export' / 'x.png'),
                                _png(tmp_path / 'original' / 'x.png'))
  results = evaluate.evaluate(config, str(tmp_path / 'eval'))
  assert [r['method'] for r in results['rows']] == ['bilinear', 'CFM']
  assert np.isfinite(results['rows'][1]['psnr'])


# ----------------------------------------------------------------------------- Python API, export


def test_python_boost_gives_the_sample_modes_images_for_every_input_type(stages, tmp_path):
  """`trained_model.boost` is what `--mode=sample` runs: the same seed and batch give the same
  pixels from a PIL image, a uint8 array and a float array in [0, 1]."""
  image = _write_png(tmp_path / 'x.png', 8, 8, 9)
  inference.sample(_sample_config(seed=5), stages['pixel'], [str(tmp_path / 'x.png')],
                   str(tmp_path / 'out'))
  written = _png(tmp_path / 'out' / 'x.png')
  model = trained_model.load(stages['pixel'])
  assert model.sample.solver == 'euler' and model.sample.nfe == 2  # Saved with the checkpoint.
  pil = model.boost(Image.open(tmp_path / 'x.png'), seed=5)
  assert len(pil) == 1 and pil[0].size == (16, 16)
  np.testing.assert_array_equal(np.asarray(pil[0]), written)
  from_uint8 = model.boost(image[None], seed=5, output_type='np')
  assert from_uint8.shape == (1, 16, 16, 3) and from_uint8.dtype == np.float32
  assert np.abs(from_uint8[0] * 255 - written).max() <= 0.5 + 1e-3
  from_float = model.boost([image / 255.0], seed=5, output_type='np')
  np.testing.assert_allclose(from_float, from_uint8, atol=1e-5)
  other_seed = model.boost(image, seed=6, output_type='np')
  assert np.abs(other_seed - from_uint8).max() > 1e-3


def test_python_boost_of_latents_nchw_and_a_cascade(stages, tmp_path):
  model = trained_model.load(stages['latent'])
  rng = np.random.default_rng(2)
  z = rng.normal(size=(3, 4, 4, 6)).astype(np.float32)  # NCHW, as diffusers returns them.
  latents = model.boost(latents=z, output_type='latent')
  assert latents.shape == (3, 4, 8, 12)
  nhwc = model.boost(latents=z.transpose(0, 2, 3, 1), output_type='latent')
  np.testing.assert_array_equal(latents, nhwc)
  # A cascade of the model twice equals boosting its output again: each stage draws from its own
  # key, so compare with the second stage's key, not just the shape.
  twice = trained_model.boost([model, model], latents=z, output_type='np', batch_size=3)
  assert twice.shape == (3, 32, 48, 3) and twice.min() >= 0 and twice.max() <= 1
  mixed = model.boost([np.zeros((8, 8, 3), np.uint8), np.zeros((6, 10, 3), np.uint8)],
                      output_type='np')
  assert [x.shape for x in mixed] == [(16, 16, 3), (12, 20, 3)]
  for bad, match in ((dict(output_type='tensor'), 'output_type'),
                     (dict(latents=np.zeros((2, 3, 5, 5))), "without the 4 channels"),
                     (dict(), 'either images or latents')):
    with pytest.raises(UserError, match=match):
      model.boost(**bad) if "latents" in bad else model.boost(
          None if 'output_type' not in bad else np.zeros((8, 8, 3), np.uint8), **bad)


def test_export_round_trips_through_load_sample_and_the_command_line(stages, tmp_path):
  """--mode=export writes the EMA weights and the config: loading the export gives the workdir's
  images exactly (float32) or nearly (bfloat16), and sample and evaluate take it as a workdir."""
  model = trained_model.load(stages['pixel'])
  photo = np.asarray(_write_png(tmp_path / 'x.png', 8, 8, 4))
  expected = model.boost(photo, output_type='np')
  proc = runs.run_main(stages['pixel'], f'--outdir={tmp_path / "export"}', mode='export',
                       timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f'Exported step 2 of {stages["pixel"]} (float32' in proc.stdout
  assert {'config', 'export.json', 'params'} <= set(os.listdir(tmp_path / 'export'))
  assert not (tmp_path / 'export.partial').exists()
  exported = trained_model.load(str(tmp_path / 'export'))
  assert exported.step == 2 and exported.config.to_dict() == model.config.to_dict()
  np.testing.assert_array_equal(exported.boost(photo, output_type='np'), expected)
  summary = inference.sample(_sample_config(), str(tmp_path / 'export'),
                             [str(tmp_path / 'x.png')], str(tmp_path / 'out'))
  assert summary['stages'][0]['step'] == 2
  np.testing.assert_array_equal(_png(tmp_path / 'out' / 'x.png'),
                                np.asarray(model.boost(photo)[0]))
  model.export(str(tmp_path / 'bf16'), 'bfloat16')
  half = trained_model.load(str(tmp_path / 'bf16'))
  assert all(v.dtype == np.float32 for v in runs.flat(half.params).values())
  assert np.abs(half.boost(photo, output_type='np') - expected).max() < 0.05
  # Exporting over an existing export is refused, and leaves it intact.
  proc = runs.run_main(stages['pixel'], f'--outdir={tmp_path / "export"}', mode='export',
                       timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: {tmp_path / "export"} already exists; export into a new directory (or remove it).')
  np.testing.assert_array_equal(trained_model.load(str(tmp_path / 'export')).boost(
      photo, output_type='np'), expected)


def test_input_size_shrinks_images_with_the_degradation_of_training(stages, tmp_path):
  """--config.sample.input_size makes the low-res input as training does (bilinear without
  antialiasing, upsampling.low_res_images), not with another filter."""
  image = _write_png(tmp_path / 'x.png', 16, 16, 12)
  inference.sample(_sample_config(input_size=8, seed=2), stages['pixel'],
                   [str(tmp_path / 'x.png')], str(tmp_path / 'out'))
  low = np.asarray(upsampling.low_res_images(images.normalize(image)[None], 8))[0]
  model = trained_model.load(stages['pixel'])
  expected = model.boost((low + 1) / 2, seed=2, output_type='np')[0]
  got = _png(tmp_path / 'out' / 'x.png').astype(np.float32) / 255
  assert got.shape == (16, 16, 3)
  assert np.abs(got - expected).max() <= 0.5 / 255 + 1e-4
  # Antialiased resizing (what PIL's filters do) gives another input and another output.
  pil = np.asarray(Image.fromarray(image).resize((8, 8), Image.Resampling.LANCZOS))
  other = model.boost(pil, seed=2, output_type='np')[0]
  assert np.abs(other - expected).max() > 2 / 255
