"""Orbax's own log lines, kept out of the log or short: every module that writes or reads with
Orbax calls `quiet()` when it loads."""

import logging
import os
import sys

from fmboost_jax import errors


class _QuietOrbax(logging.Filter):
  """For Orbax's records only: leaves its progress lines (INFO, about 60 per checkpoint written or
  read) out of the log unless `--verbosity=1` asks for debug output, and its warnings when an item
  directory (`checkpoints/STEP/state`) is restored on its own (its metadata file lives one level
  up) and when the array handler is registered anew (`checkpointing`). An error that Orbax's
  background threads log with its traceback (a save that failed, which the checkpointer reports
  in one line of its own) becomes one line: the message and the error's first line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if '/orbax/' not in record.pathname.replace(os.sep, '/'):
      return True
    if record.levelno < logging.WARNING:
      return logging.getLogger('absl').isEnabledFor(logging.DEBUG)
    if record.levelno == logging.WARNING and str(record.msg).startswith(
        ('Metadata file does not exist', 'Type handler registry')):
      return False
    error = record.exc_info[1] if record.exc_info else None
    if error is not None:
      record.msg, record.args = f'{record.getMessage()} ({errors.short(error)})', None
      record.exc_info, record.exc_text = None, None
    return True


_FILTER = _QuietOrbax()


def quiet() -> None:
  """Installs the filter on absl's logger, where Orbax logs (once: the same filter is not added
  twice)."""
  logging.getLogger('absl').addFilter(_FILTER)


def _closed_loop(report) -> bool:
  error = report.exc_value
  return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


def hide_closed_loop_reports() -> None:
  """Leaves out of the output the reports of one unraisable error from then on (once: the hook is
  not wrapped twice): `RuntimeError: Event loop is closed`, raised by the completion callbacks of
  the writes still in flight when a background save failed (a full disk), one per file, after
  Orbax closed the event loop that awaited them; they can arrive until the process ends. Python
  reports such errors through `sys.unraisablehook` only; every other report passes on to the hook
  installed before.

  Where they come from (orbax-checkpoint 0.12.8, tensorstore 0.1.86): the array writes run in a
  commit thread of Orbax's own (`_src/futures/future.py`, `CommitFutureAwaitingContractedSignals`:
  `asyncio_utils.run_sync(coro)`), on a fresh event loop that `_run_sync_via_new_loop`
  (`_src/asyncio_utils.py`) closes as soon as the coroutine ends, without cancelling or awaiting
  its other tasks. The first failed tensorstore write ends `asyncio.gather` in
  `_src/serialization/serialization.py` (`async_serialize_from_host`) and
  `_src/serialization/jax_array_handlers.py` (`_async_serialize_replica_slices`) at once, and the
  tasks still awaiting their writes are left on the closed loop; each of those writes, when it
  ends, calls `loop.call_soon_threadsafe` from a tensorstore thread, which raises. The loop is
  closed before the failure reaches the manager (`wait_until_finished`), and nothing holds those
  writes, so no order of the manager's calls avoids the reports. Synchronous saves and
  `use_ocdbt=False` go through the same code (measured: reports in about half the failed saves,
  all of them without OCDBT), and a lower `save_concurrent_gb` still lets many writes run at once;
  Orbax's public API has no option that changes it."""
  previous = sys.unraisablehook
  if getattr(previous, 'hides_closed_loop_reports', False):
    return

  def hook(report) -> None:
    if not _closed_loop(report):
      previous(report)

  hook.hides_closed_loop_reports = True
  sys.unraisablehook = hook
