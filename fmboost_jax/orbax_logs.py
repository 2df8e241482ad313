"""Orbax's own log lines, kept out of the log: every module that writes or reads with Orbax calls
`quiet()` when it loads."""

import logging
import os


class _QuietOrbax(logging.Filter):
  """Leaves Orbax's progress lines (INFO, about 60 per checkpoint written or read) out of the log
  unless `--verbosity=1` asks for debug output, and the warning it gives when an item directory
  (`checkpoints/STEP/state`) is restored on its own, whose metadata file lives one level up."""

  def filter(self, record: logging.LogRecord) -> bool:
    if '/orbax/' not in record.pathname.replace(os.sep, '/'):
      return True
    if record.levelno < logging.WARNING:
      return logging.getLogger('absl').isEnabledFor(logging.DEBUG)
    return not (record.levelno == logging.WARNING
                and str(record.msg).startswith('Metadata file does not exist'))


_FILTER = _QuietOrbax()


def quiet() -> None:
  """Installs the filter on absl's logger, where Orbax logs (once: the same filter is not added
  twice)."""
  logging.getLogger('absl').addFilter(_FILTER)
