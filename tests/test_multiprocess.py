"""Two cooperating processes on this machine (4 fake CPU devices each, gloo collectives)."""

import os
import subprocess
import sys

from tests import runs


def test_two_processes_train_as_one_runtime_and_checkpoint(tmp_path):
  workdir = tmp_path / 'mp'
  env = runs.env()
  env["PYTHON"] = sys.executable
  proc = subprocess.run(
      ['bash', 'launch/local_multiprocess.sh', '2', '4', '--config=configs/demo.py:tiny',
       f'--workdir={workdir}', '--config.train.num_steps=3'],
      cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # One runtime of 8 devices: each process logged the same global view.
  assert proc.stderr.count('JAX process 0 of 2, 4 local / 8 global devices') == 1
  assert proc.stderr.count('JAX process 1 of 2, 4 local / 8 global devices') == 1
  # Orbax wrote one checkpoint, with both processes' data-iterator positions.
  assert runs.checkpoint_steps(workdir) == [3]
  data_files = os.listdir(workdir / 'checkpoints' / '3' / 'data')
  assert sorted(n for n in data_files if n.startswith('process_')) == [
      'process_0-of-2.json', 'process_1-of-2.json']
  # Only process 0 writes logs and results.
  assert len(list(workdir.glob('events.out.tfevents.*'))) == 1
  assert sorted(runs.scalars(workdir, 'loss')) == [1, 2, 3]
  assert (workdir / 'results.json').exists()

  # Resuming with another process count is refused with one line, and nothing is lost.
  proc = runs.run_main(workdir, '--config.train.num_steps=6', devices=8)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert 'resume with the same number of processes' in proc.stderr.strip().splitlines()[-1]
  assert runs.checkpoint_steps(workdir) == [3]


def test_incomplete_distributed_flags_are_one_clear_line(tmp_path):
  proc = runs.run_main(tmp_path, '--coordinator_address=127.0.0.1:1234', timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: --coordinator_address needs --num_processes and --process_id too.')
