"""Throughput of the training input pipeline on the CPU: precomputed latents, storage, JPEGs.

What is measured, all on synthetic data written to a temporary folder first (deleted at the end):

  1. Precomputed latents (config.data.source='latents'): N records {'x1', 'x_up'}, each float32
     [128, 128, 4] (256 KiB per array, 512 KiB per record), written as memory-mapped .npy shards
     with the metadata.json that `--mode=precompute` writes (`write_latents`). The files are read
     once before timing, so every row reads from a warm page cache (no disk I/O). Samples/s of
     `input_pipeline.create_train_iterator(config)` (configs/default.py with source='latents',
     batch_size 64) for several config.data.num_threads, after a few warm-up batches, over batches
     for about --seconds each, and the CPU time the process (all its threads and worker
     processes) spent meanwhile: cores busy = CPU s / wall s. Worker processes: the same pipeline
     (`create_train_dataset` with num_threads=0) under
     `IterDataset.mp_prefetch(MultiprocessingOptions(num_workers=k))`; its workers are spawned and
     receive the pipeline pickled, so the memory-mapped shards are pickled as file references here
     (by default every shard would be copied into every worker: the output says how many MiB).
  2. Storage format: random-order single-record reads of the same records through a grain
     MapDataset (source -> shuffle -> map to {'x1', 'x_up'} -> to_iter_dataset(ReadOptions)),
     records/s, from the .npy shards (the pipeline's `_LatentRecords`) and from ArrayRecord files
     (`array_record` package, written with 'group_size:1,uncompressed', one record = the raw bytes
     of x1 then x_up, read back with np.frombuffer through grain.sources.ArrayRecordDataSource).
     Both warm in the page cache.
  3. JPEGs (config.data.source='folder'): M 1024 x 1024 JPEGs (quality 90) made from the
     scikit-image photographs (square crops, resized with PIL, with mild Gaussian noise so that the
     files have the size of real photographs), batch 8 of 1024 px crops, images/s of
     `create_train_iterator` for several num_threads. If the folder source refuses the images (as
     it did while held-out strips made it want 2048 x 1024 px), the same work (decode_image_file,
     random 1024 crop, random flip, normalize, batch) runs through a grain MapDataset with the
     same ReadOptions instead, and the rows say so. Images per core: images per CPU second of the
     process (all threads; robust to other load on the machine), and, for reference, images/s over
     the cores the threads can use, min(max(1, num_threads), usable cores) (num_threads=0 decodes
     on the calling thread). The cores one GPU needs: 150 samples/s (the UNet-base train step at
     128 x 128 x 8 latents on one H100/H200) over the best images per CPU second.
  4. One 12000 x 12000 PNG (an upscaled photograph, compress_level 1; smooth, so a real photograph
     of that size makes a larger file that decodes no faster): seconds and peak RSS (VmHWM) of
     `images.decode_image_file` in a fresh process, and of reading its header alone.

Usage, from the repo root (about 2 minutes; --smoke: tiny sizes, a few seconds; --only some of
latents storage jpeg huge):

  .venv/bin/python benchmarks/input_pipeline.py [--json PATH] [--smoke] [--only PART ...]

Run it on a quiet machine: every row is CPU-bound, and the numbers scale with free cores.
Parts 2 to 4 are in benchmarks/input_formats.py; this file writes the data and prints the tables.
"""

import argparse
import copyreg
import io
import json
import mmap
import os
import shlex
import shutil
import tempfile
import time

import numpy as np
from common import (  # common puts the repo on sys.path.
    _close,
    _cores,
    machine,
    shown_args,
    time_batches,
)
from input_formats import (
    TRAIN_STEP_SAMPLES_PER_SECOND,
    array_record_version,
    bench_huge_png,
    bench_jpegs,
    bench_storage,
    write_array_record,
    write_jpegs,
)

GPUS_PER_HOST = 8
PAPER_GLOBAL_BATCH = 64  # configs/default.py: 64 images of 1024 px per step.
LATENTS_TARGET = 1500  # Samples/s the precomputed latents must reach on this 2-core machine.
SHAPE = [128, 128, 4]  # Latent of a 1024 px crop: [S/8, S/8, 4].
PARTS = ('latents', 'storage', 'jpeg', 'huge')


# ----------------------------------------------------------------------------- synthetic latents


def latents_metadata_dict(config, shards: list[dict], latent_shape: list[int]) -> dict:
  """The metadata.json `fmboost_jax/precompute.py` writes, for records made with `config`
  (`data_sources.latents_metadata` checks the sizes, upsampling mode and first stage)."""
  return {
      'num_records': sum(s['count'] for s in shards),
      'shards': shards,
      'latent_shape': list(latent_shape),
      'high_res_size': config.data.high_res_size,
      'low_res_size': config.data.low_res_size,
      'upsampling_mode': config.flow.upsampling_mode,
      'first_stage': {k: config.first_stage[k] for k in config.first_stage},
      'crops_per_image': config.precompute.crops_per_image,
      'seed': config.seed,
      'first_stage_weights': config.first_stage.weights,
      'source': {k: config.data[k] for k in ('source', 'path', 'tfds_name', 'tfds_split')},
      'num_images': sum(s['count'] for s in shards) // config.precompute.crops_per_image,
      'num_validation_images': 1,
  }


def write_latents(path: str, config, num_records: int, shape: list[int], shard_size: int) -> dict:
  """Writes latent records as .npy shards x1-NNNNN.npy / x_up-NNNNN.npy + metadata.json: a block
  of 256 random records repeated (the content does not change read speed), record i starting
  with the value i."""
  from fmboost_jax import data_sources  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  block = np.random.default_rng(0).standard_normal((min(256, num_records), *shape),
                                                    dtype=np.float32)
  shards = []
  for start in range(0, num_records, shard_size):
    count = min(shard_size, num_records - start)
    name = f'{len(shards):05d}'
    for key in ('x1', 'x_up'):
      out = np.lib.format.open_memmap(os.path.join(path, f'{key}-{name}.npy'), mode='w+',
                                      dtype=np.float32, shape=(count, *shape))
      for i in range(0, count, len(block)):
        out[i:i + len(block)] = block[:count - i]
      out.reshape(count, -1)[:, 0] = np.arange(start, start + count)
      out.flush()
      del out
    shards.append({'x1': f'x1-{name}.npy', 'x_up': f'x_up-{name}.npy', 'count': count})
  meta = latents_metadata_dict(config, shards, shape)
  with open(os.path.join(path, data_sources.LATENTS_METADATA), 'w') as f:
    json.dump(meta, f, indent=2, default=list)
  size = config.data.high_res_size
  np.save(os.path.join(path, data_sources.LATENTS_VALIDATION),
          np.zeros((1, size, size, 3), np.float32))
  return meta


def warm_page_cache(paths: list[str]) -> float:
  """Reads every file once (so that timed reads hit the page cache); returns the MiB read."""
  total = 0
  for path in paths:
    with open(path, 'rb') as f:
      while chunk := f.read(64 << 20):
        total += len(chunk)
  return total / 2**20


def latents_config(path: str, batch_size: int, num_threads: int, upsampling_mode: str):
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.data.source = 'latents'
  config.data.path = path
  config.data.batch_size = batch_size
  config.data.num_threads = num_threads
  config.flow.upsampling_mode = upsampling_mode
  return config


def _reduce_memmap(array):
  """Pickles a memory-mapped .npy file as a reference to the file (reopened read-only where it
  is unpickled) instead of by value; views and other arrays pickle as usual."""
  if isinstance(array.base, mmap.mmap) and array.filename and array.mode in ('r', 'c'):
    return np.memmap, (array.filename, array.dtype, array.mode, array.offset, array.shape,
                       'F' if array.flags.f_contiguous and not array.flags.c_contiguous else 'C')
  return np.asarray(array).__reduce__()


class _CountingWriter(io.RawIOBase):
  def __init__(self):
    super().__init__()
    self.size = 0

  def writable(self):
    return True

  def write(self, b):
    self.size += memoryview(b).nbytes
    return memoryview(b).nbytes


def pickled_mib(obj) -> float:
  """Size of cloudpickle.dumps(obj) (as grain's mp_prefetch sends it to each worker), streamed."""
  import cloudpickle  # pylint: disable=import-outside-toplevel
  writer = _CountingWriter()
  cloudpickle.dump(obj, writer)
  return writer.size / 2**20


def bench_latents(args, path: str, meta: dict) -> dict:
  """Rows of create_train_iterator over num_threads, and of mp_prefetch over worker counts."""
  import grain  # pylint: disable=import-outside-toplevel

  from fmboost_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  # Training from latents uses the upsampling mode they were made with (checked against metadata).
  mode = meta['upsampling_mode']
  rows, notes = [], []
  for threads in args.threads:
    iterator = input_pipeline.create_train_iterator(
        latents_config(path, args.batch_size, threads, mode))
    r = time_batches(iterator, args.batch_size, args.warmup, args.seconds)
    _close(iterator)
    rows.append({'pipeline': 'create_train_iterator', 'num_threads': threads, 'num_workers': 0,
                 **r})
    print(f"latents, num_threads={threads}: {r['samples_per_second']:.0f} samples/s "
          f"({r['batches']} batches in {r['seconds']:.1f} s, {r['cores_busy']:.2f} cores busy)",
          flush=True)

  # Worker processes over the same pipeline, prepared in the workers without threads. grain reads
  # absl flags when it starts them (main.py parses them with absl.app.run).
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  config = latents_config(path, args.batch_size, 0, mode)
  dataset = input_pipeline.create_train_dataset(config)
  default_pickle = pickled_mib(dataset)
  copyreg.pickle(np.memmap, _reduce_memmap)
  try:
    by_reference = pickled_mib(dataset)
    for workers in args.workers:
      try:
        iterator = iter(dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))
        r = time_batches(iterator, args.batch_size, max(args.warmup, 2 * workers), args.seconds)
        _close(iterator)
      except Exception as e:  # pylint: disable=broad-except
        notes.append(f'mp_prefetch with {workers} workers failed: {type(e).__name__}: {e}')
        print(notes[-1], flush=True)
        continue
      rows.append({'pipeline': 'mp_prefetch', 'num_threads': 0, 'num_workers': workers, **r})
      print(f"latents, mp_prefetch num_workers={workers}: {r['samples_per_second']:.0f} "
            f"samples/s ({r['batches']} batches in {r['seconds']:.1f} s, {r['cores_busy']:.2f} "
            'cores busy)', flush=True)
  finally:
    copyreg.dispatch_table.pop(np.memmap, None)
  return {'rows': rows, 'notes': notes, 'upsampling_mode': mode,
          'default_pickle_mib': default_pickle, 'by_reference_pickle_mib': by_reference}


# ----------------------------------------------------------------------------- tables


def tables(results: dict) -> str:
  """The Markdown tables of a result (benchmarks/run.py renders the same from the JSON)."""
  out = []
  lat = results.get('latents')
  if lat:
    s = lat['setup']
    out += [f"Precomputed latents: {s['records']} records of 2 x float32 {s['shape']} "
            f"({s['record_kib']:.0f} KiB each, {s['dataset_mib']:.0f} MiB in {s['shards']} .npy "
            f"shard(s), read once before: page cache warm), batch {s['batch_size']}, target "
            f"{LATENTS_TARGET} samples/s. Cores busy: CPU seconds of the process and its workers "
            'over wall seconds.', '',
            '| pipeline | num_threads | workers | samples / s | cores busy | samples / CPU s |',
            '|---|---:|---:|---:|---:|---:|']
    for r in lat['rows']:
      out.append(f"| `{r['pipeline']}` | {r['num_threads']} | {r['num_workers']} | "
                 f"{r['samples_per_second']:.0f} | {r['cores_busy']:.2f} | "
                 f"{r['samples_per_cpu_second']:.0f} |")
    b = lat['best']
    out += ['', *[f'Note: {n}' for n in lat['notes']],
            f"Best: {b['samples_per_second']:.0f} samples/s ({b['pipeline']}, num_threads="
            f"{b['num_threads']}, workers {b['num_workers']}): target of {LATENTS_TARGET} "
            f"{'met' if lat['target_met'] else 'missed'}. mp_prefetch pickles the pipeline into "
            f"each worker: {lat['default_pickle_mib']:.1f} MiB by default (the memory-mapped "
            f"shards by value), {lat['by_reference_pickle_mib']:.2f} MiB with the shards pickled "
            'as file references (as in these rows).', '']
  st = results.get('storage')
  if st:
    out += ['Storage: random-order single-record reads through a grain MapDataset (page cache '
            f"warm); .npy via {st['npy_reader']}; ArrayRecord: "
            f"{st.get('array_record') or 'not installed (no rows)'}"
            f"{'' if not st.get('array_record') else ' (' + st['array_record_note'] + ')'}.", '',
            '| format | num_threads | records / s | MiB / s |', '|---|---:|---:|---:|']
    for r in st['rows']:
      out.append(f"| {r['format']} | {r['num_threads']} | {r['records_per_second']:.0f} | "
                 f"{r['mib_per_second']:.0f} |")
    if st.get('winner'):
      out += ['', st['winner']]
    out.append('')
  jp = results.get('jpeg')
  if jp:
    s = jp['setup']
    out += [f"JPEGs: {s['count']} files of {s['size']}x{s['size']} px (quality 90, mean "
            f"{s['mean_kib']:.0f} KiB), batch {s['batch_size']} of {s['size']} px crops, via "
            f"`{jp['via']}`. Images / CPU s: images over the CPU seconds the process spent (all "
            'threads); images / thread core: images/s over min(max(1, num_threads), '
            f"{results['cores']} usable cores).", '',
            '| num_threads | images / s | cores busy | images / CPU s | images / s / thread core |',
            '|---:|---:|---:|---:|---:|']
    for r in jp['rows']:
      out.append(f"| {r['num_threads']} | {r['images_per_second']:.1f} | {r['cores_busy']:.2f} "
                 f"| {r['images_per_cpu_second']:.1f} | {r['images_per_threads_core']:.1f} |")
    out += ['', f"Host to device: {jp['host_to_device_bytes_per_image'] / 2**20:.2f} MiB per "
            f"image ({', '.join(jp['batch_dtypes'])}), "
            f"{jp['host_to_device_bytes_per_image'] * PAPER_GLOBAL_BATCH / 1e6:.0f} MB per step "
            f"at the paper's global batch of {PAPER_GLOBAL_BATCH}."]
    out += ['', f"Cores per GPU for {TRAIN_STEP_SAMPLES_PER_SECOND} samples/s: "
            f"{jp['cores_per_gpu']:.1f} (at the best {jp['best_images_per_core']:.1f} images per "
            f"CPU second); {GPUS_PER_HOST} GPUs: {GPUS_PER_HOST * jp['cores_per_gpu']:.0f} cores."]
    if jp['note']:
      out += ['', f"Note: {jp['note']}"]
    out.append('')
  huge = results.get('huge_png')
  if huge:
    if 'error' in huge:
      out.append(f"Huge PNG {huge['size']}x{huge['size']}: decode failed: {huge['error']}")
    else:
      out.append(
          f"Huge PNG {huge['size']}x{huge['size']} ({huge['file_mib']:.0f} MiB file, "
          f"{huge['array_mib']:.0f} MiB decoded): `decode_image_file` {huge['seconds']:.2f} s, "
          f"peak RSS +{huge['peak_increase_mib']:.0f} MiB in a fresh process (header alone "
          f"{huge['header_seconds'] * 1e3:.1f} ms); warnings: "
          f"{', '.join(huge['warnings']) or 'none'}.")
  return '\n'.join(out).rstrip() + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--records', type=int, default=4096, help='Latent records written.')
  parser.add_argument('--shard-size', type=int, default=4096, help='Records per .npy shard.')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--threads', type=int, nargs='+', default=[0, 1, 2, 4, 8],
                      help='config.data.num_threads of the latents rows.')
  parser.add_argument('--workers', type=int, nargs='*', default=[1, 2],
                      help='mp_prefetch worker processes (none: --workers with no value).')
  parser.add_argument('--seconds', type=float, default=4.0, help='Timed seconds per latents row.')
  parser.add_argument('--warmup', type=int, default=3, help='Warm-up batches per row.')
  parser.add_argument('--storage-threads', type=int, nargs='+', default=[0, 1, 2, 4, 8])
  parser.add_argument('--storage-seconds', type=float, default=1.5)
  parser.add_argument('--no-array-record', action='store_true')
  parser.add_argument('--jpegs', type=int, default=48)
  parser.add_argument('--jpeg-size', type=int, default=1024)
  parser.add_argument('--jpeg-noise', type=float, default=3.0,
                      help='Gaussian noise (levels) added so files have realistic sizes.')
  parser.add_argument('--jpeg-batch-size', type=int, default=8)
  parser.add_argument('--jpeg-threads', type=int, nargs='+', default=[0, 1, 2, 4])
  parser.add_argument('--jpeg-seconds', type=float, default=5.0)
  parser.add_argument('--jpeg-warmup', type=int, default=2)
  parser.add_argument('--huge', type=int, default=12000, help='Huge PNG side (0: skip).')
  parser.add_argument('--only', nargs='+', choices=PARTS, default=list(PARTS),
                      help='Parts to measure (default: all).')
  parser.add_argument('--tmp', default=None, help='Where the synthetic data goes (a temp dir).')
  parser.add_argument('--smoke', action='store_true', help='Tiny sizes, a few seconds.')
  parser.add_argument('--json', help='Also write the results to this file.')
  args = parser.parse_args()
  shape = SHAPE
  if args.smoke:
    shape = [16, 16, 4]
    args.records, args.shard_size, args.batch_size = 64, 32, 8
    args.threads, args.workers, args.seconds, args.warmup = [0, 2], [1], 0.2, 1
    args.storage_threads, args.storage_seconds = [0, 2], 0.1
    args.jpegs, args.jpeg_size, args.jpeg_batch_size = 4, 64, 2
    args.jpeg_threads, args.jpeg_seconds, args.jpeg_warmup, args.huge = [0, 2], 0.2, 1, 0

  t_start = time.perf_counter()
  load = os.getloadavg()
  root = tempfile.mkdtemp(prefix='input_pipeline_bench_', dir=args.tmp)
  record_bytes = 2 * int(np.prod(shape)) * 4
  if {'latents', 'storage'} & set(args.only):
    needed = args.records * record_bytes * (1 if args.no_array_record else 2) + 2**30
    free = shutil.disk_usage(root).free
    if needed > free:
      args.records = max(args.batch_size * 4, int((free - 2**30) // (2 * record_bytes)))
      print(f'Only {free / 2**30:.1f} GiB free in {root}: using {args.records} records.')
  results = {'machine': machine(), 'cores': _cores(), 'smoke': args.smoke, 'parts': args.only,
             'command': shlex.join(['.venv/bin/python', 'benchmarks/input_pipeline.py',
                                    *shown_args()]),
             'loadavg_start': load}
  try:
    if {'latents', 'storage'} & set(args.only):
      from configs import default  # pylint: disable=import-outside-toplevel
      latents = os.path.join(root, 'latents')
      t0 = time.perf_counter()
      meta = write_latents(latents, default.get_config(), args.records, shape, args.shard_size)
      files = [os.path.join(latents, s[k]) for s in meta['shards'] for k in ('x1', 'x_up')]
      write_seconds = time.perf_counter() - t0
      warm_mib = warm_page_cache(files)
    if 'latents' in args.only:
      lat = bench_latents(args, latents, meta)
      lat['setup'] = {'records': args.records, 'shape': shape, 'record_kib': record_bytes / 1024,
                      'dataset_mib': warm_mib, 'shards': len(meta['shards']),
                      'batch_size': args.batch_size, 'write_seconds': write_seconds,
                      'page_cache': 'warm (every shard read once before the rows)'}
      best = max(lat['rows'], key=lambda r: r['samples_per_second'])
      lat['best'] = {k: best[k] for k in ('pipeline', 'num_threads', 'num_workers',
                                          'samples_per_second')}
      lat['target_met'] = best['samples_per_second'] >= LATENTS_TARGET
      results['latents'] = lat

    if 'storage' in args.only:
      version = None if args.no_array_record else array_record_version()
      ar_files = None
      if version:
        ar_files = write_array_record(os.path.join(root, 'array_record'), latents, meta)
        warm_page_cache(ar_files)
      else:
        print('array_record is not installed: no ArrayRecord rows.', flush=True)
      st = bench_storage(args, latents, meta, ar_files)
      st['array_record'] = version and f'array_record {version}'
      st['array_record_note'] = ('installed in the venv as a dependency of grain and '
                                 'tensorflow-datasets, not pinned in requirements.txt; written '
                                 "with 'group_size:1,uncompressed'")
      if version:
        best_of = {f: max(r['records_per_second'] for r in st['rows'] if r['format'] == f)
                   for f in {r['format'] for r in st['rows']}}
        one = {r['format']: r['records_per_second'] for r in st['rows'] if r['num_threads'] == 1}
        win, lose = max(best_of, key=best_of.get), min(best_of, key=best_of.get)
        st['best'] = best_of
        st['winner'] = (f'Faster: {win}, {best_of[win]:.0f} against {best_of[lose]:.0f} '
                        f'records/s at the best thread count ({best_of[win] / best_of[lose]:.2f}x)'
                        + (f"; one thread: npy {one['npy (mmap)']:.0f}, array_record "
                           f"{one['array_record']:.0f}." if len(one) == 2 else '.'))
      results['storage'] = st
      shutil.rmtree(os.path.join(root, 'array_record'), ignore_errors=True)
    shutil.rmtree(os.path.join(root, 'latents'), ignore_errors=True)

    if 'jpeg' in args.only:
      jpegs = os.path.join(root, 'jpegs')
      setup = write_jpegs(jpegs, args.jpegs, args.jpeg_size, args.jpeg_noise)
      jp = bench_jpegs(args, jpegs)
      jp['setup'] = {**setup, 'batch_size': args.jpeg_batch_size}
      results['jpeg'] = jp

    if 'huge' in args.only and args.huge:
      if shutil.disk_usage(root).free > 4 * args.huge**2 * 3:
        results['huge_png'] = bench_huge_png(os.path.join(root, 'huge.png'), args.huge)
      else:
        print('Not enough disk space for the huge PNG: skipped.')
  finally:
    shutil.rmtree(root, ignore_errors=True)
  results['loadavg_end'] = os.getloadavg()
  results['minutes'] = (time.perf_counter() - t_start) / 60
  text = tables(results)
  print(f"\n{results['command']} ({results['minutes']:.1f} minutes)\nMachine: "
        f"{results['machine']}; load average {load[0]:.2f} at the start.\n\n{text}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
