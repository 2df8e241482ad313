"""Helpers for tests that run `main.py` in a subprocess and read what it wrote."""

import glob
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests' programs are tiny: XLA spends far longer compiling them than running them, so they are
# compiled without LLVM's expensive optimisations (a third less time per tiny training run). Runs
# that do real work (the demo's 1000 steps, the rehearsal at 1024 px) keep XLA's defaults.
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


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


def scalars(workdir, tag: str) -> dict[int, float]:
  """All values of a scalar written by the clu writer, by step."""
  from tensorflow.core.util import event_pb2  # noqa: PLC0415
  from tensorflow.python.framework import tensor_util  # noqa: PLC0415
  from tensorflow.python.lib.io import tf_record  # noqa: PLC0415

  values = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for record in tf_record.tf_record_iterator(path):
      event = event_pb2.Event.FromString(record)
      for v in event.summary.value:
        if v.tag == tag:
          values[event.step] = float(tensor_util.MakeNdarray(v.tensor))
  return values


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


def flat(tree) -> dict[str, np.ndarray]:
  import jax  # noqa: PLC0415
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def train_tiny(workdir, **overrides) -> str:
  """Trains `configs/demo.py:tiny` for 2 steps in this process (overrides: section__field=value)
  and returns the workdir."""
  from configs import demo  # noqa: PLC0415
  from fmboost_jax import train  # noqa: PLC0415

  config = demo.get_config('tiny')
  config.train.num_steps = 2
  config.train.checkpoint_every = 2
  for key, value in overrides.items():
    section, field = key.split('__')
    config[section][field] = value
  train.train_and_evaluate(config, str(workdir))
  return str(workdir)
