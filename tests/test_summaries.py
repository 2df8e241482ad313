"""The training loop's TensorBoard files, written without TensorFlow, read by TensorBoard itself."""

import glob
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

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
