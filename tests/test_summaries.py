"""The training loop's TensorBoard files, written without TensorFlow, read by TensorBoard itself."""

import glob
import io
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image
from tensorboard.compat.proto import event_pb2

from fmboost_jax import summaries
from tests import runs


def test_tensorboard_reads_the_scalars_and_images(tmp_path):
  rng = np.random.default_rng(0)
  grid = rng.integers(0, 256, (1, 12, 20, 3), dtype=np.uint8)
  writer = summaries.SummaryWriter(str(tmp_path))
  writer.write_scalars(1, {'loss': 0.5, 'val/psnr': 31.25})
  writer.write_scalars(2, {'loss': 0.25})
  writer.write_images(2, {'val/grid': grid})
  writer.close()

  from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={'tensors': 0})
  acc.Reload()
  assert acc.PluginTagToContent('scalars').keys() == {'loss', 'val/psnr'}
  assert acc.PluginTagToContent('images').keys() == {'val/grid'}
  loss = [(e.step, float(np.asarray(_ndarray(e.tensor_proto)))) for e in acc.Tensors('loss')]
  assert loss == [(1, 0.5), (2, 0.25)]
  [image] = acc.Tensors('val/grid')
  width, height, png = _ndarray(image.tensor_proto)
  assert (image.step, int(width), int(height)) == (2, 20, 12)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), grid[0])
  # The test's own reader (checksums verified) agrees.
  assert runs.scalars(tmp_path, 'val/psnr') == {1: 31.25}
  assert len(runs.tf_records(glob.glob(str(tmp_path / 'events.out.tfevents.*'))[0])) == 4


def _ndarray(proto):
  from tensorboard.util import tensor_util  # noqa: PLC0415
  return tensor_util.make_ndarray(proto)


def test_only_the_enabled_process_writes_files(tmp_path):
  writer = summaries.SummaryWriter(str(tmp_path / 'logs'), enabled=False)
  writer.write_scalars(1, {'loss': 1.0})
  writer.write_images(1, {'grid': np.zeros((1, 4, 4, 3), np.uint8)})
  writer.close()
  assert not (tmp_path / 'logs').exists()


def test_progress_writes_the_speed_and_leaves_out_paused_time(tmp_path, monkeypatch):
  clock = iter([0.0, 10.0, 20.0, 50.0, 60.0])  # perf_counter at each read below.
  monkeypatch.setattr(summaries.time, 'perf_counter', lambda: next(clock))
  writer = summaries.SummaryWriter(str(tmp_path))
  progress = summaries.Progress(writer, num_steps=100, every_secs=5)
  progress(1)  # t=0: the start.
  with progress.paused():  # t=10 .. 20: 10 s of evaluation.
    pass
  progress(21)  # t=50: 20 steps in 50 - 10 s.
  progress(22)  # t=60: 10 s since, but only one step: 0.1 steps/s.
  writer.close()
  assert runs.scalars(tmp_path, 'steps_per_sec') == pytest.approx({21: 0.5, 22: 0.1})


def test_the_training_loop_does_not_import_tensorflow(tmp_path):
  """main.py trains without TensorFlow (about 10 s of imports at every process start)."""
  script = ('import runpy, sys; sys.argv = sys.argv[1:]\n'
            'try:\n  runpy.run_path("main.py", run_name="__main__")\n'
            'finally:\n  print("tensorflow imported:", "tensorflow" in sys.modules)')
  command = runs.command(tmp_path, '--config.train.num_steps=1')
  proc = subprocess.run([sys.executable, '-c', script, *command[1:]], cwd=runs.ROOT,
                        env=runs.env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == 'tensorflow imported: False'
  assert sorted(runs.scalars(tmp_path, 'loss')) == [1]


def test_the_native_record_checksum_is_tensorboards():
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
  rng = np.random.default_rng(0)
  for size in (0, 1, 7, 8, 12, 1000, 4099):
    data = rng.bytes(size)
    assert summaries.masked_crc32c(data) == masked_crc32c(data), size


def test_a_paper_size_grid_is_stored_box_downscaled(tmp_path):
  """An 8192x4096 grid (8 rows of 1024 px images, 4 columns) is stored at 2048x1024, each pixel
  the mean of a 4x4 box, in an event file TensorBoard reads with its checksums verified."""
  rng = np.random.default_rng(1)
  grid = rng.integers(0, 256, (1, 8192, 4096, 3), dtype=np.uint8)
  small = rng.integers(0, 256, (2, 300, 200, 1), dtype=np.uint8)
  writer = summaries.SummaryWriter(str(tmp_path))
  writer.write_images(3, {'val/grid': grid, 'small': small})
  grid[:] = 0  # The caller may reuse its arrays once the call returns.
  writer.close()

  stored = _images(tmp_path)
  [(step, width, height, [png])] = stored['val/grid']
  assert (step, width, height) == (3, 1024, 2048)
  boxes = np.random.default_rng(1).integers(
      0, 256, (1, 8192, 4096, 3), dtype=np.uint8)[0].reshape(2048, 4, 1024, 4, 3)
  box_sums = boxes.sum(axis=(1, 3), dtype=np.uint32)
  expected = (box_sums + 8) // 16  # The mean, rounded half up.
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), expected)
  assert np.abs(np.asarray(Image.open(io.BytesIO(png))) - boxes.mean(axis=(1, 3))).max() <= 0.5
  # Images within the size limit are stored as they are.
  [(_, width, height, pngs)] = stored['small']
  assert (width, height) == (200, 300)
  for png, image in zip(pngs, small):
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), image[..., 0])


def test_downscale_keeps_the_aspect_and_averages_partial_boxes():
  image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
  assert summaries.downscale(image, 7) is image
  out = summaries.downscale(image, 4)  # Factor 2: 3x4, the last row and column half boxes.
  assert out.shape == (3, 4, 3)
  np.testing.assert_array_equal(out[2, 3], image[4, 6])
  np.testing.assert_array_equal(out[2, 0], (image[4, :2].astype(int).sum(0) + 1) // 2)
  assert summaries.downscale(np.zeros((4100, 300, 1), np.uint8), 2048).shape == (1367, 100, 1)


def test_the_training_thread_does_not_wait_for_the_writing(tmp_path, monkeypatch):
  """A writer that hangs holds up nothing but itself; close() writes all that was queued."""
  gate, started = threading.Event(), threading.Event()
  write = summaries._AppendedFile.write

  def slow_write(self, record):
    started.set()
    assert gate.wait(timeout=60)
    write(self, record)

  monkeypatch.setattr(summaries._AppendedFile, 'write', slow_write)
  writer = summaries.SummaryWriter(str(tmp_path))  # Up to 8 calls queued.
  writer.write_scalars(1, {'loss': 1.0})
  assert started.wait(timeout=60)  # The background thread is stuck in the first write ...
  grid = np.zeros((1, 64, 32, 3), np.uint8)
  for step in range(2, 5):  # ... and the training thread goes on.
    writer.write_scalars(step, {'loss': 1.0 / step})
    writer.write_images(step, {'grid': grid})
  assert runs.scalars(tmp_path, 'loss') == {}
  gate.set()
  writer.close()
  assert runs.scalars(tmp_path, 'loss') == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.25})
  assert [s for s, *_ in _images(tmp_path)['grid']] == [2, 3, 4]


def test_a_failed_write_is_raised_by_the_next_call(tmp_path, monkeypatch):
  def broken_write(self, record):
    raise OSError(28, 'No space left on device')

  writer = summaries.SummaryWriter(str(tmp_path))
  monkeypatch.setattr(summaries._AppendedFile, 'write', broken_write)
  writer.write_scalars(1, {'loss': 1.0})
  with pytest.raises(RuntimeError, match='No space left on device') as raised:
    writer.flush()
  assert isinstance(raised.value.__cause__, OSError)
  writer.write_scalars(2, {'loss': 1.0})
  with pytest.raises(RuntimeError, match='No space left on device'):
    writer.close()
  monkeypatch.undo()
  writer = summaries.SummaryWriter(str(tmp_path / 'other'))
  with pytest.raises(ValueError, match='uint8'):  # Refused at the call.
    writer.write_images(1, {'grid': np.zeros((1, 4, 4, 3))})
  writer.close()


def _bucket(tmp_path, opened):
  """epath's filesystem for gs:// paths, redirected into `tmp_path`; every open recorded."""
  from etils.epath import testing

  def local(path):
    return str(tmp_path / str(path).removeprefix('gs://'))

  def open_(open_fn, path, mode):
    opened.append((str(path), mode))
    os.makedirs(os.path.dirname(local(path)), exist_ok=True)
    return open_fn(local(path), mode)

  def refuse(fn, path, *args, **kwargs):
    raise AssertionError(f'{fn.__name__} {path}: a bucket logdir only uploads whole objects')

  return testing.mock_epath(open=open_, exists=refuse, glob=refuse, makedirs=refuse, mkdir=refuse,
                            remove=refuse, rename=refuse, replace=refuse)


def _log(writer, steps):
  grid = np.random.default_rng(2).integers(0, 256, (1, 40, 60, 3), dtype=np.uint8)
  for step in steps:
    writer.write_scalars(step, {'loss': 1.0 / step, 'lr': 0.5})
    if step % 3 == 0:
      writer.write_images(step, {'grid': grid})
    if step % 4 == 0:
      writer.flush()


def test_a_bucket_logdir_gets_a_sequence_of_whole_event_files(tmp_path):
  """Objects cannot be appended to: each upload is a new event file, valid on its own; read in
  name order they hold the events a local logdir holds."""
  opened = []
  with _bucket(tmp_path / 'bucket', opened):
    writer = summaries.SummaryWriter('gs://runs/demo', flush_secs=3600)
    _log(writer, range(1, 11))  # Flushed at steps 4 and 8, then closed.
    writer.close()
    writer = summaries.SummaryWriter('gs://runs/demo', flush_secs=0)
    _log(writer, range(11, 14))  # Uploaded whenever the queue runs empty.
    writer.close()
  local = summaries.SummaryWriter(str(tmp_path / 'local'))
  _log(local, range(1, 14))
  local.close()

  bucket = tmp_path / 'bucket' / 'runs' / 'demo'
  files = sorted(os.listdir(bucket))
  # Each object written once, whole, and the names sort in the order of writing.
  assert opened == [(f'gs://runs/demo/{f}', 'wb') for f in files]
  assert len(files) >= 3 + 1
  for name in files:
    assert name.startswith('events.out.tfevents.') and name.endswith('.v2'), name
    first = event_pb2.Event.FromString(runs.tf_records(bucket / name)[0])
    assert first.file_version == 'brain.Event:2'
  assert _events(bucket) == _events(tmp_path / 'local')
  assert runs.scalars(bucket, 'loss') == pytest.approx({s: 1.0 / s for s in range(1, 14)})

  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(bucket), size_guidance={'tensors': 0})
  acc.Reload()
  assert [e.step for e in acc.Tensors('loss')] == list(range(1, 14))
  assert [e.step for e in acc.Tensors('grid')] == [3, 6, 9, 12]


def test_a_bucket_logdir_uploads_what_is_new_every_flush_secs(tmp_path):
  opened = []
  with _bucket(tmp_path, opened):
    writer = summaries.SummaryWriter('gs://runs/demo', flush_secs=0.2)
    writer.write_scalars(1, {'loss': 1.0})
    deadline = time.monotonic() + 60
    while not opened and time.monotonic() < deadline:  # No flush() called: the time is due.
      time.sleep(0.05)
    assert len(opened) == 1
    time.sleep(0.5)
    assert len(opened) == 1  # Nothing new, nothing uploaded.
    writer.close()
  assert len(opened) == 1
  assert runs.scalars(tmp_path / 'runs' / 'demo', 'loss') == {1: 1.0}


def _events(logdir) -> list[bytes]:
  """The summaries in the event files of `logdir`, in name order, without their wall times."""
  out = []
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    for record in runs.tf_records(path):
      event = event_pb2.Event.FromString(record)
      if not event.file_version:
        event.ClearField('wall_time')
        out.append(event.SerializeToString(deterministic=True))
  return out


def _images(logdir) -> dict[str, list[tuple[int, int, int, list[bytes]]]]:
  """(step, width, height, PNGs) of each image summary TensorBoard reads in `logdir`, by tag."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={'tensors': 0})
  acc.Reload()
  out = {}
  for tag in acc.PluginTagToContent('images'):
    for e in acc.Tensors(tag):
      width, height, *pngs = _ndarray(e.tensor_proto)
      out.setdefault(tag, []).append((e.step, int(width), int(height), pngs))
  return out
