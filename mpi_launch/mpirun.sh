#!/bin/bash
# mpirun on a hostfile; arguments after the config go to `hvdllm train` (overrides, flags):
#   mpi_launch/mpirun.sh 8 mpi_launch/hostfile.example configs/gpt2-small.toml --train.steps=1000
# Activate the venv first (source .venv/bin/activate): -x PATH hands its hvdllm to every node.
# As root, Open MPI also needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.
# A SIGTERM to this script stops the run cleanly (checkpoint, exit 0): it is passed on as
# SIGUSR1, which mpirun forwards to every rank; a SIGTERM to mpirun itself would end the job
# with exit status 1.
set -euo pipefail
NP=${1:?number of ranks}; HOSTFILE=${2:?hostfile}; CONFIG=${3:-configs/gpt2-small.toml}
shift $(( $# < 3 ? $# : 3 ))
mpirun -np "$NP" --hostfile "$HOSTFILE" --bind-to none --map-by slot \
  -x PATH -x LD_LIBRARY_PATH -x NCCL_DEBUG=WARN \
  hvdllm train --config "$CONFIG" "$@" &
MPIRUN=$!
trap 'kill -USR1 "$MPIRUN" 2>/dev/null || true' TERM INT
# wait returns early when a trapped signal arrives; wait again for mpirun's own exit status.
status=0
wait "$MPIRUN" || status=$?
while kill -0 "$MPIRUN" 2>/dev/null; do
  status=0
  wait "$MPIRUN" || status=$?
done
exit "$status"
