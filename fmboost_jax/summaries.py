"""TensorBoard summaries and progress reports for the training loop, without TensorFlow.

Scalars and image grids go to `events.out.tfevents.*` files in the logdir in the format that
`tf.summary.scalar` and `tf.summary.image` write (tensors tagged for TensorBoard's scalars and
images plugins, in TFRecord framing), so TensorBoard reads them as it reads any JAX or TensorFlow
run. Writing them through TensorFlow (as clu's writers do) costs every training process about 10 s
of imports at start and puts TensorFlow on every accelerator host; TensorBoard's protocol buffers
are pure Python, and the records' checksums here are native (google-crc32c).

The training thread only queues what it logs: a background thread encodes the images (downscaled
to at most `max_image_size` pixels on the long side: an 8192x4096 grid is stored at 2048x1024),
frames the records and writes them. The queue is bounded (a writer that falls behind makes the
training thread wait rather than hold every grid in memory); `flush()` and `close()` wait until
everything queued is written, and an error of the background thread is raised by the next call.

The logdir may be a local directory or a bucket (`gs://...`, through `storage`). A local logdir
gets one event file, appended to. Bucket objects cannot be appended to, so a bucket logdir gets a
sequence of complete event files, `events.out.tfevents.<start time>.<host>.<pid>.<nnnnnn>.v2`
(nnnnnn counting the process's uploads), one per upload: every `flush_secs` while there is
something new, and at `flush()` and `close()`. Each is a valid event file on its own, and their
names sort in the order they were written (the order in which TensorBoard reads a run's files).
"""

import atexit
import contextlib
import io
import itertools
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import google_crc32c
import numpy as np
from absl import logging
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.util import tensor_util

from fmboost_jax import storage


def masked_crc32c(data: bytes) -> int:
  """The masked CRC32C of TFRecord framing (TensorBoard's `masked_crc32c`, natively computed)."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tf_record(data: bytes) -> bytes:
  """`data` framed as one TFRecord: length, its masked CRC, the data, its masked CRC."""
  header = struct.pack('<Q', len(data))
  return b''.join((header, struct.pack('<I', masked_crc32c(header)), data,
                   struct.pack('<I', masked_crc32c(data))))


def downscale(image: np.ndarray, max_size: int) -> np.ndarray:
  """`image` [height, width, channels] uint8 shrunk by the smallest integer factor that brings
  its long side to at most `max_size`, each output pixel the mean of a factor x factor box (the
  aspect ratio kept; partial boxes at the right and bottom edges averaged over what they hold)."""
  factor = -(-max(image.shape[:2]) // max_size)
  if factor <= 1:
    return image
  channels = image.shape[-1]
  pil = Image.fromarray(image.squeeze(-1) if channels == 1 else image)
  out = np.asarray(pil.reduce(factor))
  return out[..., None] if channels == 1 else out


def png(image: np.ndarray) -> bytes:
  """`image` [height, width, channels] uint8 as PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format='PNG')
  return buffer.getvalue()


def _file_version_event() -> event_pb2.Event:
  return event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2')


class _AppendedFile:
  """One event file in a local directory, appended to."""

  def __init__(self, logdir: str, name: str):
    os.makedirs(logdir, exist_ok=True)
    self._file = open(os.path.join(logdir, f'{name}.v2'), 'ab')  # noqa: SIM115
    self._file.write(tf_record(_file_version_event().SerializeToString()))

  def write(self, record: bytes):
    self._file.write(record)

  def due_in(self) -> float | None:
    return None

  def flush(self, force: bool = True):
    del force  # A local flush costs a system call: done whenever the queue runs empty.
    self._file.flush()

  def close(self):
    self._file.close()


_UPLOADS, _UPLOADS_LOCK = itertools.count(), threading.Lock()


class _ObjectSequence:
  """Event files in a bucket: the records since the last upload, as a new complete event file
  (its own file-version record first) every `flush_secs` while there are any, and when forced."""

  def __init__(self, logdir: str, name: str, flush_secs: float):
    self._logdir, self._name, self._flush_secs = storage.path(logdir), name, flush_secs
    self._records: list[bytes] = []
    self._since: float | None = None  # When the oldest record not uploaded was written.

  def write(self, record: bytes):
    if self._since is None:
      self._since = time.monotonic()
    self._records.append(record)

  def due_in(self) -> float | None:
    """Seconds until the records held are due for upload (None: none held)."""
    if self._since is None:
      return None
    return max(0.0, self._since + self._flush_secs - time.monotonic())

  def flush(self, force: bool = True):
    if not self._records or (not force and self.due_in() > 0):
      return
    self._since = time.monotonic()  # After a failed upload, the next try waits flush_secs.
    # The number counts this process's uploads (two writers started in one second have one name),
    # zero-padded: the names sort as they were written (TensorBoard reads a run's files in name
    # order, and skips a file that sorts before the one it has read).
    with _UPLOADS_LOCK:
      target = self._logdir / f'{self._name}.{next(_UPLOADS):06d}.v2'
    data = b''.join([tf_record(_file_version_event().SerializeToString()), *self._records])
    storage.write_bytes_atomically(target, data)
    self._records, self._since = [], None  # (A failed upload keeps them for the next try.)

  def close(self):
    self.flush()


_STOP, _FLUSH = object(), object()  # What the background thread is told besides events.


class SummaryWriter:
  """Logs scalars on every process and writes them and images to TensorBoard where `enabled`
  (process 0 of a multi-host run), from a background thread.

  Args:
    logdir: A local directory or a bucket path (`gs://...`).
    enabled: Whether this process writes event files (all log their scalars).
    max_image_size: Images are downscaled by a box filter to at most this many pixels on their
      long side.
    flush_secs: A bucket logdir uploads what is new at most this many seconds after it was logged
      (a local logdir writes it as soon as the queue is empty).
    max_queued: How many calls may wait for the background thread before a call waits for it.
  """

  def __init__(self, logdir: storage.PathLike, enabled: bool = True, *,
               max_image_size: int = 2048, flush_secs: float = 120.0, max_queued: int = 8):
    self._logdir, self._max_image_size = os.fspath(logdir), max_image_size
    self._thread = None
    self._error: BaseException | None = None
    if not enabled:
      return
    name = f'events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}'
    if storage.is_remote(self._logdir):
      self._events = _ObjectSequence(self._logdir, name, flush_secs)
    else:
      self._events = _AppendedFile(self._logdir, name)
    self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
    self._thread = threading.Thread(target=self._run, name='SummaryWriter', daemon=True)
    self._thread.start()
    atexit.register(self.close)  # Whatever is queued is written at exit without a close().

  def _run(self):
    """The background thread: writes each queued event, flushes when asked or due, until _STOP."""
    while True:
      try:
        item = self._queue.get(timeout=self._events.due_in())
      except queue.Empty:
        item = None  # Only the time to upload the records held has come.
      try:
        if item is _STOP:
          self._events.close()
        else:
          if item is _FLUSH:
            self._events.flush(force=True)
          elif item is not None:
            self._events.write(tf_record(item().SerializeToString()))
          if self._queue.empty():
            self._events.flush(force=False)
      except BaseException as e:  # pylint: disable=broad-except  (raised by the caller's next call)
        if self._error is None:
          self._error = e
      finally:
        if item is not None:
          self._queue.task_done()
      if item is _STOP:
        return

  def _raise_error(self):
    error, self._error = self._error, None
    if error is not None:
      raise RuntimeError(f'Writing TensorBoard summaries to {self._logdir} failed: '
                         f'{type(error).__name__}: {error}') from error

  def _put(self, item):
    self._queue.put(item)
    self._raise_error()

  def _write_values(self, step: int, values: Callable[[], list[summary_pb2.Summary.Value]]):
    if self._thread is not None:
      wall_time = time.time()
      self._put(lambda: event_pb2.Event(wall_time=wall_time, step=step,
                                        summary=summary_pb2.Summary(value=values())))

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in scalars.items()))
    scalars = {k: np.float32(v) for k, v in scalars.items()}
    self._write_values(step, lambda: [
        summary_pb2.Summary.Value(
            tag=k, tensor=tensor_util.make_tensor_proto(v),
            metadata=scalar_metadata.create_summary_metadata(display_name=k, description=''))
        for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    """Writes each `[n, height, width, channels]` uint8 batch as PNG images, downscaled to at most
    `max_image_size` pixels on the long side. The arrays are copied: the caller may reuse them."""
    if self._thread is None:
      return
    for tag, batch in images.items():
      if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
        raise ValueError(f'{tag}: images must be uint8 [n, height, width, 1, 3 or 4], not '
                         f'{batch.dtype} {batch.shape}.')
    images = {tag: np.array(batch) for tag, batch in images.items()}

    def values():
      out = []
      for tag, batch in images.items():
        small = [downscale(image, self._max_image_size) for image in batch]
        height, width = small[0].shape[:2]
        out.append(summary_pb2.Summary.Value(
            tag=tag, tensor=tensor_util.make_tensor_proto(
                [str(width).encode(), str(height).encode(), *map(png, small)], dtype=np.object_),
            metadata=image_metadata.create_summary_metadata(display_name=tag, description='')))
      return out

    self._write_values(step, values)

  def flush(self):
    """Waits until everything logged so far is written (uploaded, for a bucket logdir)."""
    if self._thread is not None:
      self._put(_FLUSH)
      self._queue.join()
      self._raise_error()

  def close(self):
    """Writes everything logged and stops the background thread; raises what failed."""
    if self._thread is not None:
      thread, self._thread = self._thread, None
      atexit.unregister(self.close)
      self._queue.put(_STOP)
      thread.join()
      self._raise_error()


class _PausableClock:
  """Time inside `paused()` (evaluation, checkpointing) is not training time."""

  _paused_secs = 0.0

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._paused_secs += time.perf_counter() - t0


class Progress(_PausableClock):
  """Logs the training speed and the time left every `every_secs` seconds of training, and writes
  the speed as `steps_per_sec`; time spent inside `paused()` (evaluation) is not training time."""

  def __init__(self, writer: SummaryWriter, num_steps: int, every_secs: float = 60.0):
    self._writer, self._num_steps, self._every_secs = writer, num_steps, every_secs
    self._start: tuple[int, float] | None = None
    self._paused_secs = 0.0

  def __call__(self, step: int):
    now = time.perf_counter()
    if self._start is None:  # The first step's time includes waiting for the first batch.
      self._start = (step, now)
      return
    first_step, since = self._start
    elapsed = now - since - self._paused_secs
    if elapsed < self._every_secs:
      return
    rate = (step - first_step) / elapsed
    left = (self._num_steps - step) / rate
    logging.info('Step %d of %d (%.0f%%): %.3g steps/s, %d min %02d s left.', step,
                 self._num_steps, 100 * step / self._num_steps, rate, left // 60, left % 60)
    self._writer.write_scalars(step, {'steps_per_sec': rate})
    self._start, self._paused_secs = (step, now), 0.0


class Throughput(_PausableClock):
  """Samples/s, TFLOP/s per device, MFU and device memory over the training steps between two
  calls (time inside `paused()`, evaluation and checkpointing, excluded), as scalars to log.

  `flops_per_step` is the compiled step's FLOPs over the global batch; `peak_flops` one device's
  peak rate (None: the device kind has none known, and MFU is not reported).
  """

  def __init__(self, *, samples_per_step: int, flops_per_step: float, num_devices: int,
               peak_flops: float | None, devices=()):
    self._samples, self._flops = samples_per_step, flops_per_step
    self._num_devices, self._peak, self._devices = num_devices, peak_flops, tuple(devices)
    self._start: tuple[int, float] | None = None
    self._paused_secs = 0.0

  def __call__(self, step: int) -> dict[str, float]:
    """The figures since the previous call (none at the first: it only starts the clock)."""
    now = time.perf_counter()
    start, self._start = self._start, (step, now)
    paused, self._paused_secs = self._paused_secs, 0.0
    if start is None or step <= start[0]:
      return {}
    seconds = now - start[1] - paused
    steps_per_sec = (step - start[0]) / seconds
    out = {'perf/samples_per_sec': steps_per_sec * self._samples}
    if self._flops > 0:
      per_device = steps_per_sec * self._flops / self._num_devices
      out['perf/tflops_per_device'] = per_device / 1e12
      if self._peak:
        out['perf/mfu'] = per_device / self._peak
    out.update(device_memory(self._devices))
    return out


def device_memory(devices) -> dict[str, float]:
  """GiB in use and at peak on the most loaded of `devices`, where the backend reports them
  (GPUs and TPUs; CPUs do not)."""
  stats = [s for s in (d.memory_stats() for d in devices) if s]
  out = {}
  for key, name in (('bytes_in_use', 'perf/memory_in_use_gib'),
                    ('peak_bytes_in_use', 'perf/memory_peak_gib')):
    values = [s[key] for s in stats if key in s]
    if values:
      out[name] = max(values) / 2**30
  return out

