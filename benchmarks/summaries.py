"""Time to write one image summary of the held-out grid at the paper's size.

  .venv/bin/python benchmarks/summaries.py                       # an 8192x4096 grid, 3 repeats
  .venv/bin/python benchmarks/summaries.py --height 1024 --width 512 --repeats 1

The grid is the training loop's (`train.image_grid`): rows of held-out images, each row the low-res
input (nearest-upsampled), its bilinear upsampling, the model's output and the target; at the
paper's 1024 px and 8 grid images it is 8192 px high and 4096 px wide. Photographs bundled with
scikit-image stand in for the images (a grid of noise would compress as no real grid does). For
each repeat: a fresh `summaries.SummaryWriter` in a temporary directory, the seconds the training
thread spends in `write_images` (what stalls training), then the seconds until `close()` returns
(everything written), the event file's size and the stored image's size. Also the masked CRC32C of
TFRecord framing in MB/s, the native one (`summaries.masked_crc32c`, where present) and
TensorBoard's pure-Python one, on 4 MiB of random bytes.
"""

import argparse
import glob
import io
import os
import statistics
import struct
import sys
import tempfile
import time

import numpy as np
from common import machine, report
from PIL import Image

PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'camera', 'immunohistochemistry', 'cat',
          'horse')


def grid(height: int, width: int) -> np.ndarray:
  """A uint8 [height, width, 3] grid of 4 columns, rows of (height / (width / 4)) photographs."""
  from skimage import data  # pylint: disable=import-outside-toplevel
  size = width // 4
  rows = []
  for i in range(height // size):
    photo = np.asarray(getattr(data, PHOTOS[i % len(PHOTOS)])())
    if photo.ndim == 2:
      photo = np.repeat(photo[..., None], 3, axis=-1)
    photo = Image.fromarray(photo[..., :3].astype(np.uint8))
    target = photo.resize((size, size), Image.Resampling.LANCZOS)
    low = target.resize((size // 8, size // 8), Image.Resampling.BOX)
    columns = [low.resize((size, size), Image.Resampling.NEAREST),
               low.resize((size, size), Image.Resampling.BILINEAR),
               low.resize((size, size), Image.Resampling.BICUBIC), target]
    rows.append(np.concatenate([np.asarray(c) for c in columns], axis=1))
  return np.ascontiguousarray(np.concatenate(rows, axis=0))


def stored_image_sizes(logdir: str) -> list[tuple[int, int]]:
  """(width, height) of each image in the event files of `logdir` (records read unchecked)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
  from tensorboard.util import tensor_util  # pylint: disable=import-outside-toplevel
  sizes = []
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      while header := f.read(12):
        data = f.read(struct.unpack('<Q', header[:8])[0])
        f.read(4)
        for value in event_pb2.Event.FromString(data).summary.value:
          if value.metadata.plugin_data.plugin_name == 'images':
            for png in tensor_util.make_ndarray(value.tensor)[2:]:
              sizes.append(Image.open(io.BytesIO(png)).size)
  return sizes


def crc_mb_per_s(fn, data: bytes) -> float:
  t0 = time.perf_counter()
  fn(data)
  return len(data) / (time.perf_counter() - t0) / 1e6


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--height', type=int, default=8192)
  parser.add_argument('--width', type=int, default=4096)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', help='Also write the results to this file.')
  args = parser.parse_args()

  from tensorboard.compat.tensorflow_stub import pywrap_tensorflow  # pylint: disable=C0415

  from fmboost_jax import summaries  # pylint: disable=import-outside-toplevel
  image = grid(args.height, args.width)
  call, written, file_mib, sizes = [], [], [], []
  for _ in range(args.repeats):
    with tempfile.TemporaryDirectory() as logdir:
      writer = summaries.SummaryWriter(logdir)
      writer.write_scalars(0, {'warm_up': 0.0})
      writer.flush()
      t0 = time.perf_counter()
      writer.write_images(1, {'val/low_res|bilinear|model|target': image[None]})
      t1 = time.perf_counter()
      writer.close()
      t2 = time.perf_counter()
      call.append(t1 - t0)
      written.append(t2 - t0)
      [path] = glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))
      file_mib.append(os.path.getsize(path) / 2**20)
      sizes = stored_image_sizes(logdir)
    print(f'write_images returned after {call[-1]:.3f} s, written after {written[-1]:.3f} s',
          file=sys.stderr)
  random_bytes = np.random.default_rng(0).bytes(4 * 2**20)
  results = {
      'machine': machine(),
      'grid': f'{args.height}x{args.width}',
      'write_images_s': statistics.median(call),
      'write_images_s_all': call,
      'written_s': statistics.median(written),
      'written_s_all': written,
      'event_file_mib': statistics.median(file_mib),
      'stored_image_width_height': sizes,
      'crc_python_mb_s': crc_mb_per_s(pywrap_tensorflow.masked_crc32c, random_bytes[:2**20]),
  }
  if hasattr(summaries, 'masked_crc32c'):
    results['crc_native_mb_s'] = crc_mb_per_s(summaries.masked_crc32c, random_bytes)
  report(results, args.json)


if __name__ == '__main__':
  main()
