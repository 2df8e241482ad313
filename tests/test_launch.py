"""Launch scripts (dry runs print the exact commands) and the speed hooks of config.train."""

import glob
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

from tests import runs


def _run(*args, env=None):
  return subprocess.run(['bash', *args], cwd=runs.ROOT, capture_output=True, text=True,
                        timeout=60, env=env)


def test_tpu_pod_dry_run_prints_the_command_for_every_worker():
  proc = _run('launch/tpu_pod.sh', '--dry-run', 'my-v4-32', 'us-central2-b',
              '--config=configs/default.py', '--workdir=/mnt/shared/paper;1')
  assert proc.returncode == 0, proc.stderr
  install, command = proc.stdout.strip().split('\n', 1)[1], proc.stdout.strip().splitlines()[-1]
  assert install == ('# python3 -m venv .venv && .venv/bin/pip install -r requirements.txt '
                     '"jax[tpu]==0.10.2"\n' + command)
  assert command == (
      "gcloud compute tpus tpu-vm ssh my-v4-32 --zone=us-central2-b --worker=all "
      "--command='cd ~/fmboost_jax && bash launch/setup_host.sh tpu && .venv/bin/python main.py "
      "--distributed --config=configs/default.py --workdir=/mnt/shared/paper\\;1 "
      "--config.train.platform=tpu'")
  proc = _run('launch/tpu_pod.sh', '--dry-run', 'my-v4-32')
  assert proc.returncode == 2 and proc.stderr.startswith('usage:')


def test_slurm_dry_run_prints_the_batch_script():
  proc = _run('launch/slurm.sh', '--dry-run', '--nodes=2', '--gpus-per-node=4', '--time=1:00:00',
              '--partition=gpu', '--', '--config=configs/default.py', '--workdir=/shared/run')
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[:10] == [
      '#!/usr/bin/env bash', '#SBATCH --job-name=fmboost', '#SBATCH --nodes=2',
      '#SBATCH --ntasks-per-node=4', '#SBATCH --gpus-per-task=1', '#SBATCH --time=1:00:00',
      '#SBATCH --signal=USR1@120', '#SBATCH --output=slurm-%j.out', '#SBATCH --partition=gpu',
      'set -euo pipefail']
  assert lines[10] == f'cd {runs.ROOT}'
  assert lines[11] == f'export XLA_FLAGS="{" ".join(SLURM_XLA_FLAGS)} ${{XLA_FLAGS:-}}"'
  # JAX for the GPUs is installed if missing and seen on every node before training.
  assert lines[13:] == [
      '# python3 -m venv .venv && .venv/bin/pip install -r requirements.txt "jax[cuda13]==0.10.2"',
      '# then every node checks that JAX sees its GPUs.',
      'bash launch/setup_host.sh gpu',
      'srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash launch/setup_host.sh --verify gpu',
      'srun --kill-on-bad-exit=1 .venv/bin/python main.py --distributed '
      '--config=configs/default.py --workdir=/shared/run --config.train.platform=gpu',
      '# submit with: sbatch <this script>']
  cpu = _run('launch/slurm.sh', '--dry-run', '--', '--config=configs/default.py',
             '--config.train.platform=any').stdout
  assert 'bash launch/setup_host.sh any\n' in cpu
  assert [line for line in cpu.splitlines() if line.startswith('srun --kill')][0].endswith(
      '--config=configs/default.py --config.train.platform=any')
  per_host = _run('launch/slurm.sh', '--dry-run', '--per=host', '--gpus-per-node=8', '--').stdout
  assert '#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=8\n' in per_host
  for bad in ('--per=node', '--nodes=0', '--frobnicate'):
    proc = _run('launch/slurm.sh', '--dry-run', bad)
    assert proc.returncode == 2 and proc.stderr.startswith('error:'), bad


SLURM_XLA_FLAGS = ['--xla_gpu_enable_latency_hiding_scheduler=true',
                   '--xla_gpu_all_reduce_combine_threshold_bytes=134217728',
                   '--xla_gpu_all_gather_combine_threshold_bytes=134217728',
                   '--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728']


def test_the_slurm_scripts_xla_flags_exist_in_the_pinned_jaxlib():
  """jaxlib aborts on a flag it does not know, on any backend: these parse (pinned 0.10.2)."""
  env = dict(runs.env(), XLA_FLAGS=' '.join(SLURM_XLA_FLAGS))
  proc = subprocess.run([sys.executable, '-c', 'import jax; print(jax.numpy.ones(2).sum())'],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == '2.0', proc.stderr[-2000:]
  env['XLA_FLAGS'] = '--xla_gpu_enable_async_collectives=true'  # Removed from XLA: refused.
  proc = subprocess.run([sys.executable, '-c', 'import jax; jax.numpy.ones(2)'], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and 'Unknown flag in XLA_FLAGS' in proc.stderr


def test_setup_host_verifies_the_platform_in_one_line():
  env = dict(runs.env(), PATH=f'{os.path.dirname(sys.executable)}:{os.environ["PATH"]}')
  proc = _run('launch/setup_host.sh', 'cpu', env=env)
  assert proc.returncode == 0, proc.stderr
  # The JAX of .venv, which runs these tests (the pinned stack's, or the newest in CI's second run).
  version = re.escape(importlib.metadata.version('jax'))
  assert re.fullmatch(rf'\S+: JAX {version} sees 1 cpu devices \(cpu\)\.\n', proc.stdout)
  proc = _run('launch/setup_host.sh', '--verify', 'gpu', env=env)
  assert proc.returncode == 1
  assert re.fullmatch(r'error: \S+: JAX in \.venv sees cpu devices, not gpu; install '
                      r'jax\[cuda13\]==0\.10\.2 there \(README, "Installs"\) or check the '
                      r"host's drivers\.\n", proc.stderr)
  proc = _run('launch/setup_host.sh', 'cuda', env=env)
  assert proc.returncode == 2
  assert proc.stderr == 'error: platform cuda is unknown; use gpu, tpu, cpu or any.\n'


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
                       '--config.train.profile_steps=2', runs.NO_EVAL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(os.listdir(cache)) >= 2  # At least the state's initialisation and the train step.
  assert glob.glob(str(tmp_path / 'w' / 'profile' / '**' / '*.xplane.pb'), recursive=True)
  assert 'Wrote a profiler trace of steps 2-3' in proc.stderr
  assert 'Compiled the train step in' in proc.stderr


def test_the_dry_run_transcripts_in_the_docs_are_what_the_scripts_print():
  transcripts = []
  for name in ('README.md', 'docs/scaling.md'):  # The TPU pod's, and the SLURM script's.
    with open(os.path.join(runs.ROOT, name)) as f:
      transcripts += re.findall(r'^\$ (launch/\S+ --dry-run .*)\n((?:[^$`\n].*\n)+)', f.read(),
                                re.M)
  assert sorted(c.split()[0] for c, _ in transcripts) == ['launch/slurm.sh', 'launch/tpu_pod.sh']
  for command, printed in transcripts:
    proc = _run(*command.split())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.replace(runs.ROOT, '/path/to/fmboost_jax') == printed.rstrip('\n') + '\n'
