"""The GPU benchmark: UNet-base training against PyTorch, 1024 px boosting, the SD autoencoder.

One script for one GPU (sized to finish in under 8 minutes on an NVIDIA H200), writing one table:

  (a) JAX: `train.train_step` of configs/default.py's UNet-base on the paper's shape (8 x 128 x 128
      inputs: a 4-channel latent concatenated with its 4-channel context) at batch 8 and 32, bf16
      compute with float32 master weights (model.compute_dtype=bfloat16), AOT-compiled, the state
      donated: compile time, seconds per step (median over --repeats runs of --steps steps back to
      back, i.e. pipelined as the training loop runs them, after 2 warm-up steps), samples/s, XLA's
      FLOPs per step (`compiled.cost_analysis()`) and the MFU against a bf16 8192^3 `jnp.dot`
      timed in the same process (the practical peak). The JAX step also updates the EMA weights.
  (b) PyTorch: the same step of the official UNet (benchmarks/torch_unet_step.py, bf16 autocast as
      the official config trains with precision bf16-mixed, cudnn.benchmark) on the same GPU, run
      first in its own process so that JAX does not hold the memory yet: samples/s and the ratio
      JAX / PyTorch.
  (c) Boosting 512 -> 1024 px through the project's own path (`trained_model.Cascade.run` on a
      64 x 64 x 4 latent, as an LCM would make it): PSU (decode at 512 px, bilinear x2, encode at
      1024 px), Euler 40 NFE of UNet-base at 128 x 128, the tiled SD decode, host transfers
      included, compilation excluded; batch 1 and 8, seconds per image (the paper: 0.347 s per
      1024^2 image on an A100, its LCM included).
  (d) The SD autoencoder: `encode` of a 1024 px image and `decode` of its 128 x 128 latent, batch 1,
      float32 and bf16 compute.

All weights are random (speed does not depend on them). Goals, printed next to the numbers: the
UNet-base step at >= 45% MFU in bf16, >= 1.5x the PyTorch step's samples/s, and the 1024 px boost
at <= 0.15 s per image at batch 8. A measurement that fails is a row saying so (the others still
run; the exit status is then 1); measurements that would start after --budget_s seconds are
skipped, so the run fits its lease. The table and the JSON are rewritten after every section.

On the GPU machine (Python 3.12, jax, flax, optax, orbax-checkpoint, diffrax and torch installed,
no network, no ml_collections: its pure-Python wheel travels in benchmarks/wheels), from the repo
root, in one line (about 6 minutes; give it a 9-minute limit):

  python3 -m pip install -q --no-index --no-deps --target /tmp/site benchmarks/wheels/*.whl && PYTHONPATH=/tmp/site python3 benchmarks/accelerator.py --out $OUT/accelerator.md --json $OUT/accelerator.json

`--smoke` runs every part with tiny shapes on the CPU in well under a minute (the tiny UNet of
configs/demo.py:tiny, a 32-channel autoencoder, 2 NFE, PyTorch on the CPU);
tests/test_accelerator_benchmark.py runs it. The library imports neither grain nor dm_pix on this
path (the JSON lists any module the GPU machine lacks that was imported anyway).
"""  # noqa: E501  (the device command above is one line)

import argparse
import datetime
import gc
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

if __name__ == '__main__' and '--smoke' in sys.argv:
  os.environ['JAX_PLATFORMS'] = 'cpu'  # Tiny shapes on the CPU, even on a GPU machine.

import jax
import jax.numpy as jnp
import numpy as np
from common import (
  REPO,
  compile_train_step,
  flops,
  machine,
  peak_flops,
  pipelined_seconds,
  random_params,
  shown_args,
)
from flax import nnx

from configs import default, demo
from fmboost_jax import sharding, trained_model
from fmboost_jax.models import autoencoder, layers

GOAL_MFU = 0.45
GOAL_TORCH_RATIO = 1.5
GOAL_BOOST_SECONDS = 0.15  # Per 1024 px image at batch 8.
PAPER_BOOST_SECONDS = 0.347  # Per 1024^2 image on an A100, the LCM included (the paper).
# Packages the GPU machine does not have: a run there must not import them.
ABSENT_ON_DEVICE = ('grain', 'array_record', 'dm_pix', 'portpicker', 'tensorflow',
                    'tensorflow_datasets', 'clu')

FULL = dict(
    latent=128, train_batches=(8, 32), boost_batches=(1, 8), low_res_latent=64, pixels=1024,
    nfe=40, peak_n=8192, peak_calls=10, steps=5, repeats=3, torch_model='unet_base',
    autoencoder=dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2), budget_s=390)
SMOKE = dict(
    latent=16, train_batches=(2,), boost_batches=(2,), low_res_latent=8, pixels=32,
    nfe=2, peak_n=256, peak_calls=2, steps=2, repeats=2, torch_model='tiny',
    autoencoder=dict(ch=32, ch_mult=(1, 2), num_res_blocks=1), budget_s=float('inf'))
AUTOENCODER_DTYPES = ('float32', 'bfloat16')
CHANNELS = 4  # SD latents.
TORCH_NAME = 'PyTorch train step (bf16-mixed)'


def model_config(smoke: bool, compute_dtype: str):
  """configs/default.py (UNet-base; demo.py:tiny's network for --smoke) with an identity first
  stage and precomputed-latent batches, computing in `compute_dtype` with float32 weights."""
  config = default.get_config()
  if smoke:
    config.model = demo.get_config('tiny').model
  config.model.compute_dtype = compute_dtype
  config.first_stage.name = 'identity'
  config.data.source = 'latents'
  return config


_AUTOENCODER_PARAMS = {}  # The random weights by autoencoder shape, shared by all compute dtypes.


def random_autoencoder(shapes: dict, compute_dtype: str) -> autoencoder.AutoencoderKL:
  """The SD KL-f8 autoencoder of `shapes` with random weights, computing in `compute_dtype`."""
  fs = default.get_config().first_stage
  fs.update(shapes['autoencoder'])
  fs.compute_dtype = compute_dtype
  abstract = layers.abstract(autoencoder.autoencoder_from_config, fs)
  key = json.dumps(shapes['autoencoder'])
  if key not in _AUTOENCODER_PARAMS:
    _AUTOENCODER_PARAMS[key] = random_params(abstract, seed=2)
  return nnx.merge(nnx.graphdef(abstract), _AUTOENCODER_PARAMS[key])


def random_unet(config) -> dict:
  """Random weights of `config.model` on SD latents, as the pure dict a train state holds."""
  abstract = layers.abstract(trained_model.network, config, CHANNELS)
  return nnx.to_pure_dict(random_params(abstract, seed=3))


def normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def row(part: str, name: str, batch: int, **fields) -> dict:
  r = dict(part=part, name=name, batch=batch, status='ok', compile_seconds=None, seconds=None,
           samples_per_second=None, seconds_per_sample=None, flops=None, mfu=None, goal='',
           met=None)
  r.update(fields)
  return r


# ------------------------------------------------------------------------------------- parts


def torch_row(shapes: dict, smoke: bool, batch: int) -> dict:
  """(b) at one batch size: benchmarks/torch_unet_step.py in a process of its own."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'torch.json')
    command = [sys.executable, os.path.join(REPO, 'benchmarks', 'torch_unet_step.py'),
               f'--model={shapes["torch_model"]}', f'--batch={batch}', f'--size={shapes["latent"]}',
               f'--device={"cpu" if smoke else "cuda"}', '--precision=bf16-mixed', '--pipelined',
               f'--steps={shapes["steps"]}', f'--repeats={shapes["repeats"]}', f'--json={out}']
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180,
                          check=False)
    if proc.returncode:
      sys.stderr.write(proc.stderr[-3000:])
      last = (proc.stderr.strip().splitlines() or [f'exit {proc.returncode}'])[-1]
      raise RuntimeError(f'torch_unet_step.py: {last}')
    with open(out) as f:
      r = json.load(f)
  seconds = r['step_seconds_median']
  return row('b', TORCH_NAME, batch, seconds=seconds, samples_per_second=batch / seconds,
             seconds_per_sample=seconds / batch, process_seconds=time.perf_counter() - t0,
             torch=r)


def peak(shapes: dict) -> dict:
  n = shapes['peak_n']
  rate = peak_flops(n, repeats=5, dtype='bfloat16', calls=shapes['peak_calls'])
  return {'n': n, 'dtype': 'bfloat16', 'flops_per_second': rate,
          'seconds': 2 * n**3 / rate}


def train_row(shapes: dict, smoke: bool, batch: int, peak_rate: float) -> dict:
  """(a) at one batch size."""
  config = model_config(smoke, 'bfloat16')
  config.data.batch_size = batch
  shape = (batch, shapes['latent'], shapes['latent'], CHANNELS)
  data = {'x1': normal(10, shape), 'x_up': normal(11, shape)}
  compiled = compile_train_step(config, CHANNELS, data, params=random_unet(config))
  step, fs_params = compiled['step'], compiled['first_stage_params']
  held = {'state': compiled['state']}

  def run():
    held['state'], measurements = step(held['state'], data, fs_params)
    return measurements

  jax.block_until_ready([run() for _ in range(2)])  # Warm-up.
  times = pipelined_seconds(run, shapes['steps'], shapes['repeats'])
  loss = float(run()['loss'])
  seconds = statistics.median(times)
  xla_flops, unoptimised = flops_or_none(step), flops_or_none(compiled['lowered'])
  params = sum(x.size for x in jax.tree.leaves(held['state'].params))
  mfu = None if xla_flops is None else xla_flops / seconds / peak_rate
  return row('a', 'JAX train step (bf16)', batch, compile_seconds=compiled['compile_seconds'],
             seconds=seconds, samples_per_second=batch / seconds,
             seconds_per_sample=seconds / batch,
             flops=xla_flops, mfu=mfu, goal=f'MFU >= {GOAL_MFU:.0%}',
             met=None if mfu is None else mfu >= GOAL_MFU,
             seconds_min=min(times), seconds_max=max(times), loss=loss, parameters=int(params),
             unoptimised_flops=unoptimised,
             unoptimised_mfu=None if unoptimised is None else unoptimised / seconds / peak_rate)


def flops_or_none(compiled_or_lowered) -> float | None:
  """XLA's FLOP count, or None where the backend gives none."""
  try:
    return flops(compiled_or_lowered)
  except Exception:  # noqa: BLE001  (an estimate; a missing one must not lose the row)
    return None


def boost_rows(shapes: dict, smoke: bool):
  """(c): a Cascade of one random UNet and the random autoencoder; yields (name, batch, a function
  that measures that batch)."""
  config = model_config(smoke, 'bfloat16')
  config.first_stage.name = 'sd_vae'
  config.first_stage.update(shapes['autoencoder'])
  config.first_stage.compute_dtype = 'bfloat16'
  config.sample.solver, config.sample.nfe = 'euler', shapes['nfe']
  model = trained_model.TrainedModel(
      path='random weights', step=0, config=config, sample=config.sample,
      first_stage=random_autoencoder(shapes, 'bfloat16'),
      graphdef=trained_model.model_graphdef(config, CHANNELS), params=random_unet(config),
      mesh=sharding.data_mesh())
  cascade = trained_model.Cascade([model])
  for b in shapes['boost_batches']:
    yield boost_name(shapes), b, lambda b=b: _boost_row(cascade, shapes, b, boost_name(shapes))


def boost_name(shapes: dict) -> str:
  return f'boost: PSU + Euler {shapes["nfe"]} NFE + tiled decode (bf16)'


def _boost_row(cascade: trained_model.Cascade, shapes: dict, batch: int, name: str) -> dict:
  s = shapes['low_res_latent']
  latents = np.asarray(normal(20 + batch, (batch, s, s, CHANNELS)))
  before = cascade.compile_seconds
  first = cascade.run(latents, 'latent', jax.random.key(0))  # Compiles.
  compile_seconds = cascade.compile_seconds - before
  times = [cascade.run(latents, 'latent', jax.random.key(i)).seconds
           for i in range(1, shapes['repeats'] + 1)]
  seconds = statistics.median(times)
  per_image = seconds / batch
  goal = met = None
  if batch == max(shapes['boost_batches']):
    goal, met = f'<= {GOAL_BOOST_SECONDS} s / image', per_image <= GOAL_BOOST_SECONDS
  return row('c', name, batch, compile_seconds=compile_seconds, seconds=seconds,
             samples_per_second=batch / seconds, seconds_per_sample=per_image, goal=goal or '',
             met=met, seconds_min=min(times), seconds_max=max(times),
             output_shape=list(first.images.shape), nfe=int(first.nfe[0][0]),
             finite=bool(np.isfinite(first.images).all()))


def autoencoder_rows(shapes: dict):
  """(d): encode and decode at `pixels` px, batch 1, per compute dtype; yields (name, batch, a
  function that measures it)."""
  for dtype in AUTOENCODER_DTYPES:
    for op in ('encode', 'decode'):
      yield (autoencoder_name(shapes, op, dtype), 1,
             lambda dtype=dtype, op=op: _autoencoder_row(shapes, dtype, op))


def autoencoder_name(shapes: dict, op: str, dtype: str) -> str:
  return f'SD {op} {shapes["pixels"]} px ({dtype})'


def _autoencoder_row(shapes: dict, dtype: str, op: str) -> dict:
  model = random_autoencoder(shapes, dtype)
  graphdef, state = nnx.split(model)
  p = shapes['pixels']
  x = (normal(30, (1, p, p, 3)) if op == 'encode' else
       normal(31, (1, p // model.factor, p // model.factor, model.channels)))
  t0 = time.perf_counter()
  compiled = jax.jit(lambda s, v: getattr(nnx.merge(graphdef, s), op)(v)).lower(state, x).compile()
  compile_seconds = time.perf_counter() - t0
  out = jax.block_until_ready(compiled(state, x))
  times = pipelined_seconds(lambda: compiled(state, x), 1, max(5, shapes['repeats']))
  seconds = statistics.median(times)
  return row('d', autoencoder_name(shapes, op, dtype), 1, compile_seconds=compile_seconds,
             seconds=seconds, samples_per_second=1 / seconds, seconds_per_sample=seconds,
             flops=flops_or_none(compiled), output_shape=list(out.shape),
             finite=bool(jnp.isfinite(out).all()))


# ------------------------------------------------------------------------------------ report


def _cell(value, fmt: str) -> str:
  return '-' if value is None else fmt.format(value)


def render(results: dict) -> str:
  shapes, rows = results['shapes'], results['rows']
  p = results.get('peak') or {}
  jax_rate = {r['batch']: r['samples_per_second'] for r in rows
              if r['part'] == 'a' and r['status'] == 'ok'}
  for r in rows:  # (b)'s goal: JAX / PyTorch samples/s at the same batch.
    if r['part'] == 'b' and r['status'] == 'ok' and r['batch'] in jax_rate:
      r['ratio'] = jax_rate[r['batch']] / r['samples_per_second']
      r['goal'] = f'JAX / PyTorch = {r["ratio"]:.2f}x (goal >= {GOAL_TORCH_RATIO}x)'
      r['met'] = r['ratio'] >= GOAL_TORCH_RATIO
  lines = [
      f'# Accelerator benchmark ({results["date"]}){" - smoke run" if results["smoke"] else ""}',
      '', f'`{results["command"]}`', '', f'Machine: {results.get("machine", "?")}.', '',
      f'Peak: a {p.get("n", "?")}^3 bf16 `jnp.dot` ran at '
      f'{_cell(p.get("flops_per_second"), "{:.4g}")} FLOP/s here (median of 5 runs); MFU = XLA '
      "FLOPs of the compiled step / step time / this peak. UNet: "
      f'{"configs/demo.py:tiny" if results["smoke"] else "UNet-base (configs/default.py)"} on '
      f'{2 * CHANNELS} x {shapes["latent"]} x {shapes["latent"]} inputs; step times are the '
      f'median over {shapes["repeats"]} runs of {shapes["steps"]} pipelined steps. Boost: a '
      f'{shapes["low_res_latent"]}^2 x {CHANNELS} latent to a {shapes["pixels"]} px image by '
      f'`trained_model.Cascade.run` (PSU, Euler {shapes["nfe"]} NFE, tiled decode, host '
      'transfers; compilation excluded); the paper: '
      f'{PAPER_BOOST_SECONDS} s per 1024 px image on an A100 with its LCM. Random weights.', '',
      '| part | measurement | batch | compile s | s / call | samples / s | s / sample '
      '| GFLOP / call | MFU | goal |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---|']
  notes = []
  for r in sorted(rows, key=lambda r: r['part']):
    goal = r['goal']
    if r['status'] != 'ok':
      goal = r['status']
    elif r['met'] is not None:
      goal = f'{goal}: {"met" if r["met"] else "NOT met"}'
    lines.append(
        f'| {r["part"]} | {r["name"]} | {r["batch"]} | {_cell(r["compile_seconds"], "{:.1f}")} '
        f'| {_cell(r["seconds"], "{:.4f}")} | {_cell(r["samples_per_second"], "{:.2f}")} '
        f'| {_cell(r["seconds_per_sample"], "{:.4f}")} '
        f'| {_cell(None if r["flops"] is None else r["flops"] / 1e9, "{:.4g}")} '
        f'| {_cell(r["mfu"], "{:.1%}")} | {goal} |')
    u = r.get('unoptimised_flops')
    if r['flops'] and u and abs(u / r['flops'] - 1) > 0.1:
      notes.append(f'- {r["name"]}, batch {r["batch"]}: XLA counts {r["flops"] / 1e9:.4g} GFLOP '
                   f'in the compiled step but {u / 1e9:.4g} before its optimisations (MFU '
                   f'{r["unoptimised_mfu"]:.1%} by that count).')
  if notes:
    lines += ['', *notes]
  lines += ['', f'Total {results["elapsed_seconds"]:.0f} s.']
  return '\n'.join(lines) + '\n'


def write(results: dict, args) -> str:
  text = render(results)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2, default=str)
  return text


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true',
                      help='Tiny shapes on the CPU (seconds), for tests.')
  parser.add_argument('--parts', default='abcd', help='Which of (a)-(d) to run, e.g. ac.')
  parser.add_argument('--budget_s', type=float,
                      help='Start no measurement after this many seconds (default 390; none in '
                      'smoke runs).')
  parser.add_argument('--out', help='Also write the Markdown table to this file.')
  parser.add_argument('--json', help='Also write the measurements to this file.')
  args = parser.parse_args()
  shapes = dict(SMOKE if args.smoke else FULL)
  budget = shapes.pop('budget_s') if args.budget_s is None else args.budget_s
  start = time.perf_counter()
  results = {
      'smoke': args.smoke, 'date': f'{datetime.datetime.now():%Y-%m-%d %H:%M}',
      'command': shlex.join(['python', 'benchmarks/accelerator.py', *shown_args()]),
      'shapes': shapes, 'peak': None, 'rows': [], 'failed': 0, 'elapsed_seconds': 0.0}

  def record(new_rows: list[dict]) -> None:
    for r in new_rows:
      results['rows'].append(r)
      results['failed'] += r['status'].startswith('failed')
      print(f'[{time.perf_counter() - start:6.1f} s] ({r["part"]}) {r["name"]}, batch '
            f'{r["batch"]}: {r["status"]}, {_cell(r["seconds"], "{:.4f}")} s / call', flush=True)
    results['elapsed_seconds'] = time.perf_counter() - start
    write(results, args)

  def measure(part: str, name: str, batch: int, fn) -> dict:
    """One measurement, or a row saying why there is none."""
    if time.perf_counter() - start > budget:
      return row(part, name, batch, status=f'skipped (past the {budget:.0f} s budget)')
    try:
      return fn()
    except Exception as e:  # noqa: BLE001  (one failed measurement must not lose the others)
      traceback.print_exc()
      return row(part, name, batch, status=f'failed: {type(e).__name__}: {str(e)[:200]}')

  # PyTorch first, before JAX takes the accelerator's memory.
  for b in shapes['train_batches'] if 'b' in args.parts else ():
    if importlib.util.find_spec('torch') is None:
      record([row('b', TORCH_NAME, b, status='skipped (torch is not installed)')])
    else:
      record([measure('b', TORCH_NAME, b, lambda b=b: torch_row(shapes, args.smoke, b))])
  device = jax.devices()[0]
  results['machine'] = machine(f'{jax.device_count()} x {device.device_kind} '
                               f'({jax.default_backend()})')
  results['peak'] = peak(shapes)
  record([])
  if 'a' in args.parts:
    for b in shapes['train_batches']:
      record([measure('a', 'JAX train step (bf16)', b,
                      lambda b=b: train_row(shapes, args.smoke, b,
                                            results['peak']['flops_per_second']))])
      gc.collect()
  if 'c' in args.parts:
    try:
      for name, b, fn in boost_rows(shapes, args.smoke):
        record([measure('c', name, b, fn)])
    except Exception as e:  # noqa: BLE001  (building the models failed: no boost rows)
      traceback.print_exc()
      record([row('c', boost_name(shapes), b, status=f'failed: {type(e).__name__}: '
                  f'{str(e)[:200]}') for b in shapes['boost_batches']])
    gc.collect()
  if 'd' in args.parts:
    for name, b, fn in autoencoder_rows(shapes):
      record([measure('d', name, b, fn)])
  results['imported_but_absent_on_device'] = sorted(
      {m.split('.')[0] for m in sys.modules} & set(ABSENT_ON_DEVICE))
  results['elapsed_seconds'] = time.perf_counter() - start
  print(write(results, args), flush=True)
  sys.exit(1 if results['failed'] else 0)


if __name__ == '__main__':
  main()
