"""Start-up of the folder source: `data_sources.scan_image_folder` over many small JPEGs.

What is measured: N JPEGs of S x S px (quality 90, smooth content with noise, in folders of 1000,
like a dataset on disk) are written to a temporary folder (deleted at the end), then the scan is
timed in this process, the in-process cache cleared before every call (as in a new process), the
files in the page cache:

  * cold: no index file (the first start of a run),
  * warm: the index written by the cold scan is present and no file changed (a restart),
  * one changed: one file's mtime moved (a restart after one file was replaced),

each `--repeats` times (median and min), with the number of files whose header (or, in the code
before the index, whole image) was read: the scan's `_probe_file` calls, counted by a wrapper. The
code without an index (scan_image_folder without `index_dir`, which decodes every file) is
measured the same way; its cold and warm rows are the same work.

Usage, from the repo root (about a minute for 10,000 files on 2 cores; --smoke: 40 files):

  .venv/bin/python benchmarks/folder_scan.py [--num-images 10000] [--size 64] [--threads 8]
      [--repeats 3] [--json PATH] [--tmp DIR] [--smoke]
"""

import argparse
import inspect
import os
import shlex
import shutil
import statistics
import tempfile
import time

import numpy as np
from common import machine, report, shown_args  # common puts the repo on sys.path.
from PIL import Image

from fmboost_jax import data_sources as ds


def write_jpegs(root: str, num: int, size: int) -> float:
  """Writes `num` size x size JPEGs under root/NNN/ (1000 per folder); returns the seconds."""
  t0 = time.perf_counter()
  rng = np.random.default_rng(0)
  base = np.linspace(0, 200, size, dtype=np.float32)
  for i in range(num):
    folder = os.path.join(root, f'{i // 1000:03d}')
    if i % 1000 == 0:
      os.makedirs(folder, exist_ok=True)
    pixels = base[None, :, None] + base[:, None, None] * 0.2 + rng.normal(0, 12, (size, size, 3))
    Image.fromarray(np.clip(pixels + i % 50, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f'{i:06d}.jpg'), quality=90)
  return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num-images', type=int, default=10_000)
  parser.add_argument('--size', type=int, default=64, help='Side of the square JPEGs, px.')
  parser.add_argument('--threads', type=int, default=8,
                      help='config.data.num_threads (the default config: 8).')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', help='Also write the results here.')
  parser.add_argument('--tmp', help='Folder for the synthetic files (default: the system temp).')
  parser.add_argument('--smoke', action='store_true', help='40 files, 1 repeat.')
  args = parser.parse_args()
  if args.smoke:
    args.num_images, args.repeats = 40, 1

  with_index = 'index_dir' in inspect.signature(ds.scan_image_folder).parameters
  probed = []
  probe = ds._probe_file  # pylint: disable=protected-access
  ds._probe_file = lambda *a, **k: probed.append(1) or probe(*a, **k)  # pylint: disable=protected-access
  geometry = ds.Geometry(args.size // 2)
  tmp = tempfile.mkdtemp(prefix='folder_scan_', dir=args.tmp)
  try:
    root, index_dir = os.path.join(tmp, 'images'), os.path.join(tmp, 'workdir')
    write_seconds = write_jpegs(root, args.num_images, args.size)

    def scan():
      ds._SCAN_CACHE.clear()  # pylint: disable=protected-access
      probed.clear()
      t0 = time.perf_counter()
      result = (ds.scan_image_folder(root, geometry, args.threads, index_dir=index_dir)
                if with_index else ds.scan_image_folder(root, geometry, args.threads))
      seconds = time.perf_counter() - t0
      assert len(result.usable) == args.num_images, result.summary(geometry, 2**62)
      return seconds, len(probed)

    changed = os.path.join(root, '000', '000000.jpg')
    cases = {  # The last cold scan leaves its index for the warm rows.
        'cold': lambda: shutil.rmtree(index_dir, ignore_errors=True),
        'warm': lambda: None,
        'one changed': lambda: os.utime(changed, ns=(time.time_ns(), time.time_ns())),
    }
    rows = []
    for case, prepare in cases.items():
      times, probes = [], set()
      for _ in range(args.repeats):
        prepare()
        seconds, count = scan()
        times.append(seconds)
        probes.add(count)
      rows.append({'case': case, 'seconds_median': statistics.median(times),
                   'seconds_min': min(times), 'probed': sorted(probes),
                   'ms_per_file': statistics.median(times) / args.num_images * 1e3})
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  results = {
      'machine': machine(), 'smoke': args.smoke, 'index': with_index,
      'command': shlex.join(['.venv/bin/python', 'benchmarks/folder_scan.py',
                             *shown_args()]),
      'num_images': args.num_images, 'size': args.size, 'threads': args.threads,
      'repeats': args.repeats, 'write_seconds': write_seconds, 'rows': rows}
  report(results, args.json)
  print(f"\n{'header-only scan with an index' if with_index else 'full-decode scan, no index'}: "
        f'{args.num_images} JPEGs of {args.size}x{args.size} px, num_threads={args.threads}\n')
  print('| start | s (median) | s (min) | ms / file | files probed |')
  print('|---|---:|---:|---:|---:|')
  for r in rows:
    print(f"| {r['case']} | {r['seconds_median']:.3f} | {r['seconds_min']:.3f} | "
          f"{r['ms_per_file']:.3f} | {'/'.join(map(str, r['probed']))} |")


if __name__ == '__main__':
  main()
