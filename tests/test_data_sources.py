"""Tests for fmboost_jax/data_sources.py: held-out geometry and split, folder and tfds sources."""

import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from fmboost_jax import data_sources as ds
from fmboost_jax import images
from fmboost_jax import input_pipeline as ip
from tests.data_helpers import coded_image, image_ids, make_config, to_uint8


def check_held_out(batch_images, heights, size):
  """Decodes coded crops; asserts every crop lies in its image's top H - S rows."""
  for crop in to_uint8(batch_images):
    k = round((crop[0, 0, 0] - 10) / 30)
    assert np.all(crop[..., 0] == 10 + 30 * k)
    rows = crop[:, 0, 1]
    np.testing.assert_array_equal(rows, rows[0] + np.arange(size))  # A contiguous crop.
    assert rows[-1] < heights[k] - size, (rows, heights[k])


# ----------------------------------------------------------------------------------------------
# Held-out geometry.


def test_random_crops_stay_above_validation_strip():
  height, width, size = 100, 40, 16
  geometry = ds.Geometry(size, strips=True)
  image = coded_image(0, height, width)
  rng = np.random.default_rng(0)
  tops, lefts = [], []
  for _ in range(2000):
    top, left = geometry.train_crop_offset(height, width, rng)
    assert top >= 0 and top + size <= height - size and 0 <= left <= width - size
    tops.append(top)
    lefts.append(left)
  assert min(tops) == 0 and max(tops) == height - 2 * size  # The whole region is reachable.
  assert min(lefts) == 0 and max(lefts) == width - size
  for _ in range(200):
    crop = geometry.train_crop(image, rng)
    assert crop.shape == (size, size, 3) and crop[-1, 0, 1] < height - size

  tiles = geometry.validation_offsets(height, width)
  assert tiles == [(84, 0), (84, 16)]
  assert all(top == height - size for top, _ in tiles)
  assert geometry.validation_offsets(2 * size - 1, width) == []
  assert geometry.validation_offsets(2 * size, size - 1) == []
  with pytest.raises(ValueError):
    geometry.train_crop_offset(2 * size - 1, width, rng)


def test_whole_image_geometry_uses_every_pixel_and_the_centre_for_validation():
  size = 16
  geometry = ds.Geometry(size)
  assert geometry.usable(16, 16) and geometry.usable(16, 40) and not geometry.usable(15, 40)
  assert geometry.minimum() == '16 px on the shorter side'
  rng = np.random.default_rng(0)
  offsets = {geometry.train_crop_offset(20, 40, rng) for _ in range(3000)}
  assert {t for t, _ in offsets} == set(range(5))
  assert {left for _, left in offsets} == set(range(25))
  assert geometry.train_crop_offset(16, 16, rng) == (0, 0)  # The crop is the whole image.
  assert geometry.validation_offsets(16, 16) == [(0, 0)]
  assert geometry.validation_offsets(21, 40) == [(2, 12)]
  assert geometry.validation_offsets(15, 40) == []

  # resize_small scales an image up to a shorter side of S, aspect kept; others are untouched.
  scaled = ds.Geometry(size, resize_small=True)
  assert scaled.usable(4, 9)
  small = coded_image(0, 8, 12)
  assert scaled.prepare(small).shape == (16, 24, 3)
  assert scaled.train_crop(small, rng).shape == (16, 16, 3)
  big = coded_image(0, 20, 20)
  assert scaled.prepare(big) is big


def test_hash_split_is_stable_and_near_the_fraction():
  names = [f'dir{i % 7}/img_{i:05d}.jpg' for i in range(20000)]
  held = [n for n in names if ds.is_held_out(n, 0.1)]
  assert 0.09 < len(held) / len(names) < 0.11
  # Membership depends on the name alone: adding files never moves an existing one.
  assert [n for n in names[:5000] if ds.is_held_out(n, 0.1)] == [n for n in held if n in
                                                                 set(names[:5000])]
  # A larger fraction holds out a superset; the path separator does not matter.
  assert set(held) <= {n for n in names if ds.is_held_out(n, 0.2)}
  assert ds.is_held_out(os.path.join('a', 'b.png'), 0.5) == ds.is_held_out('a/b.png', 0.5)


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

  scan = ds.scan_image_folder(str(tmp_path), ds.Geometry(size, strips=True), num_threads=2)
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
    assert batch.shape == (4, size, size, 3) and batch.dtype == np.uint8  # Pixels.
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

  scan = ds.scan_image_folder(str(tmp_path), ds.Geometry(size, strips=True), num_threads=2)
  assert [os.path.basename(p) for p, _, _ in scan.usable] == ['good.png']
  assert sorted(os.path.basename(p) for p, _ in scan.unreadable) == [
      'corrupt.jpg', 'text.png', 'truncated.JPEG', 'truncated.png']
  assert sorted(os.path.basename(p) for p, _, _ in scan.too_small) == ['narrow.jpg', 'small.png']
  assert scan.num_ignored == 1

  config = make_config('folder', size=size, batch_size=2, num_val_images=1, path=str(tmp_path))
  caplog.set_level(logging.INFO)
  batch = next(ip.create_train_iterator(config))['image']
  assert ('1 usable, 4 unreadable, 2 too small (below 32x16 px (H x W: 16 px crops above a '
          'held-out strip)), 0 too large') in caplog.text
  check_held_out(batch, {0: 40}, size)
  np.testing.assert_array_equal(to_uint8(ip.validation_images(config))[0, :, 0, 1],
                                np.arange(24, 40))

  config.data.num_val_images = 2
  with pytest.raises(ds.DataError, match='Only 1 validation crops .*num_val_images=2'):
    ip.validation_images(config)

  (tmp_path / 'good.png').unlink()
  with pytest.raises(
      ds.DataError, match=r'no usable image \(0 usable, 4 unreadable, 2 too small \(below 32x16'):
    ip.create_train_iterator(config)


def test_folder_missing_or_empty(tmp_path):
  config = make_config('folder', path=str(tmp_path / 'missing'))
  with pytest.raises(ds.DataError, match='does not exist'):
    ip.create_train_iterator(config)
  (tmp_path / 'empty' / 'sub').mkdir(parents=True)
  (tmp_path / 'empty' / 'sub' / 'labels.csv').write_text('a,b')
  config.data.path = str(tmp_path / 'empty')
  with pytest.raises(ds.DataError, match='holds no .*1 other files'):
    ip.create_train_iterator(config)
  with pytest.raises(ds.DataError, match='holds no'):
    ip.validation_images(config)


# ----------------------------------------------------------------------------------------------
# tfds source: a tiny ArrayRecord dataset built offline in tmp_path and loaded by name.

_TFDS_SHAPES = [(40, 32), (20, 20), (36, 16), (64, 24)]  # The second one is too small for S=16.
_TFDS_VALIDATION_SHAPES = [(16, 20), (12, 30), (24, 16)]  # Whole images; the second is too small.


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
    return {'train': self._generate_examples(_TFDS_SHAPES),
            'validation': self._generate_examples(_TFDS_VALIDATION_SHAPES, first=5)}

  def _generate_examples(self, shapes, first=0):
    for k, (height, width) in enumerate(shapes, start=first):
      yield k, {'image': coded_image(k, height, width)}


def test_tfds_source(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  FmboostTestPhotos(data_dir=data_dir, file_format='array_record').download_and_prepare()
  size = 16
  config = make_config('tfds', size=size, batch_size=4, num_val_images=4,
                       tfds_name='fmboost_test_photos', tfds_data_dir=data_dir)
  assert config.data.tfds_val_split == 'validation'
  it = ip.create_train_iterator(config)
  heights = {k: h for k, (h, _) in enumerate(_TFDS_SHAPES)}
  seen = set()
  for _ in range(4):
    batch = next(it)['image']
    assert batch.shape == (4, size, size, 3) and batch.dtype == np.uint8  # Pixels.
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

  # Whole held-out images: the validation split, centre crops, the too small one skipped.
  config.data.holdout = 'images'
  with pytest.raises(ds.DataError, match="Only 2 validation crops .*larger config.data."
                     "tfds_val_split than 'validation'"):
    ip.validation_images(config)
  config.data.num_val_images = 2
  val = to_uint8(ip.validation_images(config))
  np.testing.assert_array_equal(val[:2], [coded_image(5, 16, 20)[:, 2:18],
                                          coded_image(7, 24, 16)[4:20]])
  assert set(image_ids(next(ip.create_train_iterator(config))['image'])) <= {0, 1, 2, 3}

  config.data.tfds_split = 'test'
  with pytest.raises(ds.DataError, match="split 'test'.*tfds build"):
    ip.create_train_iterator(config)


def test_tfds_unknown_or_unprepared(tmp_path):
  config = make_config('tfds', tfds_name='no_such_dataset_xyz', tfds_data_dir=str(tmp_path))
  with pytest.raises(ds.DataError, match="'no_such_dataset_xyz'.*could not be opened.*check "
                     "config.data.tfds_name.*tfds build"):
    ip.create_train_iterator(config)
  config.data.tfds_name = 'mnist'  # Registered in tfds but not prepared in this data_dir.
  with pytest.raises(ds.DataError, match="'mnist'.*could not be opened"):
    ip.validation_images(config)


# ----------------------------------------------------------------------------------------------
# Whole held-out images (holdout='images', the default for real datasets).


def numbered_image(k, height, width):
  """uint8 [H, W, 3]: channel 0 is 5 k (k < 50 names the image), 1 the row, 2 the column."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  return np.stack([np.full((height, width), 5 * k), rows, cols], -1).astype(np.uint8)


def numbers(images):
  return sorted(set(np.round(to_uint8(images[:, 0, 0, 0]) / 5).astype(int).tolist()))


def test_folder_holds_out_whole_images_by_a_hash_of_their_paths(tmp_path, caplog):
  size = 16
  shapes = {}
  for k in range(40):
    shapes[k] = (16 + k % 3, 16 + 2 * (k % 4))  # Shorter side exactly S for most of them.
    (tmp_path / f'd{k % 3}').mkdir(exist_ok=True)
    Image.fromarray(numbered_image(k, *shapes[k])).save(tmp_path / f'd{k % 3}' / f'{k}.png')
  Image.fromarray(numbered_image(45, 15, 40)).save(tmp_path / 'small.png')
  config = make_config('folder', size=size, batch_size=8, num_val_images=4, holdout='images',
                       path=str(tmp_path), val_fraction=0.25)
  relative = {k: f'd{k % 3}/{k}.png' for k in range(40)}
  held = sorted((relative[k], k) for k in range(40) if ds.is_held_out(relative[k], 0.25))
  held_ids = [k for _, k in held]
  assert 4 <= len(held_ids) <= 18

  caplog.set_level(logging.INFO)
  it = ip.create_train_iterator(config)
  seen = set()
  for _ in range(12):
    seen.update(numbers(next(it)['image']))
  assert '40 usable, 0 unreadable, 1 too small (below 16 px on the shorter side)' in caplog.text
  assert seen == set(range(40)) - set(held_ids)  # Every training image, never a held-out one.

  val = to_uint8(ip.validation_images(config))
  assert val.shape == (4, size, size, 3)
  for crop, (_, k) in zip(val, held[:4]):  # Centre crops, in path order.
    h, w = shapes[k]
    np.testing.assert_array_equal(crop, numbered_image(k, h, w)[(h - size) // 2:][:size,
                                                                (w - size) // 2:][:, :size])
  np.testing.assert_array_equal(to_uint8(ip.validation_images(config)), val)

  # Adding images never moves an existing one across the split.
  for k in range(40, 45):
    Image.fromarray(numbered_image(k, 16, 16)).save(tmp_path / f'new{k}.png')
  more = ds.open_images(config, 'validation')
  assert [numbers(images.normalize(more[i])[None])[0] for i in range(len(more))
          if numbers(images.normalize(more[i])[None])[0] < 40] == held_ids

  config.data.num_val_images = 40
  with pytest.raises(ds.DataError, match=r'Only \d+ validation crops .* raise '
                     'config.data.val_fraction'):
    ip.validation_images(config)


def test_a_folder_with_no_held_out_image_is_told_about_val_fraction_first(tmp_path):
  """Three usable images, none of them in the held-out share of val_fraction=0.02 (their hashes
  decide, worked out below): the sizes are fine, so the advice is the held-out share."""
  names = [f'{k}.png' for k in range(3)]
  assert not any(ds.is_held_out(n, 0.02) for n in names) and all(
      ds.is_held_out(n, 0.999) for n in names)
  for k, name in enumerate(names):
    Image.fromarray(numbered_image(k, 16, 16)).save(tmp_path / name)
  config = make_config('folder', size=16, batch_size=1, num_val_images=1, holdout='images',
                       path=str(tmp_path), val_fraction=0.02)
  with pytest.raises(ds.DataError, match=r'has no held-out image \(3 usable, .*\); raise '
                     r'config.data.val_fraction \(none of the 3 usable images is held out at '
                     r'0.02\), or set config.data.val_path to a folder of held-out images.$'):
    ds.open_images(config, 'validation')
  config.data.val_fraction = 0.999
  with pytest.raises(ds.DataError, match=r'has no training image .*; lower '
                     r'config.data.val_fraction \(all 3 usable images are held out at 0.999\).$'):
    ds.open_images(config, 'train')


def test_a_folder_of_exactly_high_res_size_images_trains(tmp_path):
  """1024 x 1024 photographs at high_res_size=1024, scaled down 64x: every crop is a whole image."""
  size = 16
  for k in range(12):
    Image.fromarray(numbered_image(k, size, size)).save(tmp_path / f'{k}.png')
  config = make_config('folder', size=size, batch_size=4, num_val_images=2, holdout='images',
                       path=str(tmp_path), val_fraction=0.3)
  batch = to_uint8(next(ip.create_train_iterator(config))['image'])
  for crop in batch:
    k = int(round(crop[0, 0, 0] / 5))
    image = numbered_image(k, size, size).astype(np.int64)
    assert np.array_equal(crop, image) or np.array_equal(crop, image[:, ::-1])
  assert ip.validation_images(config).shape == (2, size, size, 3)


def test_separate_held_out_folder(tmp_path):
  size = 16
  (tmp_path / 'train').mkdir()
  (tmp_path / 'val').mkdir()
  for k in range(6):
    Image.fromarray(numbered_image(k, 20, 20)).save(tmp_path / 'train' / f'{k}.png')
  for k in range(6, 9):
    Image.fromarray(numbered_image(k, 16, 24)).save(tmp_path / 'val' / f'{k}.png')
  config = make_config('folder', size=size, batch_size=6, num_val_images=3, holdout='images',
                       path=str(tmp_path / 'train'), val_path=str(tmp_path / 'val'))
  assert numbers(next(ip.create_train_iterator(config))['image']) == list(range(6))
  assert numbers(ip.validation_images(config)) == [6, 7, 8]

  config.data.val_path = str(tmp_path / 'train' / 'sub')
  (tmp_path / 'train' / 'sub').mkdir()
  with pytest.raises(ds.DataError, match='val_path=.* overlaps config.data.path=.*two separate'):
    ip.validation_images(config)
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'notes.txt').write_text('no images')
  config.data.val_path = str(tmp_path / 'empty')
  with pytest.raises(ds.DataError, match="'.*empty' holds no .* files"):
    ip.validation_images(config)
  config.data.val_path = str(tmp_path / 'val')
  config.data.high_res_size, config.data.low_res_size = 20, 10
  with pytest.raises(ds.DataError, match='has no held-out image .*3 too small .*resize_small'):
    ip.validation_images(config)
  config.data.resize_small = True
  assert ip.validation_images(config).shape == (3, 20, 20, 3)


def test_no_image_reaching_high_res_size_is_one_clear_error(tmp_path):
  for k in range(5):
    Image.fromarray(numbered_image(k, 12, 30)).save(tmp_path / f'{k}.png')
  config = make_config('folder', size=16, holdout='images', path=str(tmp_path),
                       val_fraction=0.5)
  with pytest.raises(ds.DataError, match=r"has no training image \(0 usable, 0 unreadable, 5 too "
                     r'small \(below 16 px on the shorter side\).*set config.data.resize_small'):
    ip.create_train_iterator(config)


def test_images_above_max_pixels_are_skipped_and_never_decoded(tmp_path, monkeypatch, caplog):
  size = 16
  for k in range(4):
    Image.fromarray(numbered_image(k, 20, 20)).save(tmp_path / f'{k}.png')
  Image.fromarray(numbered_image(9, 200, 300)).save(tmp_path / 'huge.png')
  decoded = []
  original = images.decode_image_file
  monkeypatch.setattr(images, 'decode_image_file', lambda p: decoded.append(os.path.basename(p))
                      or original(p))
  geometry = ds.Geometry(size)
  scan = ds.scan_image_folder(str(tmp_path), geometry, num_threads=2, max_pixels=50_000)
  assert [(os.path.basename(p), h, w) for p, h, w in scan.too_large] == [('huge.png', 200, 300)]
  assert len(scan.usable) == 4 and 'huge.png' not in decoded
  config = make_config('folder', size=size, batch_size=4, path=str(tmp_path), max_pixels=50_000,
                       holdout='images', val_fraction=0.01)
  caplog.set_level(logging.INFO)
  it = ip.create_train_iterator(config)
  for _ in range(3):
    assert 9 not in numbers(next(it)['image'])
  assert 'huge.png' not in decoded
  assert '1 too large (above config.data.max_pixels=50000)' in caplog.text
  config.data.max_pixels = 100
  with pytest.raises(ds.DataError, match='max_pixels=100 is below one 16x16 crop'):
    ip.create_train_iterator(config)
