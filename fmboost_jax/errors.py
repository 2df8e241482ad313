"""The one exception type for mistakes a user can fix (bad path, bad config, bad file).

`main.py` prints its message as one line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
  """A problem with the user's input; the message names the problem and the fix."""


class ReportedElsewhere(UserError):
  """A UserError of a multi-process run that process 0 reports: this process exits with it
  without printing it again, so the run's output holds its line once."""


def short(error: BaseException) -> str:
  """An exception as one short line: its type and the start of its first line."""
  text = str(error).strip().splitlines()
  text = text[0] if text else ''
  text = text if len(text) <= 160 else text[:157] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__
