#!/usr/bin/env bash
# Runs N cooperating processes of main.py on this machine, each with D fake CPU devices, as one
# JAX runtime (the setup the multi-process tests use; on real clusters use the same flags with one
# process per host).
#
#   launch/local_multiprocess.sh N D [main.py flags...]
#   launch/local_multiprocess.sh 2 4 --config=configs/demo.py:tiny --workdir=workdirs/mp
#
# The processes inherit the environment (JAX_COMPILATION_CACHE_DIR included; the device count is
# appended to XLA_FLAGS, where the last value of a flag wins). If one is lost, the others stop
# within --heartbeat_timeout_seconds, each with one line naming it; the exit status is then the last
# non-zero one.
set -euo pipefail
cd "$(dirname "$0")/.."
num_processes=${1:?usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [main.py flags...]}
devices=${2:?usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [main.py flags...]}
shift 2
port=${PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-.venv/bin/python}
pids=()
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=${devices}" \
    JAX_PLATFORMS=cpu "$python" main.py --coordinator_address="127.0.0.1:${port}" \
    --num_processes="$num_processes" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
# A process that lost a peer prints one line and ends by SIGABRT (fmboost_jax/peer_loss.py); the
# shell's own report of that signal would be a second line.
for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || status=$?; done
exit "$status"
