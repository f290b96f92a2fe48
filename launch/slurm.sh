#!/bin/bash
# Train on several nodes under SLURM: srun starts one `accelerate launch` per node, each launcher starts
# one process per GPU, and all of them meet at the first node of the allocation.
#
#   sbatch --nodes 2 launch/slurm.sh recipes/pretrain.py --config recipes/configs/pretrain/gpt-small.yaml
#   ACCELERATE_CONFIG=launch/fsdp2.yaml sbatch --nodes 4 launch/slurm.sh recipes/sft.py --init pipeline-pretrain
#
# The first argument is the recipe, the rest are its flags. Environment knobs: ACCELERATE_CONFIG (default
# launch/ddp.yaml; the DeepSpeed and FSDP2 configs work too), GPUS_PER_NODE (default: what SLURM gives
# each node), MASTER_PORT (default 29500). Runs go to LLMTRAIN_RUNS_DIR, which must be on a filesystem
# every node sees: the main process writes the run folder and all processes read checkpoints from it.
#
#SBATCH --job-name=llmtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

if [ "$#" -lt 1 ]; then
    echo "usage: sbatch [--nodes N] launch/slurm.sh RECIPE.py [--key value ...]" >&2
    exit 2
fi

# Rendezvous from the SLURM environment: the first node hosts it, every node knows the job's shape.
# sed reads the whole list (head would close the pipe early, and pipefail would turn that SIGPIPE into a failure)
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-29500}
export NNODES=${SLURM_NNODES:-1}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi --list-gpus | wc -l)}}
export NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/ddp.yaml}
export LLMTRAIN_RUNS_DIR=${LLMTRAIN_RUNS_DIR:-$PWD/runs}

echo "llmtrain on $NNODES node(s) x $GPUS_PER_NODE processes = $NUM_PROCESSES, rendezvous $MASTER_ADDR:$MASTER_PORT," \
    "config $ACCELERATE_CONFIG, runs in $LLMTRAIN_RUNS_DIR"

# One task per node; the single quotes defer $SLURM_NODEID to each node, which is its machine rank.
srun --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec accelerate launch \
        --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$NNODES" \
        --num_processes "$NUM_PROCESSES" \
        --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$MASTER_ADDR" \
        --main_process_port "$MASTER_PORT" \
        --rdzv_backend static \
        --same_network \
        "$@"
' llmtrain-launch "$@"
