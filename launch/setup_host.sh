#!/usr/bin/env bash
# Makes this host ready to train on PLATFORM and says so in one line: creates .venv with the pinned
# stack (requirements.txt) and JAX's wheels for the platform when .venv lacks them, then checks that
# JAX sees the platform's devices. The launch scripts run it on every host before main.py.
#
#   launch/setup_host.sh [--verify | --install-command] PLATFORM   PLATFORM: gpu | tpu | cpu | any
#
# gpu installs "jax[cuda13]==V" and tpu "jax[tpu]==V", V being requirements.txt's jax pin.
# --verify only checks (for hosts that share one .venv on shared storage: install on one host);
# --install-command prints the install command and does nothing (the launch scripts' dry runs).
# Exits 1 with one `error:` line when JAX still sees another backend.
set -euo pipefail
cd "$(dirname "$0")/.."
verify_only=0 print_only=0
if [[ "${1:-}" == "--verify" ]]; then verify_only=1; shift; fi
if [[ "${1:-}" == "--install-command" ]]; then print_only=1; shift; fi
platform=${1:?usage: $0 [--verify | --install-command] gpu|tpu|cpu|any}
version=$(sed -n 's/^jax==//p' requirements.txt)
case "$platform" in
  gpu) wheels="jax[cuda13]==$version" ;;
  tpu) wheels="jax[tpu]==$version" ;;
  cpu | any) wheels="" ;;
  *) echo "error: platform $platform is unknown; use gpu, tpu, cpu or any." >&2; exit 2 ;;
esac
if ((print_only)); then
  echo "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt${wheels:+ \"$wheels\"}"
  exit 0
fi
python=.venv/bin/python
host=$(hostname)

backend() {
  "$python" -c 'import jax; print(jax.default_backend(), jax.local_device_count(),
jax.local_devices()[0].device_kind, jax.__version__, sep="|")' 2>/dev/null | tail -n 1
}

found=$([[ -x "$python" ]] && backend || true)
if ((!verify_only)) && [[ -z "$found" || ("$platform" != any && "${found%%|*}" != "$platform") ]]
then
  echo "$host: installing requirements.txt${wheels:+ and $wheels} into .venv" >&2
  [[ -x "$python" ]] || python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt ${wheels:+"$wheels"} >&2
  found=$(backend || true)
fi
IFS='|' read -r seen count kind installed <<< "${found:-none|0|none|none}"
if [[ "$platform" != any && "$seen" != "$platform" ]]; then
  echo "error: $host: JAX in .venv sees ${seen} devices, not $platform; install ${wheels:-jax} \
there (README, \"Installs\") or check the host's drivers." >&2
  exit 1
fi
echo "$host: JAX $installed sees $count $seen devices ($kind)."
