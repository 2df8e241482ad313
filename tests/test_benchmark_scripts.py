"""The training-step and solver benchmarks take main.py's --config flags and keep running (tiny
shapes here; benchmarks/run.py measures the real ones)."""

import json
import subprocess
import sys

import pytest

from tests import runs

# Whole benchmark scripts in subprocesses: the full suite runs them, the fast tier does not.
pytestmark = pytest.mark.slow

def _run(script, *args, tmp_path):
  out = tmp_path / f'{script}.json'
  proc = subprocess.run([sys.executable, f'benchmarks/{script}', *args, f'--json={out}'],
                        cwd=runs.ROOT, env=runs.env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f)


def test_train_step_benchmark_takes_config_flags(tmp_path):
  r = _run('train_step.py', '--config=configs/demo.py:tiny', '--config.data.batch_size=4',
           '--config.model.conv_impl=matmul', '--steps=1', tmp_path=tmp_path)
  assert r['config'] == 'configs/demo.py:tiny'
  assert r['settings'] == ['data.batch_size=4', 'model.conv_impl=matmul']
  assert r['resolved'] == {'compute_dtype': 'float32', 'conv_impl': 'matmul',
                           'attention_impl': 'xla'}
  assert r['batch_size'] == 4 and r['parameters'] == 723875
  assert r['step_seconds_median'] > 0 and r['flops_per_step'] > 0


def test_solver_benchmark_takes_the_samplers_config(tmp_path):
  r = _run('solver.py', '--config=configs/demo.py:tiny', '--config.sample.solver=heun',
           '--config.sample.nfe=4', '--config.sample.batch_size=2', tmp_path=tmp_path)
  assert (r['solver'], r['nfe'], r['size'], r['batch_size']) == ('heun', 4, 16, 2)
  assert r['ok'] and r['seconds_per_image'] > 0
