"""benchmarks/accelerator.py --smoke runs every part end to end on the CPU and reports every row, so
the GPU benchmark is ready to run whenever a GPU is at hand."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests import runs

# Whole benchmark scripts in subprocesses: the full suite runs them, the fast tier does not.
pytestmark = pytest.mark.slow

SCRIPT = os.path.join(runs.ROOT, 'benchmarks', 'accelerator.py')


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_accelerator_benchmark_smoke(tmp_path):
  json_path, md_path = tmp_path / 'accelerator.json', tmp_path / 'accelerator.md'
  proc = subprocess.run([sys.executable, SCRIPT, '--smoke', '--json', str(json_path), '--out',
                         str(md_path)], cwd=runs.ROOT, env=runs.env(1), capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.loads(json_path.read_text())
  assert results['smoke'] and results['machine']
  assert _positive(results['peak']['flops_per_second'])
  # Nothing the GPU machine lacks (grain, dm_pix, TensorFlow, ...) was imported.
  assert results['imported_but_absent_on_device'] == []

  rows = results['rows']
  assert [r['part'] for r in sorted(rows, key=lambda r: r['part'])] == list('abcdddd')
  assert results['failed'] == 0
  for r in rows:
    if r['part'] == 'b' and r['status'].startswith('skipped (torch'):
      continue  # PyTorch is a dev dependency; without it (b) is skipped.
    assert r['status'] == 'ok', r
    for field in ('seconds', 'samples_per_second', 'seconds_per_sample'):
      assert _positive(r[field]), (field, r)
    if r['part'] != 'b':
      assert _positive(r['compile_seconds']), r
    if r['part'] in 'ad':
      assert _positive(r['flops']), r
  a, = (r for r in rows if r['part'] == 'a')
  assert math.isfinite(a['loss'])
  # MFU: the compiled step's FLOPs per second over the measured peak; the goal is 45% of it.
  assert a['mfu'] == pytest.approx(a['flops'] / a['seconds'] / results['peak']['flops_per_second'])
  assert a['goal'] == 'MFU >= 45%' and a['met'] == (a['mfu'] >= 0.45)
  c, = (r for r in rows if r['part'] == 'c')
  assert c['nfe'] == results['shapes']['nfe'] and c['finite']
  assert c['output_shape'] == [c['batch'], 32, 32, 3] and c['goal']
  assert {r['name'] for r in rows if r['part'] == 'd'} == {
      f'SD {op} 32 px ({dtype})' for op in ('encode', 'decode')
      for dtype in ('float32', 'bfloat16')}
  assert all(r['finite'] for r in rows if r['part'] == 'd')
  b, = (r for r in rows if r['part'] == 'b')
  if b['status'] == 'ok':
    assert b['torch']['model'] == 'tiny' and b['torch']['precision'] == 'bf16-mixed'
    assert _positive(b['ratio']) and 'JAX / PyTorch' in b['goal']

  table = md_path.read_text()
  assert table in proc.stdout  # Printed last, as written.
  assert '| part | measurement | batch | compile s |' in table
  for r in rows:
    assert f'| {r["part"]} | {r["name"]} | {r["batch"]} |' in table
