"""Tests for fmboost_jax/weights.py: both file formats, both naming conventions, strictness, and
one-sentence errors for bad input (files written by the tests; no download)."""

import re

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file as save_safetensors

from fmboost_jax import weights
from fmboost_jax.errors import UserError
from fmboost_jax.models import autoencoder as ae
from tests.test_autoencoder import SMALL, random_model


class NotATensor:
  """Pickled into a checkpoint to check that torch.load(weights_only=True) refuses it."""


def _ldm_state(model) -> dict[str, np.ndarray]:
  """The model's parameters as an LDM state dict in PyTorch layouts (the inverse conversion)."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(var[...])
    if path[-1] == 'kernel' and value.ndim == 4:  # HWIO -> OIHW.
      value = value.transpose(3, 2, 0, 1)
    elif path[-1] == 'kernel':  # Dense [in, out] -> 1x1 conv [out, in, 1, 1].
      value = value.T[:, :, None, None]
    name = {'kernel': 'weight', 'scale': 'weight'}.get(path[-1], path[-1])
    out['.'.join(str(p) for p in (*path[:-1], name))] = np.array(value, np.float32, order='C')
  return out


def _abstract(**config):
  return nnx.eval_shape(lambda: ae.AutoencoderKL(**config, rngs=nnx.Rngs(0)))


@pytest.fixture(scope='module')
def model():
  return random_model(seed=3, **SMALL)


@pytest.fixture(scope='module')
def ldm(model):
  return _ldm_state(model)


def _assert_loaded(state, model, rtol=0.0):
  expected = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  got = dict(nnx.to_flat_state(state))
  assert got.keys() == expected.keys()
  for path, var in expected.items():
    assert got[path][...].dtype == np.float32
    np.testing.assert_allclose(got[path][...], var[...], rtol=rtol, atol=rtol, err_msg=str(path))


def _error(path, target) -> str:
  with pytest.raises(UserError) as info:
    weights.load_autoencoder_weights(path, target)
  message = str(info.value)
  assert '\n' not in message
  return message


def _torch(ldm_state, dtype=None):
  torch = pytest.importorskip('torch', reason='.ckpt tests need torch==2.13.0 (requirements-dev)')
  return {k: torch.from_numpy(v) if dtype is None else torch.from_numpy(v).to(dtype)
          for k, v in ldm_state.items()}


# --- Good files ---------------------------------------------------------------------------------


def test_safetensors_with_ldm_names_round_trip(tmp_path, model, ldm):
  path = tmp_path / 'vae.safetensors'
  save_safetensors(ldm, str(path))
  state = weights.load_autoencoder_weights(path, _abstract(**SMALL))
  _assert_loaded(state, model)
  # A concrete module is an accepted target too, and the state applies with nnx.update.
  target = random_model(seed=4, **SMALL)
  nnx.update(target, weights.load_autoencoder_weights(path, target))
  _assert_loaded(nnx.state(target, nnx.Param), model)
  # Half precision files are read and widened to float32.
  save_safetensors({k: v.astype(np.float16) for k, v in ldm.items()}, str(path))
  _assert_loaded(weights.load_autoencoder_weights(path, _abstract(**SMALL)), model, rtol=2e-3)


def test_ckpt_variants_round_trip(tmp_path, model, ldm):
  torch = pytest.importorskip('torch', reason='.ckpt tests need torch==2.13.0 (requirements-dev)')
  tensors = _torch(ldm)
  attention_2d = {k: (v[:, :, 0, 0] if '.attn_1.' in k and v.ndim == 4 else v)
                  for k, v in tensors.items()}
  variants = {
      'bare': tensors,
      'lightning': {'state_dict': {**tensors, 'loss.logvar': torch.zeros(()),
                                   'loss.discriminator.main.0.weight': torch.zeros(64, 3, 4, 4)},
                    'global_step': 7, 'epoch': 1},
      'full_sd': {'state_dict': {
          **{f'first_stage_model.{k}': v for k, v in tensors.items()},
          'model.diffusion_model.out.2.weight': torch.zeros(4, 320, 3, 3),
          'cond_stage_model.transformer.text_model.final_layer_norm.weight': torch.zeros(768),
          'model_ema.decay': torch.tensor(0.999)}},
      'attention_as_linear': attention_2d,
  }
  abstract = _abstract(**SMALL)
  for name, obj in variants.items():
    path = tmp_path / f'{name}.ckpt'
    torch.save(obj, str(path))
    _assert_loaded(weights.load_autoencoder_weights(path, abstract), model)
  torch.save(_torch(ldm, torch.bfloat16), str(tmp_path / 'bf16.ckpt'))
  _assert_loaded(weights.load_autoencoder_weights(tmp_path / 'bf16.ckpt', abstract), model,
                 rtol=2e-2)


def test_diffusers_key_mapping():
  cases = {
      'encoder.conv_in.weight': 'encoder.conv_in.weight',
      'encoder.down_blocks.1.resnets.0.conv_shortcut.bias':
          'encoder.down.1.block.0.nin_shortcut.bias',
      'encoder.down_blocks.2.downsamplers.0.conv.weight': 'encoder.down.2.downsample.conv.weight',
      'encoder.mid_block.resnets.1.norm2.weight': 'encoder.mid.block_2.norm2.weight',
      'encoder.mid_block.attentions.0.group_norm.bias': 'encoder.mid.attn_1.norm.bias',
      'encoder.mid_block.attentions.0.to_out.0.weight': 'encoder.mid.attn_1.proj_out.weight',
      'decoder.mid_block.attentions.0.key.weight': 'decoder.mid.attn_1.k.weight',
      'decoder.mid_block.attentions.0.proj_attn.bias': 'decoder.mid.attn_1.proj_out.bias',
      'encoder.conv_norm_out.weight': 'encoder.norm_out.weight',
      'decoder.up_blocks.0.resnets.2.conv1.weight': 'decoder.up.3.block.2.conv1.weight',
      'decoder.up_blocks.0.upsamplers.0.conv.bias': 'decoder.up.3.upsample.conv.bias',
      'decoder.up_blocks.3.resnets.0.conv_shortcut.weight':
          'decoder.up.0.block.0.nin_shortcut.weight',
      'decoder.conv_norm_out.bias': 'decoder.norm_out.bias',
      'quant_conv.weight': 'quant_conv.weight',
  }
  for diffusers_key, ldm_key in cases.items():
    assert weights.diffusers_to_ldm_key(diffusers_key, 4) == ldm_key
  # LDM keys pass through unchanged.
  for ldm_key in cases.values():
    assert weights.diffusers_to_ldm_key(ldm_key, 4) == ldm_key


def test_diffusers_old_attention_names_and_model_directory(tmp_path):
  pytest.importorskip('torch', reason='needs torch==2.13.0 (requirements-dev)')
  from tests.test_autoencoder import _diffusers_vae  # pylint: disable=import-outside-toplevel
  vae = _diffusers_vae((32, 64, 64), 1, seed=2)
  state = {k: v.contiguous().numpy() for k, v in vae.state_dict().items()}
  new_path = tmp_path / 'new.safetensors'
  save_safetensors(state, str(new_path))
  renames = {'.to_q.': '.query.', '.to_k.': '.key.', '.to_v.': '.value.',
             '.to_out.0.': '.proj_attn.'}
  old = {}
  for key, value in state.items():
    for a, b in renames.items():
      key = key.replace(a, b)
    old[key] = value
  assert any('.proj_attn.' in k for k in old)
  (tmp_path / 'vae').mkdir()
  save_safetensors(old, str(tmp_path / 'vae' / weights.DIFFUSERS_FILENAME))
  abstract = _abstract(**SMALL)
  reference = weights.load_autoencoder_weights(new_path, abstract)
  graphdef, _ = nnx.split(abstract)
  expected = nnx.merge(graphdef, reference)
  for target in (tmp_path, tmp_path / 'vae'):  # A pipeline directory or its vae/ folder.
    _assert_loaded(weights.load_autoencoder_weights(target, abstract), expected)


# --- Bad input ----------------------------------------------------------------------------------


def test_missing_path(tmp_path):
  message = _error(tmp_path / 'nowhere.ckpt', _abstract(**SMALL))
  assert 'nowhere.ckpt does not exist' in message and 'config.first_stage.weights' in message
  message = _error(tmp_path, _abstract(**SMALL))
  assert f'{tmp_path} holds no {weights.DIFFUSERS_FILENAME}' in message


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / 'notes.safetensors'
  path.write_text('these are my notes, not weights\n')
  message = _error(path, _abstract(**SMALL))
  assert re.search(r'notes\.safetensors is not a safetensors file', message)
  pytest.importorskip('torch', reason='needs torch==2.13.0 (requirements-dev)')
  path = tmp_path / 'notes.ckpt'
  path.write_text('these are my notes, not weights\n')
  assert 'notes.ckpt is not a readable PyTorch checkpoint' in _error(path, _abstract(**SMALL))


def test_truncated_files(tmp_path, ldm):
  path = tmp_path / 'vae.safetensors'
  save_safetensors(ldm, str(path))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  message = _error(path, _abstract(**SMALL))
  assert 'vae.safetensors is not a' in message and 'truncated' in message
  torch = pytest.importorskip('torch', reason='needs torch==2.13.0 (requirements-dev)')
  path = tmp_path / 'vae.ckpt'
  torch.save(_torch(ldm), str(path))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  message = _error(path, _abstract(**SMALL))
  assert 'vae.ckpt is not a readable PyTorch checkpoint' in message and 'truncated' in message


def test_checkpoint_of_another_model(tmp_path):
  torch = pytest.importorskip('torch', reason='needs torch==2.13.0 (requirements-dev)')
  path = tmp_path / 'unet.ckpt'
  torch.save({'model.diffusion_model.input_blocks.0.0.weight': torch.zeros(320, 4, 3, 3),
              'model.diffusion_model.out.2.bias': torch.zeros(4)}, str(path))
  abstract = _abstract(**SMALL)
  num_keys = len(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  message = _error(path, abstract)
  assert f'unet.ckpt does not match the autoencoder: {num_keys} missing keys (' in message
  assert 'and none belongs to an autoencoder' in message
  assert 'model.diffusion_model.input_blocks.0.0.weight' in message


def test_autoencoder_of_another_config(tmp_path, ldm):
  path = tmp_path / 'small.safetensors'
  save_safetensors(ldm, str(path))
  message = _error(path, _abstract(**dict(SMALL, num_res_blocks=2)))
  # 48 = one more ResnetBlock per level in the encoder and in the decoder (3 levels, 8 tensors).
  assert '48 missing keys (decoder.up.0.block.2.conv1.bias, ' in message
  assert 'and 42 more' in message
  assert 'unexpected' not in message
  message = _error(path, _abstract(**dict(SMALL, ch_mult=(1, 2))))
  assert '28 unexpected keys (decoder.up.2.block.0.conv1.bias, ' in message


def test_shape_mismatch(tmp_path, ldm):
  bad = dict(ldm)
  bad['encoder.conv_in.weight'] = np.zeros((32, 3, 5, 5), np.float32)
  path = tmp_path / 'bad.safetensors'
  save_safetensors(bad, str(path))
  message = _error(path, _abstract(**SMALL))
  assert ('1 shape mismatches (encoder.conv_in.weight (file [32, 3, 5, 5], model [32, 3, 3, 3]))'
          in message)
  message = _error(path, _abstract(**dict(SMALL, ch=64)))
  assert re.search(r'\d+ shape mismatches \(.*, and \d+ more\)', message)


def test_pickled_objects_are_refused(tmp_path, ldm):
  torch = pytest.importorskip('torch', reason='needs torch==2.13.0 (requirements-dev)')
  path = tmp_path / 'lightning.ckpt'
  torch.save({'state_dict': _torch(ldm), 'callbacks': {'checkpoint': NotATensor()}}, str(path))
  assert 'holds Python objects besides tensors' in _error(path, _abstract(**SMALL))
  path = tmp_path / 'list.ckpt'
  torch.save([torch.zeros(2)], str(path))
  assert 'holds a list, not a state dict' in _error(path, _abstract(**SMALL))


def test_without_torch(tmp_path, monkeypatch, ldm):
  monkeypatch.setitem(__import__('sys').modules, 'torch', None)  # `import torch` now fails.
  path = tmp_path / 'vae.ckpt'
  path.write_bytes(b'PK\x03\x04 a zip-based torch checkpoint would start like this')
  message = _error(path, _abstract(**SMALL))
  assert 'needs PyTorch: pip install torch==2.13.0, or convert the file to .safetensors' in message
  # safetensors files need no torch.
  save_safetensors(ldm, str(tmp_path / 'vae.safetensors'))
  weights.load_autoencoder_weights(tmp_path / 'vae.safetensors', _abstract(**SMALL))
