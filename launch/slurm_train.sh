#!/bin/bash
# Trains jaxsd under SLURM on one or many GPU (or CPU) nodes; checkpoints
# before the time limit or preemption and requeues itself to resume in the
# same workdir.
#
#   sbatch launch/slurm_train.sh configs/mnist.py [--config.x=y ...]
#   sbatch --nodes=4 launch/slurm_train.sh configs/mnist.py
#   WORKDIR=/shared/runs/big sbatch launch/slurm_train.sh configs/mnist.py
#   # Nodes without GPUs: one process per task of the job
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 \
#     launch/slurm_train.sh configs/tiny.py
#   DRY_RUN=1 SLURM_NNODES=2 SLURM_GPUS_PER_NODE=4 \
#     bash launch/slurm_train.sh configs/mnist.py   # prints the srun command
#
# Submit from the repository root (tasks start in the submit directory).
# See launch/README.md for the batch size, processes per GPU or per node,
# and what to change for a new cluster.

# ---- Resources: edit for your cluster, or override on the sbatch line ------
# sbatch reads these lines only above the first command of the script.
#SBATCH --job-name=jaxsd
#SBATCH --nodes=1
# GPUs per node. Clusters without --gpus-per-node use --gres=gpu:4; nodes
# without GPUs need --gpus-per-node=0 (sbatch refuses a GPU request there).
#SBATCH --gpus-per-node=4
# One process per GPU: tasks per node = GPUs per node. With
# PROCESSES=per-node set this to 1 (and give the task all the node's CPUs).
# Without GPUs the job's tasks per node are the processes per node.
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
# Often required: --partition=..., --account=..., --qos=..., --mem=...
# Put back in the queue after preemption or a node failure ...
#SBATCH --requeue
# ... and send USR1 to this script 180 s before the time limit: it has the
# run checkpoint and stop, then requeues the job. The lead time must cover
# training.log_every steps plus writing a checkpoint.
#SBATCH --signal=B:USR1@180
# Keep one log across requeues (%x = job name, %j = job id, kept on requeue).
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append

set -euo pipefail

# ---- Parameters (environment variables override them) --------------------
# Workdir on storage every node sees (checkpoints, MLflow, samples); a
# requeued job resumes from it. Default: runs/<config name> here.
if [[ $# -lt 1 ]]; then
  echo "usage: sbatch launch/slurm_train.sh CONFIG.py [--config.key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
WORKDIR=${WORKDIR:-$PWD/runs/$(basename "$CONFIG" .py)}
# per-gpu: one process per GPU, JAX's usual choice; jax.distributed reads
# SLURM's variables and gives each process GPU number SLURM_LOCALID, so every
# task must see all its node's GPUs (no --gpus-per-task / --gpu-bind here).
# per-node: one process drives all GPUs of its node (fewer processes, same
# devices); needs --ntasks-per-node=1 above.
# Without GPUs (GPUS_PER_NODE=0, or a job that has none) per-gpu starts one
# process per task of the job: --ntasks-per-node sets the processes per node.
PROCESSES=${PROCESSES:-per-gpu}
PYTHON=${PYTHON:-python}
NODES=${NODES:-${SLURM_NNODES:-1}}
# SLURM_GPUS_PER_NODE may carry a type ("a100:4"); --gres jobs set
# SLURM_GPUS_ON_NODE instead. Empty: the job has no GPUs.
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}
# Cluster-specific network settings usually go here, e.g.
#   export NCCL_SOCKET_IFNAME=ib0   # the interface between nodes
#   export NCCL_DEBUG=WARN
# and the environment: module load ... / source .venv/bin/activate

refuse() {
  echo "jaxsd: launch refused: $*" >&2
  exit 2
}

# The job's tasks per node: --ntasks-per-node, or --ntasks spread evenly
# (SLURM_TASKS_PER_NODE is "2" or "2(x4)"; "2,1" is uneven). Empty outside
# a job (DRY_RUN without these variables).
job_tasks_per_node() {
  if [[ -n ${SLURM_NTASKS_PER_NODE:-} ]]; then
    echo "$SLURM_NTASKS_PER_NODE"
  elif [[ ${SLURM_TASKS_PER_NODE:-} =~ ^([0-9]+)(\(x[0-9]+\))?$ ]]; then
    echo "${BASH_REMATCH[1]}"
  elif [[ -n ${SLURM_TASKS_PER_NODE:-} ]]; then
    refuse "the job's tasks are spread unevenly over its nodes" \
           "(SLURM_TASKS_PER_NODE=$SLURM_TASKS_PER_NODE): submit with" \
           "--ntasks-per-node=N"
  fi
}
JOB_TASKS_PER_NODE=$(job_tasks_per_node)

[[ $GPUS_PER_NODE =~ ^[0-9]+$ ]] ||
  refuse "GPUS_PER_NODE=$GPUS_PER_NODE: give a number of GPUs (0: none)"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || refuse "NODES=$NODES: give a number >= 1"
if [[ -n ${SLURM_NNODES:-} && $NODES != "$SLURM_NNODES" ]]; then
  refuse "NODES=$NODES but the job has $SLURM_NNODES node(s)"
fi

case $PROCESSES in
  per-gpu)
    if ((GPUS_PER_NODE > 0)); then
      TASKS_PER_NODE=$GPUS_PER_NODE
    else
      [[ -n $JOB_TASKS_PER_NODE ]] ||
        refuse "no GPUs (GPUS_PER_NODE=0), so processes per node follow" \
               "the job's tasks, and none are given: submit with" \
               "--ntasks-per-node=N (DRY_RUN: set SLURM_NTASKS_PER_NODE=N)"
      TASKS_PER_NODE=$JOB_TASKS_PER_NODE
    fi
    ;;
  per-node)
    TASKS_PER_NODE=1
    if ((GPUS_PER_NODE > 0)); then
      # jax.distributed would otherwise give the one process GPU 0 only.
      JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
      export JAX_LOCAL_DEVICE_IDS
    fi
    ;;
  *) refuse "PROCESSES=$PROCESSES: use per-gpu or per-node" ;;
esac
((TASKS_PER_NODE >= 1)) ||
  refuse "$TASKS_PER_NODE processes per node: submit with --ntasks-per-node=N"
# srun inside the job starts the job's task count (it reads SLURM_NTASKS)
# whatever --ntasks-per-node says, so the two must agree.
if [[ -n $JOB_TASKS_PER_NODE && $JOB_TASKS_PER_NODE != "$TASKS_PER_NODE" ]]; then
  if ((GPUS_PER_NODE > 0)); then
    why="PROCESSES=$PROCESSES with $GPUS_PER_NODE GPU(s) per node needs"
  else
    why="PROCESSES=per-node needs"
  fi
  refuse "the job has $JOB_TASKS_PER_NODE task(s) per node but $why" \
         "$TASKS_PER_NODE: submit with --ntasks-per-node=$TASKS_PER_NODE"
fi

cmd=(srun --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE"
     --kill-on-bad-exit=1)
# srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05).
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
  cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi
cmd+=("$PYTHON" -u -m jaxsd.main --config="$CONFIG" --workdir="$WORKDIR" "$@")

if [[ -n ${DRY_RUN:-} ]]; then
  if [[ -n ${JAX_LOCAL_DEVICE_IDS:-} ]]; then
    printf 'JAX_LOCAL_DEVICE_IDS=%s ' "$JAX_LOCAL_DEVICE_IDS"
  fi
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi

if ((GPUS_PER_NODE > 0)); then
  devices="$GPUS_PER_NODE GPU(s)"
else
  devices="no GPUs"
fi
echo "jaxsd: $NODES node(s) x $devices, $TASKS_PER_NODE process(es) per" \
     "node, workdir $WORKDIR, restart ${SLURM_RESTART_COUNT:-0}" >&2
mkdir -p "$WORKDIR"

# ---- Signals -----------------------------------------------------------------
# jaxsd (its trainer) checkpoints and stops on SIGTERM.
# - USR1 (--signal=B:USR1, the time limit is near) comes to this script
#   alone: forward SIGTERM to the python processes of the job's steps
#   (scancel --signal does not signal this script itself), then requeue.
#   srun is not signalled directly: on SIGTERM it may end its tasks instead of
#   passing the signal on.
# - SIGTERM (scancel, preemption, scontrol requeue) comes from SLURM, which
#   signals every task itself: nothing to forward. scancel would be refused
#   then ("Job can not be altered now") and retry until KillWait killed this
#   script, holding up whatever preempted the job.
requeue=0
# shellcheck disable=SC2317  # run from the traps below
on_time_limit() {
  echo "jaxsd: time limit near: checkpointing, then requeueing" >&2
  requeue=1
  # Bounded: scancel retries for as long as SLURM will not alter the job.
  timeout 10 scancel --signal=TERM "$SLURM_JOB_ID" ||
    echo "jaxsd: warning: could not signal the training processes" >&2
}
# shellcheck disable=SC2317  # run from the traps below
on_term() {
  echo "jaxsd: SIGTERM: the training processes checkpoint and stop" >&2
}
trap on_time_limit USR1
trap on_term TERM

# In the background so that traps run while it trains; `wait` returns early
# (status > 128) when a trap runs, so wait again until srun has finished.
"${cmd[@]}" &
srun_pid=$!
status=0
wait "$srun_pid" || status=$?
while ((status > 128)) && kill -0 "$srun_pid" 2>/dev/null; do
  status=0
  wait "$srun_pid" || status=$?
done

if ((requeue && status == 0)); then
  echo "jaxsd: requeueing job $SLURM_JOB_ID to resume from $WORKDIR" >&2
  # The requeue sends this script SIGTERM; it is done, so it just exits.
  trap '' TERM
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
