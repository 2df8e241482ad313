"""Runs every benchmark and writes the tables into benchmarks/results.md and docs/benchmarks.md.

  .venv/bin/python benchmarks/run.py                  # everything, about 2 hours on 2 cores
  .venv/bin/python benchmarks/run.py --only train     # some parts: train torch_reference solver
                                                      #   demo_sampling autoencoder convolution
                                                      #   input_pipeline compile_targets

Each measurement runs in its own process (train_step.py, torch_unet_step.py, solver.py, sampling.py,
autoencoder.py, convolution.py, input_pipeline.py, compile_targets.py; see their docstrings), one
after the other: run it on a quiet machine, nothing else using the cores. The text between the
`benchmarks/run.py` markers in results.md and docs/benchmarks.md is replaced; everything outside
them (the optimisation log, the analysis) is left as it is. With --only, the parts not run keep the
numbers of the previous run (kept in benchmarks/results.json); --render rewrites the tables from
that file without measuring. The demo sampling rows need the README demo's checkpoint in
--demo_workdir; without one the demo is trained first (about 6 minutes).
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from common import REPO, machine
from input_pipeline import LATENTS_TARGET
from input_pipeline import tables as input_pipeline_tables

BENCH = os.path.join(REPO, 'benchmarks')
RESULTS_MD = os.path.join(BENCH, 'results.md')
RESULTS_JSON = os.path.join(BENCH, 'results.json')
SUMMARY_MD = os.path.join(REPO, 'docs', 'benchmarks.md')
BEGIN = '<!-- benchmarks/run.py: begin (generated; edit outside the markers) -->'
END = '<!-- benchmarks/run.py: end -->'

OFFICIAL_STEP_SECONDS = 9.05  # Official PyTorch UNet-base step, batch 2, 2-core CPU (issue 7).
# UNet-base at batch 2 on 64x64 latents (512 px), the setting of the official measurement.
UNET_BASE = ['--config=configs/default.py', '--config.data.batch_size=2',
             '--config.data.high_res_size=512', '--steps=5']
DEMO = ['--config=configs/demo.py', '--steps=20']
# (row name, arguments, whether its FLOPs count the model's work: XLA convolutions, no im2col).
TRAIN = [
    ('UNet-base, default (`auto`: float32, matmul convolutions on CPUs)', UNET_BASE, False),
    ('UNet-base, XLA convolutions', [*UNET_BASE, '--config.model.conv_impl=xla'], True),
    ('UNet-base, bf16 compute', [*UNET_BASE, '--config.model.compute_dtype=bfloat16'], False),
    ('UNet-base, `remat=full`', [*UNET_BASE, '--config.model.remat=full'], False),
    ('UNet-base, `remat=dots`', [*UNET_BASE, '--config.model.remat=dots'], False),
    ('demo (XLA convolutions)', DEMO, True),
    ('demo, `conv_impl=matmul`', [*DEMO, '--config.model.conv_impl=matmul'], False),
]
SOLVER_BASE = ['--config.sample.batch_size=1']
SOLVER = [
    ('Euler, 40 NFE', ['--config.data.high_res_size=512', '--config.sample.nfe=40']),
    ('Euler, 40 NFE', ['--config.data.high_res_size=1024', '--config.sample.nfe=40']),
    ('Dopri5, rtol 1e-2, atol 1e-3',
     ['--config.data.high_res_size=512', '--config.sample.solver=dopri5',
      '--config.sample.rtol=1e-2', '--config.sample.atol=1e-3']),
    ('Dopri5, rtol 1e-3, atol 1e-5',
     ['--config.data.high_res_size=512', '--config.sample.solver=dopri5',
      '--config.sample.rtol=1e-3', '--config.sample.atol=1e-5']),
]
AUTOENCODER_REPEATS = 3
AUTOENCODER = [['--sizes', size, '--repeats', str(AUTOENCODER_REPEATS)] for size in ('512', '1024')]
PARTS = ('train', 'torch_reference', 'solver', 'demo_sampling', 'autoencoder', 'convolution',
         'input_pipeline', 'compile_targets')


def _run(script: str, args: list[str]) -> dict | list:
  """Runs benchmarks/SCRIPT with ARGS and --json; returns what it wrote."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'out.json')
    command = [sys.executable, os.path.join(BENCH, script), *args, '--json', path]
    print('$', shlex.join(command), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode or not os.path.exists(path):
      sys.exit(f'{script} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
    print(f'  done in {time.perf_counter() - t0:.0f} s', flush=True)
    with open(path) as f:
      return json.load(f)


def measure(parts: list[str], demo_workdir: str) -> dict:
  results = {}
  if 'train' in parts:
    results['train'] = [
        dict(name=name, args=args, counts_work=work,
             model='unet_base' if args[0] == UNET_BASE[0] else 'demo',
             default=args in (UNET_BASE, DEMO), **_run('train_step.py', args))
        for name, args, work in TRAIN]
  if 'torch_reference' in parts:
    results['torch_reference'] = _run('torch_unet_step.py', ['--steps=5'])
  if 'solver' in parts:
    results['solver'] = [dict(name=name, args=args, **_run('solver.py', [*SOLVER_BASE, *args]))
                         for name, args in SOLVER]
  if 'demo_sampling' in parts:
    if not os.path.isdir(os.path.join(REPO, demo_workdir, 'checkpoints')):
      print(f'No checkpoint in {demo_workdir}: training the README demo first.', flush=True)
      if subprocess.run([sys.executable, 'main.py', '--config=configs/demo.py',
                         f'--workdir={demo_workdir}'], cwd=REPO, check=False).returncode:
        sys.exit(f'training the demo into {demo_workdir} failed (its error is above).')
    results['demo_sampling'] = _run('sampling.py', [f'--workdir={demo_workdir}',
                                                    '--input_size=64'])
  if 'autoencoder' in parts:
    results['autoencoder'] = [r for args in AUTOENCODER
                              for r in _run('autoencoder.py', [*args, '--tiled-size', '0'])]
  if 'convolution' in parts:
    results['convolution'] = _run('convolution.py', [])
  if 'input_pipeline' in parts:
    results['input_pipeline'] = _run('input_pipeline.py', [])
  if 'compile_targets' in parts:
    results['compile_targets'] = _run('compile_targets.py', [])
  return results


# ----------------------------------------------------------------------------- tables


def _f(value, fmt='{:.2f}') -> str:
  return '–' if value is None else fmt.format(value)


def train_table(rows: list[dict]) -> tuple[list[str], dict]:
  """The training-step table; GFLOP/s count the model's work (the XLA-convolution step's FLOPs)."""
  model_flops = {r['model']: r['flops_per_step'] for r in rows if r['counts_work']}
  lines = ['| step | batch | compile s | median s / step (min–max) | samples / s | GFLOP / step '
           '| GFLOP/s | of peak | dispatch ms | pipelined s / step | XLA temp MiB '
           '| state + batch MiB | peak RSS MiB |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    work = model_flops.get(r['model'], r['flops_per_step'])
    rate = work / r['step_seconds_median']
    lines.append(
        f"| {r['name']} | {r['batch_size']} | {r['compile_seconds']:.1f} | "
        f"{r['step_seconds_median']:.3f} ({r['step_seconds_min']:.3f}–{r['step_seconds_max']:.3f}) "
        f"| {r['samples_per_second']:.2f} | {work / 1e9:.1f} | {rate / 1e9:.0f} | "
        f"{rate / (r['peak_gflops'] * 1e9):.0%} | {r['dispatch_ms_median']:.2f} | "
        f"{r['pipelined_seconds']:.3f} | "
        f"{r['temp_mib']:.0f} | {r['argument_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
  unet = [r for r in rows if r['model'] == 'unet_base']
  # The goal is stated for the default step, in float32 on CPUs, against the float32 peak.
  default = next(r for r in unet if r['default'])
  rate = model_flops['unet_base'] / default['step_seconds_median'] / (default['peak_gflops'] * 1e9)
  summary = dict(default=default, default_fraction=rate,
                 peak_gflops=sorted(r['peak_gflops'] for r in rows)[len(rows) // 2],
                 max_compile=max(r['compile_seconds'] for r in unet),
                 model_flops=model_flops)
  return lines, summary


def model_flops_rate(train_summary: dict, row: dict) -> float:
  """GFLOP/s of a UNet-base step row, counting the model's work as the XLA step does."""
  return train_summary['model_flops']['unet_base'] / row['step_seconds_median'] / 1e9


def solver_table(rows: list[dict], train_summary: dict | None) -> tuple[list[str], list[str]]:
  """UNet-base sampling rows and, per row, the forward time the training step implies."""
  implied = None
  if train_summary:  # The default step's achieved rate applied to one forward pass, both FLOP
    step = train_summary['default']  # counts of the same (default) formulation.
    rate = step['flops_per_step'] / step['step_seconds_median']
    implied = lambda r: r['forward_flops'] / rate  # noqa: E731
  lines = ['| solver | latent | NFE | s / image | s / NFE | forward s | s / NFE ÷ forward | '
           'forward implied by the train step s | compile s | XLA temp MiB | peak RSS MiB |',
           '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  notes = []
  for r in rows:
    fwd_implied = implied(r) if implied else None
    lines.append(
        f"| {r['name']} | {r['size']}² | {r['nfe']}{'' if r['ok'] else ' (not ok)'} | "
        f"{r['seconds_per_image']:.2f} | {r['seconds_per_nfe']:.3f} | {r['forward_seconds']:.3f} "
        f"| {r['per_nfe_over_forward']:.2f} | {_f(fwd_implied, '{:.3f}')} | "
        f"{r['compile_seconds']:.1f} | {r['temp_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
    if fwd_implied:
      notes.append(r['seconds_per_nfe'] / fwd_implied)
  return lines, notes


def demo_sampling_table(result: dict) -> list[str]:
  lines = [result['setup'], '', '| solver | setting | mean NFE | s / image | compile s | '
           'peak RSS MiB |', '|---|---|---:|---:|---:|---:|']
  for r in result['rows']:
    lines.append(f"| {r['solver']} | {r['setting']} | {r['nfe']:.1f} | "
                 f"{r['seconds_per_image']:.3f} | {r['compile_seconds']:.1f} | "
                 f"{r['peak_rss_mib']:.0f} |")
  return lines


def autoencoder_table(rows: list[dict]) -> tuple[list[str], list[float]]:
  by = {(r['method'], r['op'], r['size']): r for r in rows}
  lines = ['| operation | JAX s | diffusers s | JAX ÷ diffusers | JAX peak RSS MiB | diffusers '
           'peak RSS MiB | JAX compile s | JAX XLA temp MiB |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  ratios = []
  for (method, op, size), j in by.items():
    if method != 'jax':
      continue
    t = by.get(('torch', op, size), {})
    what = f'encode {size} px' if op == 'encode' else f'decode {size // 8}² latent ({size} px)'
    if 'error' in j or 'error' in t:
      lines.append(f"| {what} | {j.get('error', '')} | {t.get('error', '')} | | | | | |")
      continue
    ratio = j['median_s'] / t['median_s'] if t else None
    if ratio:
      ratios.append(ratio)
    lines.append(f"| {what} | {j['median_s']:.2f} | {_f(t.get('median_s'))} | "
                 f"{_f(ratio)} | {j['peak_rss']:.0f} | {_f(t.get('peak_rss'), '{:.0f}')} | "
                 f"{_f(j['compile_s'])} | {_f(j['xla_temp'], '{:.0f}')} |")
  return lines, ratios


def convolution_table(rows: list[dict]) -> list[str]:
  lines = ['| H = W, channels | XLA convolution | im2col + one matmul '
           '| 9 shifted matmuls, summed |',
           '|---|---:|---:|---:|']
  shapes = sorted({(r['size'], r['channels']) for r in rows}, key=lambda s: s[1])
  for size, channels in shapes:
    cells = [f"{r['seconds'] * 1e3:.1f} ms, {r['gflops']:.0f} GFLOP/s" for r in rows
             if (r['size'], r['channels']) == (size, channels)]
    lines.append(f'| {size}, {channels} | ' + ' | '.join(cells) + ' |')
  return lines


def render(results: dict) -> tuple[str, str]:
  """(results.md block, README block)."""
  full, short, goals = [f"Machine: {results['machine']}.", ''], [], []
  train_summary = None
  if 'train' in results:
    lines, train_summary = train_table(results['train'])
    default = train_summary['default']
    torch_ref = results.get('torch_reference')
    official = torch_ref['step_seconds_median'] if torch_ref else OFFICIAL_STEP_SECONDS
    where = ('measured in the same run by benchmarks/torch_unet_step.py' if torch_ref else
             'measured on a 2-core machine like this (issue 7)')
    speedup = official / default['step_seconds_median']
    goals.append(
        '- Training step, the default UNet-base at batch 2 on 8×64×64 inputs: '
        f"**{default['step_seconds_median']:.2f} s** against {official:.2f} s for the official "
        f'PyTorch step ({where}): **{speedup:.2f}x faster**, at '
        f"**{train_summary['default_fraction']:.0%}** of the float32 peak measured in the same "
        f"process (goal: at least 1.5x faster: {'met' if speedup >= 1.5 else 'missed'}).")
    goals.append(f"- Compile time of the UNet-base step: at most "
                 f"{train_summary['max_compile']:.1f} s (goal: under a minute: "
                 f"{'met' if train_summary['max_compile'] < 60 else 'missed'}).")
    section = ['### Training step (forward, backward, Adam, EMA)', '',
               '`benchmarks/train_step.py` with `--config` flags as main.py takes them (each row '
               'names what differs from the config file), float32 unless said, one CPU device, '
               'AOT-compiled, '
               'median over 5 steps after 2 warm-up steps (UNet-base) or 20 (demo). The peak is a '
               f"4096³ float32 `jnp.dot` in the same process ({train_summary['peak_gflops']:.0f} "
               'GFLOP/s, median over the rows). GFLOP/s count the model\'s work: the FLOPs XLA '
               'reports for the step with XLA convolutions (the matmul formulation adds im2col '
               'copies XLA also counts). Dispatch: host time until the step call returns (it runs '
               'asynchronously); pipelined: time per step of 5 (20) steps run back to back without '
               'waiting, as the training loop runs them. State + batch: XLA\'s argument buffers '
               '(parameters, Adam moments, EMA).', '', *lines, '']
    if 'torch_reference' in results:
      t = results['torch_reference']
      section += [
          f"The official step in PyTorch ({t['torch']}, {t['threads']} threads; "
          '`benchmarks/torch_unet_step.py`: the official UNet-base, '
          f"{t['parameters']:,} parameters; forward, loss, backward, Adam, no EMA) on this "
          f"machine: median **{t['step_seconds_median']:.2f} s** ({t['step_seconds_min']:.2f}–"
          f"{t['step_seconds_max']:.2f}), {model_flops_rate(train_summary, t):.0f} GFLOP/s, peak "
          f"RSS {t['peak_rss_mib']:.0f} MiB.", '']
    full += section
    short += section
  if 'solver' in results:
    lines, ratios = solver_table(results['solver'], train_summary)
    if ratios:
      goals.append(
          f"- Sampling per network evaluation, UNet-base: {min(ratios):.2f}–{max(ratios):.2f}x "
          'the forward time the training step implies (goal: at most 1x: '
          f"{'met' if max(ratios) <= 1.0 else 'missed'}).")
    section = ['### Sampling with UNet-base', '',
               '`benchmarks/solver.py`: the sampler of `main.py --mode=sample` (the objective\'s '
               '`source` + `sampling.solve`) on SD latents, batch 1, the default (`auto`) settings,'
               ' random weights with a randomly initialised output layer (so the Dopri5 NFE show '
               'the solver on a generic field, not a trained one: the demo rows show that). '
               'Forward s: the network alone at the same size and batch. The implied forward is '
               'the row\'s forward FLOPs at the training step\'s achieved FLOP rate.', '',
               *lines, '']
    full += section
    short += section
  if 'demo_sampling' in results:
    section = ['### Sampling with the demo checkpoint (`main.py --mode=sample`)', '',
               *demo_sampling_table(results['demo_sampling']), '']
    full += section
    short += section
  if 'autoencoder' in results:
    lines, ratios = autoencoder_table(results['autoencoder'])
    if ratios:
      goals.append(f"- Autoencoder: JAX takes {min(ratios):.2f}–{max(ratios):.2f}x the time of "
                   "diffusers' PyTorch AutoencoderKL (goal: at most 1x: "
                   f"{'met' if max(ratios) <= 1.0 else 'missed'}).")
    section = ['### Autoencoder (SD v1 KL-f8) against diffusers', '',
               '`benchmarks/autoencoder.py`: random weights, float32, batch 1, every operation in '
               f'a fresh process; median of {AUTOENCODER_REPEATS} runs after a warm-up; '
               'peak RSS is the increase during the runs.', '', *lines, '']
    full += section
    short += section
  if 'convolution' in results:
    full += ['### One 3×3 convolution, forward + backward (batch 2, float32)', '',
             '`benchmarks/convolution.py`; GFLOP/s count 3x the forward FLOPs.', '',
             *convolution_table(results['convolution']), '']
  if 'input_pipeline' in results:
    pipeline = results['input_pipeline']
    latents, jpeg = pipeline.get('latents'), pipeline.get('jpeg')
    if latents:
      best = latents['best']
      setting = (f"{best['num_workers']} worker processes" if best['num_workers'] else
                 f"num_threads={best['num_threads']}")
      shape = '×'.join(map(str, latents['setup']['shape']))
      goals.append(
          f"- Input pipeline, precomputed {shape} latents: **{best['samples_per_second']:.0f} "
          f"samples/s** at best ({setting}, batch {latents['setup']['batch_size']}, page cache "
          f"warm) (goal: at least "
          f"{LATENTS_TARGET:,} on this machine: {'met' if latents['target_met'] else 'missed'})" +
          (f"; {jpeg['setup']['size']} px JPEGs: {jpeg['best_images_per_core']:.0f} images per "
           f"CPU second, {jpeg['cores_per_gpu']:.1f} cores per GPU at 150 samples/s."
           if jpeg else '.'))
    full += ['### Input pipeline (training batches on the CPU)', '',
             '`benchmarks/input_pipeline.py`: `input_pipeline.create_train_iterator` on synthetic '
             'precomputed latents and JPEGs, the storage formats of the latents, and one huge '
             f"PNG (`{pipeline['command']}`, {pipeline['minutes']:.1f} minutes, load average "
             f"{pipeline['loadavg_start'][0]:.2f} at the start).", '',
             *input_pipeline_tables(pipeline).splitlines(), '']
  if 'compile_targets' in results:
    targets = results['compile_targets']
    section = ['### What fits where: UNet-base compiled for TPUs and GPUs', '',
               '`benchmarks/compile_targets.py`: `main.py --mode=compile` of configs/default.py '
               'training from precomputed 128²×4 latents (no held-out evaluation), `auto` settings '
               '(bfloat16 compute, float32 state), compiled on this CPU machine by XLA\'s TPU '
               'compiler (libtpu 0.0.42.1) and GPU compiler (jax-cuda13-plugin 0.10.2, deviceless, '
               f"the target configs in fmboost_jax/gpu_targets) ({targets['minutes']:.0f} "
               'minutes). Per device: state = parameters, Adam moments and EMA by the arithmetic '
               'of their shardings; temporaries and total (arguments + outputs not aliased + '
               'temporaries + code) from `memory_analysis()`; step at peak = the step\'s FLOPs '
               'per device at the dense bf16 peak (a lower bound); MFU for 150 samples/s per '
               'device = what that throughput would need. XLA\'s TPU compiler trades compute '
               'for memory (rematerialisation) when memory is short, so the TPU temporaries need '
               'not grow with the batch.', '', *targets['table'],
               '', *targets['largest_batches'], '']
    full += section
    short += section
  only = '' if set(results['parts']) == set(PARTS) else f" --only {' '.join(results['parts'])}"
  when = ', '.join(f'{part} {stamp}' for part, stamp in results['measured'].items())
  head = [f"Command: `.venv/bin/python benchmarks/run.py{only}` ({results['minutes']:.0f} minutes)."
          f' Measured: {when}.', '',
          *(['**Goals**', '', *goals, ''] if goals else [])]
  return ('\n'.join([*full[:2], *head, *full[2:]]).rstrip() + '\n',
          '\n'.join([*full[:2], *head, *short]).rstrip() + '\n')


def replace_block(path: str, block: str) -> None:
  with open(path) as f:
    text = f.read()
  if BEGIN not in text or END not in text:
    sys.exit(f'{path} has no {BEGIN} ... {END} markers; add them where the tables belong.')
  start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
  with open(path, 'w') as f:
    f.write(text[:start] + '\n' + block + text[end:])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', nargs='+', choices=PARTS, default=list(PARTS))
  parser.add_argument('--demo_workdir', default='workdirs/demo')
  parser.add_argument('--render', action='store_true',
                      help='Measure nothing: rewrite the tables from benchmarks/results.json.')
  args = parser.parse_args()
  results = {}
  if os.path.exists(RESULTS_JSON) and (args.render or set(args.only) != set(PARTS)):
    with open(RESULTS_JSON) as f:
      results = json.load(f)
  elif args.render:
    sys.exit(f'--render needs {RESULTS_JSON} from an earlier run; run without --render first.')
  if not args.render:
    t0 = time.perf_counter()
    results.update(measure(args.only, args.demo_workdir))
    stamp = f'{datetime.datetime.now():%Y-%m-%d %H:%M}'
    results.setdefault('measured', {}).update({part: stamp for part in args.only})
    results.update(machine=machine(), minutes=(time.perf_counter() - t0) / 60, parts=args.only)
    with open(RESULTS_JSON, 'w') as f:
      json.dump(results, f, indent=2)
  full, short = render(results)
  replace_block(RESULTS_MD, full)
  replace_block(SUMMARY_MD, short)
  print(full)


if __name__ == '__main__':
  main()
