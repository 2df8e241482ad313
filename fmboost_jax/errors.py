"""The one exception type for mistakes a user can fix (bad path, bad config, bad file).

`main.py` prints its message as one line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
  """A problem with the user's input; the message names the problem and the fix."""
