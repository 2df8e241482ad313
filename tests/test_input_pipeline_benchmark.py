"""benchmarks/input_pipeline.py --smoke runs end to end and reports every row (a few seconds)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_input_pipeline_benchmark_smoke(tmp_path):
  out = tmp_path / 'input_pipeline.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'input_pipeline.py'), '--smoke',
       '--json', str(out), '--tmp', str(tmp_path)],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  assert results['smoke'] and results['machine']

  latents = results['latents']
  threads = [r for r in latents['rows'] if r['pipeline'] == 'create_train_iterator']
  assert sorted(r['num_threads'] for r in threads) == [0, 2]
  workers = [r for r in latents['rows'] if r['pipeline'] == 'mp_prefetch']
  assert [r['num_workers'] for r in workers] == [1], latents['notes']
  for r in latents['rows']:
    assert r['samples_per_second'] > 0 and r['samples_per_cpu_second'] > 0 and r['batches'] >= 3
  assert latents['best']['samples_per_second'] > 0

  storage = results['storage']
  formats = {r['format'] for r in storage['rows']}
  assert 'npy (mmap)' in formats
  if storage['array_record']:  # array_record comes with grain; without it there are no rows.
    assert 'array_record' in formats and storage['winner']
  assert all(r['records_per_second'] > 0 for r in storage['rows'])

  jpeg = results['jpeg']
  assert sorted(r['num_threads'] for r in jpeg['rows']) == [0, 2]
  assert jpeg['via'] in ('create_train_iterator', 'direct')
  assert all(r['images_per_second'] > 0 and r['images_per_cpu_second'] > 0 for r in jpeg['rows'])
  assert jpeg['cores_per_gpu'] > 0
  assert 'huge_png' not in results  # Skipped in smoke runs.
  assert '| pipeline | num_threads |' in proc.stdout
  # The synthetic data (written under --tmp) is deleted at the end.
  assert [p.name for p in tmp_path.iterdir()] == ['input_pipeline.json']
