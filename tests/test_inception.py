"""Tests for the FID Inception-v3 (fmboost_jax/models/inception.py) and its strict weight loader.

The parity tests compare with torch-fidelity's `FeatureExtractorInceptionV3` on random weights (no
download). They need torch-fidelity and torchvision, which are not in requirements-dev.txt
(torch-fidelity's package imports torchvision), and skip without them; run them from a separate
venv with `pip install torch==2.14.1 torchvision==0.29.1 torch-fidelity -r requirements.txt
pytest`: `python -m pytest -q tests/test_inception.py -s` prints the errors.
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file as save_safetensors

from fmboost_jax import weights
from fmboost_jax.errors import UserError
from fmboost_jax.models import inception

# Parameters (conv kernels, BatchNorm scale and bias) of the FID Inception-v3 without its `fc`
# classifier; torch-fidelity's module has the same number (checked in the parity test).
NUM_PARAMS = 21_785_568
FIDELITY_REASON = ('parity with torch-fidelity needs torch_fidelity and torchvision (not in '
                   'requirements-dev.txt); see this file\'s docstring')


def _abstract() -> inception.InceptionV3:
  return nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))


def _random_state_dict(seed: int) -> dict[str, np.ndarray]:
  """A random `pt_inception-2015-12-05` state dict (PyTorch names and layouts, with `fc.*` and
  `num_batches_tracked`), scaled so activations stay O(1) through the 94 conv layers; the
  BatchNorm running statistics are far from (0, 1) so that they matter."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(_abstract())):
    prefix, shape = '.'.join(map(str, path[:-1])), tuple(var.shape)
    if path[-1] == 'kernel':  # HWIO -> OIHW, He initialisation.
      kh, kw, cin, cout = shape
      std = math.sqrt(2.0 / (kh * kw * cin))
      out[f'{prefix}.weight'] = rng.normal(0.0, std, (cout, cin, kh, kw))
    elif path[-1] == 'scale':
      out[f'{prefix}.weight'] = rng.uniform(0.5, 1.5, shape)
    elif path[-1] == 'bias':
      out[f'{prefix}.bias'] = rng.normal(0.0, 0.2, shape)
    elif path[-1] == 'mean':
      out[f'{prefix}.running_mean'] = rng.normal(0.0, 0.5, shape)
      out[f'{prefix}.num_batches_tracked'] = np.array(1000, np.int64)
    elif path[-1] == 'var':
      out[f'{prefix}.running_var'] = rng.uniform(0.5, 2.0, shape)
    else:
      raise AssertionError(f'unexpected variable {path}')
  out['fc.weight'] = rng.normal(0.0, 0.02, (1008, 2048))
  out['fc.bias'] = np.zeros(1008)
  return {k: v if v.dtype == np.int64 else v.astype(np.float32) for k, v in out.items()}


def _save_pth(state: dict[str, np.ndarray], path) -> None:
  torch = pytest.importorskip('torch', reason='writing .pth files needs torch (requirements-dev)')
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, str(path))


def _error(path) -> str:
  with pytest.raises(UserError) as info:
    weights.load_inception_weights(path, _abstract())
  message = str(info.value)
  assert '\n' not in message
  return message


@pytest.fixture(scope='module')
def state_dict():
  return _random_state_dict(seed=0)


def _images(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- Main venv: structure, loading, errors -------------------------------------------------------


def test_parameter_count():
  params = nnx.state(_abstract(), nnx.Param)
  assert sum(math.prod(v.shape) for v in jax.tree.leaves(params)) == NUM_PARAMS


def test_resize_is_tensorflow1_bilinear():
  # TF1 samples output pixel i at input i * in / out (no half-pixel offset) and repeats the last
  # pixel at the border; jax.image.resize (half-pixel centres) would give other numbers.
  image = np.array([[0.0, 10.0], [20.0, 30.0]], np.float32)[None, :, :, None]
  resized = inception.resize_bilinear_tf1(image, (4, 4))[0, :, :, 0]
  np.testing.assert_array_equal(resized, [[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30],
                                          [20, 25, 30, 30]])


def test_loaded_model_maps_any_size_to_2048_features(tmp_path, state_dict):
  path = tmp_path / 'inception.safetensors'
  save_safetensors(state_dict, str(path))
  model = weights.inception_from_weights(path)
  # Conv OIHW -> HWIO, BatchNorm weight/running stats -> scale/mean/var.
  kernel = state_dict['Mixed_6b.branch7x7_2.conv.weight']  # [O, I, 1, 7].
  np.testing.assert_array_equal(model.Mixed_6b.branch7x7_2.conv.kernel[...],
                                kernel.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(model.Mixed_7c.branch_pool.bn.var[...],
                                state_dict['Mixed_7c.branch_pool.bn.running_var'])
  features = nnx.jit(lambda m, x: m(x))(model, _images(1, (2, 37, 53, 3)))
  assert features.shape == (2, 2048) and features.dtype == np.float32
  assert np.all(np.isfinite(features)) and np.std(features) > 0


def test_missing_file_names_the_file_and_the_flag(tmp_path):
  message = _error(tmp_path / 'nowhere.pth')
  assert 'nowhere.pth' in message
  assert 'pt_inception-2015-12-05-6726825d.pth' in message
  assert '--config.eval.inception_weights=PATH' in message


def test_file_that_is_not_a_checkpoint(tmp_path):
  path = tmp_path / 'inception.pth'
  path.write_text('<html>404 Not Found</html>')
  assert 'inception.pth' in _error(path)


def test_wrong_shape_is_listed(tmp_path, state_dict):
  bad = dict(state_dict)
  key = 'Mixed_7b.branch3x3_2a.conv.weight'  # [384, 384, 1, 3], saved as [384, 384, 3, 1].
  bad[key] = np.ascontiguousarray(bad[key].transpose(0, 1, 3, 2))
  path = tmp_path / 'transposed.pth'
  _save_pth(bad, path)
  message = _error(path)
  assert f'1 shape mismatches ({key} (file [384, 384, 3, 1], model [384, 384, 1, 3]))' in message
  assert 'missing' not in message and 'unexpected' not in message


def test_another_models_state_dict(tmp_path):
  rng = np.random.default_rng(0)
  resnet = {'conv1.weight': rng.normal(size=(64, 3, 7, 7)).astype(np.float32),
            'bn1.weight': np.ones(64, np.float32), 'fc.weight': np.zeros((1000, 2048), np.float32)}
  path = tmp_path / 'resnet.safetensors'
  save_safetensors(resnet, str(path))
  message = _error(path)
  assert '470 missing keys (Conv2d_1a_3x3.bn.bias, ' in message
  assert '2 unexpected keys (bn1.weight, conv1.weight)' in message  # fc.* is ignored.


# --- Parity with torch-fidelity (its venv only) --------------------------------------------------


def _fidelity(module: str):
  """torch-fidelity's `module`, or a skip when torch-fidelity or torchvision is missing."""
  pytest.importorskip('torchvision', reason=FIDELITY_REASON)
  return pytest.importorskip(f'torch_fidelity.{module}', reason=FIDELITY_REASON)


def test_resize_matches_torch_fidelity():
  tf1_resize = _fidelity('interpolate_compat_tensorflow').interpolate_bilinear_2d_like_tensorflow1x
  import torch  # pylint: disable=import-outside-toplevel
  images = _images(2, (2, 37, 53, 3)).astype(np.float32)
  resize = jax.jit(inception.resize_bilinear_tf1, static_argnums=1)
  for size in ((299, 299), (20, 71)):  # Up-sampling, and mixed down/up-sampling.
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    theirs = tf1_resize(nchw, size=size, align_corners=False).permute(0, 2, 3, 1).numpy()
    with jax.disable_jit():  # Op by op: the same float32 operations, so the same bits.
      np.testing.assert_array_equal(inception.resize_bilinear_tf1(images, size), theirs)
    ours = np.asarray(resize(images, size))  # XLA contracts a + (b - a) * t into an FMA.
    print(f'\nTF1 resize 37x53 -> {size}: max abs error {np.abs(ours - theirs).max():.3g} (jit), '
          '0 (eager)')
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_features_match_torch_fidelity(tmp_path, state_dict):
  extractor = _fidelity('feature_extractor_inceptionv3').FeatureExtractorInceptionV3
  import torch  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'pt_inception-random.pth'
  _save_pth(state_dict, path)
  torch.set_num_threads(2)
  # A local weights path: torch-fidelity loads it with a strict load_state_dict (no download).
  theirs = extractor('inception-v3-compat', ['2048'], feature_extractor_weights_path=str(path))
  torch_params = sum(p.numel() for name, p in theirs.named_parameters()
                     if not name.startswith('fc.'))
  assert torch_params == NUM_PARAMS

  model = weights.inception_from_weights(path)
  run = nnx.jit(lambda m, x: m(x))
  for seed, shape in ((3, (2, 64, 96, 3)), (4, (2, 299, 299, 3))):
    images = _images(seed, shape)
    ours = np.asarray(run(model, images))
    with torch.no_grad():
      (ref,) = theirs(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    ref = ref.numpy()
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    print(f'\nFID features {shape[1]}x{shape[2]}: relative error {rel:.3g}, max abs error '
          f'{np.abs(ours - ref).max():.3g} (feature RMS {np.sqrt(np.mean(ref ** 2)):.3g})')
    assert rel < 1e-4
