"""Helpers for tests that run `main.py` in a subprocess and read what it wrote."""

import glob
import importlib.util
import os
import socket
import struct
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests' programs are tiny: XLA spends far longer compiling them than running them, so they are
# compiled without LLVM's expensive optimisations (a third less time per tiny training run). Runs
# that do real work (the demo's 700 steps, the rehearsal's encoding of 1024 px photographs) keep
# XLA's defaults.
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
# Runs that test the loop (resume, meshes, signals, checkpoints) skip the held-out evaluation, a
# quarter of a tiny run; the demo, the rehearsal and the tests of evaluation keep it.
NO_EVAL = '--config.train.eval_every=0'


def installed(module: str) -> bool:
  """Whether `module` (dotted names too) can be imported, without importing it."""
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # A parent package is missing.
    return False


CUDA_PLUGIN = installed('jax_plugins.xla_cuda13')


def xla_flags(devices: int, fast_compile: bool = True) -> str:
  return f'--xla_force_host_platform_device_count={devices}' + (
      f' {FAST_COMPILE}' if fast_compile else '')


def env(devices: int = 1, fast_compile: bool = True) -> dict[str, str]:
  e = dict(os.environ)
  e['XLA_FLAGS'] = xla_flags(devices, fast_compile)
  e['TF_CPP_MIN_LOG_LEVEL'] = '2'
  return e


def command(workdir, *overrides, config='configs/demo.py:tiny', mode='train') -> list[str]:
  return [sys.executable, 'main.py', f'--config={config}', f'--workdir={workdir}', f'--mode={mode}',
          *overrides]


def run_main(workdir, *overrides, devices: int = 1, config='configs/demo.py:tiny',
             mode='train', timeout: float = 600,
             fast_compile: bool = True) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, *overrides, config=config, mode=mode), cwd=ROOT,
                        env=env(devices, fast_compile), capture_output=True, text=True,
                        timeout=timeout)


def free_port() -> int:
  """A TCP port no process on this machine listens on now (for a coordinator address)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def scalars(workdir, tag: str) -> dict[int, float]:
  """All values of a scalar in the workdir's TensorBoard event files, by step."""
  from tensorboard.compat.proto import event_pb2  # noqa: PLC0415
  from tensorboard.util import tensor_util  # noqa: PLC0415

  values = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for record in tf_records(path):
      event = event_pb2.Event.FromString(record)
      for v in event.summary.value:
        if v.tag == tag:
          values[event.step] = float(tensor_util.make_ndarray(v.tensor))
  return values


def tf_records(path) -> list[bytes]:
  """The records of a TFRecord file (length, checksum, data, checksum), checksums verified."""
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c  # noqa: PLC0415

  records = []
  with open(path, 'rb') as f:
    while header := f.read(12):
      (length,), (header_crc,) = struct.unpack('<Q', header[:8]), struct.unpack('<I', header[8:])
      data, (data_crc,) = f.read(length), struct.unpack('<I', f.read(4))
      assert (header_crc, data_crc) == (masked_crc32c(header[:8]), masked_crc32c(data)), path
      records.append(data)
  return records


def checkpoint_steps(workdir) -> list[int]:
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def restore_state(workdir, step: int) -> dict:
  """The saved train state as a nested dict of numpy arrays (whatever devices saved it)."""
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415

  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step), 'state')
  with ocp.PyTreeCheckpointer() as ckptr:
    metadata = ckptr.metadata(path)
    metadata = getattr(metadata, 'item_metadata', metadata)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def saved_position(workdir, step: int) -> dict:
  """The `position` item of a checkpoint: {'process_count': N, 'position': the iterator state}."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(path, args=ocp.args.Composite(
        position=ocp.args.JsonRestore()))['position']


def flat(tree) -> dict[str, np.ndarray]:
  import jax  # noqa: PLC0415
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def train_tiny(workdir, **overrides) -> str:
  """Trains `configs/demo.py:tiny` for 2 steps in this process, without the held-out evaluation
  (overrides: section__field=value) and returns the workdir."""
  from configs import demo  # noqa: PLC0415
  from fmboost_jax import train  # noqa: PLC0415

  config = demo.get_config('tiny')
  config.train.num_steps = 2
  config.train.checkpoint_every = 2
  config.train.eval_every = 0
  for key, value in overrides.items():
    section, field = key.split('__')
    config[section][field] = value
  train.train_and_evaluate(config, str(workdir))
  return str(workdir)


def forward_flops(config, size: int, channels: int = 3) -> float:
  """XLA's FLOPs of one forward pass of `config`'s network on one [size, size] input, lowered on
  its own (to compare a step's FLOPs with: forward and backward are about 3 forward passes)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from fmboost_jax import trained_model  # noqa: PLC0415
  from fmboost_jax.models import layers  # noqa: PLC0415

  graphdef, params = nnx.split(layers.abstract(trained_model.network, config, channels))
  return jax.jit(lambda p, x, t: nnx.merge(graphdef, p)(x, t)).lower(
      params, jax.ShapeDtypeStruct((1, size, size, 2 * channels), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.float32)).cost_analysis()['flops']


def autoencoder_flops(config, size: int) -> dict[str, float]:
  """XLA's FLOPs of the first stage of `config` encoding one [size, size] image and decoding its
  latents, each lowered on its own (abstract weights)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from fmboost_jax import first_stages  # noqa: PLC0415

  first_stage = first_stages.first_stage_from_config(config, weights_loaded=False)
  graphdef, params = nnx.split(first_stage)
  latent = size // first_stage.factor
  cost = lambda fn, shape: jax.jit(lambda p, x: fn(nnx.merge(graphdef, p), x)).lower(
      params, jax.ShapeDtypeStruct(shape, jnp.float32)).cost_analysis()['flops']
  return {'encode': cost(lambda m, x: m.encode(x), (1, size, size, 3)),
          'decode': cost(lambda m, z: m.decode(z), (1, latent, latent, first_stage.channels))}


def readme_commands(name: str) -> list[list[str]]:
  """The commands of README's block between `<!-- NAME: begin -->` and `<!-- NAME: end -->`,
  continuation lines joined, comments left out."""
  return docs_commands(name, 'README.md')


def docs_commands(name: str, document: str) -> list[list[str]]:
  """`readme_commands` of another document (a path from the repository's root)."""
  import shlex  # noqa: PLC0415

  with open(os.path.join(ROOT, document)) as f:
    text = f.read()
  block = text.split(f'<!-- {name}: begin -->')[1].split(f'<!-- {name}: end -->')[0]
  lines = [line for line in block.replace('\\\n', ' ').splitlines()
           if line.strip() and not line.startswith(('#', '```'))]
  return [shlex.split(line) for line in lines]
