"""Tests for fmboost_jax/models/unet.py (sizes against reference section 3, numerics, init)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from fmboost_jax.models import backends, layers
from fmboost_jax.models import unet as unet_lib

# XLA convolutions, as the tests below count and compare them (`auto` has its own tests).
SMALL = dict(in_channels=6, out_channels=3, model_channels=32, channel_mult=(1, 2, 2),
             num_res_blocks=1, attention_levels=(2,), num_heads=2, head_dim=16, conv_impl='xla')


def _attention_modules(model):
  return [node for _, node in nnx.iter_graph(model)
          if isinstance(node, unet_lib.SpatialSelfAttention)]


def _perturb(model, seed=0, std=0.05):
  """Replaces every zero-initialised parameter by small random values (in place)."""
  key = jax.random.key(seed)
  for i, (_, var) in enumerate(nnx.iter_graph(model)):
    if isinstance(var, nnx.Param) and not np.any(np.asarray(var[...])):
      var[...] = std * jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype)


@pytest.fixture(scope='module')
def small_model():
  return unet_lib.UNet(**SMALL, rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def perturbed_model():
  model = unet_lib.UNet(**SMALL, rngs=nnx.Rngs(0))
  _perturb(model)
  return model


def test_param_keys_draw_the_parameters_of_nnx_rngs_in_and_out_of_jit():
  """layers.ParamKeys (used to build networks inside jit and eval_shape) gives bitwise the weights
  nnx.Rngs gives, so checkpoints and seeds mean the same whichever built the network."""
  def params(rngs):  # A residual block with a 1x1 skip: 12 parameters.
    block = unet_lib.ResBlock(32, 64, 128, dtype=jnp.float32, param_dtype=jnp.float32,
                              rngs=rngs)
    return jax.tree.leaves(nnx.state(block, nnx.Param))

  key = jax.random.key(7)
  reference = params(nnx.Rngs(key))
  assert len(reference) == 12
  eager = params(layers.ParamKeys(key))
  jitted = jax.jit(lambda k: params(layers.ParamKeys(k)))(key)
  for got in (eager, jitted):
    assert all(np.array_equal(a, b) for a, b in zip(reference, got))
  # Another key, other weights; an integer seed is the key it names.
  assert not np.array_equal(reference[0], params(layers.ParamKeys(jax.random.key(8)))[0])
  assert np.array_equal(params(nnx.Rngs(3))[0], params(layers.ParamKeys(3))[0])


def test_reference_config_parameter_counts():
  config = default.get_config()
  model = layers.abstract(unet_lib.UNet, in_channels=8, out_channels=4, **config.model)
  assert unet_lib.count_params(model) == 305_806_340
  count = unet_lib.count_params
  assert count(model.time_dense1) + count(model.time_dense2) == 328_704
  assert count(model.out_norm) + count(model.out_conv) == 4_868
  attention = _attention_modules(model)
  assert len(attention) == 8
  assert sum(unet_lib.count_params(a) for a in attention) == 8_419_328
  # The state of the abstract model counts the same.
  assert unet_lib.count_params(nnx.state(model, nnx.Param)) == 305_806_340
  # Layer sequence of reference 3.7: 16 input blocks, 16 output blocks, stem 8 -> 128.
  assert len(model.input_blocks) == 16 and len(model.output_blocks) == 16
  assert model.input_blocks[0].kernel.shape == (3, 3, 8, 128)
  assert model.out_conv.kernel.shape == (3, 3, 128, 4)
  assert model.output_blocks[0].res.in_conv.kernel.shape == (3, 3, 2048, 1024)
  assert model.output_blocks[3].res.in_conv.kernel.shape == (3, 3, 1536, 1024)
  assert model.output_blocks[3].upsample is not None
  assert model.output_blocks[12].res.in_conv.kernel.shape == (3, 3, 384, 128)
  assert model.output_blocks[15].upsample is None


def test_block_parameter_counts():
  res = layers.abstract(unet_lib.ResBlock, 128, 128, 512)
  assert unet_lib.count_params(res) == 427_008
  attn = layers.abstract(unet_lib.SpatialSelfAttention, 1024, 4, 64)
  assert unet_lib.count_params(attn) == 1_052_416


def test_timestep_embedding_values():
  emb = np.asarray(unet_lib.timestep_embedding(jnp.array([1.0, 0.5]), 128))
  assert emb.shape == (2, 128) and emb.dtype == np.float32
  np.testing.assert_allclose(emb[0, [0, 64]], [0.5403, 0.8415], atol=1e-4)
  np.testing.assert_allclose(emb[1, [0, 1, 64, 65]], [0.8776, 0.9077, 0.4794, 0.4196], atol=1e-4)
  freqs = np.exp(-math.log(10000.0) * np.arange(64) / 64)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(0.5 * freqs), np.sin(0.5 * freqs)]),
                             atol=1e-6)


def test_pytorch_style_initialisation(small_model):
  block = small_model.input_blocks[1].res
  bound = 1 / math.sqrt(3 * 3 * 32)
  kernel = np.asarray(block.in_conv.kernel[...])
  bias = np.asarray(block.in_conv.bias[...])
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
  assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.5 * bound
  np.testing.assert_array_equal(block.in_norm.scale[...], 1.0)
  np.testing.assert_array_equal(block.in_norm.bias[...], 0.0)
  assert block.in_norm.epsilon == 1e-5
  for layer in (block.out_conv, small_model.out_conv, _attention_modules(small_model)[0].proj_out):
    assert not np.any(np.asarray(layer.kernel[...])) and not np.any(np.asarray(layer.bias[...]))


@pytest.mark.parametrize('height,width', [(16, 16), (16, 24)])
def test_output_is_zero_at_init(small_model, height, width):
  x = jax.random.normal(jax.random.key(1), (2, height, width, 6))
  t = jnp.array([0.1, 0.9])
  out = small_model(x, t)
  assert out.shape == (2, height, width, 3) and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_perturbed_output_nonzero_and_time_dependent(perturbed_model):
  x = jax.random.normal(jax.random.key(1), (2, 16, 24, 6))
  out0 = perturbed_model(x, jnp.array([0.0, 0.0]))
  out1 = perturbed_model(x, jnp.array([1.0, 1.0]))
  assert out0.shape == (2, 16, 24, 3) and out0.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out0)))
  assert float(jnp.abs(out0).mean()) > 1e-3
  assert float(jnp.abs(out1 - out0).mean()) > 1e-5


def test_attention_matches_spatial_mhsa_reference():
  heads, head_dim, channels = 2, 16, 64
  attn = unet_lib.SpatialSelfAttention(channels, heads, head_dim, rngs=nnx.Rngs(3))
  _perturb(attn, std=0.2)
  x = np.asarray(jax.random.normal(jax.random.key(4), (2, 4, 6, channels)), np.float64)
  out = np.asarray(attn(jnp.asarray(x, jnp.float32)), np.float64)

  # Plain float64 reference: GroupNorm(32, eps 1e-5) -> per-head [q|k|v] -> softmax over H*W.
  b, h, w, c = x.shape
  g = x.reshape(b, h * w, 32, c // 32)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  normed = ((g - mean) / np.sqrt(var + 1e-5)).reshape(b, h * w, c)
  normed = normed * np.asarray(attn.norm.scale[...]) + np.asarray(attn.norm.bias[...])
  qkv = normed @ np.asarray(attn.qkv.kernel[...], np.float64) + np.asarray(attn.qkv.bias[...])
  qkv = qkv.reshape(b, h * w, heads, 3, head_dim)
  q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(head_dim)
  weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
  weights /= weights.sum(axis=-1, keepdims=True)
  o = np.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, h * w, heads * head_dim)
  o = o @ np.asarray(attn.proj_out.kernel[...], np.float64) + np.asarray(attn.proj_out.bias[...])
  expected = x + o.reshape(b, h, w, c)

  delta, ref_delta = out - x, expected - x
  assert np.abs(ref_delta).mean() > 1e-2
  rel = np.linalg.norm(delta - ref_delta) / np.linalg.norm(ref_delta)
  assert rel < 1e-5, rel

  # Spatial attention is equivariant to permutations of the pixels.
  perm = np.random.default_rng(0).permutation(h * w)
  x_perm = x.reshape(b, h * w, c)[:, perm].reshape(b, h, w, c)
  out_perm = np.asarray(attn(jnp.asarray(x_perm, jnp.float32)))
  np.testing.assert_allclose(out_perm, out.reshape(b, h * w, c)[:, perm].reshape(b, h, w, c),
                             atol=1e-5)


def test_bfloat16_compute(perturbed_model):
  model_bf16 = layers.abstract(unet_lib.UNet, **SMALL, compute_dtype='bfloat16')
  nnx.update(model_bf16, nnx.state(perturbed_model, nnx.Param))
  for leaf in jax.tree.leaves(nnx.state(model_bf16, nnx.Param)):
    assert leaf.dtype == jnp.float32
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 6))
  t = jnp.array([0.3, 0.7])
  ref = perturbed_model(x, t)
  out = model_bf16(x, t)
  assert out.dtype == jnp.float32 and out.shape == ref.shape
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert 1e-4 < rel < 5e-2, rel  # Really computed in bfloat16, yet close.


def test_unet_from_config_keywords_small():
  config = default.get_config()
  config.model.model_channels = 32
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attention_levels = (1,)
  config.model.num_heads = 2
  config.model.head_dim = 16
  config.model.compute_dtype = 'bfloat16'
  model = layers.abstract(unet_lib.UNet, in_channels=6, out_channels=3, **config.model)
  assert model.input_blocks[0].kernel.shape == (3, 3, 6, 32)
  assert model.out_conv.kernel.shape == (3, 3, 32, 3)
  assert model.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x, t: nnx.merge(graphdef, s)(x, t), state,
                       jax.ShapeDtypeStruct((1, 8, 8, 6), jnp.float32),
                       jax.ShapeDtypeStruct((1,), jnp.float32))
  assert out.shape == (1, 8, 8, 3) and out.dtype == jnp.float32
  config.model.compute_dtype = 'float16'
  with pytest.raises(ValueError, match='compute_dtype'):
    unet_lib.UNet(in_channels=6, out_channels=3, **config.model, rngs=nnx.Rngs(0))


def test_bad_spatial_size_is_a_clear_error(small_model):
  with pytest.raises(ValueError, match='not divisible by 4'):
    small_model(jnp.zeros((1, 10, 16, 6)), jnp.zeros((1,)))


@pytest.mark.parametrize('shape, kernel, strides, padding', [
    ((2, 9, 7, 5), (3, 3, 5, 4), (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 8, 5), (3, 3, 5, 4), (2, 2), ((1, 1), (1, 1))),
    ((1, 6, 10, 3), (1, 1, 3, 8), (1, 1), ((0, 0), (0, 0))),
    ((1, 6, 6, 3), (3, 3, 3, 2), (1, 1), ((0, 0), (0, 0))),
])
def test_conv_as_matmul_equals_the_xla_convolution_and_its_gradients(shape, kernel, strides,
                                                                       padding):
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), kernel)
  dn = jax.lax.conv_dimension_numbers(shape, kernel, ('NHWC', 'HWIO', 'NHWC'))
  xla = lambda x, w: jax.lax.conv_general_dilated(x, w, strides, padding,  # noqa: E731
                                                  dimension_numbers=dn)
  mm = lambda x, w: layers.conv_as_matmul(x, w, strides, padding)  # noqa: E731
  relative = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
  assert mm(x, w).shape == xla(x, w).shape
  assert relative(mm(x, w), xla(x, w)) < 1e-5  # float32 rounding of a different summation order
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
  for a, b in zip(jax.grad(loss(mm), (0, 1))(x, w), jax.grad(loss(xla), (0, 1))(x, w)):
    assert relative(a, b) < 1e-5


@pytest.mark.parametrize('conv_impl', ['xla', 'matmul'])
@pytest.mark.parametrize('shape', [(2, 5, 7, 6), (1, 1, 1, 6), (1, 8, 3, 6)])
def test_upsample_equals_a_convolution_of_the_nearest_upsampled_map(conv_impl, shape):
  up = layers.Upsample(6, rngs=nnx.Rngs(0))
  up.conv.conv_general_dilated = backends.CONV_IMPLS[conv_impl]
  up.conv.bias[...] = jax.random.normal(jax.random.key(2), (6,))
  x = jax.random.normal(jax.random.key(1), shape)
  relative = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
  # The definition: repeat every pixel 2x2, then the 3x3 convolution with zero padding 1.
  reference = lambda up, x: up.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))  # noqa: E731
  assert up(x).shape == (shape[0], 2 * shape[1], 2 * shape[2], 6)
  assert relative(up(x), reference(up, x)) < 1e-6
  big = jnp.zeros((2, 16, 16, 6))
  flops = lambda f: jax.jit(f).lower(up, big).compile().cost_analysis()['flops']  # noqa: E731
  assert flops(lambda up, x: up(x)) < 0.5 * flops(reference)  # 4 of every 9 multiply-adds.
  loss = lambda f: lambda up, x: jnp.sum(jnp.sin(f(up, x)))  # noqa: E731
  grads = nnx.grad(loss(lambda up, x: up(x)), argnums=(0, 1))(up, x)
  ref_grads = nnx.grad(loss(reference), argnums=(0, 1))(up, x)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert a.shape == b.shape and relative(a, b) < 1e-5
  up.conv.dtype = jnp.bfloat16  # bf16 compute with float32 parameters, taps summed in float32.
  assert up(x).dtype == jnp.bfloat16
  assert relative(up(x).astype(jnp.float32), reference(up, x).astype(jnp.float32)) < 1e-2


def test_unet_with_matmul_convolutions_computes_the_same_velocity(perturbed_model):
  config = default.get_config()
  config.model.update(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                      attention_levels=(2,), num_heads=2, head_dim=16, conv_impl='matmul')
  model = unet_lib.UNet(in_channels=6, out_channels=3, **config.model, rngs=nnx.Rngs(0))
  nnx.update(model, nnx.state(perturbed_model, nnx.Param))
  assert all(m.conv_general_dilated is layers.conv_as_matmul
             for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv))
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 6))
  t = jnp.array([0.3, 0.7])
  ref, out = perturbed_model(x, t), model(x, t)
  assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-5
  config.model.conv_impl = 'winograd'
  with pytest.raises(ValueError, match='conv_impl'):
    unet_lib.UNet(in_channels=6, out_channels=3, **config.model, rngs=nnx.Rngs(0))



def _grad_fn(model):
  """Lowered gradient of a scalar loss w.r.t. the model's parameters, and the parameters."""
  graphdef, params = nnx.split(model, nnx.Param)
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 6))
  t = jnp.array([0.2, 0.7])

  def loss(p):
    return jnp.mean(nnx.merge(graphdef, p)(x, t) ** 2)

  return jax.jit(jax.value_and_grad(loss)).lower(params), params


def _count_ops(lowered) -> dict[str, int]:
  text = lowered.as_text()
  return {op: text.count(f'stablehlo.{op}') for op in ('optimization_barrier', 'convolution',
                                                       'dot_general')}


@pytest.mark.slow
def test_remat_policies_recompute_blocks_with_the_same_gradients(perturbed_model):
  lowered, params = _grad_fn(perturbed_model)
  ref_loss, ref_grads = lowered.compile()(params)
  ops = {'none': _count_ops(lowered)}
  for policy in ('full', 'dots'):
    model = unet_lib.UNet(**SMALL, remat=policy, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(perturbed_model, nnx.Param))
    lowered, _ = _grad_fn(model)
    loss, grads = lowered.compile()(params)
    assert abs(float(loss - ref_loss)) <= 1e-6 * abs(float(ref_loss))
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(grads),
                                                          jax.tree.leaves(ref_grads)))
    den = sum(float(jnp.sum(b ** 2)) for b in jax.tree.leaves(ref_grads))
    assert math.sqrt(num / den) < 1e-5
    ops[policy] = _count_ops(lowered)
  # The program handed to XLA recomputes each of the 11 residual blocks (3 encoder UNetBlocks, 2
  # middle ResBlocks, 6 decoder UNetBlocks) behind an optimization barrier: 'full' recomputes
  # their convolutions and matrix products, 'dots' the convolutions but keeps the unbatched matrix
  # products (dense layers).
  # (XLA's CPU pipeline drops the barriers and folds most of the recomputation back, so on CPUs the
  # option saves no memory; benchmarks/results.md has the measurement.)
  assert ops['none']['optimization_barrier'] == 0
  assert ops['full']['optimization_barrier'] == ops['dots']['optimization_barrier'] == 11
  assert ops['full']['convolution'] > ops['none']['convolution']
  assert ops['dots']['convolution'] == ops['full']['convolution']
  assert ops['none']['dot_general'] < ops['dots']['dot_general'] < ops['full']['dot_general']
  config = default.get_config()
  config.model.remat = 'everything'
  with pytest.raises(ValueError, match="remat='everything' is not supported"):
    unet_lib.UNet(in_channels=6, out_channels=3, **config.model, rngs=nnx.Rngs(0))
