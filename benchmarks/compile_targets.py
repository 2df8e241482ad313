"""What fits where: UNet-base's train step at the paper's shape compiled for TPU slices and NVIDIA
GPUs by `main.py --mode=compile` (XLA's real TPU and GPU compilers, on this CPU machine).

  .venv/bin/python benchmarks/compile_targets.py                 # the rows of ROWS (~1 h, 2 cores)
  .venv/bin/python benchmarks/compile_targets.py --rows v5e:2x4/4/1/none h100:8/16/1/none

The config is configs/default.py training from precomputed latents (the paper workflow: 128^2 x 4
latents, 8 input channels) without held-out evaluation, `auto` settings (bfloat16 compute on
GPUs and TPUs). Each row is TARGET/PER_DEVICE_BATCH/FSDP/REMAT, compiled in its own process. A
row XLA refuses for its memory reports the refusal. The largest per-device batch of a target
follows from two of its rows (the temporaries grow linearly with the batch; the state does not):
printed as an estimate, and the row at that batch, where measured, confirms it.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from common import REPO, machine, report

GiB = 2**30
# libtpu and cloud clients never look for a metadata server (set before they load).
LOOPBACK = {'JAX_PLATFORMS': 'cpu', 'TPU_SKIP_MDS_QUERY': '1', 'NO_GCE_CHECK': 'True',
            'GCE_METADATA_HOST': '127.0.0.1:1', 'GCE_METADATA_ROOT': '127.0.0.1:1',
            'GCE_METADATA_IP': '127.0.0.1:1'}
SAMPLES_PER_SECOND = 150  # Per device: the MFU column is what this throughput needs.
# Informative subset (a UNet-base compile takes 3-10 minutes here): the per-device batch for
# each device kind near where it stops fitting, fsdp and remat where they decide it.
ROWS = (
    'v5e:2x4/4/1/none', 'v5e:2x4/8/1/none', 'v5e:2x4/8/8/none',
    'v5p:2x2x2/16/1/none', 'v6e:2x4/8/1/none',
    'h100:8/8/1/none', 'h100:8/16/1/none', 'h200:8/32/1/none',
)


def compile_row(row: str, overrides: list[str]) -> dict:
  target, per_device, fsdp, remat = row.split('/')
  num_devices = 1
  for d in re.findall(r'\d+', target.split(':')[1]):
    num_devices *= int(d)
  with tempfile.TemporaryDirectory() as workdir:
    command = [
        sys.executable, 'main.py', '--mode=compile', '--config=configs/default.py',
        f'--workdir={workdir}', f'--config.compile.target={target}',
        '--config.data.source=latents', '--config.train.eval_every=0',
        "--config.compile.programs=('train',)",  # The train step is what the table compares.
        f'--config.data.batch_size={int(per_device) * num_devices}',
        f'--config.mesh.fsdp={fsdp}', '--config.mesh.data=-1', f'--config.model.remat={remat}',
        f'--config.compile.samples_per_second={SAMPLES_PER_SECOND}', *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, **LOOPBACK}, capture_output=True,
                          text=True, check=False)
    seconds = time.perf_counter() - t0
    out = {'row': row, 'target': target, 'per_device_batch': int(per_device), 'fsdp': int(fsdp),
           'remat': remat, 'wall_seconds': seconds}
    path = os.path.join(workdir, 'compile', target.replace(':', '_') + '.json')
    if proc.returncode == 0 and os.path.exists(path):
      with open(path) as f:
        out['report'] = json.load(f)
    else:
      errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
      out['error'] = errors[0] if errors else proc.stderr[-1500:]
  print(row, f'{seconds:.0f} s', 'ok' if 'report' in out else out['error'][:200], flush=True)
  return out


def table(rows: list[dict]) -> list[str]:
  lines = ['| target | per-device batch | fsdp | remat | state GiB | temporaries GiB | total GiB '
           f'/ HBM | fits | TFLOP / sample | step at peak ms | MFU for {SAMPLES_PER_SECOND} '
           'samples/s per device | compile s |',
           '|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|']
  for r in rows:
    head = f"| {r['target']} | {r['per_device_batch']} | {r['fsdp']} | {r['remat']} |"
    if 'report' not in r:
      need = re.search(r'needs ([\d.]+) GiB', r['error'])
      lines.append(head + ' | | ' + (f'{need[1]} (XLA)' if need else '') + ' | **no** | | | | '
                   f"{r['wall_seconds']:.0f} |")
      continue
    rep = r['report']
    (p,) = rep['programs']
    state = sum(p['state_bytes'].values()) / GiB
    m = p['memory']
    lines.append(
        head + f" {state:.2f} | {m['temporaries'] / GiB:.2f} | {m['total'] / GiB:.2f} / "
        f"{rep['hbm_bytes'] / GiB:.0f} | {'yes' if m['fits'] else '**no**'} | "
        f"{p['flops_per_sample'] / 1e12:.3f} | {1e3 * p['step_seconds_at_peak']:.0f} | "
        f"{100 * SAMPLES_PER_SECOND * p['flops_per_sample'] / rep['peak_bf16_flops']:.1f}% | "
        f"{p['compile_seconds']:.0f} |")
  return lines


def largest_batches(rows: list[dict]) -> list[str]:
  """Per (target, fsdp, remat) with two fitting rows: the per-device batch where the total
  reaches the HBM, by the line through them."""
  groups = {}
  for r in rows:
    if 'report' in r:
      groups.setdefault((r['target'], r['fsdp'], r['remat']), []).append(r)
  lines = []
  for (target, fsdp, remat), rs in groups.items():
    if len(rs) < 2:
      continue
    a, b = sorted(rs, key=lambda r: r['per_device_batch'])[:2]
    ta, tb = (r['report']['programs'][0]['memory']['total'] for r in (a, b))
    slope = (tb - ta) / (b['per_device_batch'] - a['per_device_batch'])
    if slope <= 0:
      lines.append(f"- {target}, fsdp={fsdp}, remat={remat}: no estimate (the total did not grow "
                   f"from {a['per_device_batch']} to {b['per_device_batch']} per device).")
      continue
    hbm = a['report']['hbm_bytes']
    estimate = a['per_device_batch'] + int((hbm - ta) // slope)
    lines.append(f'- {target}, fsdp={fsdp}, remat={remat}: {slope / GiB:.2f} GiB per sample; '
                 f'at most about {estimate} per device fit.')
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rows', nargs='+', default=list(ROWS))
  parser.add_argument('--override', action='append', default=[],
                      help='A config flag added to every row, e.g. '
                      '--override=--config.model.model_channels=32 (the tests shrink the model).')
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  t0 = time.perf_counter()
  rows = [compile_row(r, args.override) for r in args.rows]
  results = {'machine': machine(), 'minutes': (time.perf_counter() - t0) / 60, 'rows': rows,
             'table': table(rows), 'largest_batches': largest_batches(rows)}
  print('\n'.join(results['table'] + [''] + results['largest_batches']))
  report(results, args.json)


if __name__ == '__main__':
  main()
