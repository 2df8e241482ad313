"""Orbax's own log lines, kept out of the log or short: every module that writes or reads with
Orbax calls `quiet()` when it loads."""

import logging
import os

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
