"""Specification of the training loop: sharding, resume, preemption, divergence, bad input."""

import logging
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from fmboost_jax import config_checks, flow, sharding, train
from fmboost_jax.errors import UserError
from fmboost_jax.models import backends
from tests import runs

# MFU in the log against a made-up peak of 100 GFLOP/s per device.
THROUGHPUT_LOG = '--config.train.peak_flops_per_device=1e11'


@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory):
  """4 steps of the tiny demo on one device, checkpointed after 3 and 4."""
  workdir = tmp_path_factory.mktemp('one_device')
  proc = runs.run_main(workdir, '--config.train.num_steps=4', runs.NO_EVAL, THROUGHPUT_LOG,
                       devices=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_the_log_reports_samples_per_second_tflops_and_mfu(one_device_run):
  """perf/* at every logged step from step 2 on (the clock starts after step 1; demo:tiny logs
  every step): TFLOP/s per device is samples/s
  times the step's FLOPs per sample (about 3 forward passes of the network, counted separately),
  MFU is that over the configured peak; CPUs report no device memory."""
  sps = runs.scalars(one_device_run, 'perf/samples_per_sec')
  tflops = runs.scalars(one_device_run, 'perf/tflops_per_device')
  mfu = runs.scalars(one_device_run, 'perf/mfu')
  assert sorted(sps) == sorted(tflops) == sorted(mfu) == [2, 3, 4]
  forward = runs.forward_flops(demo.get_config('tiny'), 16)
  for step in (2, 3, 4):
    assert sps[step] > 0
    flops_per_sample = tflops[step] * 1e12 / sps[step]  # One device.
    assert 2.7 * forward < flops_per_sample < 3.6 * forward, (flops_per_sample, forward)
    assert mfu[step] == pytest.approx(tflops[step] * 1e12 / 1e11, rel=1e-5)
  assert not runs.scalars(one_device_run, 'perf/memory_in_use_gib')


def _relative_error(state, reference, part):
  keys = [k for k in reference if k.startswith(f"['{part}']")]
  diff = np.sqrt(sum(np.sum((state[k] - reference[k])**2) for k in keys))
  return diff / np.sqrt(sum(np.sum(reference[k]**2) for k in keys))


@pytest.mark.slow
@pytest.mark.parametrize('mesh', [('data=8',), ('data=2', 'fsdp=4')])
def test_every_mesh_of_eight_devices_matches_one_device(tmp_path, one_device_run, mesh):
  """Three steps on 8 devices with a data mesh and a data x fsdp mesh: same losses and parameters
  as one device (relative 1e-5); fsdp_min_size=1000 makes the tiny model's large kernels really
  sharded. A pure fsdp=8 mesh is left out for the suite's time: the data x fsdp mesh runs the
  same fsdp code, split 4 ways."""
  workdir = tmp_path / 'eight'
  proc = runs.run_main(workdir, '--config.train.num_steps=3', '--config.mesh.fsdp_min_size=1000',
                       runs.NO_EVAL,
                       *[f'--config.mesh.{m}' for m in mesh], devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  sizes = dict(m.split('=') for m in mesh)
  assert (f"Device mesh {{'data': {sizes.get('data', 1)}, 'fsdp': {sizes.get('fsdp', 1)}}}"
          in proc.stderr)
  loss1, loss8 = runs.scalars(one_device_run, 'loss'), runs.scalars(workdir, 'loss')
  assert sorted(loss1) == [1, 2, 3, 4] and sorted(loss8) == [1, 2, 3]
  np.testing.assert_allclose([loss8[s] for s in (1, 2, 3)], [loss1[s] for s in (1, 2, 3)],
                             rtol=1e-5)
  state1 = runs.flat(runs.restore_state(one_device_run, 3))
  state8 = runs.flat(runs.restore_state(workdir, 3))
  assert state1.keys() == state8.keys()
  for part in ('params', 'ema_params'):  # Relative L2 error over all (EMA) parameters.
    assert _relative_error(state8, state1, part) < 1e-5, part
  assert int(state8["['step']"]) == int(state1["['step']"]) == 3

  if 'fsdp=4' not in mesh:
    return
  # The checkpoint of the data x fsdp mesh restores on one device and training continues.
  proc = runs.run_main(workdir, '--config.train.num_steps=4', runs.NO_EVAL, devices=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 3' in proc.stderr
  np.testing.assert_allclose(runs.scalars(workdir, 'loss')[4], loss1[4], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resume_is_bitwise_identical(tmp_path):
  steps = 20
  straight = tmp_path / 'straight'
  proc = runs.run_main(straight, f'--config.train.num_steps={steps}',
                       '--config.train.checkpoint_every=1000', runs.NO_EVAL)
  assert proc.returncode == 0, proc.stderr[-3000:]

  interrupted = tmp_path / 'interrupted'
  p = subprocess.Popen(runs.command(interrupted, f'--config.train.num_steps={steps}',
                                    '--config.train.checkpoint_every=1000', runs.NO_EVAL),
                       cwd=runs.ROOT, env=runs.env(), stderr=subprocess.PIPE, text=True)
  log = []
  for line in p.stderr:
    log.append(line)
    if 'Compiled the train step' in line:
      p.send_signal(signal.SIGTERM)
      break
  log.extend(p.stderr)
  assert p.wait(timeout=300) == 0, ''.join(log[-50:])
  (stopped_at,) = runs.checkpoint_steps(interrupted)
  assert 1 <= stopped_at < steps
  assert any('Received a stop signal' in line for line in log)

  # A process killed while writing the next checkpoint leaves an unfinished temporary directory
  # (Orbax renames it only when complete): plant one, with a truncated array file, and resume.
  ckpt_dir = interrupted / 'checkpoints'
  partial = ckpt_dir / f'{stopped_at + 1}.orbax-checkpoint-tmp-1795000000'
  shutil.copytree(ckpt_dir / str(stopped_at), partial)
  for f in partial.rglob('*'):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(f.read_bytes()[:50])

  proc = runs.run_main(interrupted, f'--config.train.num_steps={steps}',
                       '--config.train.checkpoint_every=1000', runs.NO_EVAL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resuming from the checkpoint at step' in proc.stderr
  assert runs.checkpoint_steps(interrupted) == [stopped_at, steps]

  loss_a, loss_b = runs.scalars(straight, 'loss'), runs.scalars(interrupted, 'loss')
  assert sorted(loss_a) == sorted(loss_b) == list(range(1, steps + 1))
  assert loss_a == loss_b  # Exactly equal floats, step by step.
  a, b = runs.flat(runs.restore_state(straight, steps)), runs.flat(runs.restore_state(interrupted,
                                                                                        steps))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_nan_loss_stops_loudly_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  config = demo.get_config('tiny')
  config.train.num_steps = 3
  config.train.eval_every = 0
  train.train_and_evaluate(config, str(tmp_path))
  assert runs.checkpoint_steps(tmp_path) == [3]
  before = runs.flat(runs.restore_state(tmp_path, 3))

  real_loss = flow.CouplingFlow.loss
  monkeypatch.setattr(flow.CouplingFlow, 'loss', lambda *a, **k: real_loss(*a, **k) * np.nan)
  config.train.num_steps = 6
  with pytest.raises(train.TrainingDiverged, match=r'diverged at step 4.*step 3\)'):
    train.train_and_evaluate(config, str(tmp_path))
  assert runs.checkpoint_steps(tmp_path) == [3]
  after = runs.flat(runs.restore_state(tmp_path, 3))
  for k in before:
    np.testing.assert_array_equal(before[k], after[k])


@pytest.mark.slow
def test_an_implicit_host_transfer_in_the_step_loop_is_an_error(tmp_path, monkeypatch):
  # A regression that hands the step host arrays (an implicit, synchronous copy every step) must
  # fail at the first step instead of silently slowing training down.
  monkeypatch.setattr(sharding, 'global_batch', lambda local_batch, mesh: dict(local_batch))
  config = demo.get_config('tiny')
  with pytest.raises(jax.errors.JaxRuntimeError, match='Disallowed host-to-device transfer'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints' / '1')


def test_ema_follows_the_reference_schedule():
  c = demo.get_config().ema
  c.start_step, c.decay, c.power = 1000, 0.999, 0.75
  d = lambda s: float(train.ema_decay(jax.numpy.asarray(s), c))  # noqa: E731
  assert d(1000) == 0.0 and d(500) == 0.0
  assert d(1001) == pytest.approx(0.405, abs=1e-3)
  assert d(1100) == pytest.approx(0.968, abs=1e-3)
  assert d(2000) == pytest.approx(0.9944, abs=1e-4)
  assert d(10000) == pytest.approx(0.9989, abs=1e-4)
  assert d(50000) == pytest.approx(0.999, abs=1e-7)


def test_ema_update_is_the_warmed_up_average_by_hand():
  """Five updates with start_step=2, decay 0.9, power 0.75: copies up to step 2, then
  ema <- d ema + (1 - d) p with d = min(0.9, 1 - (1 + e)^-0.75) after e = step - 2 updates."""
  c = demo.get_config().ema
  c.start_step, c.decay, c.power = 2, 0.9, 0.75
  p = [np.full((2,), v, np.float64) for v in (5.0, -1.0, 2.0, 4.0, 8.0, 3.0)]
  ema = {'w': jax.numpy.zeros((2,))}
  for step in range(1, 7):
    ema = train.ema_update(ema, {'w': jax.numpy.asarray(p[step - 1], jax.numpy.float32)},
                           jax.numpy.asarray(step), c)
  d = [0.0] + [min(0.9, 1 - (1 + e)**-0.75) for e in (1, 2, 3, 4)]  # Steps 2 (copy), 3, .., 6.
  assert d[1:] == pytest.approx([0.405396, 0.561309, 0.646447, 0.700930], abs=1e-6)
  by_hand = p[1]
  for k in range(1, 5):
    by_hand = d[k] * by_hand + (1 - d[k]) * p[k + 1]
  np.testing.assert_allclose(np.asarray(ema['w']), by_hand, rtol=1e-6)
  # The weights of the average: p2 (the copy), p3 .. p6, summing to 1.
  weights = [np.prod(d[1:5])] + [(1 - d[k]) * np.prod(d[k + 1:5]) for k in range(1, 5)]
  assert sum(weights) == pytest.approx(1.0)
  np.testing.assert_allclose(np.asarray(ema['w']), sum(w * x for w, x in zip(weights, p[1:])),
                             rtol=1e-6)


def test_learning_rate_warms_up_linearly():
  c = demo.get_config().optim
  c.learning_rate, c.warmup_steps = 3e-5, 1000
  lr = train.learning_rate_schedule(c)
  assert float(lr(0)) == pytest.approx(3e-8)
  assert float(lr(499)) == pytest.approx(1.5e-5)
  assert float(lr(999)) == pytest.approx(3e-5)
  assert float(lr(5000)) == pytest.approx(3e-5)


def _error_line(proc):
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  line = proc.stderr.strip().splitlines()[-2 if proc.returncode == 2 else -1]
  assert line.startswith('error: ')
  return line


@pytest.mark.parametrize('overrides,devices,expected', [
    (['--config.trian.num_steps=3'], 1, 'error: the config has no field trian; did you mean train? '
     '(from --config.trian.num_steps=3)'),
    (['--config.data.low_res_size=6'], 1, 'low_res_size'),
    (['--config.data.batch_size=12', '--config.data.num_val_images=12'], 8,
     'not divisible by the 8'),
    (['--config.data.source=folder', '--config.data.path=/nonexistent/photos'], 1,
     '/nonexistent/photos'),
    (['--config.flow.objective=dm'], 1, 'objective'),
    (['--config.model.remat=everything'], 1, "config.model.remat='everything' is not supported"),
    (['--config.flow.upsampling_mode=identity'], 1, "upsampling_mode='identity' is unknown; use "
     'one of psu, bilinear, nearest (precomputed latents record the mode'),
    (['--config.data.val_fraction=1.5', '--config.data.holdout=images'], 1,
     'val_fraction=1.5 must lie strictly between 0 and 1'),
    (['--config.data.batch_size=0'], 1, 'error: config.data.batch_size=0 must be positive; set '
     'it to the global batch of images per step, e.g. 64 (the paper).'),
    (['--config.train.platform=gpu'], 1, 'error: config.train.platform=gpu but JAX sees cpu '
     'devices (cpu); install JAX for gpu on this host (README, "Installs"), run where the gpus '
     'are, or set --config.train.platform=any to run here anyway.'),
    (['--config.train.platform=cuda'], 1, "config.train.platform='cuda' is unknown; use one of "
     'any, cpu, gpu, tpu.'),
    (['--config.model.model_channels=16'], 1, 'error: config.model.model_channels=16 with '
     'channel_mult=(1, 2) gives the widths [16, 32], which the 32 GroupNorm groups do not all '
     'divide; use a multiple of 32 for model_channels (e.g. 32).'),
    (['--config.model.attention_impl=cudnn'], 1, "error: config.model.attention_impl='cudnn' "
     'needs an NVIDIA GPU and bfloat16 compute (here: cpu, float32); set '
     '--config.model.attention_impl=auto (cuDNN where it applies, else XLA) or xla.'),
])
def test_bad_input_is_one_clear_line(tmp_path, overrides, devices, expected):
  proc = runs.run_main(tmp_path / 'w', *overrides, devices=devices, timeout=120)
  assert expected in _error_line(proc)


def test_a_negative_evaluation_interval_is_one_clear_line():
  config = demo.get_config('tiny')
  config.train.eval_every = -1
  with pytest.raises(UserError, match=r'^config.train.eval_every=-1 must be 0 \(no held-out '
                     r'evaluation while training\) or at least 1.$'):
    config_checks.check(config, 'train')


def test_cpu_compiler_options_reach_the_train_step_on_cpus_only_and_bad_ones_are_one_line():
  options = demo.get_config().train.cpu_compiler_options
  assert backends.compiler_options('cpu', options) == {
      'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}
  assert backends.compiler_options('gpu', options) is None
  tiny = demo.get_config('tiny').train.cpu_compiler_options
  assert backends.compiler_options('cpu', tiny) is None
  # What the demo's option does: a convolution and its gradients leave YNNPACK for XLA's own
  # kernels, the reduction (the bias gradient) stays in YNNPACK.
  loss = lambda w, b, x: jnp.sum((jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b) ** 2)
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
      jnp.ones((3, 3, 32, 32)), jnp.ones((32,)), jnp.ones((4, 16, 16, 32)))

  def in_ynnpack(compiler_options) -> list[str]:
    """The shapes of the compiled program's YNNPACK fusions."""
    return sorted(re.findall(r'%ynn_fusion\S* = (\S+) fusion', lowered.compile(
        compiler_options=compiler_options).as_text()))

  assert in_ynnpack(None) == ['f32[32,3,3,32]{3,2,1,0}', 'f32[32]{0}', 'f32[4,16,16,32]{3,2,1,0}']
  assert in_ynnpack(backends.compiler_options('cpu', options)) == ['f32[32]{0}']

  config = demo.get_config('tiny')
  config.train.cpu_compiler_options = (('xla_cpu_no_such_option', '1'),)
  with pytest.raises(UserError, match=re.escape(
      "config.train.cpu_compiler_options: this XLA does not take them (No such compile option: "
      "'xla_cpu_no_such_option'); correct or remove the option.")):
    config_checks.check(config, 'train')
  config.train.cpu_compiler_options = ('xla_cpu_experimental_ynn_fusion_type',)
  with pytest.raises(UserError, match=r'must be \(name, value\) pairs'):
    config_checks.check(config, 'train')


def test_a_missing_config_file_is_one_clear_line(tmp_path):
  proc = runs.run_main(tmp_path / 'w', config='configs/nope.py', timeout=120)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert _error_line(proc) == (
      "error: the --config file could not be loaded ([Errno 2] No such file or directory: "
      "'configs/nope.py'); pass the path of an ml_collections config file such as "
      'configs/demo.py.')


@pytest.mark.parametrize('mode,where', [('train', 'under'), ('convert', 'file'),
                                        ('sample', 'outdir')])
def test_an_output_path_that_is_or_lies_under_a_file_is_one_clear_line(tmp_path, mode, where):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  flags = ['--config.first_stage.name=sd_vae', '--config.first_stage.weights=x'] if mode == \
      'convert' else []
  workdir = {'under': blocker / 'workdir', 'file': blocker, 'outdir': tmp_path}[where]
  if where == 'outdir':
    flags.append(f'--outdir={blocker}')
  proc = runs.run_main(workdir, *flags, mode=mode, timeout=120)
  expected = {
      'under': f'error: the output directory {blocker}/workdir lies under the file {blocker}; '
               'choose another --workdir.',
      'file': f'error: the output directory {blocker} is a file; choose another --workdir.',
      'outdir': f'error: the output directory {blocker} is a file; choose another --outdir.'}
  assert _error_line(proc) == expected[where]
  assert blocker.read_text() == 'not a directory'


def _small_disk(tmp_path, size: str):
  """A tmpfs of `size` mounted at tmp_path/disk (the test unmounts it), or a skip."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(disk)],
                           capture_output=True)
  if mounted.returncode:
    pytest.skip('mounting a small tmpfs is not permitted on this machine')
  return disk


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path):
  """Checkpoints of about 11 MB every step on a 30 MB tmpfs: the save that fails in the background
  stops training with one line (no traceback), its temporary directory is removed and the earlier
  checkpoints restore."""
  disk = _small_disk(tmp_path, '30m')
  try:
    proc = runs.run_main(disk / 'w', '--config.train.checkpoint_every=1',
                         '--config.train.keep_checkpoints=0', runs.NO_EVAL, timeout=300)
    line = _error_line(proc)
    m = re.fullmatch(
        r'error: saving the checkpoint of step (\d) in (.*) failed \(no space left on device\); '
        r'([\d.]+) MiB are free there: free space or choose another --workdir, then start again '
        r'to resume from step (\d) \(the checkpoints of steps (.*) are intact\)\.', line)
    assert m, line
    step = int(m[1])
    assert m[2] == f'{disk}/w/checkpoints' and int(m[4]) == step - 1 >= 1
    assert runs.checkpoint_steps(disk / 'w') == list(range(1, step))
    assert m[5] == ', '.join(str(s) for s in range(1, step))
    assert not [n for n in os.listdir(disk / 'w' / 'checkpoints') if not n.isdigit()]
    assert abs(float(m[3]) - shutil.disk_usage(disk).free / 2**20) < 1.0
    for kept in range(1, step):
      assert int(runs.restore_state(disk / 'w', kept)['step']) == kept
  finally:
    subprocess.run(['umount', str(disk)], check=True)


def test_a_save_that_fails_in_the_background_is_one_error_and_one_line_per_log_record(
    tmp_path, caplog, monkeypatch):
  """Checkpoints of 1.5 MB (incompressible) on a 4 MB tmpfs, in this process: the save that fails
  in the background raises one CheckpointSaveError (from the manager's own report of the failed
  save), Orbax's records of the failure are one line each, nothing reaches `sys.unraisablehook`
  (no write of the failed save was left in flight to report `Event loop is closed`: Orbax's
  default handler leaves 0 to 89 of them, benchmarks/checkpoint_save.py), the temporary directory
  is gone and the earlier steps stay."""
  import time  # noqa: PLC0415

  import grain  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415

  from fmboost_jax import checkpointing, model_files  # noqa: PLC0415

  disk = _small_disk(tmp_path, '4m')
  reports = []
  monkeypatch.setattr(sys, 'unraisablehook', reports.append)
  caplog.set_level(logging.ERROR, logger='absl')
  rng = np.random.default_rng(0)
  state = {f'w{i}': jnp.asarray(rng.standard_normal(4000, dtype=np.float32)) for i in range(96)}
  try:
    checkpointer = checkpointing.Checkpointer(str(disk / 'c'), keep=0)
    with pytest.raises(checkpointing.CheckpointSaveError) as failed:
      for step in range(1, 10):
        checkpointer.save(step, state, iter(grain.MapDataset.range(4).to_iter_dataset()),
                          ml_collections.ConfigDict({'seed': 0}))
        checkpointer.check()
      checkpointer.wait()
    checkpointer.close()
    time.sleep(1)  # Late completion callbacks of the failed writes.
    message = str(failed.value)
    step = int(re.match(r'saving the checkpoint of step (\d+) ', message)[1])
    assert step >= 2 and '\n' not in message
    assert 'failed (no space left on device); ' in message
    assert message.endswith(f'resume from step {step - 1} (the checkpoints of steps '
                            f'{", ".join(str(s) for s in range(1, step))} are intact).')
    assert model_files.finished_steps(disk / 'c') == list(range(1, step))
    assert sorted(os.listdir(disk / 'c')) == sorted(str(s) for s in range(1, step))
    assert reports == []
    orbax = [r for r in caplog.records if '/orbax/' in r.pathname]
    assert orbax and all(r.exc_info is None and '\n' not in r.getMessage() for r in orbax)
  finally:
    subprocess.run(['umount', str(disk)], check=True)


def test_a_checkpoint_resumes_with_another_process_count_from_its_shared_position(
    tmp_path, monkeypatch):
  """A checkpoint saved by 2 processes at one position resumes in this one from that position;
  one whose processes were at different positions is refused in one line."""
  import grain  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415

  from fmboost_jax import checkpointing  # noqa: PLC0415

  state = {'w': jnp.arange(4.0)}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {'w': jax.ShapeDtypeStruct((4,), jnp.float32, sharding=device)}
  iterator = lambda: iter(grain.MapDataset.range(10).to_iter_dataset())  # noqa: E731
  for name, position in (('same', {'next_index': 3}), ('different', None)):
    monkeypatch.setattr(checkpointing, '_position_record',
                        lambda _, p=position: {'process_count': 2, 'position': p})
    checkpointer = checkpointing.Checkpointer(str(tmp_path / name), keep=0)
    checkpointer.save(1, state, iterator(), ml_collections.ConfigDict({'seed': 0}))
    checkpointer.wait()
    checkpointer.close()
  checkpointer = checkpointing.Checkpointer(str(tmp_path / 'same'), keep=0)
  resumed = iterator()
  restored = checkpointer.restore(1, abstract, resumed)
  checkpointer.close()
  np.testing.assert_array_equal(restored['w'], np.arange(4.0))
  assert next(resumed) == 3
  checkpointer = checkpointing.Checkpointer(str(tmp_path / 'different'), keep=0)
  with pytest.raises(UserError) as refused:
    checkpointer.restore(1, abstract, iterator())
  checkpointer.close()
  assert str(refused.value) == (
      f'the checkpoint at step 1 in {tmp_path / "different"} holds different data-iterator '
      'positions for its 2 processes, so it cannot resume with 1; resume with the same number of '
      'processes.')


def test_a_typo_in_a_nested_override_is_one_readable_line(tmp_path):
  proc = runs.run_main(tmp_path, '--config.train.num_stpes=5', timeout=120)
  assert proc.returncode == 2
  assert _error_line(proc) == ("error: the config has no field train.num_stpes; did you mean "
                               "train.num_steps? (from --config.train.num_stpes=5)")


@pytest.mark.slow
def test_bf16_compute_keeps_float32_master_weights(tmp_path, one_device_run):
  workdir = tmp_path / 'bfloat16'
  proc = runs.run_main(workdir, '--config.train.num_steps=3',
                       '--config.model.compute_dtype=bfloat16', runs.NO_EVAL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  state = runs.flat(runs.restore_state(workdir, 3))
  assert {a.dtype for k, a in state.items() if 'params' in k} == {np.dtype('float32')}
  bf16, f32 = runs.scalars(workdir, 'loss'), runs.scalars(one_device_run, 'loss')
  # Step 1 sees the exactly-zero initial output; steps 2 and 3 see bf16 arithmetic.
  assert bf16[1] == f32[1]
  np.testing.assert_allclose(bf16[3], f32[3], rtol=2e-2)
  assert bf16[3] != f32[3]


@pytest.mark.slow
def test_resuming_with_another_model_is_one_clear_line(tmp_path):
  proc = runs.run_main(tmp_path, '--config.train.num_steps=1', runs.NO_EVAL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # eval_every=0: no held-out evaluation, at the end either.
  assert runs.scalars(tmp_path, 'loss') and not runs.scalars(tmp_path, 'val/psnr_model')
  assert not (tmp_path / 'results.json').exists() and 'Held-out results' not in proc.stdout
  proc = runs.run_main(tmp_path, '--config.train.num_steps=2', '--config.model.model_channels=64',
                       runs.NO_EVAL)
  assert 'does not fit this config' in _error_line(proc)
  assert runs.checkpoint_steps(tmp_path) == [1]


def test_orbax_progress_stays_out_of_the_log_unless_debug_output_is_asked_for(tmp_path, caplog):
  """Writing a checkpoint and reading its EMA weights back logs none of Orbax's progress lines
  (about 60 per checkpoint) and no warning about a missing metadata file at the default INFO
  verbosity; at DEBUG (`--verbosity=1`) Orbax's lines are back."""
  import grain  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415

  from fmboost_jax import checkpointing, model_files  # noqa: PLC0415

  state = {'ema_params': {'w': jnp.arange(4.0)}, 'step': jnp.asarray(1)}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {'w': jax.ShapeDtypeStruct((4,), jnp.float32, sharding=device)}

  def save_and_restore(workdir) -> np.ndarray:
    checkpointer = checkpointing.Checkpointer(str(workdir), keep=0)
    checkpointer.save(1, state, iter(grain.MapDataset.range(4).to_iter_dataset()),
                      ml_collections.ConfigDict({'seed': 0}))
    checkpointer.wait()
    checkpointer.close()
    return model_files.restore_subtree(str(workdir), 1, 'ema_params', abstract)['w']

  orbax = lambda: [r for r in caplog.records if '/orbax/' in r.pathname]  # noqa: E731
  caplog.set_level(logging.INFO, logger='absl')
  np.testing.assert_array_equal(save_and_restore(tmp_path / 'info'), np.arange(4.0))
  assert orbax() == []
  caplog.clear()
  caplog.set_level(logging.DEBUG, logger='absl')
  np.testing.assert_array_equal(save_and_restore(tmp_path / 'debug'), np.arange(4.0))
  assert len([r for r in orbax() if r.levelno == logging.INFO]) > 20
  assert not any('Metadata file does not exist' in r.getMessage() for r in caplog.records)


def test_one_process_saves_replicated_arrays_without_slicing_programs(tmp_path, caplog):
  """Orbax's replica-parallel saving compiles a slicing program per array shape at the first save
  (184 for the tiny demo on 8 devices, 8 s); one process writes replicated arrays whole."""
  import grain  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415

  from fmboost_jax import checkpointing, model_files  # noqa: PLC0415

  replicated = jax.sharding.NamedSharding(jax.make_mesh((8,), ('data',)),
                                          jax.sharding.PartitionSpec())
  params = {f'w{n}': jax.device_put(jnp.arange(n * 1024.0), replicated) for n in (8, 9, 10)}
  checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=0)
  caplog.set_level(logging.WARNING)
  with jax.log_compiles():
    checkpointer.save(1, {'ema_params': params}, iter(grain.MapDataset.range(4).to_iter_dataset()),
                      ml_collections.ConfigDict({'seed': 0}))
    checkpointer.wait()
  checkpointer.close()
  assert [r.getMessage() for r in caplog.records if 'Compiling' in r.getMessage()] == []
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
              for k, v in params.items()}
  restored = model_files.restore_subtree(str(tmp_path), 1, 'ema_params', abstract)
  for k, v in params.items():
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(v))


@pytest.mark.slow
def test_the_readmes_own_images_command_trains_on_a_folder_of_photographs(tmp_path):
  """README's "Your own images" command, cut to 2 steps, on three bundled photographs written as
  JPEGs into nested folders plus one too small: it trains the demo's 16 -> 32 px crops on them."""
  from PIL import Image  # noqa: PLC0415

  from fmboost_jax import images  # noqa: PLC0415

  photos = tmp_path / 'photos'
  (photos / 'trip').mkdir(parents=True)
  for name, image in images.load_skimage_photos()[:3]:
    Image.fromarray(image).save(photos / 'trip' / f'{name}.jpg')
  Image.new('RGB', (40, 40)).save(photos / 'tiny.png')  # Below 64x32 px: skipped and counted.
  [command] = runs.readme_commands('own images')
  argv = [a.replace('/data/photos', str(photos)).replace('workdirs/mine', str(tmp_path / 'mine'))
          for a in command]
  assert argv[:2] == ['.venv/bin/python', 'main.py']
  proc = subprocess.run([sys.executable, *argv[1:], '--config.train.num_steps=2', runs.NO_EVAL],
                        cwd=runs.ROOT, env=runs.env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (f'Image folder {photos}: 3 usable, 0 unreadable, 1 too small (below 64x32 px'
          in proc.stderr)
  assert runs.checkpoint_steps(tmp_path / 'mine') == [2]
