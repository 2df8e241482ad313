"""Tests for fmboost_jax/weights.py: both file formats, both naming conventions, strictness, and
one-sentence errors for bad input (files written by the tests; no download)."""

import contextlib
import os
import pickle
import re
import subprocess
import sys
import types
import typing
from argparse import Namespace
from collections import OrderedDict, defaultdict

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file as save_safetensors

from fmboost_jax import weights
from fmboost_jax.errors import UserError
from fmboost_jax.models import autoencoder as ae
from fmboost_jax.models import layers
from tests.test_autoencoder import SMALL, random_model


class NotATensor:
  """An object of a class outside the allow-list: the checkpoint holding it is refused."""


# Stand-ins for the classes a PyTorch Lightning 1.x checkpoint pickles by reference (pickle writes
# their `__module__`); pytorch_lightning and omegaconf are not installed, `_fake_modules` lets
# pickle find these classes there while the test writes the file.
class ModelCheckpoint:
  """Like pytorch_lightning's ModelCheckpoint, the key of the `callbacks` entry of SD v1 .ckpt."""
  __module__ = 'pytorch_lightning.callbacks.model_checkpoint'

  def __init__(self, **attributes):
    self.monitor, self.save_top_k = 'val/rec_loss', 3
    self.__dict__.update(attributes)


class AttributeDict(dict):
  """Like pytorch_lightning's hparams dict (a dict subclass with attribute access)."""
  __module__ = 'pytorch_lightning.utilities.parsing'


class DictConfig:
  """Like omegaconf's DictConfig: its pickled state holds metadata that references typing.Any."""
  __module__ = 'omegaconf.dictconfig'

  def __init__(self, content):
    self._content, self._metadata = content, {'ref_type': typing.Any, 'object_type': dict}


class RunningStage:
  """Like a Lightning enum pickled in the loop state (a REDUCE of the class)."""
  __module__ = 'lightning.pytorch.trainer.states'

  def __init__(self, value):
    self.value = value

  def __reduce__(self):
    return RunningStage, (self.value,)


class Payload:
  """Pickles as the call `func(*args)`, which a plain unpickler would run while loading."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


@contextlib.contextmanager
def _fake_modules(monkeypatch, *classes):
  """Registers empty modules holding `classes` while a test pickles them; removed afterwards."""
  with monkeypatch.context() as patch:
    for cls in classes:
      parts = cls.__module__.split('.')
      for i in range(1, len(parts) + 1):
        name = '.'.join(parts[:i])
        if name not in sys.modules:
          patch.setitem(sys.modules, name, types.ModuleType(name))
      patch.setattr(sys.modules[cls.__module__], cls.__name__, cls, raising=False)
    yield


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
  return layers.abstract(ae.AutoencoderKL, **config)


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
  # Not torch.save output at all (no torch needed to tell): text, random bytes, an empty file.
  path = tmp_path / 'notes.ckpt'
  path.write_text('these are my notes, not weights\n')
  noise = np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes()
  assert noise[:1] != b'\x80' and noise[:2] != b'PK'
  (tmp_path / 'x.ckpt').write_bytes(noise)
  (tmp_path / 'empty.ckpt').write_bytes(b'')
  # A pickle header followed by noise: not the magic number torch.save's legacy format starts
  # with (torch.serialization.MAGIC_NUMBER), so not a checkpoint either; nor a plain pickle.
  (tmp_path / 'p.ckpt').write_bytes(b'\x80\x02' + noise)
  (tmp_path / 'dict.ckpt').write_bytes(pickle.dumps({'a': 1}, protocol=2))
  for name in ('notes.ckpt', 'x.ckpt', 'empty.ckpt', 'p.ckpt', 'dict.ckpt'):
    message = _error(tmp_path / name, _abstract(**SMALL))
    assert (f'{tmp_path / name} is not a PyTorch checkpoint (expected a file written by '
            'torch.save') in message
    assert 'besides tensors' not in message


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
  message = _error(path, _abstract(**SMALL))
  assert (f'holds pickled Python code or objects ({NotATensor.__module__}.NotATensor) that are '
          'not unpickled') in message
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


# --- Full PyTorch Lightning checkpoints: read without running code -------------------------------


def _lightning_checkpoint(state_dict, **extra):
  """A dict laid out like the .ckpt that PyTorch Lightning 1.x saves (SD v1, LDM VAEs)."""
  torch = pytest.importorskip('torch', reason='needs torch==2.13.0 (requirements-dev)')
  return {
      'epoch': 3, 'global_step': 12000, 'pytorch-lightning_version': '1.4.2',
      'state_dict': state_dict,
      'callbacks': {ModelCheckpoint: {'best_model_score': torch.tensor(0.25), 'dirpath': 'logs/',
                                      'best_k_models': {'a.ckpt': torch.tensor(0.3)}},
                    "ModelCheckpoint{'monitor': 'val/rec_loss'}": {'kth_value': torch.tensor(1.0)},
                    'instance': ModelCheckpoint(best=torch.tensor(2.0))},
      'optimizer_states': [{'state': {0: {'step': torch.tensor(5.0), 'exp_avg': torch.zeros(3)}},
                            'param_groups': [{'lr': 4.5e-6, 'betas': (0.5, 0.9), 'params': [0]}]}],
      'lr_schedulers': [{'last_epoch': 7, 'lr_lambdas': [None], '_last_lr': [4.5e-6]}],
      'hparams_name': 'kwargs',
      'hyper_parameters': AttributeDict(embed_dim=4, ddconfig=DictConfig({'ch': 128})),
      'hparams': Namespace(base_learning_rate=4.5e-6, gpus='0,'),
      'loops': {'stage': RunningStage('train'), 'counts': defaultdict(int, {'epoch': 3}),
                'seen': {1, 2}, 'frozen': frozenset({3}), 'raw': b'\x00\xff', 'z': complex(1, 2),
                'ordered': OrderedDict(a=1)},
      **extra}


def test_lightning_checkpoint_loads_without_its_classes(tmp_path, monkeypatch, model, ldm):
  torch = pytest.importorskip('torch', reason='needs torch==2.13.0 (requirements-dev)')
  lightning = (ModelCheckpoint, AttributeDict, DictConfig, RunningStage)
  abstract = _abstract(**SMALL)
  state_dict = {'loss.logvar': torch.zeros(()),
                **{f'first_stage_model.{k}': v for k, v in _torch(ldm).items()}}
  with _fake_modules(monkeypatch, *lightning):
    torch.save(_lightning_checkpoint(state_dict), str(tmp_path / 'zip.ckpt'))
    torch.save(_lightning_checkpoint(state_dict), str(tmp_path / 'protocol4.ckpt'),
               pickle_protocol=4)
    torch.save(_lightning_checkpoint(_torch(ldm)), str(tmp_path / 'legacy.ckpt'),
               _use_new_zipfile_serialization=False)
  assert 'pytorch_lightning' not in sys.modules and 'omegaconf.dictconfig' not in sys.modules
  # torch's own safe loader refuses such a file; ours reads the weights.
  with pytest.raises(pickle.UnpicklingError, match='pytorch_lightning.callbacks.model_checkpoint'):
    torch.load(str(tmp_path / 'zip.ckpt'), weights_only=True)
  for name in ('zip.ckpt', 'protocol4.ckpt', 'legacy.ckpt'):
    _assert_loaded(weights.load_autoencoder_weights(tmp_path / name, abstract), model)
  # Nothing was imported to read the Lightning objects (they are inert placeholders).
  assert not any(m.split('.')[0] in ('pytorch_lightning', 'lightning', 'omegaconf')
                 for m in sys.modules)


def test_pickled_code_is_refused_and_never_runs(tmp_path, monkeypatch, ldm):
  torch = pytest.importorskip('torch', reason='needs torch==2.13.0 (requirements-dev)')
  marker = tmp_path / 'MARKER'
  payloads = {'posix.system': Payload(os.system, f'touch {marker}'),
              'io.open': Payload(open, str(marker), 'w'),
              'subprocess.Popen': Payload(subprocess.Popen, ['touch', str(marker)]),
              'builtins.eval': Payload(eval, f'open({str(marker)!r}, "w")')}
  abstract = _abstract(**SMALL)
  for name, payload in payloads.items():
    files = {
        'top': {'state_dict': _torch(ldm), 'evil': payload},
        'first': {'evil': payload, 'state_dict': _torch(ldm)},  # Before any tensor is read.
        # Nested in a Lightning callback entry, as the state of an allow-listed (placeholder)
        # class, as an item of an allow-listed dict subclass, and as a Lightning class' reduce.
        'callbacks': _lightning_checkpoint(_torch(ldm), callbacks={
            ModelCheckpoint: {'best_model_score': torch.tensor(0.1), 'evil': payload}}),
        'placeholder_state': _lightning_checkpoint(
            _torch(ldm), callbacks={ModelCheckpoint: ModelCheckpoint(dirpath=payload)}),
        'placeholder_items': _lightning_checkpoint(
            _torch(ldm), hyper_parameters=AttributeDict(lr=1.0, evil=payload)),
        'in_state_dict': {'state_dict': {**_torch(ldm), 'evil': payload}},
    }
    for kind, obj in files.items():
      path = tmp_path / f'{kind}.ckpt'
      with _fake_modules(monkeypatch, ModelCheckpoint, AttributeDict, DictConfig, RunningStage):
        torch.save(obj, str(path))
      message = _error(path, abstract)
      assert message == (
          f'{path} holds pickled Python code or objects ({name}) that are not unpickled, since '
          'loading them could run code; use a .safetensors or tensors-only copy of the weights '
          'from a source you trust instead.'), (kind, message)
      assert not marker.exists(), (name, kind)
  # The pre-zip format goes through the same unpickler.
  path = tmp_path / 'legacy.ckpt'
  torch.save({'state_dict': _torch(ldm), 'evil': payloads['posix.system']}, str(path),
             _use_new_zipfile_serialization=False)
  assert '(posix.system)' in _error(path, abstract)
  assert not marker.exists()


def _legacy_file(path, data_pickle: bytes):
  """A pre-zip torch.save file around hand-written pickle opcodes (no tensors)."""
  torch = pytest.importorskip('torch', reason='needs torch==2.13.0 (requirements-dev)')
  header = [torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION,
            {'protocol_version': torch.serialization.PROTOCOL_VERSION, 'little_endian': True}]
  path.write_bytes(b''.join(pickle.dumps(x, protocol=2) for x in header) + data_pickle
                   + pickle.dumps([], protocol=2))


def test_crafted_pickle_operations_are_refused(tmp_path):
  torch = pytest.importorskip('torch', reason='needs torch==2.13.0 (requirements-dev)')
  rebuild = torch._utils._rebuild_tensor_v2  # pylint: disable=protected-access
  defaults = rebuild.__defaults__
  cases = {
      # BUILD on an allowed function would set its attributes (here: break its defaults).
      'BUILD of torch._utils._rebuild_tensor_v2':
          b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__)s\x86b.',
      # A call of something that is not a global at all (a str).
      'a call of a str': b'\x80\x02X\x01\x00\x00\x00x)R.',
      # SETITEM on an allowed callable, and a copyreg extension code.
      'SETITEM on collections.OrderedDict':
          b'\x80\x02ccollections\nOrderedDict\nX\x01\x00\x00\x00kNs.',
      'a copyreg extension code': b'\x80\x02\x82\x01.',
      # Only the latin-1 use of _codecs.encode that pickle makes for bytes.
      "_codecs.encode with str, 'rot13'":
          b'\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.',
      'builtins.getattr': b'\x80\x02cbuiltins\ngetattr\n.',
  }
  for what, data in cases.items():
    path = tmp_path / 'crafted.pt'
    _legacy_file(path, data)
    with pytest.raises(UserError) as info:
      weights.read_state_dict(path)
    assert f'holds pickled Python code or objects ({what}) that are not unpickled' in str(
        info.value)
  assert rebuild.__defaults__ == defaults
  # The same writer with harmless opcodes is read.
  _legacy_file(tmp_path / 'plain.pt', pickle.dumps({'state_dict': {'a': 1}}, protocol=2))
  assert weights.read_state_dict(tmp_path / 'plain.pt') == {'a': 1}


# --- diffusers float16 variant -------------------------------------------------------------------


def test_diffusers_fp16_variant(tmp_path, model, ldm):
  half = {k: v.astype(np.float16) for k, v in ldm.items()}
  abstract = _abstract(**SMALL)
  # The reference: the float16 values, widened to float32, in a float32 file.
  save_safetensors({k: v.astype(np.float32) for k, v in half.items()},
                   str(tmp_path / 'widened.safetensors'))
  graphdef, _ = nnx.split(abstract)
  expected = nnx.merge(graphdef, weights.load_autoencoder_weights(
      tmp_path / 'widened.safetensors', abstract))
  for folder in ('alone', 'pipeline/vae'):
    (tmp_path / folder).mkdir(parents=True)
    save_safetensors(half, str(tmp_path / folder / weights.DIFFUSERS_FP16_FILENAME))
  assert not np.array_equal(half['encoder.conv_in.weight'].astype(np.float32),
                            ldm['encoder.conv_in.weight'])
  for target in (tmp_path / 'alone', tmp_path / 'pipeline'):
    _assert_loaded(weights.load_autoencoder_weights(target, abstract), expected)
  # With both files in the folder, the float32 one is used (exactly the float32 weights).
  save_safetensors(ldm, str(tmp_path / 'alone' / weights.DIFFUSERS_FILENAME))
  _assert_loaded(weights.load_autoencoder_weights(tmp_path / 'alone', abstract), model)
  (tmp_path / 'pipeline' / 'vae' / weights.DIFFUSERS_FP16_FILENAME).rename(
      tmp_path / 'pipeline' / 'vae' / 'other.safetensors')
  message = _error(tmp_path / 'pipeline', abstract)
  assert (f'{tmp_path / "pipeline"} holds no {weights.DIFFUSERS_FILENAME} or '
          f'{weights.DIFFUSERS_FP16_FILENAME}') in message


def test_torch_forced_weights_only(tmp_path, monkeypatch, ldm):
  torch = pytest.importorskip('torch', reason='needs torch==2.13.0 (requirements-dev)')
  torch.save(_torch(ldm), str(tmp_path / 'vae.ckpt'))
  monkeypatch.setenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '1')
  message = _error(tmp_path / 'vae.ckpt', _abstract(**SMALL))
  assert 'needs the environment variable TORCH_FORCE_WEIGHTS_ONLY_LOAD unset' in message
