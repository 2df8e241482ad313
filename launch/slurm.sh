#!/usr/bin/env bash
# Submits main.py as a SLURM job on a GPU cluster: one process per GPU (default) or per host, all
# joined into one device mesh by jax.distributed.initialize() (`--distributed` detects SLURM: the
# coordinator is the job's first node, process ids come from SLURM_PROCID). SIGUSR1 two minutes
# before the time limit makes every process save a checkpoint and exit 0; resubmitting the same
# command resumes from it.
#
#   launch/slurm.sh [--dry-run] [--nodes=N] [--gpus-per-node=G] [--per=gpu|host] [--time=T]
#                   [--partition=P] [--account=A] -- [main.py flags...]
#   launch/slurm.sh --nodes=4 --gpus-per-node=8 --time=24:00:00 -- --config=configs/default.py \
#       --workdir=/shared/runs/paper --config.first_stage.weights=/shared/sd_vae
#   launch/slurm.sh --nodes=4 --gpus-per-node=8 --time=1:00:00 -- --mode=evaluate \
#       --config=configs/default.py --workdir=/shared/runs/paper
#
# Every mode runs in the job (train, precompute, evaluate, sample, export, convert): each process
# computes its share, process 0 writes.
# The job first makes sure every node's JAX sees the GPUs (launch/setup_host.sh; it installs
# requirements.txt with jax[cuda13] into .venv when missing) and sets XLA's GPU flags for overlapping
# collectives with compute. --dry-run prints the batch script and the sbatch command instead of
# submitting.
set -euo pipefail
usage="usage: $0 [--dry-run] [--nodes=N] [--gpus-per-node=G] [--per=gpu|host] [--time=T] \
[--partition=P] [--account=A] -- [main.py flags...]"
dry_run=0 nodes=1 gpus=8 per=gpu time=24:00:00 partition='' account=''
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --nodes=*) nodes=${1#*=} ;;
    --gpus-per-node=*) gpus=${1#*=} ;;
    --per=*) per=${1#*=} ;;
    --time=*) time=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --account=*) account=${1#*=} ;;
    --) shift; break ;;
    *) echo "error: unknown option $1; main.py flags go after --." >&2; echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
if ! [[ "$nodes" =~ ^[1-9][0-9]*$ && "$gpus" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --nodes and --gpus-per-node must be positive integers." >&2; exit 2
fi
case "$per" in
  gpu) tasks=$gpus gpu_line="#SBATCH --gpus-per-task=1" ;;
  host) tasks=1 gpu_line="#SBATCH --gpus-per-node=$gpus" ;;
  *) echo "error: --per=$per must be gpu or host." >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
flags=''
for flag in "$@"; do flags+=" $(printf '%q' "$flag")"; done
# Refuse to train anywhere but on the GPUs (unless the flags choose another platform).
if [[ "$flags" != *"--config.train.platform"* ]]; then flags+=" --config.train.platform=gpu"; fi
platform=$(sed -n 's/.*--config\.train\.platform=\([a-z]*\).*/\1/p' <<< "$flags")
# XLA's GPU flags for overlapping collectives with compute: the latency-hiding scheduler moves
# collectives so they run beside the convolutions, and larger combine thresholds make the gradient
# all-reduce (data) and the fsdp all-gathers / reduce-scatters fewer, bigger transfers. Flags already
# in XLA_FLAGS come later and win.
xla_flags="--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
--xla_gpu_all_gather_combine_threshold_bytes=134217728 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728"
script="#!/usr/bin/env bash
#SBATCH --job-name=fmboost
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$tasks
$gpu_line
#SBATCH --time=$time
#SBATCH --signal=USR1@120
#SBATCH --output=slurm-%j.out${partition:+
#SBATCH --partition=$partition}${account:+
#SBATCH --account=$account}
set -euo pipefail
cd $(printf '%q' "$repo")
export XLA_FLAGS=\"$xla_flags \${XLA_FLAGS:-}\"
# JAX for the GPUs: where .venv lacks it, this node runs (once, for all nodes)
# $(bash "$repo/launch/setup_host.sh" --install-command "$platform")
# then every node checks that JAX sees its GPUs.
bash launch/setup_host.sh $platform
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash launch/setup_host.sh --verify $platform
srun --kill-on-bad-exit=1 .venv/bin/python main.py --distributed$flags"
if ((dry_run)); then
  echo "$script"
  echo "# submit with: sbatch <this script>"
  exit 0
fi
echo "$script" | sbatch
