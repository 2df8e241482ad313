"""Orbax checkpoints in `<workdir>/checkpoints`: the train state, the data iterator and the config.

Each step holds three items: `state`, `data` (the grain iterator position of every process) and
`config` (the experiment config as JSON, `checkpoints/STEP/config/metadata`), so that whatever
restores a step (sampling, evaluation, a cascade) reads the config that step was trained with.

Orbax writes each step to a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoint as the latest usable one. A save that fails in the
background (a full disk) is noticed without waiting, at the first `check` after it finished, and
becomes one `CheckpointSaveError` naming the directory and its free space; its temporary directory
is removed and the earlier checkpoints stay as they are. The background threads' tracebacks of
such a failure are logged as one line each (`_BackgroundErrors`). Orbax's own progress lines stay
out of the log unless `--verbosity=1` asks for debug output (`orbax_logs`).

An exported model (`write_export`, `--mode=export`) is a directory of its own: `export.json` (what
it was exported from), `config` (the training config, as in a checkpoint) and `params` (the
sampling weights only), written under a temporary name and renamed when complete.
"""

import json
import logging
import os
import shutil
import sys
import threading
from typing import TYPE_CHECKING

import jax
import ml_collections
import orbax.checkpoint as ocp

from fmboost_jax import errors, orbax_logs, sharding, storage
from fmboost_jax.errors import UserError

if TYPE_CHECKING:  # grain is imported where a data iterator is saved or restored, so that
  import grain  # the model layer (boosting, a train step) runs without it.

orbax_logs.quiet()


class CheckpointSaveError(UserError):
  """A checkpoint could not be written (e.g. the disk is full)."""


# How long the processes of a multi-process export wait for each other between its steps.
EXPORT_BARRIER_SECONDS = 600


def _quiet_closed_loop(excepthook, unraisablehook, thread_excepthook):
  """The hooks, except that they stay silent about the write callbacks of a failed background save
  that arrive after its event loop closed (`RuntimeError: Event loop is closed`, one per file)."""
  def closed(error) -> bool:
    return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'

  return (lambda kind, error, tb: None if closed(error) else excepthook(kind, error, tb),
          lambda info: None if closed(info.exc_value) else unraisablehook(info),
          lambda args: None if closed(args.exc_value) else thread_excepthook(args))




class _BackgroundErrors(logging.Filter):
  """Turns the tracebacks that Orbax's finalize thread and its asyncio write tasks log for a
  failed write into one line each, and remembers the first such error for the user's message."""

  def __init__(self):
    super().__init__()
    self.first: BaseException | None = None

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and ('orbax' in record.pathname or record.name == 'asyncio'):
      self.first = self.first or error
      record.msg, record.args = f'{record.getMessage()} ({errors.short(error)})', None
      record.exc_info, record.exc_text = None, None
    return True


class Checkpointer:
  """Saves and restores `{'state': pytree, 'data': grain iterator, 'config': JSON}` by step."""

  def __init__(self, directory: str, *, keep: int):
    """`keep` latest checkpoints are preserved; 0 keeps all."""
    directory = storage.path(directory)
    # Replicated arrays: in a multi-process run each process writes a part of them (Orbax's
    # replica-parallel saving, its default); one process writes them whole, without the slicing
    # programs that saving in parts compiles at the first save, one per array shape (184, 8 s, for
    # the tiny demo on 8 CPU devices). Orbax's registered handler keeps its other settings.
    if jax.process_count() == 1:
      ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel = False
    policy = ocp.checkpoint_managers.LatestN(keep if keep > 0 else None)
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                           enable_async_checkpointing=True)
    try:
      self._manager = ocp.CheckpointManager(directory, options=options,
                                            item_names=('state', 'data', 'config'))
    except OSError as e:
      raise UserError(f'cannot create the checkpoint directory {directory} ({e.strerror}); '
                      'choose a writable --workdir.') from None
    self.directory = os.fspath(directory)
    self._path = directory
    self._pending: int | None = None  # The step of the save in flight, until checked.
    self._background = _BackgroundErrors()
    for name in ('absl', 'asyncio'):
      logging.getLogger(name).addFilter(self._background)
    self._hooks = sys.excepthook, sys.unraisablehook, threading.excepthook
    sys.excepthook, sys.unraisablehook, threading.excepthook = _quiet_closed_loop(*self._hooks)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator: 'grain.DatasetIterator',
           config: ml_collections.ConfigDict) -> None:
    """Starts an asynchronous save of `state`, the iterator position and `config` at `step`
    (after the previous one has finished and been checked)."""
    import grain  # noqa: PLC0415
    self.wait()
    self._pending = step
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))), force=True)

  def restore(self, step: int, abstract_state, data_iterator: 'grain.DatasetIterator'):
    """Restores the state onto `abstract_state` (ShapeDtypeStructs with shardings).

    The iterator is restored in place. Errors propagate: a checkpoint that does not fit the
    target is never silently replaced by a fresh start.
    """
    data_dir = self._path / str(step) / 'data'
    positions = {}
    for file in (data_dir.iterdir() if data_dir.is_dir() else []):
      if file.name.startswith('process_'):
        positions[file.name] = json.loads(file.read_text())
    saved_by = {name.rsplit('-of-', 1)[-1].split('.')[0] for name in positions}
    other_count = bool(saved_by) and saved_by != {str(jax.process_count())}
    if other_count and any(p != next(iter(positions.values())) for p in positions.values()):
      raise UserError(
          f'the checkpoint at step {step} in {self.directory} holds different data-iterator '
          f'positions for its {"/".join(sorted(saved_by))} processes, so it cannot resume with '
          f'{jax.process_count()}; resume with the same number of processes.')
    _check_fits(self._path / str(step) / 'state', abstract_state,
                f'the checkpoint at step {step} in {self.directory}')
    # The iterator position is the same on every process (input_pipeline.create_train_dataset),
    # so a checkpoint of another process count resumes from that one position.
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if not other_count:
      import grain  # noqa: PLC0415
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      first_line = (str(e).strip().splitlines() or [type(e).__name__])[0].split('. ')[0][:200]
      raise UserError(
          f'the checkpoint at step {step} in {self.directory} does not fit this config '
          f'({first_line}); train with the config it was made with (saved beside it, '
          f'{storage.join(self.directory, str(step), "config", "metadata")}) or choose a new '
          '--workdir.') from e
    if other_count:
      data_iterator.set_state(next(iter(positions.values())))
    return restored['state']

  def check(self) -> None:
    """Raises CheckpointSaveError if the last save has finished without writing its step; returns
    at once while it is still being written."""
    if self._pending is None or self._manager.is_saving_in_progress():
      return
    if jax.process_index() != 0:  # Process 0 renames the step directory when all have written.
      self._pending = None
      return
    step, self._pending = self._pending, None
    if step not in _steps(self._path):
      self._fail(step, self._background.first)

  def wait(self) -> None:
    """Waits for the save in flight and checks it."""
    step = self._pending
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001  (Orbax and tensorstore raise many kinds)
      self._pending = None
      self._fail(step, e)
    self.check()

  def _fail(self, step: int | None, error: BaseException | None) -> None:
    for partial in self._path.glob('*.orbax-checkpoint-tmp*'):
      partial.rmtree(missing_ok=True)
    kept = _steps(self._path)
    if error is not None and ('No space left on device' in str(error)
                              or getattr(error, 'errno', None) == 28):
      reason = ' (no space left on device)'
    else:
      reason = f' ({errors.short(error)})' if error is not None else ''
    resume = (f'start again to resume from step {kept[-1]} (the checkpoints of steps '
              f'{", ".join(map(str, kept))} are intact)' if kept else 'start again')
    if storage.is_remote(self._path):
      advice = 'check the bucket (its quota, your access) or choose another --workdir'
    else:
      free = shutil.disk_usage(self.directory).free / 2**20
      advice = f'{free:.1f} MiB are free there: free space or choose another --workdir'
    raise CheckpointSaveError(
        f'saving the checkpoint of step {step} in {self.directory} failed{reason}; {advice}, then '
        f'{resume}.')

  def close(self) -> None:
    self._manager.close()
    for name in ('absl', 'asyncio'):
      logging.getLogger(name).removeFilter(self._background)
    sys.excepthook, sys.unraisablehook, threading.excepthook = self._hooks


def latest_step(directory: str) -> int | None:
  """The newest complete checkpoint in `directory`, or None."""
  steps = _steps(storage.path(directory))
  return steps[-1] if steps else None


def _steps(directory: storage.Path) -> list[int]:
  """The finished checkpoints' steps in `directory`, ascending (Orbax's test: a renamed step folder
  on disks, a commit marker in buckets)."""
  return sorted(ocp.utils.checkpoint_steps(directory))


def restore_config(directory: str, step: int) -> ml_collections.ConfigDict:
  """The config saved with the checkpoint at `step` (lists where the config had tuples)."""
  path = storage.path(directory) / str(step) / 'config'
  if not path.is_dir():
    raise UserError(f'the checkpoint at step {step} in {directory} holds no saved config; it was '
                    'written by an older version of fmboost_jax: train it again.')
  return _read_json(path)


def _read_json(path: storage.Path) -> ml_collections.ConfigDict:
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    return ml_collections.ConfigDict(checkpointer.restore(path))


EXPORT_INFO = 'export.json'


def is_export(directory: str) -> bool:
  return (storage.path(directory) / EXPORT_INFO).is_file()


def write_export(directory: str, params, config: ml_collections.ConfigDict,
                 info: dict) -> None:
  """Writes an exported model: `info` (JSON), `config` and the weights `params` (a pytree).

  A local export is written under a temporary name and renamed when complete; in a bucket (no
  renaming of folders there) `export.json` is written last, so only a complete export is one.
  In a multi-process run every process calls this with the same global arrays: Orbax writes the
  weights once, process 0 everything else.
  """
  target = storage.path(directory)
  if target.exists() and (not target.is_dir() or any(target.iterdir())):
    raise UserError(f'{directory} already exists; export into a new directory (or remove it).')
  remote = storage.is_remote(target)
  partial = target if remote else target.parent / f'{target.name}.partial'
  writer = jax.process_index() == 0
  sharding.wait_for_all_processes('export: output checked', EXPORT_BARRIER_SECONDS)
  if writer:
    if not remote:
      partial.rmtree(missing_ok=True)
    partial.mkdir(parents=True, exist_ok=True)
  sharding.wait_for_all_processes('export: folder made', EXPORT_BARRIER_SECONDS)
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    checkpointer.save(partial / 'config',
                      args=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(partial / 'params', params)
  if writer:
    (partial / EXPORT_INFO).write_text(
        json.dumps({'format': 'fmboost_jax export', 'version': 1, **info}, indent=2))
    if not remote:
      if target.is_dir():
        target.rmdir()
      partial.rename(target)
  sharding.wait_for_all_processes('export: written', EXPORT_BARRIER_SECONDS)


def read_export_config(directory: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(the training config, export.json) of an exported model."""
  path = storage.path(directory)
  info = json.loads((path / EXPORT_INFO).read_text())
  return _read_json(path / 'config'), info


def read_export_params(directory: str, abstract):
  """The weights of an exported model onto `abstract` (ShapeDtypeStructs with shardings; saved
  bfloat16 weights are cast to their dtype)."""
  path = storage.path(directory) / 'params'
  _check_fits(path, abstract, f'the exported model in {directory}')
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))


def restore_subtree(directory: str, step: int, name: str, abstract):
  """Restores only `state[name]` of the checkpoint at `step` onto `abstract` (ShapeDtypeStructs
  with shardings), e.g. the EMA weights for inference without the optimizer state."""
  path = storage.path(directory) / str(step) / 'state'
  what = f'the checkpoint at step {step} in {directory}'
  _check_fits(path, {name: abstract}, what, only=name)
  target = {name: abstract}
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  return restored[name]


def _check_fits(path: storage.Path, abstract, what: str, only: str | None = None) -> None:
  """Compares the saved arrays' names and shapes with the target before restoring anything
  (only those under the top-level key `only`, if given)."""
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(path)
  saved = _shapes(getattr(saved, 'item_metadata', saved))
  if only is not None:
    saved = {k: v for k, v in saved.items() if k.split('/', 1)[0] == only}
  wanted = _shapes(abstract)
  problems = [f'{k} (saved {saved.get(k)}, config {wanted.get(k)})'
              for k in sorted(saved.keys() | wanted.keys()) if saved.get(k) != wanted.get(k)]
  if problems:
    listed = '; '.join(problems[:3]) + (f'; and {len(problems) - 3} more' if len(problems) > 3
                                        else '')
    raise UserError(
        f'{what} does not fit this config ({listed}); use the config it was made with (saved '
        'beside it in checkpoints/STEP/config) or choose a new --workdir.')


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """'params/input_blocks/0/kernel' -> shape, for every array of a state or its metadata."""
  def name(key):
    return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))
  return {'/'.join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
