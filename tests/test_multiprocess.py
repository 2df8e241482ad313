"""Two cooperating processes on this machine (4 fake CPU devices each, gloo collectives)."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests import runs


def _launch(workdir, *flags, timeout=600):
  env = runs.env()
  env['PYTHON'] = sys.executable
  return subprocess.run(
      ['bash', 'launch/local_multiprocess.sh', '2', '4', '--config=configs/demo.py:tiny',
       f'--workdir={workdir}', *flags],
      cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _relative_error(a, b):
  diff = np.sqrt(sum(np.sum((a[k] - b[k])**2) for k in b))
  return diff / np.sqrt(sum(np.sum(b[k]**2) for k in b))


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_resumes_in_one_process(tmp_path):
  workdir = tmp_path / 'mp'
  proc = _launch(workdir, '--config.train.num_steps=3')
  assert proc.returncode == 0, proc.stderr[-3000:]
  # One runtime of 8 devices: each process logged the same global view.
  for p in (0, 1):
    view = f'JAX process {p} of 2: backend cpu, device kind cpu, 4 local / 8 global devices'
    assert proc.stderr.count(view) == 1
  # Orbax wrote one checkpoint, with both processes' data-iterator positions.
  assert runs.checkpoint_steps(workdir) == [3]
  data_files = os.listdir(workdir / 'checkpoints' / '3' / 'data')
  assert sorted(n for n in data_files if n.startswith('process_')) == [
      'process_0-of-2.json', 'process_1-of-2.json']
  # Only process 0 writes logs and results.
  assert len(list(workdir.glob('events.out.tfevents.*'))) == 1
  assert (workdir / 'results.json').exists()

  # The same 8-device training in one process: the same global batches, losses and parameters.
  single = tmp_path / 'single'
  proc = runs.run_main(single, '--config.train.num_steps=6', devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  loss1, loss2 = runs.scalars(single, 'loss'), runs.scalars(workdir, 'loss')
  assert sorted(loss2) == [1, 2, 3]
  np.testing.assert_allclose([loss2[s] for s in (1, 2, 3)], [loss1[s] for s in (1, 2, 3)],
                             rtol=1e-5)
  state1 = runs.flat(runs.restore_state(single, 3))
  assert _relative_error(runs.flat(runs.restore_state(workdir, 3)), state1) < 1e-5

  # The two-process checkpoint resumes in one process, from the same data position.
  proc = runs.run_main(workdir, '--config.train.num_steps=6', devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 3' in proc.stderr
  loss2 = runs.scalars(workdir, 'loss')
  np.testing.assert_allclose([loss2[s] for s in (4, 5, 6)], [loss1[s] for s in (4, 5, 6)],
                             rtol=1e-5)
  assert _relative_error(runs.flat(runs.restore_state(workdir, 6)),
                         runs.flat(runs.restore_state(single, 6))) < 1e-5


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  workdir = tmp_path / 'mp'
  port = 20000 + os.getpid() % 20000
  procs = []
  for i in range(2):
    env = runs.env(4)
    env['JAX_PLATFORMS'] = 'cpu'
    procs.append(subprocess.Popen(
        runs.command(workdir, '--config.train.num_steps=500',
                     '--config.train.checkpoint_every=1000',
                     f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                     f'--process_id={i}'),
        cwd=runs.ROOT, env=env, stderr=subprocess.PIPE, text=True))
  log = []
  for line in procs[1].stderr:
    log.append(line)
    if 'Compiled the train step' in line:
      procs[1].send_signal(signal.SIGTERM)  # Only process 1 is told to stop.
      break
  log.extend(procs[1].stderr)
  err0 = procs[0].stderr.read()
  assert [p.wait(timeout=300) for p in procs] == [0, 0], (err0[-2000:], ''.join(log[-30:]))
  (stopped_at,) = runs.checkpoint_steps(workdir)
  assert 1 <= stopped_at < 500
  for text in (err0, ''.join(log)):
    assert f'saving at step {stopped_at} and exiting' in text
  assert sorted(n for n in os.listdir(workdir / 'checkpoints' / str(stopped_at) / 'data')
                if n.startswith('process_')) == ['process_0-of-2.json', 'process_1-of-2.json']


def test_incomplete_distributed_flags_are_one_clear_line(tmp_path):
  proc = runs.run_main(tmp_path, '--coordinator_address=127.0.0.1:1234', timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: --coordinator_address needs --num_processes and --process_id too.')
