"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this directory
is on sys.path): config overrides, the machine's measured peak, memory, the machine line, and
the timing helpers of input_pipeline.py and input_formats.py."""

import ast
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


def apply_settings(config, settings: list[str]) -> None:
  """Applies `section.field=value` overrides (values parsed as Python literals unless strings)."""
  for setting in settings:
    key, value = setting.split('=', 1)
    section, field = key.split('.')
    current = config[section][field]
    config[section][field] = value if isinstance(current, str) else ast.literal_eval(value)


def peak_flops(n: int = 4096, repeats: int = 5) -> float:
  """FLOP/s of a float32 n x n x n matrix product in JAX (the machine's practical peak)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times)


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
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def machine() -> str:
  """One line: CPU, cores, memory, date, library versions."""
  with open('/proc/cpuinfo') as f:
    cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '?')
  with open('/proc/meminfo') as f:
    mem_gib = int(next(line.split()[1] for line in f if line.startswith('MemTotal'))) / 2**20
  versions = []
  for package in ('jax', 'jaxlib', 'flax', 'torch', 'diffusers'):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      versions.append(f'{package} {importlib.metadata.version(package)}')
  return (f'{cpu}, {len(os.sched_getaffinity(0))} usable cores, {mem_gib:.0f} GiB RAM, no '
          f'accelerator; Python {sys.version.split()[0]}, {", ".join(versions)}; '
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
