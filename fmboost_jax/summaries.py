"""TensorBoard summaries and progress reports for the training loop, without TensorFlow.

Scalars and image grids go to an `events.out.tfevents.*` file in the workdir in the format that
`tf.summary.scalar` and `tf.summary.image` write (tensors tagged for TensorBoard's scalars and
images plugins, in TensorBoard's record framing), so TensorBoard reads them as it reads any JAX or
TensorFlow run. Writing them through TensorFlow (as clu's writers do) costs every training process
about 10 s of imports at start and puts TensorFlow on every accelerator host; TensorBoard's own
protocol buffers and record writer are pure Python.
"""

import contextlib
import io
import os
import socket
import time
from collections.abc import Iterator, Mapping

import numpy as np
from absl import logging
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util


class SummaryWriter:
  """Logs scalars on every process and writes them and images to TensorBoard where `enabled`
  (process 0 of a multi-host run)."""

  def __init__(self, logdir: str, enabled: bool = True):
    self._records = None
    if enabled:
      os.makedirs(logdir, exist_ok=True)
      name = f'events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.v2'
      self._records = RecordWriter(open(os.path.join(logdir, name), 'ab'))  # noqa: SIM115
      self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event: event_pb2.Event):
    self._records.write(event.SerializeToString())

  def _write_values(self, step: int, values: list[summary_pb2.Summary.Value]):
    if self._records is not None:
      self._write(event_pb2.Event(wall_time=time.time(), step=step,
                                  summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in scalars.items()))
    self._write_values(step, [
        summary_pb2.Summary.Value(
            tag=k, tensor=tensor_util.make_tensor_proto(np.float32(v)),
            metadata=scalar_metadata.create_summary_metadata(display_name=k, description=''))
        for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    """Writes each `[n, height, width, channels]` uint8 batch as PNG images."""
    values = []
    for tag, batch in images.items():
      encoded = []
      for image in batch:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image).squeeze(-1) if image.shape[-1] == 1 else image).save(
            buffer, format='PNG')
        encoded.append(buffer.getvalue())
      height, width = batch.shape[1:3]
      values.append(summary_pb2.Summary.Value(
          tag=tag, tensor=tensor_util.make_tensor_proto(
              [str(width).encode(), str(height).encode(), *encoded], dtype=np.object_),
          metadata=image_metadata.create_summary_metadata(display_name=tag, description='')))
    self._write_values(step, values)

  def flush(self):
    if self._records is not None:
      self._records.flush()

  def close(self):
    if self._records is not None:
      self._records.close()
      self._records = None


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

