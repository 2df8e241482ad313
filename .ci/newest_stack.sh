#!/usr/bin/env bash
# CI's second run: the fast tier and the multi-process tests on the newest stack, Python 3.13 in a
# Debian 13 root with requirements-newest.txt (jax 0.12), beside the pinned stack's whole suite
# (Python 3.11, requirements.txt) that .ci/run runs first. Needs root (debootstrap, chroot, mount).
#
#   bash .ci/newest_stack.sh [ROOT]    # ROOT defaults to .ci/newest-root (ignored by git)
#
# The root is made once (debootstrap, about 35 s) and kept; each run copies the work tree (tracked
# and untracked files, not the ignored ones such as .venv) into ROOT/src and installs the stack
# into ROOT/venv, which is ROOT/src/.venv there. The root gets fresh proc, sysfs (read-only) and /dev/shm mounts, never bind
# mounts of this machine's, and they are unmounted on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(realpath -m "${1:-.ci/newest-root}")
if [[ $EUID -ne 0 ]]; then
  echo "error: .ci/newest_stack.sh needs root (debootstrap, chroot, mount); run it as root." >&2
  exit 1
fi
if [[ ! -x $root/usr/bin/python3 || ! -x $root/usr/bin/strace ]]; then
  command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null
  # Debian's mirror as this machine's apt uses it.
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
           || true)
  rm -rf "$root"
  # strace and iproute2: the bucket tests' loopback-only network namespace (tests/buckets.py).
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,strace,iproute2 \
    trixie "$root" "${mirror:-http://deb.debian.org/debian}" >/dev/null
fi
# Name resolution (gloo looks up the host name; pip the package index) and this machine's CAs.
cp /etc/hosts /etc/resolv.conf "$root/etc/"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"

unmount() {
  for m in dev/shm sys proc; do
    mountpoint -q "$root/$m" && umount "$root/$m"
  done
  return 0
}
trap unmount EXIT
unmount
mount -t proc proc "$root/proc"
mount -t sysfs -o ro sysfs "$root/sys"  # libtpu's tcmalloc counts the CPUs there.
mount -t tmpfs tmpfs "$root/dev/shm"

rm -rf "$root/src" && mkdir "$root/src"
git ls-files -z --cached --others --exclude-standard \
  | tar -c --null --ignore-failed-read -T - 2>/dev/null | tar -x -C "$root/src"

chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/venv/bin:/usr/bin:/bin \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 bash -euo pipefail -c '
  [[ -x /venv/bin/python ]] || python3 -m venv /venv
  pip install -q -r /src/requirements-newest.txt
  cd /src
  ln -s /venv .venv  # The project'"'"'s .venv, as in the first run (launch/setup_host.sh checks it).
  python -c "import sys, jax, flax; print(\"newest stack: Python\", sys.version.split()[0], \"jax\",
    jax.__version__, \"flax\", flax.__version__)"
  python -m pytest -q -rs -m "not slow or multiprocess"'
