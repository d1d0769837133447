#!/bin/bash
# A peftcli run on SLURM that survives preemption and the time limit:
#   sbatch configs/slurm.sh recipes/quickstart.yaml
# The recipe needs training.save_every. --signal sends SIGTERM 120 s before the limit: peftcli
# finishes its step, checkpoints and exits 143; the job requeues itself, and the requeued job
# (and one a preemption requeued) continues the run with --resume. --max-restarts 2 restarts
# the group from its newest checkpoint when a process dies mid-run.
#SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8
#SBATCH --requeue --signal=B:TERM@120 --open-mode=append
set -euo pipefail
recipe=${1:?usage: sbatch configs/slurm.sh RECIPE}
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
resume=""
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then resume="--resume"; fi
# Each node's launcher gets the signal (B: the batch shell passes it on to srun's tasks).
trap 'kill -TERM "$pid" 2>/dev/null' TERM
srun --kill-on-bad-exit=0 bash -c "sed -e 's/^machine_rank: .*/machine_rank: \$SLURM_NODEID/' \
    -e 's/^main_process_ip: .*/main_process_ip: $head/' configs/multi-node.yaml > /tmp/peftcli-node-\$SLURM_JOB_ID.yaml
  peftcli train $recipe --launch-config /tmp/peftcli-node-\$SLURM_JOB_ID.yaml --max-restarts 2 $resume" &
pid=$!
code=0
wait "$pid" || code=$?
if [ "$code" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then  # the signal cut the wait short:
  code=0; wait "$pid" || code=$?                             # wait for the checkpoint
fi
if [ "$code" -eq 143 ]; then scontrol requeue "$SLURM_JOB_ID"; fi  # stopped at a checkpoint: go on
exit "$code"
