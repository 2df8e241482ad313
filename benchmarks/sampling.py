"""Seconds per image and NFE of `main.py --mode=sample` for several solver settings.

Runs the sample mode once per setting in a fresh process on the same inputs and reads each run's
summary.json (per-image time excludes compilation, which is reported apart). Usage, from the repo
root, after the README's demo command:

  .venv/bin/python benchmarks/sampling.py --workdir=workdirs/demo --input_size=64

writes benchmarks/results_sampling.md (the table in README).
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
  parser.add_argument('--output', default=os.path.join(REPO, 'benchmarks', 'results_sampling.md'))
  args = parser.parse_args()

  rows = []
  for solver, flags in SETTINGS:
    with tempfile.TemporaryDirectory() as outdir:
      command = [sys.executable, 'main.py', '--mode=sample', f'--config={args.config}',
                 f'--workdir={args.workdir}', f'--inputs={args.inputs}', f'--outdir={outdir}',
                 f'--config.sample.input_size={args.input_size}', *flags]
      subprocess.run(command, cwd=REPO, check=True, capture_output=True)
      with open(os.path.join(outdir, 'summary.json')) as f:
        summary = json.load(f)
    image = summary['images'][0]
    setting = ' '.join(f.split('.')[-1] for f in flags[1:])
    rows.append(f"| {solver} | {setting} | {summary['mean_nfe'][0]:.1f} | "
                f"{summary['seconds_per_image']:.3f} | {summary['compile_seconds']:.1f} |")
    print(rows[-1], flush=True)

  header = [
      f'# Sampling speed ({datetime.date.today().isoformat()})', '',
      f'`{shlex.join([".venv/bin/python", "benchmarks/sampling.py", *sys.argv[1:]])}`: '
      f"{summary['num_images']} inputs ({args.inputs}, {image['input_size'][0]} px longer side) "
      f"boosted to {image['output_size'][0]} px by the checkpoint in {args.workdir} (step "
      f"{summary['stages'][0]['step']}), batch {summary['batch_size']} on {summary['devices']} "
      'device(s), float32; seconds per image exclude compilation.', '',
      '| solver | setting | mean NFE | s / image | compile s |', '|---|---|---:|---:|---:|']
  with open(args.output, 'w') as f:
    f.write('\n'.join(header + rows) + '\n')
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
