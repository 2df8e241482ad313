"""Seconds per image of the ODE solvers with UNet-base, next to one forward pass of the network.

  .venv/bin/python benchmarks/solver.py --config.data.high_res_size=512 --config.sample.batch_size=1
  .venv/bin/python benchmarks/solver.py --config.sample.solver=dopri5 --config.sample.rtol=1e-3 \
      --config.sample.atol=1e-5 --config.data.high_res_size=512 --config.sample.batch_size=1

`--config` is main.py's flag (default configs/default.py: UNet-base, 305.8 M parameters); the
sampler settings are config.sample's (solver, nfe, rtol, atol, max_steps, batch_size) and the
latent grid is config.data.high_res_size / 8: 64 for 512 px outputs (the size UNet-base trains at
in reference 3.9) or 128 for 1024 px (the paper's 512 -> 1024 px setting). Random weights. The
output convolution, zero at initialisation (the velocity would be 0 and Dopri5 would finish in one
step), gets PyTorch's default initialisation so the field is a generic nonlinear function of x and
t; the Dopri5 NFE therefore say how the solver behaves on such a field, not what a trained model
needs (benchmarks/sampling.py measures that on the demo checkpoint). The sampler is the one main.py
uses (`sampling.solve` after the objective's `source`), AOT-compiled; time per image is the median
over --repeats runs, excluding compilation. The forward pass is the same network alone at the same
batch and size (median of 5).
"""

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from common import config_overrides, define_config_flag, flops, peak_rss_mib, report, xla_memory
from flax import nnx

from fmboost_jax import flow, sampling, trained_model
from fmboost_jax.models import layers

CONFIG = define_config_flag('configs/default.py')
REPEATS = flags.DEFINE_integer('repeats', 1, 'Timed runs per row (median).')
JSON = flags.DEFINE_string('json', None, 'Also write the results to this file.')


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv):
  del argv
  config = CONFIG.value
  s = config.sample
  batch = s.batch_size
  if config.first_stage.name == 'identity':  # Pixel space: RGB images.
    size, channels = config.data.high_res_size, 3
  else:  # SD latents.
    size = config.data.high_res_size // 2 ** (len(config.first_stage.ch_mult) - 1)
    channels = config.first_stage.z_channels
  model = trained_model.network(config, channels, nnx.Rngs(0))
  kernel = model.out_conv.kernel
  kernel[...] = layers.torch_kernel_init(jax.random.key(1), kernel.shape, kernel.dtype)
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  shape = (batch, size, size, channels)
  x_up = jax.random.normal(jax.random.key(2), shape)
  key = jax.random.key(3)

  def sample(params, x_up, key):
    x0, context = flow.objective(config.flow).source(x_up, key)
    solution = sampling.solve(trained_model.velocity_fn(graphdef, params), x0, context,
                              solver=s.solver, nfe=s.nfe, rtol=s.rtol, atol=s.atol,
                              max_steps=config.sample.max_steps)
    return solution.x1, solution.nfe, solution.ok

  def forward(params, x, t):
    return trained_model.velocity_fn(graphdef, params)(x, x, t)

  t0 = time.perf_counter()
  compiled = jax.jit(sample).lower(params, x_up, key).compile()
  compile_seconds = time.perf_counter() - t0
  t = jnp.full((batch,), 0.5)
  compiled_forward = jax.jit(forward).lower(params, x_up, t).compile()

  x1, nfe, ok = compiled(params, x_up, key)  # Warm-up (allocations), then the timed runs.
  jax.block_until_ready(x1)
  seconds = _median_seconds(lambda: compiled(params, x_up, key)[0], REPEATS.value)
  jax.block_until_ready(compiled_forward(params, x_up, t))
  forward_seconds = _median_seconds(lambda: compiled_forward(params, x_up, t), 5)
  nfe = int(nfe)
  results = {
      'solver': s.solver, 'size': size, 'batch_size': batch, 'settings': config_overrides(),
      'nfe_requested': s.nfe if s.solver != 'dopri5' else None,
      'rtol': s.rtol if s.solver == 'dopri5' else None,
      'atol': s.atol if s.solver == 'dopri5' else None,
      'nfe': nfe, 'ok': bool(ok), 'compile_seconds': compile_seconds,
      'seconds': seconds, 'seconds_per_image': seconds / batch,
      'seconds_per_nfe': seconds / nfe, 'forward_seconds': forward_seconds,
      'forward_flops': flops(compiled_forward),
      'per_nfe_over_forward': seconds / nfe / forward_seconds,
      **xla_memory(compiled), 'peak_rss_mib': peak_rss_mib(),
  }
  report(results, JSON.value)


if __name__ == '__main__':
  app.run(main)
