"""Paths on local disks and in Cloud Storage, one type for both: `etils.epath.Path`.

Every path a run reads or writes (workdir, image folders, precomputed latents, autoencoder weights,
exports, sample inputs and outputs) may be `gs://bucket/...`. Orbax writes its arrays there through
tensorstore and its metadata through epath; this module gives the rest of the project the same
paths, a few operations the local filesystem has and a bucket lacks (atomic replacement, ranged
reads of one record), and one-line errors for a bucket that cannot be reached.

Bucket I/O goes through gcsfs. epath would pick `tf.io.gfile` instead when TensorFlow is importable
(the tfds source imports it); that client ignores `STORAGE_EMULATOR_HOST`, so importing this module
sets `EPATH_USE_TF=false` (unless set): the same client for Orbax's files and ours, real buckets
and emulators alike.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

os.environ.setdefault('EPATH_USE_TF', 'false')
if os.environ.get('STORAGE_EMULATOR_HOST'):
  # gcsfs asks Cloud Storage's control plane (gRPC, with real credentials) for each bucket's layout
  # unless told not to; an emulator has no control plane, and the retries take minutes.
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')

from etils import epath  # noqa: E402

from fmboost_jax.errors import UserError  # noqa: E402

Path = epath.Path
PathLike = str | os.PathLike

# Where Google's client libraries look for credentials, for the error that finds none.
_CREDENTIALS_ADVICE = (
    'run `gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS to a service '
    'account key file, or run on a Cloud VM whose service account may use the bucket (for a Cloud '
    'Storage emulator set STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL to its address)')


def is_remote(path: PathLike) -> bool:
  """Whether `path` names an object store (gs://, s3://, ...), not the local filesystem."""
  return '://' in os.fspath(path)


def path(value: PathLike) -> epath.Path:
  """`value` as a Path: a bucket path as it is, a local path made absolute (Orbax needs that)."""
  text = os.fspath(value)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


def files_under(root: PathLike) -> list[epath.Path]:
  """Every file below the folder `root`, at any depth, folder by folder (epath's recursive glob is
  refused for buckets and, without TensorFlow, for local paths too)."""
  found, folders = [], [path(root)]
  while folders:
    for entry in folders.pop().iterdir():
      (folders if entry.is_dir() else found).append(entry)
  return sorted(found, key=os.fspath)


def relative(file: PathLike, root: PathLike) -> str:
  """`file`'s path below the folder `root`, '/'-separated (local paths resolved as os.path does)."""
  file, root = os.fspath(file), os.fspath(root)
  if is_remote(file) or is_remote(root):
    prefix = root.rstrip('/') + '/'
    if not file.startswith(prefix):
      raise ValueError(f'{file} is not below {root}')
    return file[len(prefix):]
  return os.path.relpath(file, root).replace(os.sep, '/')


def join(base: PathLike, *parts: str) -> str:
  """`base / parts` as a string (the form configs and logs carry)."""
  return os.fspath(epath.Path(os.fspath(base)).joinpath(*parts))


def write_bytes_atomically(target: PathLike, data: bytes) -> None:
  """Writes `data` to `target` so that a reader sees the old file or the whole new one, never a
  part: a bucket object appears only when its upload completes; a local file is written beside the
  target and renamed over it."""
  target = path(target)
  if is_remote(target):
    target.write_bytes(data)
    return
  temporary = target.parent / f'.{target.name}.tmp-{uuid.uuid4().hex[:8]}'
  try:
    temporary.write_bytes(data)
    os.replace(temporary, target)
  finally:
    if temporary.exists():
      temporary.unlink()


def write_text_atomically(target: PathLike, text: str) -> None:
  write_bytes_atomically(target, text.encode('utf-8'))


def read_bytes(source: PathLike, offset: int = 0, size: int | None = None) -> bytes:
  """`size` bytes of `source` from `offset` (all of the rest when None): one ranged read of a
  bucket object."""
  with path(source).open('rb') as f:
    f.seek(offset)
    return f.read() if size is None else f.read(size)


def open_binary(source: PathLike) -> io.BufferedIOBase | Any:
  """`source` opened for reading bytes (a local file, or a bucket object read in ranges)."""
  return path(source).open('rb')


@contextlib.contextmanager
def local_copy(source: PathLike) -> Iterator[str]:
  """A local file name holding `source`'s bytes: `source` itself when local, else a temporary copy
  (for readers that need a real file, e.g. safetensors' memory map), removed afterwards."""
  if not is_remote(source):
    yield os.fspath(source)
    return
  name = path(source).name
  with tempfile.TemporaryDirectory(prefix='fmboost_jax-') as folder:
    local = os.path.join(folder, name)
    with open_binary(source) as f, open(local, 'wb') as out:
      shutil.copyfileobj(f, out, 16 << 20)
    yield local


def check_bucket(value: PathLike, what: str) -> None:
  """For a gs:// path: credentials exist and the bucket does; otherwise one UserError naming
  `what` (e.g. '--workdir') and the fix. Local paths pass unchecked."""
  text = os.fspath(value)
  if not text.startswith('gs://'):
    if is_remote(text):
      raise UserError(f'{what}={text}: only local paths and gs:// buckets are supported; copy the '
                      'files to one of them.')
    return
  bucket = text[len('gs://'):].split('/', 1)[0]
  if not bucket:
    raise UserError(f'{what}={text} names no bucket; write gs://BUCKET/PATH.')
  if not os.environ.get('STORAGE_EMULATOR_HOST'):
    import google.auth  # noqa: PLC0415  (only bucket paths need it)
    import google.auth.exceptions  # noqa: PLC0415
    try:
      google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
      raise UserError(f'{what}={text}: no Google Cloud credentials found to reach gs://{bucket}; '
                      f'{_CREDENTIALS_ADVICE}.') from None
  try:
    exists = epath.Path(f'gs://{bucket}').exists()
  except Exception as e:  # pylint: disable=broad-except  (the client's own errors vary)
    raise UserError(f'{what}={text}: gs://{bucket} cannot be reached ({type(e).__name__}: '
                    f'{str(e).splitlines()[0][:160] if str(e) else ""}); check the bucket name and '
                    f'your access to it.') from None
  if not exists:
    raise UserError(f'{what}={text}: the bucket gs://{bucket} does not exist (or you may not list '
                    f'it); create it with `gcloud storage buckets create gs://{bucket}` or fix the '
                    'path.')
