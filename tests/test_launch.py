"""Launch scripts (dry runs print the exact commands) and the speed hooks of config.train."""

import glob
import os
import subprocess

import pytest

from tests import runs


def _run(*args, env=None):
  return subprocess.run(['bash', *args], cwd=runs.ROOT, capture_output=True, text=True,
                        timeout=60, env=env)


def test_tpu_pod_dry_run_prints_the_command_for_every_worker():
  proc = _run('launch/tpu_pod.sh', '--dry-run', 'my-v4-32', 'us-central2-b',
              '--config=configs/default.py', '--workdir=/mnt/shared/paper',
              '--config.sample.stages=a;b')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == (
      "gcloud compute tpus tpu-vm ssh my-v4-32 --zone=us-central2-b --worker=all "
      "--command='cd ~/fmboost_jax && .venv/bin/python main.py --distributed "
      "--config=configs/default.py --workdir=/mnt/shared/paper --config.sample.stages=a\\;b "
      "--config.train.platform=tpu'")
  proc = _run('launch/tpu_pod.sh', '--dry-run', 'my-v4-32')
  assert proc.returncode == 2 and proc.stderr.startswith('usage:')


def test_slurm_dry_run_prints_the_batch_script():
  proc = _run('launch/slurm.sh', '--dry-run', '--nodes=2', '--gpus-per-node=4', '--time=1:00:00',
              '--partition=gpu', '--', '--config=configs/default.py', '--workdir=/shared/run')
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[:9] == [
      '#!/usr/bin/env bash', '#SBATCH --job-name=fmboost', '#SBATCH --nodes=2',
      '#SBATCH --ntasks-per-node=4', '#SBATCH --gpus-per-task=1', '#SBATCH --time=1:00:00',
      '#SBATCH --signal=USR1@120', '#SBATCH --output=slurm-%j.out', '#SBATCH --partition=gpu']
  assert lines[9] == f'cd {runs.ROOT}'
  assert lines[10] == ('srun --kill-on-bad-exit=1 .venv/bin/python main.py --distributed '
                       '--config=configs/default.py --workdir=/shared/run '
                       '--config.train.platform=gpu')
  cpu = _run('launch/slurm.sh', '--dry-run', '--', '--config=configs/default.py',
             '--config.train.platform=any').stdout
  assert [line for line in cpu.splitlines() if line.startswith('srun')][0].endswith(
      '--config=configs/default.py --config.train.platform=any')
  per_host = _run('launch/slurm.sh', '--dry-run', '--per=host', '--gpus-per-node=8', '--').stdout
  assert '#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=8\n' in per_host
  for bad in ('--per=node', '--nodes=0', '--frobnicate'):
    proc = _run('launch/slurm.sh', '--dry-run', bad)
    assert proc.returncode == 2 and proc.stderr.startswith('error:'), bad


def test_process_count_disagreeing_with_slurm_is_one_clear_line(tmp_path):
  env = runs.env()
  env.update(SLURM_JOB_ID='7', SLURM_NTASKS='4')
  proc = subprocess.run(runs.command(tmp_path, '--coordinator_address=127.0.0.1:1234',
                                     '--num_processes=2', '--process_id=0'),
                        cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: --num_processes=2 disagrees with SLURM_NTASKS=4 of this SLURM job; use '
      '--distributed without the explicit flags, or make them agree.')


@pytest.mark.slow
def test_compilation_cache_and_profiler_trace(tmp_path):
  cache = tmp_path / 'cache'
  proc = runs.run_main(tmp_path / 'w', '--config.train.num_steps=4',
                       f'--config.train.compilation_cache_dir={cache}',
                       '--config.train.profile_steps=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(os.listdir(cache)) >= 2  # At least the train and eval steps.
  assert glob.glob(str(tmp_path / 'w' / 'profile' / '**' / '*.xplane.pb'), recursive=True)
  assert 'Wrote a profiler trace of steps 2-3' in proc.stderr
  assert 'Compiled the train step in' in proc.stderr
