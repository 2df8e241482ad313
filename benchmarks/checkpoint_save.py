"""Saving an array tree with Orbax's default handler and with `model_files.array_tree_handler`.

  .venv/bin/python benchmarks/checkpoint_save.py                    # 400 MB in 100 arrays
  .venv/bin/python benchmarks/checkpoint_save.py --megabytes=16 --arrays=8 --saves=2 --full-disk=2

The training checkpointer saves its state with `model_files.array_tree_handler`, which commits the
writes of a save in one OCDBT transaction; Orbax's default (`ocp.StandardCheckpointHandler`)
writes each array on its own. For each handler, in a fresh process: a `CheckpointManager` saves a
tree of `--arrays` float32 arrays (random, `--megabytes` in all) `--saves` times asynchronously, as
training does; the seconds `save` blocks, the seconds until `wait_until_finished` returns, and the
growth of the process's peak memory. With `--full-disk=N` (root only: it mounts a tmpfs), each
handler also saves 96 arrays of 16 KB on a 4 MB tmpfs until a save fails, N times, and counts the
`RuntimeError: Event loop is closed` reports of each failed save (Orbax closes the event loop of a
save that failed while its other writes are still in flight).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from common import REPO, machine, report

HANDLERS = ('orbax default', 'array_tree_handler')


def _manager(directory: str, handler: str):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  from fmboost_jax import model_files  # pylint: disable=import-outside-toplevel
  if handler == 'orbax default':
    item, save = ocp.StandardCheckpointHandler(), ocp.args.StandardSave
  else:
    item, save = model_files.array_tree_handler(), ocp.args.PyTreeSave
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True, create=True)
  manager = ocp.CheckpointManager(directory, options=options, item_handlers={'state': item})
  return manager, lambda step, tree: manager.save(
      step, args=ocp.args.Composite(state=save(tree)), force=True)


def _tree(megabytes: float, arrays: int, seed: int = 0) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  size = int(megabytes * 1e6 / 4 / arrays)
  return jax.block_until_ready(
      {f'w{i}': jax.numpy.asarray(rng.standard_normal(size, dtype=np.float32))
       for i in range(arrays)})


def timed_saves(handler: str, megabytes: float, arrays: int, saves: int) -> dict:
  """In this process: the seconds of each save and the growth of the peak memory."""
  tree = _tree(megabytes, arrays)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  blocked, total = [], []
  with tempfile.TemporaryDirectory() as directory:
    manager, save = _manager(directory, handler)
    for step in range(saves):
      t0 = time.perf_counter()
      save(step, tree)
      blocked.append(time.perf_counter() - t0)
      manager.wait_until_finished()
      total.append(time.perf_counter() - t0)
    manager.close()
  return {'handler': handler, 'save_blocks_s': blocked, 'saved_s': total,
          'saved_s_median': statistics.median(total),
          'peak_rss_growth_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before}


def failed_save_reports(handler: str, disk: str) -> dict:
  """In this process: saves on the small disk at `disk` until one fails; the `Event loop is
  closed` reports that reach `sys.unraisablehook` within a second after it."""
  reports = []
  sys.unraisablehook = reports.append
  tree = _tree(96 * 16e3 / 1e6, 96)
  manager, save = _manager(os.path.join(disk, 'c'), handler)
  failed_at = None
  for step in range(1, 20):
    try:
      save(step, tree)
      manager.wait_until_finished()
    except Exception:  # noqa: BLE001  (whatever the failed save raised)
      failed_at = step
      break
  time.sleep(1)
  closed = [r for r in reports if 'Event loop is closed' in str(r.exc_value)]
  return {'handler': handler, 'failed_at_step': failed_at, 'closed_loop_reports': len(closed)}


def _child(name: str, *args) -> dict:
  """`name(*args)` in a fresh process (its own peak memory, no loaded handler)."""
  code = (f'import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); '
          f'import checkpoint_save as b; print(json.dumps(b.{name}(*{args!r})))')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        check=False)
  if proc.returncode != 0:
    sys.exit(f'error: the {name} run failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _full_disk_rows(handler: str, tries: int) -> list[dict]:
  rows = []
  with tempfile.TemporaryDirectory() as disk:
    for _ in range(tries):
      mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', disk],
                               capture_output=True, text=True, check=False)
      if mounted.returncode != 0:
        sys.exit(f'error: mounting a 4 MB tmpfs failed ({mounted.stderr.strip()}); run as root '
                 'or leave out --full-disk.')
      try:
        rows.append(_child('failed_save_reports', handler, disk))
      finally:
        subprocess.run(['umount', disk], check=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--megabytes', type=float, default=400)
  parser.add_argument('--arrays', type=int, default=100)
  parser.add_argument('--saves', type=int, default=3)
  parser.add_argument('--full-disk', type=int, default=0,
                      help='Failed saves on a 4 MB tmpfs per handler (needs root).')
  parser.add_argument('--json', help='Also write the results to this file.')
  args = parser.parse_args()
  rows = [_child('timed_saves', h, args.megabytes, args.arrays, args.saves) for h in HANDLERS]
  for row in rows:
    print(f'{row["handler"]}: saved in {row["saved_s_median"]:.2f} s (median), peak memory '
          f'+{row["peak_rss_growth_mib"]:.0f} MiB', file=sys.stderr)
  results = {'machine': machine(), 'megabytes': args.megabytes, 'arrays': args.arrays,
             'saves': rows}
  if args.full_disk:
    results['full_disk'] = {h: _full_disk_rows(h, args.full_disk) for h in HANDLERS}
  report(results, args.json)


if __name__ == '__main__':
  main()
