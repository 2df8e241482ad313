"""The per-backend settings of the networks: what `auto` resolves to on each backend, cuDNN
attention refused where it cannot run or falling back to XLA's, with the same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging
from flax import nnx

from configs import default
from fmboost_jax.errors import UserError
from fmboost_jax.models import backends, unet


def _settings(backend, **model):
  kw = dict(compute_dtype='auto', conv_impl='auto', attention_impl='auto', head_dim=64)
  kw.update(model)
  return backends.backend_settings(backend, **kw)


@pytest.mark.parametrize('backend,expected', [
    ('cpu', ('float32', 'matmul', 'xla')),
    ('gpu', ('bfloat16', 'xla', 'cudnn_or_xla')),
    ('tpu', ('bfloat16', 'xla', 'xla')),
    ('metal', ('float32', 'xla', 'xla')),  # An unknown backend: the portable defaults.
])
def test_auto_resolves_to_the_measured_choice_per_backend(backend, expected):
  s = _settings(backend)
  assert (s['compute_dtype'], s['conv_impl'], s['attention_impl']) == expected


def test_explicit_settings_are_kept_and_cudnn_only_where_it_applies():
  assert _settings('gpu', compute_dtype='float32')['attention_impl'] == 'xla'  # cuDNN: bf16 only.
  assert _settings('gpu', head_dim=12)['attention_impl'] == 'xla'  # Not a multiple of 8.
  assert _settings('gpu', head_dim=256)['attention_impl'] == 'xla'  # Above 128.
  assert _settings('cpu', conv_impl='xla', compute_dtype='bfloat16') == {
      'compute_dtype': 'bfloat16', 'conv_impl': 'xla', 'attention_impl': 'xla'}


def test_the_start_up_line_names_the_settings_and_an_unknown_backend():
  model = default.get_config().model
  assert backends.check_backend('cpu', **model) == (
      'UNet on cpu: compute float32, convolutions matmul, attention xla.')
  assert backends.check_backend('gpu', **model) == (
      'UNet on gpu: compute bfloat16, convolutions xla, attention cudnn (XLA where it cannot run).')
  assert backends.check_backend('metal', **model) == (
      "UNet on metal: compute float32, convolutions xla, attention xla (auto settings on the "
      "unknown backend 'metal': the portable defaults).")


@pytest.mark.parametrize('backend,dtype', [('cpu', 'bfloat16'), ('tpu', 'auto'),
                                           ('gpu', 'float32')])
def test_cudnn_attention_where_it_cannot_run_is_one_clear_error(backend, dtype):
  with pytest.raises(UserError, match=r"^config.model.attention_impl='cudnn' needs an NVIDIA GPU "
                     rf'and bfloat16 compute \(here: {backend}, '):
    backends.check_backend(backend, compute_dtype=dtype, attention_impl='cudnn')
  backends.check_backend('gpu', compute_dtype='auto', attention_impl='cudnn')  # Allowed.


def _attention_block(impl):
  block = unet.SpatialSelfAttention(32, 2, 16, attention_impl=impl, dtype=jnp.bfloat16,
                                    rngs=nnx.Rngs(0))
  # A non-zero output projection, so that the attention shows in the output.
  block.proj_out.kernel[...] = jax.random.normal(jax.random.key(1), block.proj_out.kernel.shape)
  return block


def test_cudnn_or_xla_falls_back_to_xla_attention_with_a_log_line(monkeypatch):
  warnings = []
  monkeypatch.setattr(logging, 'log_first_n',
                      lambda level, msg, n, *args: warnings.append(msg % args))
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32), jnp.bfloat16)
  fallback = jax.jit(lambda x: _attention_block('cudnn_or_xla')(x))(x)
  xla = jax.jit(lambda x: _attention_block('xla')(x))(x)
  assert float(jnp.abs(xla.astype(jnp.float32) - x.astype(jnp.float32)).max()) > 0.1
  np.testing.assert_array_equal(np.asarray(fallback, np.float32), np.asarray(xla, np.float32))
  assert warnings == ['cuDNN attention cannot run here (the program is compiled for cpu, not an '
                      'NVIDIA GPU); using XLA attention.']


def test_cudnn_attention_that_cannot_run_fails_while_tracing_with_one_line():
  x = jnp.zeros((2, 4, 4, 32), jnp.bfloat16)
  with pytest.raises(UserError) as error:
    jax.jit(lambda x: _attention_block('cudnn')(x)).lower(x)
  assert str(error.value).splitlines()[0] == (  # main.py prints the first line.
      "config.model.attention_impl='cudnn' cannot run here (the program is compiled for cpu, not "
      "an NVIDIA GPU); set --config.model.attention_impl=auto or xla.")


def test_the_default_unet_builds_with_auto_settings_on_this_backend():
  model = default.get_config().model
  model.update(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), num_res_blocks=1)
  net = unet.UNet(in_channels=8, out_channels=4, rngs=nnx.Rngs(0), **model)
  assert net.dtype == (jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16)
  out = net(jnp.ones((1, 8, 8, 8)), jnp.zeros((1,)))
  assert out.shape == (1, 8, 8, 4) and out.dtype == jnp.float32
