"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this directory
is on sys.path): config overrides, the machine's measured peak, pipelined timing, the compiled
train step and random weights (train_step.py, accelerator.py), memory, the machine line, and the
timing helpers of input_pipeline.py and input_formats.py."""

import contextlib
import datetime
import gc
import importlib.metadata
import json
import multiprocessing
import os
import resource
import statistics
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
MiB = 2.0**20


def define_config_flag(default: str):
  """Defines main.py's `--config` flag: an ml_collections config file (`FILE` or `FILE:variant`,
  default `default` in this repository) with `--config.section.field=value` overrides, parsed as
  main.py parses them. Returns the flag holder; the scripts run under `absl.app.run`."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  return config_flags.DEFINE_config_file(
      'config', os.path.join(REPO, default),
      'The config file and --config.section.field=value overrides, as main.py takes them.')


def config_file() -> str:
  """The `--config` file of this run, relative to the repository (with its `:variant`)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  return os.path.relpath(config_flags.get_config_filename(flags.FLAGS['config']), REPO)


def config_overrides() -> list[str]:
  """This run's `--config.section.field=value` overrides, as `section.field=value`."""
  return [a[len('--config.'):] for a in sys.argv[1:] if a.startswith('--config.')]


def peak_flops(n: int = 4096, repeats: int = 5, dtype: str = 'float32', calls: int = 1) -> float:
  """FLOP/s of an n x n x n matrix product in JAX (the machine's practical peak): the median over
  `repeats` of `calls` products run back to back (one wait at the end), on random inputs."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  return 2 * n**3 / statistics.median(pipelined_seconds(lambda: dot(a, b), calls, repeats))


def pipelined_seconds(run, calls: int, repeats: int) -> list[float]:
  """Seconds per call of `run()` called `calls` times back to back and waited for once at the end
  (as a training loop runs its steps), for each of `repeats` repeats."""
  import jax  # pylint: disable=import-outside-toplevel
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = run()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls)
  return times


def random_params(abstract, seed: int = 0):
  """Random values for the nnx.Params of an abstract module (`nnx.eval_shape`), drawn with numpy
  on the host, where random initialisation under jit compiles slowly (a CPU): kernels
  U(+-1/sqrt(fan_in)) as PyTorch draws them, norm scales 1 + 0.1 N(0, 1), all else 0.1 N(0, 1)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  values = []
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    if path[-1] == 'kernel':
      bound = 1.0 / np.sqrt(np.prod(var.shape[:-1]))
      value = (rng.random(var.shape, np.float32) * 2 - 1) * np.float32(bound)
    else:
      value = rng.standard_normal(var.shape, np.float32) * np.float32(0.1)
      value += np.float32(path[-1] == 'scale')
    values.append((path, var.replace(value=jnp.asarray(value))))
  return nnx.from_flat_state(values)


def compile_train_step(config, channels: int, batch: dict, donate: bool = True,
                       params=None) -> dict:
  """`train.train_step` of `config` (identity first stage, so `batch` holds images or precomputed
  latents {'x1', 'x_up'}) AOT-compiled for `batch`: {'step': compiled(state, batch, first-stage
  params) -> (state, measurements), 'state', 'first_stage_params', 'lowered', 'compile_seconds'
  (tracing, lowering and compilation)}. The state is `train.init_state`'s, or starts from
  `params` (a pure dict) when given; it is donated to the step unless not `donate`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from fmboost_jax import first_stages, train, trained_model  # pylint: disable=import-outside-toplevel
  from fmboost_jax.models import backends  # pylint: disable=import-outside-toplevel
  first_stage_graphdef, first_stage_params = nnx.split(first_stages.IdentityFirstStage())
  tx = train.make_optimizer(config.optim)
  graphdef = trained_model.model_graphdef(config, channels)
  if params is None:
    state = jax.jit(lambda k: train.init_state(config, channels, tx, k))(jax.random.key(0))
  else:  # The EMA weights a copy, so that no buffer is donated twice.
    state = jax.jit(lambda p: train.TrainState(
        step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
        ema_params=jax.tree.map(jnp.copy, p)))(params)
  key = jax.random.key(1)
  t0 = time.perf_counter()
  lowered = jax.jit(lambda s, b, f: train.train_step(
      s, b, f, key, graphdef=graphdef, first_stage_graphdef=first_stage_graphdef, tx=tx,
      config=config), donate_argnums=(0,) if donate else ()).lower(state, batch, first_stage_params)
  step = lowered.compile(compiler_options=backends.compiler_options(
      jax.default_backend(), config.train.cpu_compiler_options))  # As the training loop does.
  return {'step': step, 'state': state, 'first_stage_params': first_stage_params,
          'lowered': lowered, 'compile_seconds': time.perf_counter() - t0}


def peak_rss_mib() -> float:
  """This process's peak resident memory so far."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def xla_memory(compiled) -> dict[str, float]:
  """XLA's buffer sizes of a compiled function, in MiB."""
  m = compiled.memory_analysis()
  return {'temp_mib': getattr(m, 'temp_size_in_bytes', 0) / MiB,
          'argument_mib': getattr(m, 'argument_size_in_bytes', 0) / MiB,
          'output_mib': getattr(m, 'output_size_in_bytes', 0) / MiB}


def flops(compiled) -> float:
  """XLA's FLOP count of a compiled (or lowered: before XLA's optimisations) function."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def machine(accelerator: str = '') -> str:
  """One line: CPU, cores, memory, the accelerator (none unless named), date, library versions."""
  with open('/proc/cpuinfo') as f:
    cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '?')
  with open('/proc/meminfo') as f:
    mem_gib = int(next(line.split()[1] for line in f if line.startswith('MemTotal'))) / 2**20
  versions = []
  for package in ('jax', 'jaxlib', 'flax', 'torch', 'diffusers'):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      versions.append(f'{package} {importlib.metadata.version(package)}')
  return (f'{cpu}, {len(os.sched_getaffinity(0))} usable cores, {mem_gib:.0f} GiB RAM, '
          f'{accelerator or "no accelerator"}; Python {sys.version.split()[0]}, '
          f'{", ".join(versions)}; '
          f'{datetime.datetime.now():%Y-%m-%d %H:%M}')


def report(results: dict, json_path: str | None) -> None:
  """Prints the results as JSON and, if asked (--json, as benchmarks/run.py does), writes them."""
  print(json.dumps(results, indent=2))
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(results, f, indent=2)


def shown_args() -> list[str]:
  """This run's arguments without --json (a temporary file when benchmarks/run.py calls)."""
  args, skip = [], False
  for a in sys.argv[1:]:
    if skip or a.startswith('--json'):
      skip = a == '--json' and not skip
      continue
    args.append(a)
  return args


# ------------------------------------------ timing helpers of the input pipeline benchmarks


def _cores() -> int:
  return len(os.sched_getaffinity(0))


def _close(iterator, timeout: float = 60.0) -> None:
  """Closes a grain iterator and waits until its prefetch threads have finished their work (a
  closed thread pool lets running tasks complete), so that no row pays for the previous one."""
  close = getattr(iterator, 'close', None)
  if close:
    close()
  gc.collect()
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and any(
      t.name.startswith('grain') and t is not threading.current_thread()
      for t in threading.enumerate()):
    time.sleep(0.01)


def cpu_seconds() -> float:
  """CPU time (user + system) of this process's threads and of its live multiprocessing
  children (grain's mp_prefetch workers)."""
  total = time.process_time()
  tick = os.sysconf('SC_CLK_TCK')
  for child in multiprocessing.active_children():
    try:
      with open(f'/proc/{child.pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    except (OSError, IndexError, ValueError):
      pass
  return total


def time_batches(iterator, batch_size: int, warmup: int, seconds: float,
                 min_batches: int = 3) -> dict:
  """Samples/s of `next(iterator)` after `warmup` batches, over at least `seconds`, and the CPU
  time spent meanwhile (all threads and worker processes): cores busy = CPU s / wall s."""
  t0 = time.perf_counter()
  for _ in range(warmup):
    next(iterator)
  start, cpu = time.perf_counter(), cpu_seconds()
  n = 0
  while n < min_batches or time.perf_counter() - start < seconds:
    next(iterator)
    n += 1
  elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
  return {'samples_per_second': n * batch_size / elapsed, 'batches': n, 'seconds': elapsed,
          'warmup_seconds': start - t0, 'cpu_seconds': cpu, 'cores_busy': cpu / elapsed,
          'samples_per_cpu_second': n * batch_size / max(cpu, 1e-9)}
