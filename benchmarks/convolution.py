"""Forward + backward of one 3x3 convolution at the UNet-base levels (batch 2, float32): XLA's
convolution against the same convolution as im2col + one matmul (`conv_as_matmul`, what
config.model.conv_impl='matmul' uses) and as 9 shifted matmuls summed.

  .venv/bin/python benchmarks/convolution.py

GFLOP/s counts 3x the forward FLOPs (the forward and the two backward products).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fmboost_jax.models.layers import conv_as_matmul  # noqa: E402

SAME = ((1, 1), (1, 1))


def conv_xla(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), SAME,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv_im2col(x, w):
  return conv_as_matmul(x, w, (1, 1), SAME)


def conv_nine_matmuls(x, w):
  h, wd = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(jnp.einsum('bhwc,cd->bhwd', xp[:, i:i + h, j:j + wd, :], w[i, j])
             for i in range(3) for j in range(3))


def seconds(conv, x, w, repeats=5):
  step = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(conv(x, w)**2), argnums=(0, 1)))
  jax.block_until_ready(step(x, w))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(x, w))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', help='Also write the measurements to this file.')
  args = parser.parse_args()
  print('| H = W, channels | XLA convolution | im2col + one matmul | 9 shifted matmuls, summed |')
  print('|---|---:|---:|---:|')
  records = []
  for size, channels in [(64, 128), (32, 256), (16, 512), (8, 1024)]:
    x = jax.random.normal(jax.random.key(0), (2, size, size, channels))
    w = jax.random.normal(jax.random.key(1), (3, 3, channels, channels)) * 0.01
    flops = 3 * 2 * 2 * size * size * 9 * channels * channels
    cells = []
    for conv in (conv_xla, conv_im2col, conv_nine_matmuls):
      t = seconds(conv, x, w)
      records.append({'size': size, 'channels': channels, 'method': conv.__name__, 'seconds': t,
                      'gflops': flops / t / 1e9})
      cells.append(f'{t * 1e3:.1f} ms, {flops / t / 1e9:.0f} GFLOP/s')
    print(f'| {size}, {channels} | ' + ' | '.join(cells) + ' |', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(records, f, indent=2)


if __name__ == '__main__':
  main()
