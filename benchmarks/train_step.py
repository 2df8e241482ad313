"""Benchmarks one full training step (forward, backward, Adam, EMA) and the machine's peak.

  .venv/bin/python benchmarks/train_step.py --config=configs/default.py \
      --config.data.batch_size=2 --config.data.high_res_size=512 --steps=5
  .venv/bin/python benchmarks/train_step.py --config=configs/demo.py --steps=20

`--config` is main.py's flag (a config file and `--config.section.field=value` overrides). A latent
config (first stage `sd_vae`, e.g. configs/default.py: UNet-base, 305.8 M parameters) is measured
on precomputed latents of high_res_size / 8 (the network sees x_t and the PSU context, 8 channels),
as the paper trains; with batch 2 at 512 px (64x64 latents) this is the setting the official PyTorch
code was measured in (reference 3.9). A pixel config (`identity`, configs/demo.py) is measured on
images. Reported: compile time of the AOT-compiled step, the median step time over --steps steps
after two warm-up steps, samples/s, XLA's FLOP count for the step (cost analysis), achieved FLOP/s
and its ratio to the peak measured in the same process (median of a 4096^3 float32 matrix product),
XLA's memory analysis of the step, the process's peak RSS, and the host time one step call takes
to return (dispatch; the step runs asynchronously) and the time per step of --steps steps run back
to back without waiting (pipelined, as in the training loop).
"""

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from common import (
  compile_train_step,
  config_file,
  config_overrides,
  define_config_flag,
  flops,
  peak_flops,
  peak_rss_mib,
  report,
  xla_memory,
)

from fmboost_jax.models import backends

CONFIG = define_config_flag('configs/default.py')
STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (after two warm-up steps).')
NO_DONATE = flags.DEFINE_bool('no_donate', False,
                              'Do not donate the train state to the step (as the loop does).')
JSON = flags.DEFINE_string('json', None, 'Also write the results to this file.')


def build(config):
  """The config to compile (identity first stage: the batch holds images or latents), the
  channels the network predicts and one batch."""
  b = config.data.batch_size
  if config.first_stage.name == 'identity':
    s, channels = config.data.high_res_size, 3
    return config, channels, {'image': jnp.zeros((b, s, s, 3))}
  s = config.data.high_res_size // 2 ** (len(config.first_stage.ch_mult) - 1)
  channels = config.first_stage.z_channels
  config.first_stage.name = 'identity'
  config.data.source = 'latents'
  shape = (b, s, s, channels)
  return config, channels, {'x1': jnp.ones(shape), 'x_up': jnp.zeros(shape)}


def main(argv):
  del argv
  config, channels, batch = build(CONFIG.value)
  settings = backends.backend_settings(jax.default_backend(), **{
      k: config.model[k] for k in ('compute_dtype', 'conv_impl', 'attention_impl', 'head_dim')})
  compiled = compile_train_step(config, channels, batch, donate=not NO_DONATE.value)
  step, state, first_stage_params = (compiled['step'], compiled['state'],
                                     compiled['first_stage_params'])
  compile_seconds = compiled['compile_seconds']
  memory = xla_memory(step)

  times, dispatch = [], []
  for i in range(STEPS.value + 2):
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
  for _ in range(STEPS.value):
    state, measurements = step(state, batch, first_stage_params)
  jax.block_until_ready(measurements)
  pipelined = (time.perf_counter() - t0) / STEPS.value
  step_flops = flops(step)
  peak = peak_flops()
  params = sum(x.size for x in jax.tree.leaves(state.params))
  results = {
      'config': config_file(),
      'settings': config_overrides(), 'resolved': settings, 'donated': not NO_DONATE.value,
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
  report(results, JSON.value)


if __name__ == '__main__':
  app.run(main)
