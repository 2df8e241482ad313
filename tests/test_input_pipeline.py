"""Tests for fmboost_jax/input_pipeline.py (all offline, small images, a few seconds in total)."""

import logging
import os
import socket
import struct
import zlib

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import default
from fmboost_jax import errors
from fmboost_jax import input_pipeline as ip


def make_config(source='skimage', size=16, batch_size=4, num_val_images=2, **data):
  config = default.get_config()
  config.seed = 7
  config.data.source = source
  config.data.high_res_size = size
  config.data.low_res_size = size // 2
  config.data.batch_size = batch_size
  config.data.num_val_images = num_val_images
  config.data.num_threads = 2
  config.data.prefetch_buffer_size = 4
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


def coded_image(k, height, width):
  """uint8 [H, W, 3]: channel 0 names the image (10 + 30 k), channel 1 is the row, 2 the column."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  return np.stack([np.full((height, width), 10 + 30 * k), rows, cols], -1).astype(np.uint8)


def to_uint8(x):
  return np.round((np.asarray(x) + 1.0) * 127.5).astype(np.int64)


def image_ids(images):
  """Which coded image each [N, S, S, 3] crop in [-1, 1] came from (robust to JPEG noise)."""
  return np.round((to_uint8(images[:, 0, 0, 0]) - 10) / 30).astype(np.int64).tolist()


def write_png16(path, array):
  """Writes a 16-bit PNG ([H, W, 1|3|4] uint16) by hand: Pillow cannot write 16-bit colour."""
  height, width, channels = array.shape
  color_type = {1: 0, 3: 2, 4: 6}[channels]
  raw = b''.join(b'\x00' + array[y].astype('>u2').tobytes() for y in range(height))

  def chunk(tag, body):
    return struct.pack('>I', len(body)) + tag + body + struct.pack('>I', zlib.crc32(tag + body))

  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n'
            + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, color_type, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def check_held_out(batch_images, heights, size):
  """Decodes coded crops; asserts every crop lies in its image's top H - S rows."""
  for crop in to_uint8(batch_images):
    k = round((crop[0, 0, 0] - 10) / 30)
    assert np.all(crop[..., 0] == 10 + 30 * k)
    rows = crop[:, 0, 1]
    np.testing.assert_array_equal(rows, rows[0] + np.arange(size))  # A contiguous crop.
    assert rows[-1] < heights[k] - size, (rows, heights[k])


# ----------------------------------------------------------------------------------------------
# Config checks.


def test_config_errors(monkeypatch):
  assert issubclass(ip.DataError, errors.UserError) and issubclass(ip.DataError, ValueError)
  with pytest.raises(ip.DataError, match='low_res_size=12 does not divide'):
    ip.check_config(make_config(size=32, low_res_size=12))
  with pytest.raises(ip.DataError, match="Unknown config.data.source='imagenet'"):
    ip.create_train_iterator(make_config(source='imagenet'))
  with pytest.raises(ip.DataError, match='config.data.path is empty'):
    ip.check_config(make_config(source='folder'))
  with pytest.raises(ip.DataError, match='tfds_name is empty'):
    ip.check_config(make_config(source='tfds'))
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(ip.DataError, match='batch_size=7 .* multiple of 2'):
    ip.create_train_iterator(make_config(batch_size=7))
  ip.check_config(make_config(batch_size=8))
  assert ip.local_batch_size(make_config(batch_size=8)) == 4


# ----------------------------------------------------------------------------------------------
# Pixel conversion.


def test_array_conversion_and_range():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  np.testing.assert_array_equal(ip.to_rgb_uint8(gray), np.stack([gray] * 3, -1))
  rgba = np.array([[[100, 50, 0, 0], [100, 50, 0, 255], [100, 50, 0, 128]]], np.uint8)
  np.testing.assert_array_equal(ip.to_rgb_uint8(rgba)[0],
                                [[255, 255, 255], [100, 50, 0], [177, 152, 127]])
  np.testing.assert_array_equal(ip.to_rgb_uint8(np.array([[True, False]]))[0, :, 0], [255, 0])
  np.testing.assert_array_equal(ip.to_rgb_uint8(np.array([[0.0, 0.5, 1.0]]))[0, :, 1],
                                [0, 128, 255])
  np.testing.assert_array_equal(
      ip.to_rgb_uint8(np.array([[0, 257, 65535, 300]], np.uint16))[0, :, 2], [0, 1, 255, 1])
  x = ip.normalize(np.array([0, 1, 254, 255], np.uint8))
  assert x.dtype == np.float32 and x[0] == -1.0 and x[-1] == 1.0
  np.testing.assert_allclose(x[1:3], [1 / 127.5 - 1, 254 / 127.5 - 1], rtol=1e-6)


def test_file_conversion_modes(tmp_path):
  gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1))
  Image.fromarray(gray, 'L').save(tmp_path / 'gray.png')
  np.testing.assert_array_equal(ip.decode_image_file(tmp_path / 'gray.png'),
                                np.stack([gray] * 3, -1))

  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[..., :3] = (200, 100, 50)
  rgba[..., 3] = [[0, 255], [128, 64]]
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
  out = ip.decode_image_file(tmp_path / 'rgba.png')
  np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # Transparent -> white.
  np.testing.assert_array_equal(out[0, 1], [200, 100, 50])  # Opaque -> unchanged.
  alpha = 128 / 255
  np.testing.assert_array_equal(out[1, 0], np.round(np.array([200, 100, 50]) * alpha
                                                    + 255 * (1 - alpha)))

  la = np.stack([np.full((2, 2), 40, np.uint8), np.array([[0, 255], [255, 0]], np.uint8)], -1)
  Image.fromarray(la, 'LA').save(tmp_path / 'la.png')
  np.testing.assert_array_equal(ip.decode_image_file(tmp_path / 'la.png')[..., 0],
                                [[255, 40], [40, 255]])

  v16 = (np.arange(30, dtype=np.uint16).reshape(5, 6) * 2000 + 7)
  Image.fromarray(v16).save(tmp_path / 'gray16.png')
  assert Image.open(tmp_path / 'gray16.png').mode == 'I;16'
  np.testing.assert_array_equal(ip.decode_image_file(tmp_path / 'gray16.png'),
                                np.stack([v16 >> 8] * 3, -1))
  rgb16 = np.stack([v16, v16 // 2, 65535 - v16], -1)
  write_png16(tmp_path / 'rgb16.png', rgb16)
  np.testing.assert_array_equal(ip.decode_image_file(tmp_path / 'rgb16.png'), rgb16 >> 8)

  palette = Image.new('P', (3, 1))
  palette.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60] + [0] * (253 * 3))
  palette.putdata([0, 1, 2])
  palette.save(tmp_path / 'palette.png', transparency=0)
  np.testing.assert_array_equal(ip.decode_image_file(tmp_path / 'palette.png')[0],
                                [[255, 255, 255], [10, 20, 30], [40, 50, 60]])

  Image.fromarray(np.array([[True, False, True]])).convert('1').save(tmp_path / 'bits.bmp')
  np.testing.assert_array_equal(ip.decode_image_file(tmp_path / 'bits.bmp')[0, :, 0],
                                [255, 0, 255])


# ----------------------------------------------------------------------------------------------
# Held-out geometry.


def test_random_crops_stay_above_validation_strip():
  height, width, size = 100, 40, 16
  image = coded_image(0, height, width)
  rng = np.random.default_rng(0)
  tops, lefts = [], []
  for _ in range(2000):
    top, left = ip.train_crop_offset(height, width, size, rng)
    assert 0 <= top and top + size <= height - size and 0 <= left <= width - size
    tops.append(top)
    lefts.append(left)
  assert min(tops) == 0 and max(tops) == height - 2 * size  # The whole region is reachable.
  assert min(lefts) == 0 and max(lefts) == width - size
  for _ in range(200):
    crop = ip.random_crop(image, size, rng)
    assert crop.shape == (size, size, 3) and crop[-1, 0, 1] < height - size

  tiles = ip.validation_tile_offsets(height, width, size)
  assert tiles == [(84, 0), (84, 16)]
  assert all(top == height - size for top, _ in tiles)
  assert ip.validation_tile_offsets(2 * size - 1, width, size) == []
  assert ip.validation_tile_offsets(2 * size, size - 1, size) == []
  with pytest.raises(ValueError):
    ip.train_crop_offset(2 * size - 1, width, size, rng)


# ----------------------------------------------------------------------------------------------
# skimage source, batches, determinism, checkpointing.


def test_skimage_photos_load_offline(monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError('network access attempted')

  monkeypatch.setattr(socket.socket, 'connect', no_network)
  ip._load_skimage_photos.cache_clear()
  photos = ip.load_skimage_photos()
  assert [name for name, _ in photos] == list(ip.SKIMAGE_PHOTOS)
  assert len(photos) == 15
  for _, image in photos:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
  usable = [name for name, image in photos if ip.is_usable(*image.shape[:2], 64)]
  assert len(usable) >= 10 and len(usable) == 15
  import skimage.data  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(photos[0][1], skimage.data.astronaut())
  np.testing.assert_array_equal(photos[-1][1][..., 2], skimage.data.coins())

  with pytest.raises(ip.DataError, match='None of the 15 bundled scikit-image photographs'):
    ip.create_train_iterator(make_config(size=1024))


def test_skimage_batches_and_validation():
  config = make_config(size=32, batch_size=8, num_val_images=20)
  it = ip.create_train_iterator(config)
  for _ in range(3):
    batch = next(it)
    assert set(batch) == {'image'}
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
    assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
    assert batch['image'].std() > 0.05  # Real photo content, not a constant.

  val = ip.validation_images(config)
  assert val.shape == (20, 32, 32, 3) and val.dtype == np.float32
  # Round-robin: the first tile of each of the 15 photographs except the flat corners of retina
  # and camera (13 tiles), then a second tile per photograph from the middle of its width
  # (astronaut: 512 wide, 16 tiles, the 9th starts at column 256).
  photos = ip.load_skimage_photos()
  assert len(photos) == 15
  astronaut, coffee = photos[0][1], photos[1][1]
  np.testing.assert_array_equal(val[0], ip.normalize(astronaut[480:512, 0:32]))
  np.testing.assert_array_equal(val[1], ip.normalize(coffee[368:400, 0:32]))
  np.testing.assert_array_equal(val[13], ip.normalize(astronaut[480:512, 256:288]))
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


# ----------------------------------------------------------------------------------------------
# Folder source.


def test_folder_recursive_mixed_extensions_and_held_out(tmp_path):
  size = 16
  heights = {0: 40, 1: 48, 2: 32, 3: 36, 4: 64}
  (tmp_path / 'a' / 'b').mkdir(parents=True)
  (tmp_path / 'c').mkdir()
  # Sorted paths: a/b/1.PNG, a/b/3.jpg, a/0.Png, c/2.webp, c/4.BMP.
  files = {0: 'a/0.Png', 1: 'a/b/1.PNG', 2: 'c/2.webp', 3: 'a/b/3.jpg', 4: 'c/4.BMP'}
  for k, name in files.items():
    image = Image.fromarray(coded_image(k, heights[k], 24 + 8 * k))
    if name.endswith('webp'):
      image.save(tmp_path / name, lossless=True)
    elif name.endswith('jpg'):
      image.save(tmp_path / name, quality=100, subsampling=0)
    else:
      image.save(tmp_path / name)
  (tmp_path / 'a' / 'notes.txt').write_text('not an image')

  scan = ip.scan_image_folder(str(tmp_path), size, num_threads=2)
  assert [os.path.relpath(p, tmp_path) for p, _, _ in scan.usable] == [
      'a/0.Png', 'a/b/1.PNG', 'a/b/3.jpg', 'c/2.webp', 'c/4.BMP']
  assert [(h, w) for _, h, w in scan.usable] == [(40, 24), (48, 32), (36, 48), (32, 40), (64, 56)]
  assert scan.unreadable == [] and scan.too_small == [] and scan.num_ignored == 1

  config = make_config('folder', size=size, batch_size=4, num_val_images=5, path=str(tmp_path))
  it = ip.create_train_iterator(config)
  seen = set()
  lossless = {k: h for k, h in heights.items() if k != 3}  # JPEG values are only approximate.
  for _ in range(5):
    batch = next(it)['image']
    assert batch.shape == (4, size, size, 3) and batch.dtype == np.float32
    assert -1.0 <= batch.min() and batch.max() <= 1.0
    ids = image_ids(batch)
    seen.update(ids)
    check_held_out(batch[np.isin(ids, list(lossless))], heights, size)
  assert seen == set(heights)

  val = to_uint8(ip.validation_images(config))
  assert val.shape == (5, size, size, 3)
  # One tile per image, at column 0 of its bottom strip, in scan order: a/0.Png (rows 24..39),
  # a/b/1.PNG (32..47), a/b/3.jpg (20..35, JPEG: approximate), c/2.webp (16..31), c/4.BMP (48..63).
  for i, top in enumerate((24, 32, 20, 16, 48)):
    assert np.abs(val[i, :, 0, 1] - np.arange(top, top + 16)).max() <= (3 if i == 2 else 0)
    assert np.abs(val[i, 0, :, 2] - np.arange(0, 16)).max() <= (3 if i == 2 else 0)


def test_folder_skips_bad_and_small_files(tmp_path, caplog):
  size = 16
  Image.fromarray(coded_image(0, 40, 20)).save(tmp_path / 'good.png')
  Image.fromarray(coded_image(1, 20, 20)).save(tmp_path / 'small.png')  # Below 32 x 16.
  Image.fromarray(coded_image(2, 40, 15)).save(tmp_path / 'narrow.jpg')  # Below 32 x 16.
  (tmp_path / 'corrupt.jpg').write_bytes(np.random.default_rng(0).bytes(2000))
  (tmp_path / 'text.png').write_text('this is not a png')
  full = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(full).save(tmp_path / 'whole.png')
  data = (tmp_path / 'whole.png').read_bytes()
  (tmp_path / 'truncated.png').write_bytes(data[:len(data) // 2])
  (tmp_path / 'whole.png').unlink()
  Image.fromarray(full).save(tmp_path / 'whole.jpeg', quality=95)
  data = (tmp_path / 'whole.jpeg').read_bytes()
  (tmp_path / 'truncated.JPEG').write_bytes(data[:len(data) // 2])
  (tmp_path / 'whole.jpeg').unlink()
  (tmp_path / 'README.md').write_text('docs')

  scan = ip.scan_image_folder(str(tmp_path), size, num_threads=2)
  assert [os.path.basename(p) for p, _, _ in scan.usable] == ['good.png']
  assert sorted(os.path.basename(p) for p, _ in scan.unreadable) == [
      'corrupt.jpg', 'text.png', 'truncated.JPEG', 'truncated.png']
  assert sorted(os.path.basename(p) for p, _, _ in scan.too_small) == ['narrow.jpg', 'small.png']
  assert scan.num_ignored == 1

  config = make_config('folder', size=size, batch_size=2, num_val_images=1, path=str(tmp_path))
  caplog.set_level(logging.INFO)
  batch = next(ip.create_train_iterator(config))['image']
  assert '1 usable, 4 unreadable, 2 too small (below 32x16 px), 1 non-image' in caplog.text
  check_held_out(batch, {0: 40}, size)
  np.testing.assert_array_equal(to_uint8(ip.validation_images(config))[0, :, 0, 1],
                                np.arange(24, 40))

  config.data.num_val_images = 2
  with pytest.raises(ip.DataError, match='Only 1 validation tiles .*num_val_images=2'):
    ip.validation_images(config)

  (tmp_path / 'good.png').unlink()
  with pytest.raises(ip.DataError, match=r'no usable image: 4 unreadable and 2 smaller than the '
                     r'minimum 32x16 px'):
    ip.create_train_iterator(config)


def test_folder_missing_or_empty(tmp_path):
  config = make_config('folder', path=str(tmp_path / 'missing'))
  with pytest.raises(ip.DataError, match='does not exist'):
    ip.create_train_iterator(config)
  (tmp_path / 'empty' / 'sub').mkdir(parents=True)
  (tmp_path / 'empty' / 'sub' / 'labels.csv').write_text('a,b')
  config.data.path = str(tmp_path / 'empty')
  with pytest.raises(ip.DataError, match='holds no .*1 other files'):
    ip.create_train_iterator(config)
  with pytest.raises(ip.DataError, match='holds no'):
    ip.validation_images(config)


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


# ----------------------------------------------------------------------------------------------
# tfds source: a tiny ArrayRecord dataset built offline in tmp_path and loaded by name.

_TFDS_SHAPES = [(40, 32), (20, 20), (36, 16), (64, 24)]  # The second one is too small for S=16.


class FmboostTestPhotos(tfds.core.GeneratorBasedBuilder):
  """Four coded images of different sizes."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(None, None, 3))}),
        disable_shuffling=True)  # Keep generation order, so validation tiles are predictable.

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for k, (height, width) in enumerate(_TFDS_SHAPES):
      yield k, {'image': coded_image(k, height, width)}


def test_tfds_source(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  FmboostTestPhotos(data_dir=data_dir, file_format='array_record').download_and_prepare()
  size = 16
  config = make_config('tfds', size=size, batch_size=4, num_val_images=4,
                       tfds_name='fmboost_test_photos', tfds_data_dir=data_dir)
  it = ip.create_train_iterator(config)
  heights = {k: h for k, (h, _) in enumerate(_TFDS_SHAPES)}
  seen = set()
  for _ in range(4):
    batch = next(it)['image']
    assert batch.shape == (4, size, size, 3) and batch.dtype == np.float32
    check_held_out(batch, heights, size)
    seen.update(image_ids(batch))
  assert seen == {0, 2, 3}  # The 20 x 20 image is skipped.

  val = to_uint8(ip.validation_images(config))
  # Round-robin: the first tile of images 0, 2 and 3 (image 1 is too small), then image 0's second.
  np.testing.assert_array_equal(val[:, 0, 0, 0], [10, 70, 100, 10])
  np.testing.assert_array_equal(val[0], coded_image(0, 40, 32)[24:40, 0:16])
  np.testing.assert_array_equal(val[1], coded_image(2, 36, 16)[20:36, 0:16])
  np.testing.assert_array_equal(val[2], coded_image(3, 64, 24)[48:64, 0:16])
  np.testing.assert_array_equal(val[3], coded_image(0, 40, 32)[24:40, 16:32])

  config.data.tfds_split = 'validation'
  with pytest.raises(ip.DataError, match="split 'validation'.*tfds build"):
    ip.create_train_iterator(config)


def test_tfds_unknown_or_unprepared(tmp_path):
  config = make_config('tfds', tfds_name='no_such_dataset_xyz', tfds_data_dir=str(tmp_path))
  with pytest.raises(ip.DataError, match="'no_such_dataset_xyz'.*could not be opened.*check "
                     "config.data.tfds_name.*tfds build"):
    ip.create_train_iterator(config)
  config.data.tfds_name = 'mnist'  # Registered in tfds but not prepared in this data_dir.
  with pytest.raises(ip.DataError, match="'mnist'.*could not be opened"):
    ip.validation_images(config)
