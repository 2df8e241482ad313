"""`--mode=compile`: the training programs compiled on this CPU machine by XLA's real TPU and GPU
compilers (libtpu's topology descriptions; deviceless CUDA targets), with memory figures a reader
can redo from the parameter count, and one `error:` line for every target or config that cannot
be compiled or does not fit."""

import importlib.metadata
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests import runs

JAX_VERSION = importlib.metadata.version('jax')

# README's compile commands (UNet-base on 128^2 latents) shrunk to seconds of compiling: 16^2
# latents, a 2-level UNet 128 channels wide, so that TPU tiles (8 x 128) pad no parameter array
# and XLA's argument bytes are the state arithmetic's, give or take the scalars.
SHRINK = ('--config.data.high_res_size=128', '--config.data.low_res_size=64',
          '--config.model.model_channels=128', '--config.model.channel_mult=(1,2)',
          '--config.model.attention_levels=(1,)', '--config.model.num_res_blocks=1',
          '--config.model.num_heads=2', '--config.model.head_dim=64')
# XLA's TPU compiler takes minutes over the autoencoder's programs (precompute's encoder, sample's
# decode) even at 128 px: the TPU tests compile the train step, the GPU tests the rest.
TRAIN_ONLY = "--config.compile.programs=('train',)"
# The TPU tests' mesh: both axes, so that one compile shows data parallelism and fsdp.
MESH = ('--config.mesh.data=2', '--config.mesh.fsdp=4', '--config.mesh.fsdp_min_size=4096')
NAMESPACES = shutil.which('unshare') is not None and shutil.which('strace') is not None


def compile_main(workdir, target, *overrides, prelude: str = '',
                 programs: tuple[str, ...] = ('train',)) -> subprocess.CompletedProcess:
  """main.py --mode=compile of configs/demo.py:tiny, compiling `programs` (the train step alone
  by default; config.compile.programs); `prelude` runs first in the same interpreter (e.g. to hide
  a module)."""
  argv = runs.command(workdir, f'--config.compile.target={target}',
                      *(() if 'evaluate' in programs else (runs.NO_EVAL,)),
                      f'--config.compile.programs={programs!r}', *overrides, mode='compile')
  if prelude:
    argv = [sys.executable, '-c', f'{prelude}; import runpy, sys; sys.argv = {argv[1:]!r}; '
            "runpy.run_path('main.py', run_name='__main__')"]
  return subprocess.run(argv, cwd=runs.ROOT, env=runs.env(1), capture_output=True, text=True,
                        timeout=600)


def error_line(result: subprocess.CompletedProcess) -> str:
  """The run's one `error:` line (exit status 1, no traceback)."""
  lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert result.returncode == 1, result.stderr[-2000:]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  return lines[0]


def run_readme_command(index: int, workdir, *extra, trace=None) -> dict:
  """README's compile command `index`, shrunk, into `workdir`; with `trace` (a file), in a
  network namespace with only loopback, its connect() calls traced by strace into it. Returns
  the JSON report, its markdown under 'markdown'."""
  command = runs.readme_commands('compile')[index]
  assert command[:3] == ['.venv/bin/python', 'main.py', '--mode=compile']
  argv = [sys.executable, *[a.replace('workdirs/plan', str(workdir)) for a in command[1:]],
          *SHRINK, *extra]
  if trace:
    argv = ['unshare', '-n', 'sh', '-c', 'ip link set lo up && exec strace -f -qq -e '
            f"trace=connect -o {trace} {shlex.join(argv)}"]
  result = subprocess.run(argv, cwd=runs.ROOT, env=runs.env(1), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  target = next(a for a in command if a.startswith('--config.compile.target='))
  name = target.split('=')[1].replace(':', '_')
  with open(os.path.join(workdir, 'compile', f'{name}.json')) as f:
    report = json.load(f)
  with open(os.path.join(workdir, 'compile', f'{name}.md')) as f:
    report['markdown'] = f.read()
  assert report['markdown'].strip() in result.stdout
  return report


def parameter_shapes() -> list[tuple[int, ...]]:
  """The shrunk UNet's parameter shapes (on 4-channel latents), built abstractly."""
  import jax
  from flax import nnx

  from fmboost_jax import trained_model
  from fmboost_jax.models import layers

  params = layers.abstract(trained_model.network, shrunk_config(), 4)
  return [tuple(x.shape) for x in jax.tree.leaves(nnx.state(params, nnx.Param))]


def shrunk_config():
  from configs import default

  config = default.get_config()
  for o in SHRINK:
    key, value = o.removeprefix('--config.').split('=')
    section, field = key.split('.')
    config[section][field] = eval(value)  # noqa: S307  (the literals above)
  return config


@pytest.fixture(scope='module')
def tpu_report(tmp_path_factory):
  """README's v5e:2x4 command (8 chips, 4 latents each), shrunk, on a mesh of both axes (data=2 x
  fsdp=4: one compile of XLA's TPU compiler, minutes on 2 cores, shows both the data-parallel
  reduction and fsdp's gathers), in a network namespace with only loopback, its connect() calls
  traced."""
  trace = tmp_path_factory.mktemp('trace') / 'connects.txt' if NAMESPACES else None
  report = run_readme_command(0, tmp_path_factory.mktemp('data'), TRAIN_ONLY, *MESH, trace=trace)
  report['connects'] = ([line for line in trace.read_text().splitlines() if 'connect(' in line]
                        if trace else None)
  return report



def _split_by_fsdp(shapes) -> int:
  """Parameters in the arrays fsdp=4 splits (`sharding.array_sharding`): at least 4096 elements
  and a dimension divisible by 4."""
  return sum(math.prod(s) for s in shapes if math.prod(s) >= 4096 and any(d % 4 == 0 for d in s))


@pytest.mark.slow
def test_tpu_state_memory_is_the_parameter_arithmetic(tpu_report):
  shapes = parameter_shapes()
  n = sum(math.prod(s) for s in shapes)
  split = _split_by_fsdp(shapes)
  assert split > 0.9 * n  # The test means something: most of the network is split.
  # Parameters, the two Adam moments and the EMA: 4 float32 copies of every parameter, a quarter
  # of the split ones per chip (the data axis replicates).
  expected = 4 * 4 * (n - split) + 4 * 4 * split // 4
  (step,) = tpu_report['programs']
  assert tpu_report['num_devices'] == 8 and tpu_report['device_kind'] == 'TPU v5 lite'
  assert tpu_report['backend_settings']['compute_dtype'] == 'bfloat16'  # `auto` on TPUs.
  assert step['state_bytes']['parameters'] == step['state_bytes']['ema']
  # Adam's moments: 2 copies, plus the int32 step counts of Adam and of the learning-rate schedule.
  assert step['state_bytes']['adam_moments'] == 2 * step['state_bytes']['parameters'] + 8
  state = sum(step['state_bytes'].values())
  assert state == expected + 8
  # XLA's own figure: the state, the batch (x1 and x_up: 32 latents of 16^2 x 4 float32 over 8
  # chips) and the int32 step counter, within the padding of its tiles.
  batch = 2 * 32 * 16 * 16 * 4 * 4 // 8
  assert step['batch_bytes'] == batch
  assert state + batch <= step['memory']['arguments'] <= 1.1 * (state + batch) + 2**16
  assert step['memory']['fits'] and step['memory']['total'] < 16 * 2**30


@pytest.mark.slow
@pytest.mark.skipif(not NAMESPACES, reason='needs unshare and strace')
def test_compiling_for_a_tpu_connects_nowhere_but_loopback(tpu_report):
  """In a network namespace with only loopback, every connect() of the compile (libtpu
  included) goes to 127.0.0.1 or a local socket, and the compile succeeds there."""
  outside = [c for c in tpu_report['connects']
             if 'AF_INET' in c and '127.0.0.1' not in c or 'AF_INET6' in c and '::1' not in c]
  assert not outside, outside


@pytest.mark.slow
def test_tpu_collectives_follow_the_mesh(tpu_report):
  collectives = tpu_report['programs'][0]['collectives']
  # fsdp gathers the split weights; the gradients are reduced over the data axis (and the
  # replicated ones over all 8 chips): at least a bfloat16 gradient per parameter of this chip's
  # share (XLA may reduce before converting to float32, combine the measurements in, and
  # reduce-scatter the split ones).
  assert collectives.get('all-gather', {}).get('count', 0) > 0, collectives
  shapes = parameter_shapes()
  n, split = sum(math.prod(s) for s in shapes), _split_by_fsdp(shapes)
  reduced = sum(collectives.get(k, {}).get('bytes', 0) for k in ('all-reduce', 'reduce-scatter'))
  assert reduced >= 2 * (n - split) + 2 * split // 4, (collectives, n, split)


@pytest.mark.slow
def test_tpu_flops_are_three_forward_passes(tpu_report):
  """The train step's FLOPs per sample: forward, and a backward of about twice the forward,
  against the forward pass counted on its own."""
  config = shrunk_config()
  config.model.conv_impl = 'xla'  # As on TPUs (`auto` on CPUs counts im2col products).
  forward = runs.forward_flops(config, 16, channels=4)
  step = tpu_report['programs'][0]
  assert 2.7 * forward < step['flops_per_sample'] < 3.6 * forward, (step['flops_per_sample'],
                                                                      forward)
  assert step['flops_per_device'] == pytest.approx(32 * step['flops_per_sample'] / 8)
  peak = 197e12  # TPU v5e's bf16 peak (cloud.google.com/tpu/docs/v5e).
  assert step['step_seconds_at_peak'] == pytest.approx(step['flops_per_device'] / peak)
  # README's command asks what 150 samples/s per chip would need.
  assert step['mfu_for_samples_per_second']['mfu'] == pytest.approx(
      150 * step['flops_per_sample'] / peak)


def test_collectives_are_read_from_the_compiled_program():
  """A hand-written HLO excerpt: a tuple all-reduce whose shape carries /*index=N*/ comments, an
  async all-gather (start counted once, with its result), a reduce-scatter; other ops ignored."""
  from fmboost_jax import costs

  hlo = """
  %all-reduce.1 = (f32[128]{0:T(128)}, /*index=1*/bf16[4,8]{1,0}) all-reduce(%a, %b), to_apply=%add
  %all-gather-start = (f32[2,64]{1,0}, f32[16,64]{1,0}) all-gather-start(%c), dimensions={0}
  %all-gather-done = f32[16,64]{1,0} all-gather-done(%all-gather-start)
  %reduce-scatter.3 = f32[8]{0} reduce-scatter(%d), dimensions={0}
  %add.4 = f32[128]{0} add(%all-reduce.1, %e)
  """
  assert costs.collectives(hlo) == {
      'all-reduce': {'count': 1, 'bytes': 128 * 4 + 32 * 2},
      'all-gather': {'count': 1, 'bytes': 16 * 64 * 4},
      'reduce-scatter': {'count': 1, 'bytes': 8 * 4},
  }


def test_bad_targets_are_one_line(tmp_path):
  line = error_line(compile_main(tmp_path / 'a', 'v9z:2x2'))
  assert "config.compile.target='v9z:2x2' is not a known target" in line
  assert all(k in line for k in ('v5e', 'v5p', 'v6e', 'h100', 'h200', 'a100'))
  line = error_line(compile_main(tmp_path / 'b', 'v5e:2x4', '--config.mesh.data=3'))
  assert 'does not match the 8 devices of the target v5e:2x4' in line
  assert not os.path.exists(tmp_path / 'b' / 'compile')


def test_an_unknown_program_is_one_line(tmp_path):
  line = error_line(compile_main(tmp_path / 'w', 'v5e:2x2', programs=('train', 'sampel')))
  assert line == ("error: config.compile.programs=('train', 'sampel') must hold train and any of "
                  "('evaluate', 'sample', 'precompute'), e.g. "
                  "--config.compile.programs=\"('train',)\".")
  assert not os.path.exists(tmp_path / 'w')  # Nothing left behind.


def test_missing_libtpu_names_the_install(tmp_path):
  line = error_line(compile_main(tmp_path, 'v5e:2x2',
                                 prelude="import os, sys; sys.modules['libtpu'] = None; "
                                 "os.environ.pop('TPU_LIBRARY_PATH', None)"))
  # jax[tpu] of the installed jax's own release brings its libtpu.
  assert 'needs libtpu' in line and f'pip install "jax[tpu]=={JAX_VERSION}"' in line, line


def test_a_config_that_does_not_fit_is_refused_with_settings_that_would(tmp_path):
  """demo:tiny on 256 px images, 64 per chip (attention over 128^2 positions at its second
  level): XLA's TPU compiler finds the temporaries larger than a v5e's 16 GiB; the line says how
  much and what would fit."""
  line = error_line(compile_main(
      tmp_path, 'v5e:2x2', '--config.data.high_res_size=256', '--config.data.low_res_size=128',
      '--config.data.batch_size=256'))
  assert 'on v5e:2x2, but a TPU v5 lite has 16.0 GiB' in line, line
  # The state of this network is a few MiB: splitting it would not help, fewer images would.
  assert 'fsdp' not in line and '--config.model.remat=dots' in line
  assert 'per-device batch of at most about 3 (--config.data.batch_size=12' in line


CUDA = pytest.mark.skipif(
    not runs.CUDA_PLUGIN,
    reason='needs the CUDA plugin (jax[cuda13], in requirements-dev.txt)')


@pytest.mark.slow
@CUDA
def test_gpu_target_compiles_with_cudnn_attention(tmp_path):
  """The tiny config in bfloat16 for one host of 8 H100s: XLA's GPU compiler, cuDNN's fused
  attention (`auto` on GPUs), the gradient all-reduce; its memory against the H100's 80 GB; the
  held-out evaluation (a diffrax solve) too."""
  result = compile_main(tmp_path, 'h100:8', '--config.model.compute_dtype=auto',
                        '--config.model.attention_impl=auto', '--config.data.batch_size=16',
                        '--config.data.num_val_images=16', programs=('train', 'evaluate'))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'compile' / 'h100_8.json') as f:
    report = json.load(f)
  assert report['device_kind'] == 'NVIDIA H100 80GB HBM3' and report['num_devices'] == 8
  assert report['backend_settings'] == {'compute_dtype': 'bfloat16', 'conv_impl': 'xla',
                                        'attention_impl': 'cudnn_or_xla'}
  step, evaluation = report['programs']
  assert (step['name'], evaluation['name']) == ('train step', 'held-out evaluation')
  assert 'all-reduce' in step['collectives']
  assert step['flops_per_sample'] > 0 and step['memory']['fits'] and evaluation['memory']['fits']
  # The evaluation's solve runs the network twice (demo:tiny samples with Euler, NFE 2; XLA counts
  # the loop's body once, the report the whole solve); resizing and the scores add little.
  assert evaluation['solve'] == 'euler, 2 NFE'
  # Its per-image outputs stay split over the GPUs, as the batch is: nothing is gathered.
  assert 'all-gather' not in evaluation['collectives'], evaluation['collectives']
  from configs import demo

  unet = runs.forward_flops(demo.get_config('tiny'), 16)
  assert 2 * unet < evaluation['flops_per_sample'] < 2.2 * unet, (evaluation, unet)
  assert report['hbm_bytes'] == 80 * 10**9


def test_missing_cuda_plugin_names_the_install(tmp_path):
  """Where the plugin is installed, it is hidden from the run."""
  line = error_line(compile_main(
      tmp_path, 'h200:8x4',
      prelude="import sys; sys.modules['jax_plugins.xla_cuda13'] = None"))
  assert 'needs the CUDA plugin' in line
  assert f'pip install "jax[cuda13]=={JAX_VERSION}"' in line, line



@pytest.mark.slow
@CUDA
def test_the_readmes_h200_command(tmp_path):
  """README's second compile command, shrunk: one host of 8 H200s, 32 latents each (README's
  first command is the TPU tests' fixture)."""
  report = run_readme_command(1, tmp_path)
  assert report['device_kind'] == 'NVIDIA H200' and report['num_devices'] == 8
  assert report['global_batch'] == 256 and report['hbm_bytes'] == 141 * 10**9
  step, encoder, solve, decode = report['programs']
  assert step['memory']['fits'] and 0 < step['mfu_for_samples_per_second']['mfu'] < 1
  # Training from latents needs precompute's encoder (8 crops on the host's 8 GPUs), and the
  # trained model sample's solve and decode (config.sample.batch_size=8 latents, one per GPU).
  assert [(p['name'], p['samples'], p['devices']) for p in report['programs'][1:]] == [
      ('precompute encoder', 8, 8), ('sample: solve', 8, 8), ('sample: decode', 8, 8)]
  assert all(p['memory']['fits'] and not p['collectives'] for p in report['programs'][1:])
  # Their FLOPs against the autoencoder's and the network's, each counted on its own: precompute
  # encodes a 128 px crop and its pixel-space upsampled 64 px version; the solve decodes the 8^2
  # latent (64 px), encodes it upsampled to 128 px and runs the network 40 times (Euler, NFE 40);
  # the decode decodes the 16^2 result.
  config = shrunk_config()
  ae = runs.autoencoder_flops(config, 128)
  ae_low = runs.autoencoder_flops(config, 64)
  unet = runs.forward_flops(config, 16, channels=4)
  assert encoder['flops_per_sample'] == pytest.approx(2 * ae['encode'], rel=0.02)
  assert solve['flops_per_sample'] == pytest.approx(
      ae_low['decode'] + ae['encode'] + 40 * unet, rel=0.05)
  assert decode['flops_per_sample'] == pytest.approx(ae['decode'], rel=0.02)


@pytest.mark.slow
@CUDA
def test_a_sampling_batch_that_does_not_fit_is_one_line(tmp_path):
  """demo:tiny on 256 px (attention over 128^2 positions): its train step of 1 image fits an H100,
  its solve of 64 latents at once does not; the line names the setting, and no workdir is left."""
  line = error_line(compile_main(
      tmp_path / 'w', 'h100:1', '--config.data.high_res_size=256',
      '--config.data.low_res_size=128', '--config.data.batch_size=1',
      '--config.sample.batch_size=64', programs=('train', 'sample')))
  assert re.fullmatch(r'error: the sample: solve of 64 samples on 1 device needs [\d.]+ GiB per '
                      r'device, but a NVIDIA H100 80GB HBM3 has 74.5 GiB; lower '
                      r'config.sample.batch_size.', line), line
  assert not os.path.exists(tmp_path / 'w')


def _max_batch_search(monkeypatch, total, *, refused_from=None, batch_size=4):
  """`aot._max_batch` for one H100 (80 GB) from a per-device batch of `batch_size`, with the
  compiler replaced by a model of its memory: `total(batch)` bytes per device, and XLA refusing
  the program outright from `refused_from` images on. Returns the search's result and the batches
  it compiled, in order."""
  from types import SimpleNamespace  # noqa: PLC0415

  import ml_collections  # noqa: PLC0415

  from fmboost_jax import accelerators, aot  # noqa: PLC0415

  compiled = []

  def fits(config, target, devices, per_device):
    compiled.append(per_device)
    if refused_from is not None and per_device >= refused_from:
      return False, None
    report = SimpleNamespace(memory=SimpleNamespace(total=total(per_device)))
    return report.memory.total <= target.kind.hbm_bytes, report

  monkeypatch.setattr(aot, '_fits', fits)
  target = accelerators.parse_target('h100:1')
  assert target.kind.hbm_bytes == 80e9
  step = SimpleNamespace(memory=SimpleNamespace(total=total(batch_size)))
  config = ml_collections.ConfigDict({'data': {'batch_size': batch_size}})
  return aot._max_batch(config, target, None, step), compiled


def test_max_batch_of_memory_linear_in_the_batch_is_the_estimate(monkeypatch):
  """12 GB + 3 GB per image: 4 images take 24 GB, 8 take 36 GB; the line through them reaches
  80 GB at 4 + 56 // 3 = 22 images (78 GB); 22 fits and 23 (81 GB) does not: 3 compiles."""
  found, compiled = _max_batch_search(monkeypatch, lambda b: 12e9 + 3e9 * b)
  assert compiled == [8, 22, 23]
  assert found == {'per_device_batch': 22, 'exact': True, 'estimate': 22, 'compiles': 3,
                   'bytes_per_sample': 3_000_000_000}


def test_max_batch_bisects_where_the_memory_grows_faster_than_the_line(monkeypatch):
  """12 GB + 0.1 GB x batch^2 (attention's scores grow with the square of the tokens, here of the
  batch): 13.6 GB at 4, 18.4 GB at 8, a slope of 1.2 GB and an estimate of 4 + 66.4 // 1.2 = 59
  (360 GB: too many); bisection between 8 and 59: 33 (121 GB) no, 20 (52 GB) fits, 26 (79.6 GB)
  fits, 29 (96 GB) no, 27 (84.9 GB) no: 26 with 27 known not to fit, 7 compiles."""
  found, compiled = _max_batch_search(monkeypatch, lambda b: 12e9 + 0.1e9 * b * b)
  assert compiled == [8, 59, 33, 20, 26, 29, 27]
  assert found == {'per_device_batch': 26, 'exact': True, 'estimate': 59, 'compiles': 7,
                   'bytes_per_sample': 1_200_000_000}


def test_max_batch_from_a_refused_double_and_at_its_bounds(monkeypatch):
  """XLA refusing 8 images outright leaves the slope of the config's own batch alone (40 GB / 4
  images = 10 GB each; estimate 4 + 40 // 10 = 8, known not to fit): 6 and 7 fit, 7 is exact.
  Memory that hardly grows reaches the search's largest batch (4096) and is reported as not exact;
  a search whose compiles run out stops at aot.MAX_BATCH_COMPILES."""
  from fmboost_jax import aot  # noqa: PLC0415

  found, compiled = _max_batch_search(monkeypatch, lambda b: 20e9 + 5e9 * b, refused_from=8)
  assert compiled == [8, 6, 7]
  assert found == {'per_device_batch': 7, 'exact': True, 'estimate': 8, 'compiles': 3,
                   'bytes_per_sample': 10_000_000_000}
  found, compiled = _max_batch_search(monkeypatch, lambda b: 1e9 + 1e6 * b)
  assert compiled == [8, aot.MAX_PER_DEVICE_BATCH] and found['per_device_batch'] == 4096
  assert not found['exact'] and found['compiles'] == 2
  # 1 GB + 1 MB x batch^3 (42 images fit: 75.1 GB; 43 need 80.5): 1.064 GB at 4, 1.512 GB at 8,
  # 112 MB per image and an estimate of 4 + 78.936 // 0.112 = 708; bisection from 708 down runs
  # out of compiles at 40 (65 GB), with 51 known not to fit.
  found, compiled = _max_batch_search(monkeypatch, lambda b: 1e9 + 1e6 * b**3)
  assert compiled == [8, 708, 358, 183, 95, 51, 29, 40] and aot.MAX_BATCH_COMPILES == 8
  assert found == {'per_device_batch': 40, 'exact': False, 'estimate': 708, 'compiles': 8,
                   'bytes_per_sample': 112_000_000}
