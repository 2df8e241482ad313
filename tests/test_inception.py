"""Tests for the FID Inception-v3 (fmboost_jax/models/inception.py) and its strict weight loader.

In CI (torch from requirements-dev.txt, no torchvision), besides the structure, loader and error
tests, `test_features_match_float64_torch_reference` and
`test_call_matches_tf1_resize_and_float64_torch_reference` check the numbers: a random
`pt_inception-2015-12-05` state dict is saved as `.pth`, loaded by `weights.inception_from_weights`,
and loaded strictly (`load_state_dict(strict=True)`: key names and shapes) into an independent
float64 plain-torch.nn copy of pytorch-fid's FID Inception-v3 written in this file (FIDInceptionA/C,
E_1 with the padding-excluding average pool, E_2 with the max pool, BatchNorm eps 1e-3, stem max
pools, global average pool); `features` on normalised 299x299 inputs, and `__call__` on uint8 64x96
images against a numpy TF1 bilinear resize + (x - 128) / 128, must match it to a relative error
< 1e-5 (measured ~3e-7).

The torch-fidelity parity tests compare with torch-fidelity's `FeatureExtractorInceptionV3` on
random weights (no download). They need torch-fidelity and torchvision, which are not in
requirements-dev.txt (torch-fidelity's package imports torchvision), and skip without them; run them
from a separate venv with `pip install torch==2.14.1 torchvision==0.29.1 torch-fidelity -r
requirements.txt pytest`: `python -m pytest -q tests/test_inception.py -s` prints the errors (and
the float64 reference tests' errors).
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file as save_safetensors

from fmboost_jax import weights
from fmboost_jax.errors import UserError
from fmboost_jax.models import inception, layers

# Parameters (conv kernels, BatchNorm scale and bias) of the FID Inception-v3 without its `fc`
# classifier; torch-fidelity's module has the same number (checked in the parity test).
NUM_PARAMS = 21_785_568
TORCH_REASON = 'the reference network needs torch (requirements-dev.txt)'
FIDELITY_REASON = ('parity with torch-fidelity needs torch_fidelity and torchvision (not in '
                   'requirements-dev.txt); see this file\'s docstring')


def _abstract() -> inception.InceptionV3:
  return layers.abstract(inception.InceptionV3)


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


# --- Independent float64 reference in plain torch (runs in CI) ----------------------------------
#
# pytorch-fid's FID Inception-v3 (torchvision's Inception3 layout with the FIDInceptionA/C/E_1/E_2
# patches), written again here from pytorch-fid's and torchvision's source in torch.nn only, so
# that the Flax network and its loader are checked numerically without torchvision or
# torch-fidelity. It shares nothing with fmboost_jax except the random state dict, which it loads
# with torch's own strict `load_state_dict` (PyTorch key names and shapes, checked independently
# of `weights.load_inception_weights`).


def _torch_fid_inception():
  """pytorch-fid's `fid_inception_v3()` up to the 2048-d average pool, as a plain torch module
  (`fc` is there only so the state dict's `fc.*` keys load strictly; `forward` does not use it)."""
  torch = pytest.importorskip('torch', reason=TORCH_REASON)
  nn, F = torch.nn, torch.nn.functional

  class Conv(nn.Module):  # torchvision's BasicConv2d.
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
      self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  def avg3(x):  # The FID patch: TensorFlow's average pool ignores the zero padding.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  class A(nn.Module):  # FIDInceptionA.
    def __init__(self, cin, pool_features):
      super().__init__()
      self.branch1x1 = Conv(cin, 64, 1)
      self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
      self.branch3x3dbl_1 = Conv(cin, 64, 1)
      self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
      self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
      self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
      return torch.cat([
          self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
          self.branch_pool(avg3(x))], 1)

  class B(nn.Module):  # torchvision's InceptionB (Mixed_6a).
    def __init__(self, cin):
      super().__init__()
      self.branch3x3 = Conv(cin, 384, 3, stride=2)
      self.branch3x3dbl_1 = Conv(cin, 64, 1)
      self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
      self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
      return torch.cat([
          self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
          F.max_pool2d(x, 3, stride=2)], 1)

  class C(nn.Module):  # FIDInceptionC.
    def __init__(self, cin, c7):
      super().__init__()
      self.branch1x1 = Conv(cin, 192, 1)
      self.branch7x7_1 = Conv(cin, c7, 1)
      self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
      self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
      self.branch7x7dbl_1 = Conv(cin, c7, 1)
      self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
      self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
      self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
      self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
      self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
      b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
      d = x
      for i in range(1, 6):
        d = getattr(self, f'branch7x7dbl_{i}')(d)
      return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg3(x))], 1)

  class D(nn.Module):  # torchvision's InceptionD (Mixed_7a).
    def __init__(self, cin):
      super().__init__()
      self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
      self.branch7x7x3_1 = Conv(cin, 192, 1)
      self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
      self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
      self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
      b7 = x
      for i in range(1, 5):
        b7 = getattr(self, f'branch7x7x3_{i}')(b7)
      return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                        F.max_pool2d(x, 3, stride=2)], 1)

  class E(nn.Module):  # FIDInceptionE_1 (avg pool, Mixed_7b) / FIDInceptionE_2 (max, Mixed_7c).
    def __init__(self, cin, max_pool):
      super().__init__()
      self.max_pool = max_pool
      self.branch1x1 = Conv(cin, 320, 1)
      self.branch3x3_1 = Conv(cin, 384, 1)
      self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
      self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
      self.branch3x3dbl_1 = Conv(cin, 448, 1)
      self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
      self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
      self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
      self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
      b3 = self.branch3x3_1(x)
      d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
      pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg3(x)
      return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                        self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                        self.branch_pool(pooled)], 1)

  class FIDInception(nn.Module):
    def __init__(self):
      super().__init__()
      self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
      self.Conv2d_2a_3x3 = Conv(32, 32, 3)
      self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
      self.Conv2d_3b_1x1 = Conv(64, 80, 1)
      self.Conv2d_4a_3x3 = Conv(80, 192, 3)
      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
      self.Mixed_6a = B(288)
      self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
      self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
      self.Mixed_7a = D(768)
      self.Mixed_7b, self.Mixed_7c = E(1280, max_pool=False), E(2048, max_pool=True)
      self.fc = nn.Linear(2048, 1008)

    def forward(self, x):  # [B, 3, 299, 299] normalised -> [B, 2048] ('pool3').
      x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
      x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
      x = F.max_pool2d(x, 3, stride=2)
      for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
        x = getattr(self, f'Mixed_{name}')(x)
      return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)

  return FIDInception()


def _tf1_resize_numpy(images: np.ndarray, size) -> np.ndarray:
  """TF1 `resize_bilinear(align_corners=False)` in float64 numpy: output pixel i samples input
  coordinate i * in / out (no half-pixel offset), neighbours clamped to the last pixel."""
  def along(x, axis, out):
    n = x.shape[axis]
    coord = np.arange(out) * (n / out)
    lo = np.floor(coord).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    t = (coord - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    return np.take(x, lo, axis) * (1 - t) + np.take(x, hi, axis) * t
  return along(along(images.astype(np.float64), 2, size[1]), 1, size[0])


@pytest.fixture(scope='module')
def reference(state_dict):
  """The torch reference with `state_dict` loaded strictly, in float64 and eval mode."""
  torch = pytest.importorskip('torch', reason=TORCH_REASON)
  module = _torch_fid_inception()
  module.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  module = module.double().eval()

  def run(nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
      return module(torch.from_numpy(nhwc.astype(np.float64).transpose(0, 3, 1, 2))).numpy()
  return run


@pytest.fixture(scope='module')
def loaded_model(tmp_path_factory, state_dict):
  path = tmp_path_factory.mktemp('inception') / 'pt_inception-random.pth'
  _save_pth(state_dict, path)
  return weights.inception_from_weights(path)


def _relative_error(ours, ref) -> float:
  rel = float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))
  print(f'\nrelative error {rel:.3g} (feature RMS {np.sqrt(np.mean(ref ** 2)):.3g})')
  return rel


def test_features_match_float64_torch_reference(loaded_model, reference):
  # `features` on 2 normalised 299x299 inputs against the float64 torch network. Measured (torch
  # 2.13 CPU, jax 0.10.2): relative error 3.4e-7 on features of RMS 2.2; BatchNorm eps 1e-5 in the
  # reference gives 1.1e-2, count_include_pad=True 4.6e-2, an average pool in Mixed_7c 1.1e-1.
  x = np.random.default_rng(5).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
  ours = nnx.jit(lambda m, v: m.features(v))(loaded_model, x)
  assert ours.shape == (2, 2048)
  assert _relative_error(ours, reference(x)) < 1e-5


def test_call_matches_tf1_resize_and_float64_torch_reference(loaded_model, reference):
  # The full path on 2 uint8-valued 64x96 images: TF1 bilinear resize (numpy above) to 299x299,
  # (x - 128) / 128, then the reference. Measured relative error 2.9e-7 on features of RMS 1.9; a
  # half-pixel-centre resize in the reference instead gives 5.4e-3.
  images = _images(6, (2, 64, 96, 3))
  ours = nnx.jit(lambda m, v: m(v))(loaded_model, images)
  x = (_tf1_resize_numpy(images, (299, 299)) - 128.0) / 128.0
  assert _relative_error(ours, reference(x)) < 1e-5


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
