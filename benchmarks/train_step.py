"""Benchmarks one full training step (forward, backward, Adam, EMA) and the machine's peak.

  .venv/bin/python benchmarks/train_step.py --model=unet_base --steps=5
  .venv/bin/python benchmarks/train_step.py --model=demo --steps=20

`unet_base` is configs/default.py's UNet (305.8 M parameters) at batch 2 on precomputed 64x64x4
latents (the network sees 8x64x64 inputs: x_t and the PSU context), float32, as the official
PyTorch code was measured (reference 3.9); `demo` is configs/demo.py (pixel space, 32 px, batch 16).
Reported: compile time of the AOT-compiled step, the median step time over --steps steps after
two warm-up steps, samples/s, XLA's FLOP count for the step (cost analysis), achieved FLOP/s and its
ratio to the peak measured in the same process (median of a 4096^3 float32 matrix product),
XLA's memory analysis of the step, the process's peak RSS, and the host time one step call takes
to return (dispatch; the step runs asynchronously) and the time per step of --steps steps run back
to back without waiting (pipelined, as in the training loop). Extra `--set section.field=value`
arguments change the config (e.g. --set model.compute_dtype=bfloat16).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from common import (
  apply_settings,
  compile_train_step,
  flops,
  peak_flops,
  peak_rss_mib,
  report,
  xla_memory,
)

from configs import default, demo


def build(model: str, settings: list[str]):
  if model == 'unet_base':
    config = default.get_config()
    config.first_stage.name = 'identity'
    config.data.source = 'latents'
    config.data.batch_size = 2
    shape, channels = (2, 64, 64, 4), 4
    batch = {'x1': jnp.ones(shape), 'x_up': jnp.zeros(shape)}
  else:
    config = demo.get_config()
    s, channels = config.data.high_res_size, 3
    batch = {'image': jnp.zeros((config.data.batch_size, s, s, 3))}
  apply_settings(config, settings)
  return config, channels, batch


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', choices=['unet_base', 'demo'], default='unet_base')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--no_donate', action='store_true',
                      help='Do not donate the train state to the step (as the loop does).')
  parser.add_argument('--set', action='append', default=[], metavar='SECTION.FIELD=VALUE')
  parser.add_argument('--json', help='Also write the results to this file.')
  args = parser.parse_args()

  config, channels, batch = build(args.model, args.set)
  compiled = compile_train_step(config, channels, batch, donate=not args.no_donate)
  step, state, first_stage_params = (compiled['step'], compiled['state'],
                                     compiled['first_stage_params'])
  compile_seconds = compiled['compile_seconds']
  memory = xla_memory(step)

  times, dispatch = [], []
  for i in range(args.steps + 2):
    t0 = time.perf_counter()
    state, measurements = step(state, batch, first_stage_params)
    t1 = time.perf_counter()  # The call returns once the step is enqueued (async dispatch).
    jax.block_until_ready(measurements)
    if i >= 2:
      times.append(time.perf_counter() - t0)
      dispatch.append(t1 - t0)
  median = statistics.median(times)
  # The same steps back to back without waiting in between, as the training loop runs them: if the
  # host's dispatch work showed up, this would be slower than the blocked median.
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, measurements = step(state, batch, first_stage_params)
  jax.block_until_ready(measurements)
  pipelined = (time.perf_counter() - t0) / args.steps
  step_flops = flops(step)
  peak = peak_flops()
  params = sum(x.size for x in jax.tree.leaves(state.params))
  results = {
      'model': args.model, 'settings': args.set, 'donated': not args.no_donate,
      'parameters': int(params),
      'batch_size': config.data.batch_size, 'devices': jax.device_count(),
      'compile_seconds': compile_seconds, 'step_seconds_median': median,
      'step_seconds_min': min(times), 'step_seconds_max': max(times),
      'samples_per_second': config.data.batch_size / median,
      'dispatch_ms_median': 1e3 * statistics.median(dispatch), 'pipelined_seconds': pipelined,
      'flops_per_step': step_flops, 'achieved_gflops': step_flops / median / 1e9,
      'peak_gflops': peak / 1e9, 'fraction_of_peak': step_flops / median / peak,
      **memory, 'peak_rss_mib': peak_rss_mib(),
      'loss': float(measurements['loss']),
  }
  report(results, args.json)


if __name__ == '__main__':
  main()
