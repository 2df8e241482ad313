"""Seconds per image of the ODE solvers with UNet-base, next to one forward pass of the network.

  .venv/bin/python benchmarks/solver.py --size=64 --solver=euler --nfe=40
  .venv/bin/python benchmarks/solver.py --size=64 --solver=dopri5 --rtol=1e-3 --atol=1e-5

UNet-base (configs/default.py, 305.8 M parameters) on SD latent grids of --size x --size: 64
(a 512 px output; the size UNet-base trains at in reference 3.9) or 128 (1024 px, the paper's
512 -> 1024 px setting), batch --batch, float32, random weights. The output
convolution, zero at initialisation (the velocity would be 0 and Dopri5 would finish in one step),
gets PyTorch's default initialisation so the field is a generic nonlinear function of x and t; the
Dopri5 NFE therefore say how the solver behaves on such a field, not what a trained model needs
(benchmarks/sampling.py measures that on the demo checkpoint). The sampler is the one main.py uses
(`sampling.solve` after the objective's `source`), AOT-compiled; time per image is the median over
--repeats runs, excluding compilation. The forward pass is the same network alone at the same batch
and size (median of 5). Extra `--set section.field=value` change the config.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from common import apply_settings, flops, peak_rss_mib, report, xla_memory
from flax import nnx

from configs import default
from fmboost_jax import flow, sampling, trained_model
from fmboost_jax.models import layers


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=64, help='Latent grid edge (64 or 128).')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--solver', choices=sampling.SOLVERS, default='euler')
  parser.add_argument('--nfe', type=int, default=40)
  parser.add_argument('--rtol', type=float, default=1e-3)
  parser.add_argument('--atol', type=float, default=1e-5)
  parser.add_argument('--repeats', type=int, default=1)
  parser.add_argument('--set', action='append', default=[], metavar='SECTION.FIELD=VALUE')
  parser.add_argument('--json', help='Also write the results to this file.')
  args = parser.parse_args()

  config = default.get_config()
  apply_settings(config, args.set)
  channels = 4
  model = trained_model.network(config, channels, nnx.Rngs(0))
  kernel = model.out_conv.kernel
  kernel[...] = layers.torch_kernel_init(jax.random.PRNGKey(1), kernel.shape, kernel.dtype)
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  shape = (args.batch, args.size, args.size, channels)
  x_up = jax.random.normal(jax.random.PRNGKey(2), shape)
  key = jax.random.PRNGKey(3)

  def sample(params, x_up, key):
    x0, context = flow.objective(config.flow).source(x_up, key)
    solution = sampling.solve(trained_model.velocity_fn(graphdef, params), x0, context,
                              solver=args.solver, nfe=args.nfe, rtol=args.rtol, atol=args.atol,
                              max_steps=config.sample.max_steps)
    return solution.x1, solution.nfe, solution.ok

  def forward(params, x, t):
    return trained_model.velocity_fn(graphdef, params)(x, x, t)

  t0 = time.perf_counter()
  compiled = jax.jit(sample).lower(params, x_up, key).compile()
  compile_seconds = time.perf_counter() - t0
  t = jnp.full((args.batch,), 0.5)
  compiled_forward = jax.jit(forward).lower(params, x_up, t).compile()

  x1, nfe, ok = compiled(params, x_up, key)  # Warm-up (allocations), then the timed runs.
  jax.block_until_ready(x1)
  seconds = _median_seconds(lambda: compiled(params, x_up, key)[0], args.repeats)
  jax.block_until_ready(compiled_forward(params, x_up, t))
  forward_seconds = _median_seconds(lambda: compiled_forward(params, x_up, t), 5)
  nfe = int(nfe)
  results = {
      'solver': args.solver, 'size': args.size, 'batch_size': args.batch, 'settings': args.set,
      'nfe_requested': args.nfe if args.solver != 'dopri5' else None,
      'rtol': args.rtol if args.solver == 'dopri5' else None,
      'atol': args.atol if args.solver == 'dopri5' else None,
      'nfe': nfe, 'ok': bool(ok), 'compile_seconds': compile_seconds,
      'seconds': seconds, 'seconds_per_image': seconds / args.batch,
      'seconds_per_nfe': seconds / nfe, 'forward_seconds': forward_seconds,
      'forward_flops': flops(compiled_forward),
      'per_nfe_over_forward': seconds / nfe / forward_seconds,
      **xla_memory(compiled), 'peak_rss_mib': peak_rss_mib(),
  }
  report(results, args.json)


if __name__ == '__main__':
  main()
