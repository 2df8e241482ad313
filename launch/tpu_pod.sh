#!/usr/bin/env bash
# Runs main.py on every worker (host) of a Cloud TPU VM pod slice, one process per worker, with the
# same flags. `--distributed` lets jax.distributed.initialize() detect the pod, so all workers form
# one device mesh; each reads its own share of the data and process 0 writes logs and results.
#
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE [main.py flags...]
#   launch/tpu_pod.sh my-v4-32 us-central2-b --config=configs/default.py \
#       --workdir=/mnt/shared/paper --config.first_stage.weights=/mnt/shared/sd_vae
#   launch/tpu_pod.sh my-v4-32 us-central2-b --mode=evaluate --config=configs/default.py \
#       --workdir=/mnt/shared/paper
#
# Every mode runs on the slice (train, precompute, evaluate, sample, export, convert): each worker
# computes its share, process 0 writes.
# Every worker needs this repository at $REPO_DIR (default ~/fmboost_jax); its .venv is created
# there on the first launch (launch/setup_host.sh: requirements.txt and jax[tpu]). The workdir must
# be on storage all workers share. $PROJECT, if set, is passed to gcloud. --dry-run prints the command instead of running it.
set -euo pipefail
usage="usage: $0 [--dry-run] TPU_NAME ZONE [main.py flags...]"
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 2 || "$1" == -* || "$2" == -* ]]; then echo "$usage" >&2; exit 2; fi
tpu=$1 zone=$2
shift 2
repo=${REPO_DIR:-\~/fmboost_jax}
flags=''
for flag in "$@"; do flags+=" $(printf '%q' "$flag")"; done
# Refuse to train anywhere but on the TPUs (unless the flags choose another platform).
if [[ "$flags" != *"--config.train.platform"* ]]; then flags+=" --config.train.platform=tpu"; fi
platform=$(sed -n 's/.*--config\.train\.platform=\([a-z]*\).*/\1/p' <<< "$flags")
# Every worker first makes sure its .venv has JAX for the TPUs (launch/setup_host.sh installs
# requirements.txt with jax[tpu] when missing) and that JAX sees them.
remote="cd $repo && bash launch/setup_host.sh $platform && .venv/bin/python main.py --distributed$flags"
command=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all "--command=$remote")
if [[ -n "${PROJECT:-}" ]]; then command+=("--project=$PROJECT"); fi
if ((dry_run)); then
  echo "# Every worker first runs launch/setup_host.sh $platform: where .venv lacks JAX for the TPUs,"
  echo "# $(bash "$(dirname "$0")/setup_host.sh" --install-command "$platform")"
  quoted=$([[ "$remote" != *"'"* ]] && printf "'%s'" "$remote" || printf '%q' "$remote")
  echo "gcloud compute tpus tpu-vm ssh $tpu --zone=$zone --worker=all --command=$quoted${PROJECT:+ --project=$PROJECT}"
  exit 0
fi
exec "${command[@]}"
