"""One line, instead of a C++ crash report, when a process of a multi-process run is lost.

When a process of a `jax.distributed` run dies (killed, crashed, its host lost), the coordination
service tells the others, and jaxlib ends each of them with LOG(FATAL): the error, a C++ stack trace
and then Python's faulthandler dump of every thread (dozens of lines) before SIGABRT. jaxlib has
no Python hook to replace that ending (in jaxlib 0.10.2 a missed-heartbeat callback given to its
client aborts with std::bad_cast: the error cannot be handed to Python), and it comes 0.1 s after
the coordinator (process 0) dies, before any Python watchdog could notice. So `install` routes
this process's stderr (fd 2) through a small filter process that passes everything through, except
that the crash report and the coordination-service errors just before it become one line naming
the lost process:

  error: process 1 of 2 stopped responding (no heartbeat for 60 s); stopping.
  error: process 0 of 2 (the coordinator) stopped responding (the connection to it failed);
  stopping.

The process still ends as jaxlib ends it (SIGABRT in jaxlib 0.10.2: exit status 134, -6 in Python's
subprocess); a jaxlib that words the fatal log otherwise gets its report through unchanged. When
process 0 dies, the others stop at once (its connection closes); when another process dies, once
the coordination service has missed its heartbeats for about `--heartbeat_timeout_seconds`
(measured here: 38-44 s at 60, 2.5-5.5 s at 3-5).

The filter runs as `python -S peer_loss.py INDEX COUNT HEARTBEAT_SECONDS` (the standard library
only), ignores the stop signals a scheduler sends the whole job (SIGTERM, SIGUSR1, SIGINT, ...) and
ends when this process's stderr closes.
"""

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

# An absl log line of C++ or Python: severity, date, time, thread id, file:line.
_LOG_LINE = re.compile(r'[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ')
# Errors and warnings of the coordination service and its clients, which precede the fatal log.
_SERVICE_LOG_LINE = re.compile(
    r'[WE]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ '
    r'(coordination_service\w*|preemption_\w+|client|distributed\w*)\.(cc|h):\d+\] ')
_FATAL = 'Terminating process because the JAX distributed service detected fatal errors'
_STACK_TRACE = '*** Check failure stack trace: ***'
# How long coordination-service errors are held back, waiting for the fatal log they announce,
# before they are shown as they are; and how long the fatal log's text may take to arrive.
HOLD_SECONDS = 2.0
_FATAL_TEXT_SECONDS = 1.0

# A collective whose peer's connection broke (Gloo, on CPU, reports it at once).
_CONNECTION_LOST = re.compile(r'Connection (reset|closed) by peer|Broken pipe|Socket closed')
# How much longer than the heartbeat timeout such a failure waits for the service's verdict.
VERDICT_MARGIN_SECONDS = 30

_filter_process: subprocess.Popen | None = None


def lost_process_line(status: str, process_index: int, process_count: int,
                      heartbeat_seconds: int) -> str:
  """The one line for the fatal error text `status` of the JAX distributed service."""
  ids = []
  unhealthy = re.search(r'stopped sending heartbeats\):(.*?)(The tasks have crashed|$)', status,
                        re.S)
  if unhealthy:  # The service's verdict.
    ids = re.findall(r'task:(\d+)', unhealthy[1]) or re.findall(r'\b\d+\b', unhealthy[1])
  if not ids:  # A barrier (the shutdown barrier) that failed on the way.
    ids = list(dict.fromkeys(re.findall(r'Task (\d+) heartbeat timeout', status)))
  if ids:
    who = f'process {ids[0]}' if len(ids) == 1 else f'processes {", ".join(ids)}'
    return (f'error: {who} of {process_count} stopped responding (no heartbeat for '
            f'{heartbeat_seconds} s); stopping.')
  if process_index != 0 and re.search(r'RPC to (the )?coordination service|leader task', status):
    return (f'error: process 0 of {process_count} (the coordinator) stopped responding (the '
            'connection to it failed); stopping.')
  reason = status.split('absl::Status:', 1)[-1].strip().splitlines()
  reason = reason[0] if reason else 'no details'
  reason = reason if len(reason) <= 200 else reason[:197] + '...'
  return f'error: the JAX distributed service stopped this process ({reason}); stopping.'


class StderrFilter:
  """The filter's state: lines in, lines out (`line`, then `tick` with the time and `end`)."""

  def __init__(self, process_index: int, process_count: int, heartbeat_seconds: int):
    self._describe = lambda status: lost_process_line(status, process_index, process_count,
                                                      heartbeat_seconds)
    self._held: list[str] = []
    self._held_since = 0.0
    self._fatal: list[str] | None = None  # The fatal log's text, once it has begun.
    self._fatal_since = 0.0
    self._reported = False

  def line(self, text: str, now: float) -> list[str]:
    if self._fatal is not None:  # LOG(FATAL) always aborts: what follows is its crash report.
      if not self._reported:
        if _STACK_TRACE in text:
          return self._report()
        self._fatal.append(text)
      return []
    if _FATAL in text:
      self._held.clear()
      self._fatal, self._fatal_since = [text], now
      return []
    if _SERVICE_LOG_LINE.match(text) or (self._held and not _LOG_LINE.match(text)):
      if not self._held:
        self._held_since = now
      self._held.append(text)  # A coordination-service error, or a continuation line of one.
      return []
    return self._release() + [text]

  def tick(self, now: float) -> list[str]:
    if self._held and now - self._held_since > HOLD_SECONDS:
      return self._release()
    if self._fatal is not None and not self._reported and now - self._fatal_since > \
        _FATAL_TEXT_SECONDS:
      return self._report()
    return []

  def end(self) -> list[str]:
    return self._report() if self._fatal is not None and not self._reported else self._release()

  def waiting(self) -> bool:
    return bool(self._held) or (self._fatal is not None and not self._reported)

  def _release(self) -> list[str]:
    held, self._held = self._held, []
    return held

  def _report(self) -> list[str]:
    self._reported = True
    return [self._describe(''.join(self._fatal)) + '\n']


def _run_filter(process_index: int, process_count: int, heartbeat_seconds: int) -> None:
  """Copies stdin to stdout through a StderrFilter until stdin closes."""
  for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP,
            signal.SIGQUIT, signal.SIGPIPE):
    signal.signal(s, signal.SIG_IGN)
  state = StderrFilter(process_index, process_count, heartbeat_seconds)
  pending = b''
  pending_since = 0.0

  def write(lines):
    for text in lines:
      with contextlib.suppress(OSError):
        os.write(1, text.encode('utf-8', 'surrogateescape'))

  while True:
    timeout = 0.25 if state.waiting() or pending else None
    if select.select([0], [], [], timeout)[0]:
      chunk = os.read(0, 1 << 16)
      if not chunk:
        break
      if not pending:
        pending_since = time.monotonic()
      *lines, pending = (pending + chunk).split(b'\n')
      for line in lines:
        write(state.line(line.decode('utf-8', 'surrogateescape') + '\n', time.monotonic()))
    now = time.monotonic()
    if pending and now - pending_since > HOLD_SECONDS:  # A partial line (a prompt, a progress bar).
      write(state.line(pending.decode('utf-8', 'surrogateescape'), now))
      pending = b''
    write(state.tick(now))
  if pending:
    write(state.line(pending.decode('utf-8', 'surrogateescape'), time.monotonic()))
  write(state.end())


def await_verdict(error: BaseException, heartbeat_seconds: int) -> None:
  """After `error`, waits for the coordination service to name a lost process, if it may.

  A collective fails as soon as a peer's connection breaks (Gloo on CPU: "Connection reset by
  peer"), but the service declares the peer lost only after the heartbeat timeout, and then ends
  this process with the filter's one line. For such an error this waits that long (and a margin),
  so that the line, not a traceback, is what is printed; it returns if no verdict came.
  """
  if _filter_process is not None and _CONNECTION_LOST.search(str(error)):
    time.sleep(heartbeat_seconds + VERDICT_MARGIN_SECONDS)


def shut_down_within(seconds: float) -> None:
  """`jax.distributed.shutdown` (its barrier: every process leaves together), given up on after
  `seconds`: processes still waiting in a collective for this one would hold it there for
  jax's shutdown timeout (5 minutes); they stop within the heartbeat timeout once it is gone."""
  import jax  # noqa: PLC0415  (the filter process runs this file without JAX)

  thread = threading.Thread(target=jax.distributed.shutdown, daemon=True)
  thread.start()
  thread.join(seconds)


def install(process_index: int, process_count: int, heartbeat_seconds: int) -> None:
  """Routes this process's stderr (fd 2, C++ and Python alike) through the filter.

  Call once, after `jax.distributed.initialize`.
  """
  global _filter_process
  if _filter_process is not None:
    return
  sys.stderr.flush()
  read_end, write_end = os.pipe()
  original = os.dup(2)
  try:
    _filter_process = subprocess.Popen(
        [sys.executable, '-S', os.path.abspath(__file__), str(process_index), str(process_count),
         str(heartbeat_seconds)], stdin=read_end, stdout=original, stderr=original)
    os.dup2(write_end, 2)
  finally:
    for fd in (read_end, write_end, original):
      os.close(fd)


if __name__ == '__main__':
  _run_filter(*map(int, sys.argv[1:4]))
