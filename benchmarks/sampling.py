"""Seconds per image and NFE of `main.py --mode=sample` for several solver settings.

Runs the sample mode once per setting in a fresh process on the same inputs and reads each run's
summary.json (per-image time excludes compilation, which is reported apart). Usage, from the repo
root, after the README's demo command:

  .venv/bin/python benchmarks/sampling.py --workdir=workdirs/demo --input_size=64

prints the table (benchmarks/run.py puts it in benchmarks/results.md). Peak RSS is that of each
sample run's process (from wait4), compilation included.
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile

from common import REPO, shown_args

SETTINGS = [
    ('euler', ['--config.sample.solver=euler', '--config.sample.nfe=10']),
    ('euler', ['--config.sample.solver=euler', '--config.sample.nfe=20']),
    ('euler', ['--config.sample.solver=euler', '--config.sample.nfe=40']),
    ('dopri5', ['--config.sample.solver=dopri5', '--config.sample.rtol=1e-2',
                '--config.sample.atol=1e-3']),
    ('dopri5', ['--config.sample.solver=dopri5', '--config.sample.rtol=1e-3',
                '--config.sample.atol=1e-5']),
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='workdirs/demo', help='A --mode=train workdir.')
  parser.add_argument('--config', default='configs/demo.py')
  parser.add_argument('--inputs', default='skimage')
  parser.add_argument('--input_size', type=int, default=64)
  parser.add_argument('--output', help='Also write the table to this Markdown file.')
  parser.add_argument('--json', help='Also write the rows and the setup to this file.')
  args = parser.parse_args()

  rows, records = [], []
  for solver, flags in SETTINGS:
    with tempfile.TemporaryDirectory() as outdir:
      command = [sys.executable, 'main.py', '--mode=sample', f'--config={args.config}',
                 f'--workdir={args.workdir}', f'--inputs={args.inputs}', f'--outdir={outdir}',
                 f'--config.sample.input_size={args.input_size}', *flags]
      proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
      stderr = proc.stderr.read()
      _, status, usage = os.wait4(proc.pid, 0)
      proc.returncode = os.waitstatus_to_exitcode(status)
      if proc.returncode:
        sys.exit(f'{shlex.join(command)} failed:\n{stderr[-3000:]}')
      with open(os.path.join(outdir, 'summary.json')) as f:
        summary = json.load(f)
    image = summary['images'][0]
    setting = ' '.join(f.split('.')[-1] for f in flags[1:])
    peak_rss = usage.ru_maxrss / 1024
    records.append({'solver': solver, 'setting': setting, 'nfe': summary['mean_nfe'][0],
                    'seconds_per_image': summary['seconds_per_image'],
                    'compile_seconds': summary['compile_seconds'], 'peak_rss_mib': peak_rss})
    rows.append(f"| {solver} | {setting} | {summary['mean_nfe'][0]:.1f} | "
                f"{summary['seconds_per_image']:.3f} | {summary['compile_seconds']:.1f} | "
                f'{peak_rss:.0f} |')
    print(rows[-1], flush=True)

  header = [
      f'# Sampling speed ({datetime.date.today().isoformat()})', '',
      f'`{shlex.join([".venv/bin/python", "benchmarks/sampling.py", *shown_args()])}`: '
      f"{summary['num_images']} inputs ({args.inputs}, {image['input_size'][0]} px longer side) "
      f"boosted to {image['output_size'][0]} px by the checkpoint in {args.workdir} (step "
      f"{summary['stages'][0]['step']}), batch {summary['batch_size']} on {summary['devices']} "
      'device(s), float32; seconds per image exclude compilation.', '',
      '| solver | setting | mean NFE | s / image | compile s | peak RSS MiB |',
      '|---|---|---:|---:|---:|---:|']
  print('\n'.join(header + rows))
  if args.output:
    with open(args.output, 'w') as f:
      f.write('\n'.join(header + rows) + '\n')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'setup': header[2], 'rows': records}, f, indent=2)


if __name__ == '__main__':
  main()
