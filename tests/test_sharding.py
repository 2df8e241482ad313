"""The mesh from config.mesh and the sharding rule of the train state, on 8 fake devices."""

import math

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import default, demo
from fmboost_jax import sharding, train
from fmboost_jax.errors import UserError


def _mesh(**axes):
  return sharding.make_mesh(ml_collections.ConfigDict(axes))


@pytest.mark.parametrize('axes, shape', [
    (dict(data=-1, fsdp=1), {'data': 8, 'fsdp': 1}),
    (dict(data=2, fsdp=-1), {'data': 2, 'fsdp': 4}),
    (dict(data=-1, fsdp=8), {'data': 1, 'fsdp': 8}),
    (dict(data=-1), {'data': 8, 'fsdp': 1}),
])
def test_mesh_axes_fill_all_devices(axes, shape):
  assert dict(_mesh(**axes).shape) == shape


@pytest.mark.parametrize('axes, match', [
    (dict(data=4, fsdp=1), r'does not match the 8 devices; make the product of the axes 8 \(or '
     'set one axis to -1\\)'),
    # One axis fills already: the fixed one must divide the devices (no advice to set -1).
    (dict(data=3, fsdp=-1), r'config.mesh.data=3 x config.mesh.fsdp=-1 does not match the 8 '
     'devices: 3 does not divide 8; make the fixed axis a divisor of 8.$'),
    (dict(data=-1, fsdp=-1), 'at most one is -1'),
    (dict(data=0, fsdp=8), 'not a mesh'),
])
def test_bad_meshes_are_one_clear_error(axes, match):
  with pytest.raises(UserError, match=match):
    _mesh(**axes)


def test_batch_must_divide_over_data_times_fsdp():
  mesh = _mesh(data=2, fsdp=4)
  sharding.check_batch_size(16, mesh)
  with pytest.raises(UserError, match='not divisible by the 8 devices of the data x fsdp axes'):
    sharding.check_batch_size(12, mesh)
  assert sharding.batch_sharded(mesh).spec == P(('data', 'fsdp'))


def test_rule_shards_the_largest_divisible_dimension_of_large_arrays_only():
  mesh = _mesh(data=2, fsdp=4)
  rule = lambda shape: sharding.array_sharding(shape, mesh, min_size=1000).spec  # noqa: E731
  assert rule((3, 3, 64, 128)) == P(None, None, None, 'fsdp')
  assert rule((3, 3, 128, 64)) == P(None, None, 'fsdp', None)
  assert rule((512, 30)) == P('fsdp', None)
  assert rule((3, 3, 6, 64)) == P(None, None, None, 'fsdp')
  assert rule((999,)) == P()  # Below the threshold.
  assert rule((1001,)) == P()  # Nothing divisible by 4.
  assert rule(()) == P()
  assert sharding.array_sharding((3, 3, 64, 128), _mesh(data=8), 1000).spec == P()


def test_unet_base_state_is_created_sharded_over_fsdp_as_the_rule_says():
  """Large UNet-base arrays (params, both Adam moments, EMA) are split 8 ways; small ones are
  replicated; the per-device share of the state is about 1/8 of it. Checked abstractly (eval_shape
  of the jitted init), so no 6 GB state is allocated."""
  config = default.get_config()
  mesh = _mesh(data=1, fsdp=8)
  tx = train.make_optimizer(config.optim)
  init = lambda k: train.init_state(config, 4, tx, k)  # noqa: E731
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  out = jax.eval_shape(jax.jit(init, out_shardings=shardings), jax.random.key(0))
  leaves = jax.tree.leaves(out)
  total = sum(x.size for x in leaves)
  per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) for x in leaves)
  assert 4 * 305_806_340 < total < 4 * 305_806_340 + 10  # params, Adam mu and nu, EMA, counters.
  assert per_device < total / 8 * 1.1  # Arrays below 2**18 elements (8% of the state) replicate.
  large = [x for x in leaves if x.size >= config.mesh.fsdp_min_size]
  assert len(large) > 100 and all('fsdp' in x.sharding.spec for x in large)
  assert all(x.sharding.spec == P() for x in leaves if x.size < config.mesh.fsdp_min_size)


def test_tiny_state_arrays_really_live_sharded_after_init():
  config = demo.get_config('tiny')
  mesh = _mesh(data=2, fsdp=4)
  tx = train.make_optimizer(config.optim)
  init = lambda k: train.init_state(config, 3, tx, k)  # noqa: E731
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.state_shardings(abstract, mesh, 1000)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  kernel = state.params['out_conv']['kernel']  # [3, 3, 32, 3]: 864 elements, replicated.
  assert kernel.shape == (3, 3, 32, 3) and kernel.sharding.spec == P()
  big = state.opt_state[0].mu['output_blocks'][2]['res']['out_conv']['kernel']
  assert big.shape == (3, 3, 32, 32) and big.sharding.spec == P(None, None, None, 'fsdp')
  assert {s.data.shape for s in big.addressable_shards} == {(3, 3, 32, 8)}


def test_batches_are_padded_to_fill_the_devices_by_repeating_the_last_row():
  assert [sharding.round_up(n, 8) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 24]
  x = np.arange(6).reshape(3, 2)
  np.testing.assert_array_equal(sharding.pad_batch(x, 5), [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
  assert sharding.pad_batch(x, 3) is x
  padded = sharding.pad_batch(jax.numpy.asarray(x), 4)
  assert isinstance(padded, jax.Array) and padded.tolist() == [[0, 1], [2, 3], [4, 5], [4, 5]]
