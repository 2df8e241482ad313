"""Tests for fmboost_jax/data_sources.py: held-out geometry and split, folder and tfds sources."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fmboost_jax import data_sources as ds
from fmboost_jax import errors, images
from fmboost_jax import input_pipeline as ip
from tests import buckets, runs
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
  # The scan reads headers only: the truncated files' headers are whole, so they count as usable
  # here and fail when they are decoded (replaced in training, skipped in validation).
  assert [os.path.basename(p) for p, _, _ in scan.usable] == [
      'good.png', 'truncated.JPEG', 'truncated.png']
  assert sorted(os.path.basename(p) for p, _ in scan.unreadable) == ['corrupt.jpg', 'text.png']
  assert sorted(os.path.basename(p) for p, _, _ in scan.too_small) == ['narrow.jpg', 'small.png']
  assert scan.num_ignored == 1 and scan.num_probed == 7

  config = make_config('folder', size=size, batch_size=2, num_val_images=1, path=str(tmp_path))
  caplog.set_level(logging.INFO)
  it = ip.create_train_iterator(config)
  assert ('3 usable, 2 unreadable, 2 too small (below 32x16 px (H x W: 16 px crops above a '
          'held-out strip)), 0 too large') in caplog.text
  for _ in range(6):  # Every crop comes from good.png: the truncated files are replaced.
    check_held_out(next(it)['image'], {0: 40}, size)
  assert caplog.text.count('which does not decode') == 2  # Once per file.
  assert 'files skipped so far: 2' in caplog.text
  np.testing.assert_array_equal(to_uint8(ip.validation_images(config))[0, :, 0, 1],
                                np.arange(24, 40))

  config.data.num_val_images = 2
  with pytest.raises(ds.DataError, match='Only 1 validation crops .*num_val_images=2'):
    ip.validation_images(config)
  # The advice leads to a value that training accepts too (a multiple of the batch size).
  config.data.num_val_images, config.data.batch_size = 8, 4
  with pytest.raises(ds.DataError, match=r'at most 1 \(evaluation while training needs a multiple '
                     r'of config.data.batch_size=4: set config.train.eval_every=0'):
    ip.validation_images(config)
  config.data.num_val_images, config.data.batch_size = 2, 2

  # Only the truncated files left: the stream finds nothing to replace them with.
  (tmp_path / 'good.png').unlink()
  with pytest.raises(ds.DataError, match=r'64 images in a row .* fail to decode'):
    next(ip.create_train_iterator(config))
  for name in ('truncated.JPEG', 'truncated.png'):
    (tmp_path / name).unlink()
  with pytest.raises(
      ds.DataError, match=r'no usable image \(0 usable, 2 unreadable, 2 too small \(below 32x16'):
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


@pytest.fixture
def counted_probes(monkeypatch):
  """The files whose header each scan reads (basenames, in call order; cleared with .clear())."""
  probed = []
  probe = ds._probe_file
  monkeypatch.setattr(ds, '_probe_file', lambda path: probed.append(os.path.basename(path)) or
                      probe(path))
  return probed


def rescan(root, index_dir, size=16):
  """A scan as a new process does it: the in-process cache cleared."""
  ds._SCAN_CACHE.clear()
  return ds.scan_image_folder(str(root), ds.Geometry(size), num_threads=2,
                              index_dir=str(index_dir))


def test_folder_index_rereads_only_new_and_changed_files(tmp_path, counted_probes, caplog):
  root, workdir = tmp_path / 'photos', tmp_path / 'workdir'
  (root / 'sub').mkdir(parents=True)
  for k, name in enumerate(['a.png', 'b.jpg', 'sub/c.png', 'sub/d.webp']):
    Image.fromarray(coded_image(k, 20 + k, 30)).save(root / name)
  Image.fromarray(coded_image(4, 8, 30)).save(root / 'small.png')
  (root / 'text.png').write_text('not a png')
  (root / 'notes.txt').write_text('ignored')

  cold = rescan(root, workdir)
  assert sorted(counted_probes) == ['a.png', 'b.jpg', 'c.png', 'd.webp', 'small.png', 'text.png']
  assert cold.num_probed == 6 and cold.index == ds.index_file(str(workdir), str(root))
  index_path = workdir / 'folder_index' / os.path.basename(cold.index)
  index = json.loads(index_path.read_text())
  assert index['root'] == str(root) and sorted(index['files']) == [
      'a.png', 'b.jpg', 'small.png', 'sub/c.png', 'sub/d.webp', 'text.png']
  st = os.stat(root / 'sub' / 'c.png')
  assert index['files']['sub/c.png'] == [st.st_size, st.st_mtime_ns, 22, 30]
  assert index['files']['text.png'][:2] == [9, os.stat(root / 'text.png').st_mtime_ns]
  assert 'UnidentifiedImageError' in index['files']['text.png'][2]
  summary = ([(os.path.relpath(p, root), h, w) for p, h, w in cold.usable],
             [os.path.relpath(p, root) for p, _ in cold.unreadable],
             [os.path.relpath(p, root) for p, _, _ in cold.too_small], cold.num_ignored)
  assert summary == ([('a.png', 20, 30), ('b.jpg', 21, 30), ('sub/c.png', 22, 30),
                      ('sub/d.webp', 23, 30)], ['text.png'], ['small.png'], 1)

  # A restart with nothing changed reads no header and finds the same.
  counted_probes.clear()
  warm = rescan(root, workdir)
  assert counted_probes == [] and warm.num_probed == 0
  assert (warm.usable, warm.unreadable, warm.too_small, warm.num_ignored) == (
      cold.usable, cold.unreadable, cold.too_small, cold.num_ignored)
  written = index_path.stat().st_mtime_ns
  # In one process a second scan (the validation images') reads nothing either.
  assert ds.scan_image_folder(str(root), ds.Geometry(16), index_dir=str(workdir)).num_probed == 0

  # A touched file (same bytes, new mtime) is read again, and only it.
  os.utime(root / 'b.jpg', ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  scan = rescan(root, workdir)
  assert counted_probes == ['b.jpg'] and scan.num_probed == 1
  assert index_path.stat().st_mtime_ns != written

  # A changed file: the new size is found.
  counted_probes.clear()
  Image.fromarray(coded_image(0, 40, 50)).save(root / 'a.png')
  scan = rescan(root, workdir)
  assert counted_probes == ['a.png'] and scan.usable[0][1:] == (40, 50)
  # A new file, then a deleted one (dropped from the scan and the index, nothing read).
  counted_probes.clear()
  Image.fromarray(coded_image(5, 30, 30)).save(root / 'sub' / 'e.png')
  assert [os.path.basename(p) for p, _, _ in rescan(root, workdir).usable][-1] == 'e.png'
  assert counted_probes == ['e.png']
  counted_probes.clear()
  (root / 'sub' / 'd.webp').unlink()
  scan = rescan(root, workdir)
  assert counted_probes == [] and len(scan.usable) == 4
  assert 'sub/d.webp' not in json.loads(index_path.read_text())['files']
  assert len(json.loads(index_path.read_text())['files']) == 6

  # Without an index directory nothing is written; a garbled index is ignored (and rewritten).
  ds._SCAN_CACHE.clear()
  assert ds.scan_image_folder(str(root), ds.Geometry(16)).index == ''
  assert sorted(os.listdir(workdir)) == ['folder_index']
  assert os.listdir(workdir / 'folder_index') == [index_path.name]
  index_path.write_text('{"truncated')
  counted_probes.clear()
  caplog.set_level(logging.WARNING)
  assert rescan(root, workdir).num_probed == 6 and len(counted_probes) == 6
  assert 'Ignoring the folder index' in caplog.text
  assert rescan(root, workdir).num_probed == 0


def test_folder_index_is_written_by_process_zero_only(tmp_path, counted_probes, monkeypatch):
  root, workdir = tmp_path / 'photos', tmp_path / 'workdir'
  root.mkdir()
  for k in range(3):
    Image.fromarray(coded_image(k, 20, 20)).save(root / f'{k}.png')
  monkeypatch.setattr(ds, '_writes_index', lambda: False)  # A process other than 0.
  assert rescan(root, workdir).num_probed == 3 and not workdir.exists()
  monkeypatch.setattr(ds, '_writes_index', lambda: True)
  assert rescan(root, workdir).num_probed == 3 and workdir.exists()
  monkeypatch.setattr(ds, '_writes_index', lambda: False)  # Reads what process 0 wrote.
  counted_probes.clear()
  assert rescan(root, workdir).num_probed == 0 and counted_probes == []


# A folder and an index in a bucket of the Cloud Storage emulator, in a process of its own inside
# the emulator's loopback-only network namespace (tests/buckets.py).
_BUCKET_SCAN = """
import io, os
import numpy as np
from PIL import Image
from fmboost_jax import data_sources as ds, storage
def png(height, width):
  buffer = io.BytesIO()
  Image.fromarray(np.full((height, width, 3), 9, np.uint8)).save(buffer, 'PNG')
  return buffer.getvalue()
for k in range(4):
  storage.write_bytes_atomically(f'gs://bucket/photos/sub{k % 2}/{k}.png', png(40 + k, 30))
storage.write_bytes_atomically('gs://bucket/photos/bad.jpg', b'not a jpeg')
storage.write_bytes_atomically('gs://bucket/photos/notes.txt', b'x')
probed = []
probe = ds._probe_file
ds._probe_file = lambda path: probed.append(path) or probe(path)
def scan():
  ds._SCAN_CACHE.clear()
  probed.clear()
  return ds.scan_image_folder('gs://bucket/photos', ds.Geometry(16), 4, index_dir='gs://bucket/w')
cold = scan()
assert [(p, h, w) for p, h, w in cold.usable] == [
    ('gs://bucket/photos/sub0/0.png', 40, 30), ('gs://bucket/photos/sub0/2.png', 42, 30),
    ('gs://bucket/photos/sub1/1.png', 41, 30), ('gs://bucket/photos/sub1/3.png', 43, 30)]
assert [p for p, _ in cold.unreadable] == ['gs://bucket/photos/bad.jpg'], cold.unreadable
assert cold.num_ignored == 1 and cold.num_probed == 5 and len(probed) == 5
assert cold.index.startswith('gs://bucket/w/folder_index/photos-')
assert storage.path(cold.index).exists()
warm = scan()
assert probed == [] and warm.usable == cold.usable
storage.write_bytes_atomically('gs://bucket/photos/sub0/0.png', png(50, 60))
changed = scan()
assert probed == ['gs://bucket/photos/sub0/0.png'] and changed.usable[0][1:] == (50, 60)
source = ds._FolderImages([p for p, _, _ in changed.usable])
assert source[0].shape == (50, 60, 3) and source[3].shape == (43, 30, 3)
print('bucket scan ok')
"""


def test_folder_and_index_in_a_bucket(tmp_path):
  reason = buckets.unavailable()
  if reason:
    pytest.skip(reason)
  (tmp_path / 'seed' / 'bucket').mkdir(parents=True)
  (tmp_path / 'seed' / 'bucket' / 'README').write_text('the bucket of the test')
  emulator = buckets.Emulator(tmp_path, tmp_path / 'seed')
  try:
    proc, found = emulator.run([sys.executable, '-c', _BUCKET_SCAN], emulator.env(), timeout=300)
  finally:
    emulator.close()
  assert proc.returncode == 0 and 'bucket scan ok' in proc.stdout, proc.stderr[-3000:]
  assert ('AF_INET', '127.0.0.1') in found
  assert not buckets.outside_loopback(found), found
  # The objects are in the emulator's storage.
  assert os.path.isfile(emulator.object('bucket', 'photos/sub1/3.png'))


def test_a_precompute_output_holding_only_the_folder_index_counts_as_new(tmp_path):
  from fmboost_jax import precompute  # noqa: PLC0415

  # main.py keeps the index of --config.data.path in the precompute's --workdir, written by the
  # scan before the output is checked.
  (tmp_path / 'out' / ds.INDEX_FOLDER).mkdir(parents=True)
  (tmp_path / 'out' / ds.INDEX_FOLDER / 'photos-0123.json').write_text('{}')
  assert precompute._check_output(str(tmp_path / 'out'), {}) == 'new'
  (tmp_path / 'out' / 'notes.txt').write_text('something else')
  with pytest.raises(errors.UserError, match='is not empty and holds no precompute.json'):
    precompute._check_output(str(tmp_path / 'out'), {})


def test_folder_scan_reads_sizes_turned_by_exif_from_the_header(tmp_path, counted_probes,
                                                                 monkeypatch):
  decoded = []
  decode = images.decode_image_file
  monkeypatch.setattr(images, 'decode_image_file', lambda p: decoded.append(p) or decode(p))
  exif = Image.Exif()
  exif[0x0112] = 6  # Rotated by 90 degrees: the decoded image is 40 x 20 (H x W).
  Image.fromarray(coded_image(0, 20, 40)).save(tmp_path / 'turned.jpg', exif=exif.tobytes())
  Image.fromarray(coded_image(1, 20, 40)).save(tmp_path / 'plain.jpg')
  scan = rescan(tmp_path, tmp_path / 'workdir')
  assert [(os.path.basename(p), h, w) for p, h, w in scan.usable] == [
      ('plain.jpg', 20, 40), ('turned.jpg', 40, 20)]
  assert decoded == []  # Headers only.
  assert images.decode_image_file(str(tmp_path / 'turned.jpg')).shape == (40, 20, 3)


def test_a_valid_header_with_corrupt_pixels_is_replaced_in_training_and_counted(tmp_path,
                                                                                caplog):
  size, root = 16, tmp_path / 'photos'
  root.mkdir()
  for k in range(2):
    Image.fromarray(coded_image(k, 40, 24)).save(root / f'{k}.png')
  Image.fromarray(coded_image(2, 64, 64)).save(root / 'whole.jpg', quality=95)
  data = (root / 'whole.jpg').read_bytes()
  (root / '2-truncated.jpg').write_bytes(data[:len(data) * 2 // 3])  # Header intact.
  (root / 'whole.jpg').unlink()
  config = make_config('folder', size=size, batch_size=4, num_val_images=2, path=str(root),
                       index_dir=str(tmp_path / 'workdir'))

  source = ds.open_images(config, 'train')
  assert [os.path.basename(p) for p in source.paths] == ['0.png', '1.png', '2-truncated.jpg']
  assert source[2] is None and source.skipped == [str(root / '2-truncated.jpg')]
  assert source[0].shape == (40, 24, 3) and source[2] is None and len(source.skipped) == 1

  caplog.clear()
  caplog.set_level(logging.INFO)
  it = ip.create_train_iterator(config)
  ids = [k for _ in range(6) for k in image_ids(next(it)['image'])]
  assert len(ids) == 24 and set(ids) == {0, 1}  # 8 epochs of 3 images: the broken one replaced.
  assert caplog.text.count('2-truncated.jpg, which does not decode') == 1  # Logged once.
  assert 'files skipped so far: 1' in caplog.text
  assert '3 usable, 0 unreadable, 0 too small' in caplog.text
  # Validation skips it: the strips of the two good images.
  np.testing.assert_array_equal(image_ids(ip.validation_images(config)), [0, 1])


# ----------------------------------------------------------------------------------------------
# tfds source: a small ArrayRecord dataset of two splits, prepared by docs/training.md's builder
# in a clean subprocess (python -I: nothing of the tests on its path) and opened here by name from
# its data_dir alone (no builder registered in this process).

_TFDS_SHAPES = [(40, 32), (20, 20), (36, 16), (64, 24)]  # The second one is too small for S=16.
_TFDS_VALIDATION_SHAPES = [(16, 20), (12, 30), (24, 16)]  # Whole images; the second is too small.


def _docs_block(name: str) -> str:
  with open(os.path.join(runs.ROOT, 'docs', 'training.md')) as f:
    text = f.read()
  block = text.split(f'<!-- {name}: begin -->')[1].split(f'<!-- {name}: end -->')[0]
  return block.split('\n', 2)[2].rsplit('```', 1)[0]  # Inside the fence.


@pytest.fixture(scope='module')
def tfds_photos(tmp_path_factory) -> str:
  """The data_dir of `my_photos`: coded PNGs 0-3 (train) and 5-7 (validation), prepared by the
  docs' builder and its command, with the project's install only."""
  root = tmp_path_factory.mktemp('tfds')
  splits = (('train', _TFDS_SHAPES, 0), ('validation', _TFDS_VALIDATION_SHAPES, 5))
  for split, shapes, first in splits:
    (root / 'photos' / split).mkdir(parents=True)
    for k, (height, width) in enumerate(shapes, start=first):
      Image.fromarray(coded_image(k, height, width)).save(root / 'photos' / split / f'{k}.png')
  builder = _docs_block('tfds builder')
  assert "PHOTOS = pathlib.Path('/data/photos')" in builder
  (root / 'my_photos.py').write_text(builder.replace('/data/photos', str(root / 'photos')))
  prepare = runs.docs_commands('tfds', 'docs/training.md')[0]
  assert prepare == ['.venv/bin/python', 'my_photos.py', '/data/tfds']
  env = {k: v for k, v in runs.env().items() if not k.startswith('PYTHON')}
  proc = subprocess.run([sys.executable, '-I', 'my_photos.py', str(root / 'tfds')], cwd=root,
                        env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The same photographs through tfds's store_as_tfds_dataset, whose builder lives in a package
  # (tfds then needs importlib_resources, which requirements.txt pins).
  store = f"""
import pathlib
import tensorflow_datasets as tfds
photos = pathlib.Path({str(root / 'photos')!r})
tfds.dataset_builders.store_as_tfds_dataset(
    name='my_photos_adhoc', version='1.0.0', data_dir={str(root / 'tfds')!r},
    features=tfds.features.FeaturesDict({{'image': tfds.features.Image(shape=(None, None, 3))}}),
    split_datasets={{split: [(p.name, {{'image': str(p)}})
                            for p in sorted((photos / split).iterdir())]
                    for split in ('train', 'validation')}},
    file_format='array_record', disable_shuffling=True)
"""
  proc = subprocess.run([sys.executable, '-I', '-c', store], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return str(root / 'tfds')


def test_tfds_source(tfds_photos):
  size = 16
  config = make_config('tfds', size=size, batch_size=4, num_val_images=4,
                       tfds_name='my_photos', tfds_data_dir=tfds_photos)
  assert config.data.tfds_val_split == 'validation'
  # Held-out strips come from the training split: a held-out split is refused, not ignored.
  with pytest.raises(ds.DataError, match="tfds_val_split='validation' is not used with "
                     "config.data.holdout='strips'"):
    ip.create_train_iterator(config)
  config.data.tfds_val_split = ''
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
  config.data.holdout, config.data.tfds_val_split = 'images', 'validation'
  with pytest.raises(ds.DataError, match="Only 2 validation crops .*larger config.data."
                     "tfds_val_split than 'validation'"):
    ip.validation_images(config)
  config.data.num_val_images = 2
  val = to_uint8(ip.validation_images(config))
  np.testing.assert_array_equal(val[:2], [coded_image(5, 16, 20)[:, 2:18],
                                          coded_image(7, 24, 16)[4:20]])
  assert set(image_ids(next(ip.create_train_iterator(config))['image'])) <= {0, 1, 2, 3}

  # store_as_tfds_dataset's copy holds the same records.
  adhoc = make_config('tfds', size=size, tfds_name='my_photos_adhoc', tfds_data_dir=tfds_photos,
                      holdout='images')
  for split in ('train', 'validation'):
    ours, theirs = ds.open_images(config, split), ds.open_images(adhoc, split)
    assert len(ours) == len(theirs) == {'train': 4, 'validation': 3}[split]
    for i in range(len(ours)):
      a, b = ours[i], theirs[i]
      assert (a is None) == (b is None) and (a is None or np.array_equal(a, b))

  config.data.tfds_split = 'test'
  with pytest.raises(ds.DataError, match=r"split 'test'.*tfds.builder\('my_photos', data_dir=DIR"):
    ip.create_train_iterator(config)


def test_tfds_unknown_or_unprepared(tmp_path):
  config = make_config('tfds', tfds_name='no_such_dataset_xyz', tfds_data_dir=str(tmp_path),
                       tfds_val_split='')
  with pytest.raises(ds.DataError, match="'no_such_dataset_xyz'.*could not be opened.*check "
                     r"config.data.tfds_name.*tfds.builder\('no_such_dataset_xyz', data_dir=DIR, "
                     r"file_format='array_record'\).download_and_prepare\(\)` \(a builder of your "
                     'own: docs/training.md'):
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
  listed = ', '.join(name for name, _ in held[:10]) + (', ...' if len(held) > 10 else '')
  assert f'Held out (never trained on): {len(held)} images of {tmp_path}: {listed}\n' in caplog.text
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


def test_the_results_name_where_the_held_out_images_come_from():
  config = make_config('folder', holdout='images', path='/data/photos', val_fraction=0.3)
  assert ds.held_out_description(config) == 'folder /data/photos, val_fraction 0.3 by name'
  config.data.val_path = '/data/val'
  assert ds.held_out_description(config) == 'folder /data/val'
  config.data.holdout = 'strips'
  assert ds.held_out_description(config) == 'folder /data/photos, the bottom strips'
  config = make_config('tfds', holdout='images', tfds_name='flowers', tfds_val_split='test')
  assert ds.held_out_description(config) == 'tfds flowers split test'
  config.data.holdout = 'strips'
  assert ds.held_out_description(config) == 'tfds flowers split train, the bottom strips'
  assert ds.held_out_description(make_config('skimage')) == 'skimage, the bottom strips'
  config = make_config('latents', path='gs://b/latents')
  assert ds.held_out_description(config) == (
      'latents gs://b/latents (the held-out crops precompute saved)')


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


def test_training_from_the_docs_tfds_dataset_holds_out_its_validation_split(tfds_photos, tmp_path):
  """docs/training.md's train command on the prepared dataset (shrunk to the tiny network, 2
  steps): the held-out images are the validation split's centre crops, never a training image."""
  train = runs.docs_commands('tfds', 'docs/training.md')[1]
  assert train[:3] == ['.venv/bin/python', 'main.py', '--config=configs/demo.py']
  args = [a.replace('/data/tfds', tfds_photos) for a in train[3:] if not a.startswith('--workdir')]
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/demo.py:tiny', f'--workdir={tmp_path / "w"}',
       *args, '--config.data.batch_size=2', '--config.data.num_val_images=2',
       '--config.train.num_grid_images=2', '--config.train.num_steps=2'],
      cwd=runs.ROOT, env=runs.env(), capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'w' / 'results.json') as f:
    results = json.load(f)
  assert results['num_images'] == 2 and results['data'] == 'tfds my_photos split validation'
  # The grid's rows: low-res (nearest) | bilinear | model | target, 16 px each. The targets are the
  # centre 16 px squares of validation images 5 (16 x 20) and 7 (24 x 16; 6 is too small).
  grid = np.asarray(Image.open(tmp_path / 'w' / 'samples' / 'step_0000002.png'))
  assert grid.shape == (32, 64, 3)
  np.testing.assert_array_equal(grid[:16, 48:], coded_image(5, 16, 20)[:, 2:18])
  np.testing.assert_array_equal(grid[16:, 48:], coded_image(7, 24, 16)[4:20, :])
