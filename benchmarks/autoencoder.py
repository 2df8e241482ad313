"""Benchmarks the SD v1 KL-f8 autoencoder: JAX (jit) against PyTorch diffusers, on CPU.

For each pixel size S: `encode` of an S x S image and `decode` of an S/8 latent (random weights,
float32, batch 1) in JAX and in diffusers' `AutoencoderKL` built from code with the same config;
then JAX `decode_tiled` (and, with --tiled-encode, `encode_tiled`) at --tiled-size with the default
tiles. Usage, from the repo root:

  .venv/bin/python benchmarks/autoencoder.py --sizes 512 1024 --repeats 3 --tiled-size 2048

Every measurement runs in a fresh subprocess (this script with --worker), so peak memory is per
operation: the high-water mark is reset (/proc/self/clear_refs) after imports, model and input
creation, and peak RSS = `ru_maxrss` after one warm-up and --repeats timed runs minus the RSS at
the reset. JAX's compile peak is measured the same way and reported apart. If the reset is not
permitted, each peak is `ru_maxrss` after the step minus `ru_maxrss` before it, which under-reports
a step whose peak stays below an earlier one (e.g. a run peak below the compile peak).
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SD = dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4)
MiB = 2.0 ** 20


def _rss_kib() -> int:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:'))


def _reset_peak() -> int:
  """Resets the RSS high-water mark if allowed; returns the baseline (KiB) to subtract."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return _rss_kib()
  except OSError:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_mib(baseline_kib: int) -> float:
  return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) / 1024


def _input(op: str, size: int, nchw: bool):
  """A random image of size x size (encode) or latent of size/8 (decode), batch 1."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rs = np.random.RandomState(0)
  if op.startswith('encode'):
    x = rs.uniform(-1, 1, (1, size, size, 3))
  else:  # JAX decodes scaled latents (it divides by 0.18215), diffusers unscaled ones.
    x = rs.randn(1, size // 8, size // 8, 4) * (1.0 if nchw else 0.18215)
  return (x.transpose(0, 3, 1, 2) if nchw else x).astype(np.float32)


def worker(method: str, op: str, size: int, repeats: int) -> dict:
  """Runs one measurement in this (fresh) process and returns its numbers."""
  result = dict(compile_s=None, compile_rss=None, xla_temp=None, xla_io=None)
  if method == 'jax':
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from tests.test_autoencoder import random_model  # pylint: disable=import-outside-toplevel
    graphdef, state = nnx.split(random_model(**SD))
    x = jnp.asarray(_input(op, size, nchw=False))
    baseline = _reset_peak()
    start = time.perf_counter()
    fn = jax.jit(lambda s, v: getattr(nnx.merge(graphdef, s), op)(v))
    compiled = fn.lower(state, x).compile()
    result.update(compile_s=time.perf_counter() - start, compile_rss=_peak_mib(baseline))
    stats = compiled.memory_analysis()
    if stats is not None:
      result.update(xla_temp=stats.temp_size_in_bytes / MiB,
                    xla_io=(stats.argument_size_in_bytes + stats.output_size_in_bytes) / MiB)
    run = lambda: compiled(state, x).block_until_ready()
  else:
    import torch  # pylint: disable=import-outside-toplevel

    from tests.test_autoencoder import _diffusers_vae  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    vae = _diffusers_vae((128, 256, 512, 512), SD['num_res_blocks'])
    x = torch.from_numpy(_input(op, size, nchw=True))
    run = ((lambda: vae.encode(x).latent_dist.mean) if op == 'encode'
           else (lambda: vae.decode(x).sample))
  baseline = _reset_peak()
  out = run()  # Warm-up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  result.update(median_s=statistics.median(times), peak_rss=_peak_mib(baseline),
                out_shape=list(out.shape))
  return result


def _measure(method: str, op: str, size: int, repeats: int) -> dict:
  """Runs `worker` in a subprocess; returns its result or {'error': ...}."""
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', method, op, str(size),
         '--repeats', str(repeats)]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
  lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
  if proc.returncode or not lines:
    sys.stderr.write(proc.stderr[-3000:])
    kind = 'killed, likely out of memory' if proc.returncode == -9 else f'exit {proc.returncode}'
    return dict(error=f'failed ({kind})')
  return json.loads(lines[-1][len('RESULT '):])


def _cell(value, fmt='{:.2f}') -> str:
  return '-' if value is None else fmt.format(value)


def _header(argv: list) -> str:
  with open('/proc/cpuinfo') as f:
    cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '?')
  v = importlib.metadata.version
  cores = f'{os.cpu_count()} logical cores, {len(os.sched_getaffinity(0))} usable'
  return (f'Machine: {cpu}, {cores}. Date: {datetime.datetime.now():%Y-%m-%d %H:%M}. '
          f'jax {v("jax")}, flax {v("flax")}, torch {v("torch")}, '
          f'diffusers {v("diffusers")}.\n\n'
          f'Command: `{shlex.join([os.path.relpath(sys.executable, REPO), *argv])}`\n\n'
          'SD v1 KL-f8 autoencoder, random weights, float32, batch 1, CPU. Size is the image edge '
          'in pixels (decode: a size/8 latent). Median of the timed runs after one warm-up. '
          'Peak RSS: increase of the process peak RSS during warm-up and timed runs, each row in '
          'a fresh process; compile RSS: the same during JAX lower+compile. XLA temp / args+out: '
          '`compiled.memory_analysis()` (args include the weights: 130 MiB encoder, 189 MiB '
          'decoder). Tiled rows use the `decode_tiled` / `encode_tiled` '
          'defaults (64/16 latent, 512/128 px tiles/overlap).\n')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[512, 1024])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--tiled-size', type=int, default=2048, help='0 skips the tiled rows')
  parser.add_argument('--tiled-encode', action='store_true',
                      help='also time encode_tiled of a --tiled-size image (slow)')
  parser.add_argument('--methods', nargs='+', default=['jax', 'torch'], choices=['jax', 'torch'])
  parser.add_argument('--out', help='Also write the table to this Markdown file.')
  parser.add_argument('--json', help='Also write the measurements to this file.')
  parser.add_argument('--worker', nargs=3, metavar=('METHOD', 'OP', 'SIZE'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    method, op, size = args.worker
    print('RESULT ' + json.dumps(worker(method, op, int(size), args.repeats)), flush=True)
    return
  for size in args.sizes + ([args.tiled_size] if args.tiled_size else []):
    if size % 8:
      parser.error(f'size {size} is not divisible by 8')
  jobs = [(m, op, s) for s in args.sizes for op in ('encode', 'decode') for m in args.methods]
  if args.tiled_size and 'jax' in args.methods:
    jobs.append(('jax', 'decode_tiled', args.tiled_size))
    if args.tiled_encode:
      jobs.append(('jax', 'encode_tiled', args.tiled_size))
  names = {'jax': 'JAX', 'torch': 'diffusers (PyTorch)'}
  rows = ['| method | size | compile s | median s | peak RSS MiB | compile RSS MiB | XLA temp MiB '
          '| XLA args+out MiB |', '|---|---:|---:|---:|---:|---:|---:|---:|']
  records = []
  for method, op, size in jobs:
    print(f'running {method} {op} {size} ...', file=sys.stderr, flush=True)
    r = _measure(method, op, size, args.repeats)
    records.append(dict(method=method, op=op, size=size, **r))
    label = f'{names[method]} {op}'
    if 'error' in r:
      rows.append(f'| {label} | {size} | {r["error"]} | | | | | |')
      continue
    rows.append(f'| {label} | {size} | {_cell(r["compile_s"])} | {_cell(r["median_s"], "{:.3f}")} '
                f'| {_cell(r["peak_rss"], "{:.0f}")} | {_cell(r["compile_rss"], "{:.0f}")} '
                f'| {_cell(r["xla_temp"], "{:.0f}")} | {_cell(r["xla_io"], "{:.0f}")} |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(records, f, indent=2)
  text = _header(sys.argv) + '\n' + '\n'.join(rows) + '\n'
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)
  print(text)


if __name__ == '__main__':
  main()
