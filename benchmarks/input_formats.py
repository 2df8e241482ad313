"""The input formats part of benchmarks/input_pipeline.py (parts 2 to 4 of its docstring).

  2. Storage format: random-order single-record reads of the precomputed latents through a grain
     MapDataset, records/s, from the .npy shards (the pipeline's `_LatentRecords`) against the
     same records in ArrayRecord files (`bench_storage`).
  3. JPEGs: images/s and images per CPU second of the 'folder' source's
     `create_train_iterator` (or the same decode, crop, flip and batch through a grain MapDataset)
     over num_threads, and the cores one GPU's train step needs (`bench_jpegs`).
  4. One huge PNG: seconds and peak RSS of `images.decode_image_file` in a fresh process
     (`bench_huge_png`).

benchmarks/input_pipeline.py writes the synthetic data, calls these and prints the tables.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
from common import REPO, _close, _cores, time_batches  # common puts the repo on sys.path.

TRAIN_STEP_SAMPLES_PER_SECOND = 150  # UNet-base, 128x128x8 latents, one H100/H200 (the issue).


# ----------------------------------------------------------------------------- storage formats


def array_record_version() -> str | None:
  try:
    import array_record  # pylint: disable=import-outside-toplevel,unused-import # noqa: F401
  except ImportError:
    return None
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  try:
    return importlib.metadata.version('array_record')
  except importlib.metadata.PackageNotFoundError:
    return '?'


def write_array_record(path: str, latents_path: str, meta: dict) -> list[str]:
  """The same records as ArrayRecord files (one per .npy shard): raw bytes of x1 then x_up."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  files = []
  for shard in meta['shards']:
    x1 = np.load(os.path.join(latents_path, shard['x1']), mmap_mode='r')
    x_up = np.load(os.path.join(latents_path, shard['x_up']), mmap_mode='r')
    name = os.path.join(path, shard['x1'].replace('x1-', 'latents-').replace('.npy',
                                                                             '.array_record'))
    writer = array_record_module.ArrayRecordWriter(name, 'group_size:1,uncompressed')
    for a, b in zip(x1, x_up):
      writer.write(a.tobytes() + b.tobytes())
    writer.close()
    files.append(name)
  return files


class _NpyRecords:
  """The .npy record reader of the pipeline (`_LatentRecords`), or an equal copy if it changed."""

  def __init__(self, path: str, shards: list[dict]):
    self._arrays = [(np.load(os.path.join(path, sh['x1']), mmap_mode='r'),
                     np.load(os.path.join(path, sh['x_up']), mmap_mode='r')) for sh in shards]
    self._ends = np.cumsum([len(a) for a, _ in self._arrays])

  def __len__(self) -> int:
    return int(self._ends[-1])

  def __getitem__(self, index: int) -> dict:
    shard = int(np.searchsorted(self._ends, index, side='right'))
    offset = index - (int(self._ends[shard - 1]) if shard else 0)
    x1, x_up = self._arrays[shard]
    return {'x1': np.array(x1[offset]), 'x_up': np.array(x_up[offset])}


class _FromBytes:
  """bytes of x1 then x_up -> {'x1', 'x_up'} float32 arrays of `shape` (no copy)."""

  def __init__(self, shape):
    self.shape = tuple(shape)

  def __call__(self, record: bytes) -> dict:
    array = np.frombuffer(record, np.float32).reshape(2, *self.shape)
    return {'x1': array[0], 'x_up': array[1]}


def time_records(dataset, seconds: float, warmup: int = 16, chunk: int = 64) -> dict:
  iterator = iter(dataset)
  for _ in range(warmup):
    next(iterator)
  start, n = time.perf_counter(), 0
  while n < 4 * chunk or time.perf_counter() - start < seconds:
    for _ in range(chunk):
      next(iterator)
    n += chunk
  elapsed = time.perf_counter() - start
  _close(iterator)
  return {'records_per_second': n / elapsed, 'records': n, 'seconds': elapsed}


def bench_storage(args, latents_path: str, meta: dict, array_record_files: list[str] | None):
  import grain  # pylint: disable=import-outside-toplevel

  from fmboost_jax import data_sources  # pylint: disable=import-outside-toplevel
  try:
    records = data_sources._LatentRecords  # pylint: disable=protected-access
    npy = records(latents_path, meta['shards'])
    npy_reader = 'data_sources._LatentRecords'
  except Exception as e:  # pylint: disable=broad-except
    print(f'data_sources._LatentRecords unavailable ({type(e).__name__}: {e}); using a copy.')
    npy, npy_reader = _NpyRecords(latents_path, meta['shards']), 'a copy of _LatentRecords'
  sources = [('npy (mmap)', grain.MapDataset.source(npy))]
  if array_record_files:
    source = grain.sources.ArrayRecordDataSource(array_record_files)
    sources.append(('array_record', grain.MapDataset.source(source).map(
        _FromBytes(meta['latent_shape']))))
  rows = []
  for name, dataset in sources:
    dataset = dataset.shuffle(seed=0).repeat(None)
    for threads in args.storage_threads:
      buffered = max(threads, 64)
      r = time_records(dataset.to_iter_dataset(grain.ReadOptions(
          num_threads=threads, prefetch_buffer_size=buffered)), args.storage_seconds)
      r.update(format=name, num_threads=threads, mib_per_second=r['records_per_second'] *
               2 * int(np.prod(meta['latent_shape'])) * 4 / 2**20)
      rows.append(r)
      print(f"{name}, num_threads={threads}: {r['records_per_second']:.0f} records/s", flush=True)
  return {'rows': rows, 'npy_reader': npy_reader}


# ----------------------------------------------------------------------------- JPEGs


def write_jpegs(path: str, count: int, size: int, noise: float) -> dict:
  """COUNT size x size JPEGs (quality 90) from the bundled photographs: square crops at a few
  offsets, flipped every other round, resized (bicubic), plus Gaussian noise of `noise` levels."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  from fmboost_jax import images  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  photos = images.load_skimage_photos()
  rng = np.random.default_rng(0)
  nbytes = []
  for i in range(count):
    name, image = photos[i % len(photos)]
    k = i // len(photos)
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = [(d * (k % 3)) // 2 for d in (h - side, w - side)]
    crop = image[top:top + side, left:left + side]
    if k % 2:
      crop = crop[:, ::-1]
    out = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(
        (size, size), Image.Resampling.BICUBIC), np.float32)
    if noise:
      out = out + rng.normal(0, noise, out.shape).astype(np.float32)
    file = os.path.join(path, f'{i:03d}-{name}.jpg')
    Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8)).save(file, quality=90)
    nbytes.append(os.path.getsize(file))
  return {'count': count, 'size': size, 'mean_kib': float(np.mean(nbytes)) / 1024,
          'noise': noise}


class _DecodeCropFlip:
  """decode_image_file + random size x size crop + random horizontal flip + normalize."""

  def __init__(self, paths: list[str], size: int):
    self.paths, self.size = paths, size

  def __call__(self, index: int, rng: np.random.Generator) -> dict:
    from fmboost_jax import images  # pylint: disable=import-outside-toplevel
    image = images.decode_image_file(self.paths[index % len(self.paths)])
    s, (h, w) = self.size, image.shape[:2]
    top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    crop = image[top:top + s, left:left + s]
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    return {'image': np.ascontiguousarray(crop)}  # uint8 pixels, as the pipeline sends them.


def folder_config(path: str, size: int, batch_size: int, num_threads: int):
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.data.source = 'folder'
  config.data.path = path
  config.data.high_res_size = size
  config.data.low_res_size = size // 2
  config.data.batch_size = batch_size
  config.data.num_threads = num_threads
  return config


def bench_jpegs(args, path: str) -> dict:
  import grain  # pylint: disable=import-outside-toplevel

  from fmboost_jax import data_sources, input_pipeline  # pylint: disable=import-outside-toplevel
  cores, rows, note, via = _cores(), [], '', 'create_train_iterator'
  paths = sorted(os.path.join(path, f) for f in os.listdir(path))
  t0 = time.perf_counter()
  try:
    iterator = input_pipeline.create_train_iterator(
        folder_config(path, args.jpeg_size, args.jpeg_batch_size, args.jpeg_threads[0]))
    _close(iterator)
  except data_sources.DataError as e:
    via = 'direct'
    note = (f'create_train_iterator refused the {args.jpeg_size} px folder ({e}); timing the same '
            'work (decode_image_file, random crop, random flip, batch) through a grain '
            'MapDataset with the same ReadOptions instead.')
    print(note, flush=True)
  startup = time.perf_counter() - t0  # The folder scan (decodes every file once), when it ran.
  for threads in args.jpeg_threads:
    buffered = max(threads, 32 // args.jpeg_batch_size)  # As the pipeline buffers (default 32).
    if via == 'create_train_iterator':
      iterator = input_pipeline.create_train_iterator(
          folder_config(path, args.jpeg_size, args.jpeg_batch_size, threads))
    else:
      dataset = (grain.MapDataset.range(len(paths)).shuffle(seed=0).repeat(None)
                 .random_map(_DecodeCropFlip(paths, args.jpeg_size), seed=1)
                 .batch(args.jpeg_batch_size, drop_remainder=True))
      iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(
          num_threads=threads, prefetch_buffer_size=buffered)))
    r = time_batches(iterator, args.jpeg_batch_size, args.jpeg_warmup, args.jpeg_seconds)
    if threads == args.jpeg_threads[0]:  # What one image costs from host to device.
      batch = next(iterator)
      bytes_per_image = sum(v.nbytes for v in batch.values()) / args.jpeg_batch_size
      dtypes = sorted({str(v.dtype) for v in batch.values()})
    _close(iterator)
    threads_cores = min(max(threads, 1), cores)
    rows.append({'num_threads': threads, 'images_per_second': r.pop('samples_per_second'),
                 'images_per_cpu_second': r.pop('samples_per_cpu_second'),
                 'threads_cores': threads_cores, **r})
    rows[-1]['images_per_threads_core'] = rows[-1]['images_per_second'] / threads_cores
    print(f"jpeg, num_threads={threads}: {rows[-1]['images_per_second']:.1f} images/s, "
          f"{rows[-1]['images_per_cpu_second']:.1f} per CPU second ({r['cores_busy']:.2f} cores "
          'busy)', flush=True)
  best = max(r['images_per_cpu_second'] for r in rows)
  return {'rows': rows, 'via': via, 'note': note, 'startup_seconds': startup,
          'host_to_device_bytes_per_image': bytes_per_image, 'batch_dtypes': dtypes,
          'best_images_per_core': best,
          'cores_per_gpu': TRAIN_STEP_SAMPLES_PER_SECOND / best}


# ----------------------------------------------------------------------------- a huge image

_DECODE = r'''
import json, sys, time, warnings
from PIL import Image
from fmboost_jax import images
def rss():  # Peak resident memory of this process (VmHWM; ru_maxrss would include the parent's).
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) for l in f if l.startswith('VmHWM')) / 1024
path = sys.argv[1]
t0 = time.perf_counter()
with Image.open(path) as img:
  header = img.size
header_seconds = time.perf_counter() - t0
before = rss()
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  t0 = time.perf_counter()
  image = images.decode_image_file(path)
  seconds = time.perf_counter() - t0
print(json.dumps({'shape': list(image.shape), 'seconds': seconds, 'header_seconds': header_seconds,
                  'rss_before_mib': before, 'peak_rss_mib': rss(),
                  'array_mib': image.nbytes / 2**20,
                  'warnings': sorted({type(w.message).__name__ for w in caught})}))
'''


def bench_huge_png(path: str, size: int) -> dict:
  from PIL import Image  # pylint: disable=import-outside-toplevel

  from fmboost_jax import images  # pylint: disable=import-outside-toplevel
  name, photo = images.load_skimage_photos()[0]
  t0 = time.perf_counter()
  Image.fromarray(photo).resize((size, size), Image.Resampling.BILINEAR).save(
      path, compress_level=1)
  make_seconds = time.perf_counter() - t0
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, '-c', _DECODE, path], cwd=REPO, env=env,
                        capture_output=True, text=True, check=False)
  file_mib = os.path.getsize(path) / 2**20
  os.remove(path)
  if proc.returncode:
    return {'size': size, 'error': proc.stderr.strip().splitlines()[-1]}
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  r.update(size=size, photo=name, file_mib=file_mib, make_seconds=make_seconds,
           peak_increase_mib=r['peak_rss_mib'] - r['rss_before_mib'])
  print(f"huge PNG {size}x{size}: decode {r['seconds']:.2f} s, peak RSS +"
        f"{r['peak_increase_mib']:.0f} MiB", flush=True)
  return r
