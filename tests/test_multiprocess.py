"""Two cooperating processes on this machine (1 or 4 fake CPU devices each, gloo collectives)."""

import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fmboost_jax import peer_loss
from tests import runs

pytestmark = pytest.mark.multiprocess


def _launch(workdir, *flags, timeout=600):
  """Two processes of one fake CPU device each (the cheapest runtime of two processes)."""
  env = runs.env()
  env['PYTHON'] = sys.executable
  env['PORT'] = str(runs.free_port())
  return subprocess.run(
      ['bash', 'launch/local_multiprocess.sh', '2', '1', '--config=configs/demo.py:tiny',
       f'--workdir={workdir}', *flags],
      cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _relative_error(a, b):
  diff = np.sqrt(sum(np.sum((a[k] - b[k])**2) for k in b))
  return diff / np.sqrt(sum(np.sum(b[k]**2) for k in b))


@pytest.mark.slow
def test_two_processes_restart_from_a_warm_compilation_cache_and_resume_in_one(tmp_path):
  """Two processes train 3 steps; two more train 6 from scratch in a fresh workdir with the
  persistent compilation cache the first filled (tests/conftest.py's JAX_COMPILATION_CACHE_DIR,
  which local_multiprocess.sh passes on), the set-up that once died at step 1 because one process
  loaded the step from the cache and the other compiled it. Then one process resumes the first
  run's checkpoint and computes the second run's steps 4-6: one process continues what two did,
  from the same data position."""
  workdir = tmp_path / 'mp'
  proc = _launch(workdir, '--config.train.num_steps=3', runs.NO_EVAL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # One runtime of 2 devices: each process logged the same global view.
  for p in (0, 1):
    view = f'JAX process {p} of 2: backend cpu, device kind cpu, 1 local / 2 global devices'
    assert proc.stderr.count(view) == 1
  # Orbax wrote one checkpoint, with the data-iterator position both processes share.
  assert runs.checkpoint_steps(workdir) == [3]
  saved = runs.saved_position(workdir, 3)
  assert saved['process_count'] == 2 and saved['position'] is not None
  # Only process 0 writes logs (and results: tests/test_multiprocess_modes.py).
  assert len(list(workdir.glob('events.out.tfevents.*'))) == 1

  warm = tmp_path / 'mp_warm'
  proc = _launch(warm, '--config.train.num_steps=6', runs.NO_EVAL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # JAX writes cache entries from process 0 only, and on CPU another process's keys differ (they
  # name its devices): process 0 loads the step from the cache, process 1 compiles it.
  assert proc.stderr.count('Compiled the train step') == 2
  assert proc.stderr.count('(from the persistent compilation cache)') >= 1, proc.stderr[-3000:]
  first, second = runs.scalars(workdir, 'loss'), runs.scalars(warm, 'loss')
  assert sorted(first) == [1, 2, 3] and sorted(second) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([first[s] for s in (1, 2, 3)], [second[s] for s in (1, 2, 3)],
                             rtol=1e-6)
  assert _relative_error(runs.flat(runs.restore_state(workdir, 3)),
                         runs.flat(runs.restore_state(warm, 3))) < 1e-6

  # The two-process checkpoint resumes in one process of 4 devices, from the same data position.
  proc = runs.run_main(workdir, '--config.train.num_steps=6', runs.NO_EVAL, devices=4)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 3' in proc.stderr
  resumed = runs.scalars(workdir, 'loss')
  np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [second[s] for s in (4, 5, 6)],
                             rtol=1e-5)
  assert _relative_error(runs.flat(runs.restore_state(workdir, 6)),
                         runs.flat(runs.restore_state(warm, 6))) < 1e-5


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  workdir = tmp_path / 'mp'
  port = runs.free_port()
  procs = []
  for i in range(2):
    env = runs.env(1)
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
  saved = runs.saved_position(workdir, stopped_at)
  assert saved['process_count'] == 2 and saved['position'] is not None


@pytest.mark.slow
def test_a_killed_process_stops_the_other_within_the_heartbeat_timeout_in_one_line(tmp_path):
  heartbeat = 3
  port = runs.free_port()
  procs = []
  for i in range(2):
    # One device each: the cheapest run, and one where Gloo's all-reduce fails at once (the
    # connection to process 1 is reset) before the coordination service names process 1.
    env = runs.env(1)
    env['JAX_PLATFORMS'] = 'cpu'
    procs.append(subprocess.Popen(
        runs.command(tmp_path / 'mp', '--config.train.num_steps=500',
                     '--config.train.checkpoint_every=1000',
                     f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                     f'--process_id={i}', f'--heartbeat_timeout_seconds={heartbeat}'),
        cwd=runs.ROOT, env=env, stderr=subprocess.PIPE, text=True))
  log0 = []  # Process 0's stderr lines, with the time each was read.
  reader = threading.Thread(
      target=lambda: log0.extend((time.monotonic(), x) for x in procs[0].stderr))
  reader.start()
  try:
    for line in procs[1].stderr:
      if re.search(r'\] \[1\] .*loss=', line):  # Process 1 logged its first training step.
        break
    procs[1].kill()
    killed = time.monotonic()
    returncode = procs[0].wait(timeout=120)
    elapsed = time.monotonic() - killed
    reader.join(timeout=30)  # Until its stderr closes: the filter's last line is in.
  finally:
    for p in procs:
      p.kill()
  lines = [x.rstrip('\n') for t, x in log0 if t >= killed]
  assert returncode != 0, lines
  assert elapsed < heartbeat + 15, (elapsed, lines)
  # One line names the lost process; before it, at most the INFO log lines of a step or two.
  line = f'error: process 1 of 2 stopped responding (no heartbeat for {heartbeat} s); stopping.'
  assert [x for x in lines if not re.match(r'I\d{4} ', x)] == [line], lines
  assert len(lines) <= 10, lines


def _filtered(text: str, process_index: int = 0) -> str:
  """`text` through the stderr filter of process `process_index` of 2 (heartbeat timeout 60 s)."""
  proc = subprocess.run([sys.executable, '-S', peer_loss.__file__, str(process_index), '2', '60'],
                        input=text, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and not proc.stderr, proc.stderr
  return proc.stdout


# What a process of two printed on this machine (jaxlib 0.10.2) when the other was SIGKILLed
# (shortened: one line of each kind in the crash report).
_STEP = ('I1202 13:02:34.623904 140007833052864 logging_writer.py:48] [2] grad_norm=0.0924674, '
         'learning_rate=0.001, loss=0.0312072, param_norm=45.2629\n')
_CRASH_REPORT = (
    '*** Check failure stack trace: ***\n'
    '    @     0x7fd0b2e40634  absl::lts_20260107::log_internal::LogMessage::SendToLog()\n'
    '    @     0x7fd0ba8a71f5  (unknown)\n'
    'Fatal Python error: Aborted\n\n'
    'Thread 0x00007fd01108c6c0 (most recent call first):\n'
    '  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap\n\n'
    'Extension modules: yaml._yaml, jaxlib.cpu_feature_guard (total: 2)\n')
_TERMINATING = ('client.h:80] Terminating process because the JAX distributed service detected '
                'fatal errors. This most likely indicates that another task died; see the other '
                'task logs for more details. Disable Python buffering, i.e. `python -u`, to be '
                'sure to see all the previous output. absl::Status: ')
_UNHEALTHY = ('UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\n'
              'The tasks have crashed. Check the task logs for an earlier error, or scheduler '
              'events (e.g. preemption, eviction) to debug further.')
_POLLED = ('E1202 12:51:48.980453    5592 coordination_service_agent.cc:289] Polled an error from '
           'coordination service (this can be an error from this or another task).\n')
PROCESS_1_LOST = (
    _STEP + 'E1202 12:51:48.979845    5581 coordination_service.cc:1549] [10373839219986400775] '
    'Use error polling to propagate the following error to all tasks: ' + _UNHEALTHY +
    " [type.googleapis.com/tensorflow.CoordinationServiceError='']\n" + _POLLED +
    'F1202 12:51:48.980579    5592 ' + _TERMINATING + _UNHEALTHY +
    "\nRPC: /xla.coordination.CoordinationService/PollForError [type.googleapis.com/tensorflow."
    "CoordinationServiceError='']\n" + _CRASH_REPORT)
PROCESS_0_LOST = (
    _STEP + 'E1202 12:52:01.073842    5633 preemption_sync_manager.cc:159] Failed to cancel '
    'preemption barrier: FAILED_PRECONDITION: Tried to cancel non-existent barrier '
    "PREEMPTION_SYNC_BARRIER. [type.googleapis.com/tensorflow.CoordinationServiceError='']\n" +
    _POLLED + 'F1202 12:52:01.073908    5633 ' + _TERMINATING + 'UNAVAILABLE: Failed to send RPC '
    'to coordination service. Either the leader task was preempted/died/restarted unexpectedly '
    'or this task is experiencing network issues. Check earlier logs from 1) this task, 2) the '
    'leader (usually slice 0 task 0), and 3) cluster scheduler to debug further.\n'
    'Additional GRPC error information from remote target coordination_service while calling '
    '/xla.coordination.CoordinationService/PollForError:\n'
    ':UNKNOWN:Error received from peer  {grpc_message:"Socket closed", grpc_status:14}\n' +
    _CRASH_REPORT)


def test_the_crash_report_of_a_lost_process_becomes_one_line():
  assert _filtered(PROCESS_1_LOST, 0) == _STEP + (
      'error: process 1 of 2 stopped responding (no heartbeat for 60 s); stopping.\n')
  assert _filtered(PROCESS_0_LOST, 1) == _STEP + (
      'error: process 0 of 2 (the coordinator) stopped responding (the connection to it failed); '
      'stopping.\n')
  # Anything else passes through unchanged, coordination-service warnings included.
  other = _STEP + _POLLED + 'a line without a newline'
  assert _filtered(other) == other
  assert peer_loss.lost_process_line(
      'absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending '
      'heartbeats):\n/job:jax_worker/replica:0/task:2\n/job:jax_worker/replica:0/task:3\n',
      0, 4, 60) == ('error: processes 2, 3 of 4 stopped responding (no heartbeat for 60 s); '
                    'stopping.')
  assert peer_loss.lost_process_line(  # Process 0 in the shutdown barrier when process 1 died.
      'absl::Status: INTERNAL: Failed to disconnect from coordination service with status: '
      "INTERNAL: Shutdown barrier has failed.\nBarrier result: 'INTERNAL: Barrier failed because: "
      'task is set to ERROR: UNAVAILABLE: Task 1 heartbeat timeout. This indicates that the remote '
      'task has failed', 0, 2, 60) == (
      'error: process 1 of 2 stopped responding (no heartbeat for 60 s); stopping.')
  assert peer_loss.lost_process_line(
      'absl::Status: DEADLINE_EXCEEDED: Barrier timed out.\nmore', 1, 2, 60) == (
      'error: the JAX distributed service stopped this process (DEADLINE_EXCEEDED: Barrier timed '
      'out.); stopping.')


def test_coordination_service_warnings_are_held_back_for_at_most_a_moment():
  f = peer_loss.StderrFilter(0, 2, 60)
  assert f.line(_POLLED, now=0.0) == [] and f.line('continued\n', now=0.1) == []
  assert f.tick(now=1.0) == []
  assert f.tick(now=peer_loss.HOLD_SECONDS + 0.5) == [_POLLED, 'continued\n']
  assert f.line(_POLLED, now=10.0) == []
  assert f.line(_STEP, now=10.1) == [_POLLED, _STEP]  # Released, in order, by the next log line.


def test_incomplete_distributed_flags_are_one_clear_line(tmp_path):
  proc = runs.run_main(tmp_path, '--coordinator_address=127.0.0.1:1234', timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: --coordinator_address needs --num_processes and --process_id too.')


def test_a_heartbeat_timeout_below_one_second_is_one_clear_line(tmp_path):
  proc = runs.run_main(tmp_path, '--coordinator_address=127.0.0.1:1234', '--num_processes=2',
                       '--process_id=0', '--heartbeat_timeout_seconds=0', timeout=120)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: --heartbeat_timeout_seconds=0 must be at least 1.')
