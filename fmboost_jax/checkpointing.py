"""The training state's Orbax checkpoints in `<workdir>/checkpoints`, one composite per step.

Each step holds four items: `state` (the train state), `data` (grain's record of every process's
data-iterator position), `position` (that position once more, as JSON, with the number of
processes that saved it) and `config` (the experiment config as JSON), so that whatever restores a
step (sampling, evaluation, a cascade: `model_files`) reads the config that step was trained with.
A checkpoint resumes with the number of processes that saved it from grain's item, and with any
other number from `position`: the iterator position is the same number in every process
(`input_pipeline.create_train_dataset`); a checkpoint whose processes were at different positions
resumes with their number only.

Orbax writes each step to a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoint as the latest usable one. A save that fails in the
background (a full disk) is noticed without waiting, at the first `check` after it finished (the
manager's `wait_until_finished` re-raises the background error), and becomes one
`CheckpointSaveError` naming the directory and its free space; its temporary directory is removed
and the earlier checkpoints stay as they are. Orbax's own log lines about it (and its progress
lines, unless `--verbosity=1` asks for debug output) are kept short by `orbax_logs`; the state's
writes are committed together (`model_files.array_tree_handler`), so no write of the failed save
is left in flight to report on its own.
"""

import json
import os
import shutil

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from fmboost_jax import errors, model_files, orbax_logs, sharding, storage
from fmboost_jax.errors import UserError

orbax_logs.quiet()


class CheckpointSaveError(UserError):
  """A checkpoint could not be written (e.g. the disk is full)."""


def _write_replicated_arrays_whole() -> None:
  """Registers Orbax's array handler without replica-parallel saving (for a run of one process).

  In a multi-process run each process writes a part of a replicated array (replica-parallel
  saving, Orbax's default); one process writes them whole, without the slicing programs that
  saving in parts compiles at the first save, one per array shape (184, 8 s, for the tiny demo on
  8 CPU devices). The handler is Orbax's with its defaults otherwise, less the per-process array
  metadata files (their store is not part of Orbax's public API; restoring does not need them).
  """
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def _position_record(data_iterator: grain.DatasetIterator) -> dict:
  """The `position` item: the number of processes and the iterator position they share (None where
  their positions differ)."""
  position = data_iterator.get_state()
  same = sharding.same_in_all_processes(json.dumps(position, sort_keys=True))
  return {'process_count': jax.process_count(), 'position': position if same else None}


class Checkpointer:
  """Saves and restores `{'state': pytree, 'data': grain iterator, 'position': JSON, 'config':
  JSON}` by step."""

  def __init__(self, directory: str, *, keep: int):
    """`keep` latest checkpoints are preserved; 0 keeps all."""
    directory = storage.path(directory)
    if jax.process_count() == 1:
      _write_replicated_arrays_whole()
    policy = ocp.checkpoint_managers.LatestN(keep if keep > 0 else None)
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                           enable_async_checkpointing=True)
    handlers = {'state': model_files.array_tree_handler(),
                'data': grain.checkpoint.CheckpointHandler(),
                'position': ocp.JsonCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
    try:
      self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    except OSError as e:
      raise UserError(f'cannot create the checkpoint directory {directory} ({e.strerror}); '
                      'choose a writable --workdir.') from None
    self.directory = os.fspath(directory)
    self._path = directory
    self._pending: int | None = None  # The step of the save in flight, until checked.

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator: grain.DatasetIterator,
           config: ml_collections.ConfigDict) -> None:
    """Starts an asynchronous save of `state`, the iterator position and `config` at `step`
    (after the previous one has finished and been checked)."""
    self.wait()
    position = _position_record(data_iterator)
    self._pending = step
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        position=ocp.args.JsonSave(position),
        config=model_files.config_item(config)), force=True)

  def restore(self, step: int, abstract_state, data_iterator: grain.DatasetIterator):
    """Restores the state onto `abstract_state` (ShapeDtypeStructs with shardings).

    The iterator is restored in place. Errors propagate: a checkpoint that does not fit the
    target is never silently replaced by a fresh start.
    """
    what = f'the checkpoint at step {step} in {self.directory}'
    try:  # Checkpoints of older versions have no `position`: they resume through grain's item.
      saved = self._manager.restore(step, args=ocp.args.Composite(
          position=ocp.args.JsonRestore()))['position']
    except KeyError:
      saved = None
    other_count = saved is not None and saved['process_count'] != jax.process_count()
    if other_count and saved['position'] is None:
      raise UserError(
          f'{what} holds different data-iterator positions for its {saved["process_count"]} '
          f'processes, so it cannot resume with {jax.process_count()}; resume with the same '
          'number of processes.')
    model_files.check_fits(self._manager.item_metadata(step)['state'].tree, abstract_state, what)
    items = {'state': model_files.tree_restore(abstract_state)}
    if not other_count:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      first_line = (str(e).strip().splitlines() or [type(e).__name__])[0].split('. ')[0][:200]
      saved_config = storage.join(self.directory, str(step), 'config', 'metadata')
      raise UserError(
          f'{what} does not fit this config ({first_line}); train with the config it was made '
          f'with (saved beside it, {saved_config}) or choose a new --workdir.') from e
    if other_count:
      data_iterator.set_state(saved['position'])
    return restored['state']

  def check(self) -> None:
    """Raises CheckpointSaveError if the last save has finished without writing its step; returns
    at once while it is still being written."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight and checks it."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()  # Raises what failed in the background, once.
    except Exception as e:  # noqa: BLE001  (Orbax and tensorstore raise many kinds)
      self._fail(step, e)
    # Process 0 renames the step directory when all processes have written their parts.
    if (step is not None and jax.process_index() == 0
        and step not in model_files.finished_steps(self._path)):
      self._fail(step, None)

  def _fail(self, step: int | None, error: BaseException | None) -> None:
    for partial in ocp.path.step.all_temporary_paths(self._path):
      partial.get().rmtree(missing_ok=True)
    kept = model_files.finished_steps(self._path)
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
