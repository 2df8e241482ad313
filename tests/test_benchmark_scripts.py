"""The training-step and solver benchmarks take main.py's --config flags and keep running (tiny
shapes here; benchmarks/run.py measures the real ones)."""

import json
import os
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


@pytest.mark.skipif(not runs.CUDA_PLUGIN,
                    reason='needs the CUDA plugin (requirements-dev.txt)')
def test_compile_targets_benchmark_tables_what_fits(tmp_path):
  """Two rows of a shrunken UNet (width 32, two levels) on one H100 (XLA's GPU compiler: seconds
  where the TPU compiler takes a minute) at 16^2 latents: the second row's per-device batch is
  twice the first's, so the line through their totals gives the largest per-device batch; the
  table has a row for each."""
  shrink = ['--config.model.model_channels=32', '--config.model.channel_mult=(1,2)',
            '--config.model.attention_levels=(1,)', '--config.model.num_res_blocks=1',
            '--config.model.head_dim=16', '--config.data.high_res_size=128',
            '--config.data.low_res_size=64']
  r = _run('compile_targets.py', '--rows', 'h100:1/4/1/none', 'h100:1/8/1/none',
           *[f'--override={o}' for o in shrink], tmp_path=tmp_path)
  first, second = (row['report']['programs'][0] for row in r['rows'])
  assert [row['per_device_batch'] for row in r['rows']] == [4, 8]
  assert first['state_bytes'] == second['state_bytes']  # The state does not grow with the batch.
  assert second['memory']['temporaries'] > first['memory']['temporaries']
  # The same work per sample, but for the per-step optimizer update spread over more samples.
  assert second['flops_per_sample'] == pytest.approx(first['flops_per_sample'], rel=1e-2)
  assert len(r['table']) == 4 and all('| h100:1 |' in line for line in r['table'][2:])
  slope = second['memory']['total'] - first['memory']['total']
  slope /= 4  # Per sample.
  estimate = 4 + int((80 * 10**9 - first['memory']['total']) // slope)
  assert r['largest_batches'] == [
      f'- h100:1, fsdp=1, remat=none: {slope / 2**30:.2f} GiB per sample; at most about '
      f'{estimate} per device fit.']


def test_summaries_benchmark_stores_the_grid_downscaled(tmp_path):
  r = _run('summaries.py', '--height=4096', '--width=2048', '--repeats=1', tmp_path=tmp_path)
  assert r['grid'] == '4096x2048' and r['stored_image_width_height'] == [[1024, 2048]]
  assert 0 < r['write_images_s'] <= r['written_s']
  assert r['crc_native_mb_s'] > r['crc_python_mb_s'] > 0

def test_folder_scan_benchmark_reads_no_header_at_a_warm_start(tmp_path):
  r = _run('folder_scan.py', '--smoke', f'--tmp={tmp_path}', tmp_path=tmp_path)
  assert r['index'] and r['num_images'] == 40
  assert {row['case']: row['probed'] for row in r['rows']} == {
      'cold': [40], 'warm': [0], 'one changed': [1]}
  assert all(row['seconds_median'] > 0 for row in r['rows'])
  assert [p.name for p in tmp_path.iterdir()] == ['folder_scan.py.json']  # Its files are gone.


@pytest.mark.skipif(os.geteuid() != 0, reason='mounts a tmpfs')
def test_checkpoint_save_benchmark_counts_the_reports_of_a_failed_save(tmp_path):
  """Both handlers save; on a 4 MB tmpfs, saves of 96 arrays of 16 KB (1.5 MB) fail at the third,
  and the training checkpointer's handler leaves no `Event loop is closed` report behind."""
  r = _run('checkpoint_save.py', '--megabytes=4', '--arrays=4', '--saves=1', '--full-disk=1',
           tmp_path=tmp_path)
  assert [row['handler'] for row in r['saves']] == ['orbax default', 'array_tree_handler']
  assert all(row['saved_s_median'] > 0 for row in r['saves'])
  assert [[row['failed_at_step'] for row in rows] for rows in r['full_disk'].values()] == [[3], [3]]
  assert r['full_disk']['array_tree_handler'][0]['closed_loop_reports'] == 0
