"""Tests for fmboost_jax/input_pipeline.py: config checks, batches, determinism, checkpointing."""

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from fmboost_jax import data_sources as ds
from fmboost_jax import errors, images
from fmboost_jax import input_pipeline as ip
from tests.data_helpers import coded_image, image_ids, make_config

# ----------------------------------------------------------------------------------------------
# Config checks.


def test_config_errors(monkeypatch):
  assert issubclass(ds.DataError, errors.UserError) and issubclass(ds.DataError, ValueError)
  with pytest.raises(ds.DataError, match='low_res_size=12 does not divide'):
    ip.check_config(make_config(size=32, low_res_size=12))
  with pytest.raises(ds.DataError, match="Unknown config.data.source='imagenet'"):
    ip.create_train_iterator(make_config(source='imagenet'))
  with pytest.raises(ds.DataError, match='config.data.path is empty'):
    ip.check_config(make_config(source='folder'))
  with pytest.raises(ds.DataError, match='tfds_name is empty'):
    ip.check_config(make_config(source='tfds'))
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(ds.DataError, match='batch_size=7 .* multiple of 2'):
    ip.create_train_iterator(make_config(batch_size=7))
  ip.check_config(make_config(batch_size=8))
  assert ip.local_batch_size(make_config(batch_size=8)) == 4


@pytest.mark.parametrize('fraction', [0.0, 1.0, -0.5, 2.0])
def test_val_fraction_outside_zero_one_is_refused(fraction):
  config = make_config('skimage', holdout='images', val_fraction=fraction)
  with pytest.raises(ds.DataError, match=f'val_fraction={fraction} must lie strictly between'):
    ip.create_train_iterator(config)
  config.data.holdout = 'halves'
  with pytest.raises(ds.DataError, match="Unknown config.data.holdout='halves'"):
    ip.validation_images(config)


# ----------------------------------------------------------------------------------------------
# Batches, determinism, iterator state and checkpointing.


def test_skimage_batches_and_validation():
  config = make_config(size=32, batch_size=8, num_val_images=20)
  it = ip.create_train_iterator(config)
  for _ in range(3):
    batch = next(it)
    assert set(batch) == {'image'}
    # Pixels, uint8: a quarter of float32's bytes to the devices (normalised there).
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
    assert batch['image'].std() > 6  # Real photo content, not a constant.

  val = ip.validation_images(config)
  assert val.shape == (20, 32, 32, 3) and val.dtype == np.float32
  # Round-robin: the first tile of each of the 15 photographs except the flat corners of retina
  # and camera (13 tiles), then a second tile per photograph from the middle of its width
  # (astronaut: 512 wide, 16 tiles, the 9th starts at column 256).
  photos = images.load_skimage_photos()
  assert len(photos) == 15
  astronaut, coffee = photos[0][1], photos[1][1]
  np.testing.assert_array_equal(val[0], images.normalize(astronaut[480:512, 0:32]))
  np.testing.assert_array_equal(val[1], images.normalize(coffee[368:400, 0:32]))
  np.testing.assert_array_equal(val[13], images.normalize(astronaut[480:512, 256:288]))
  assert val.std(axis=(1, 2, 3)).min() >= 0.02
  np.testing.assert_array_equal(ip.validation_images(config), val)


def test_determinism_and_state_resume():
  config = make_config(size=16, batch_size=4)
  first = [next(it)['image'] for it in [ip.create_train_iterator(config)] for _ in range(5)]
  it = ip.create_train_iterator(config)
  again = []
  for step in range(5):
    again.append(next(it)['image'])
    if step == 1:
      state = it.get_state()
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)

  resumed = ip.create_train_iterator(config)
  resumed.set_state(state)
  for step in range(2, 5):
    np.testing.assert_array_equal(next(resumed)['image'], first[step])

  other = make_config(size=16, batch_size=4)
  other.seed = 8
  assert not np.array_equal(next(ip.create_train_iterator(other))['image'], first[0])


def test_iterator_checkpoints_with_orbax(tmp_path):
  config = make_config(size=16, batch_size=4)
  it = ip.create_train_iterator(config)
  reference = [next(it)['image'] for _ in range(2)]
  manager = ocp.CheckpointManager(tmp_path / 'ckpt')
  manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  reference += [next(it)['image'] for _ in range(3)]

  restored = ip.create_train_iterator(config)
  manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  for step in range(2, 5):
    np.testing.assert_array_equal(next(restored)['image'], reference[step])
  manager.close()


def test_global_batches_do_not_depend_on_the_number_of_processes(tmp_path, monkeypatch):
  """Two processes read the two halves of exactly the global batches one process reads, and their
  iterator positions are the same number, so a checkpoint resumes with another process count."""
  size = 16
  for k in range(6):
    Image.fromarray(coded_image(k, 32 + 2 * k, 16)).save(tmp_path / f'{k}.png')
  config = make_config('folder', size=size, batch_size=4, num_val_images=3, path=str(tmp_path))
  single = ip.create_train_iterator(config)
  expected = [next(single)['image'] for _ in range(4)]
  assert len(set(image_ids(np.concatenate(expected[:1])))) == 4
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  halves, states = [], []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    it = ip.create_train_iterator(config)
    halves.append([next(it)['image'] for _ in range(4)])
    states.append(it.get_state())
    assert all(b.shape == (2, size, size, 3) for b in halves[-1])
  for k in range(4):
    np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), expected[k])
  assert states[0] == states[1] == single.get_state()

  # A 2-process position restored into one process continues with the next global batch.
  monkeypatch.setattr(jax, 'process_count', lambda: 1)
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  resumed = ip.create_train_iterator(config)
  resumed.set_state(states[0])
  np.testing.assert_array_equal(next(resumed)['image'], next(single)['image'])
