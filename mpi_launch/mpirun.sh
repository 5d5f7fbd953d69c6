#!/bin/bash
# mpirun on a hostfile; arguments after the config go to `hvdllm train` (overrides, flags):
#   mpi_launch/mpirun.sh 8 mpi_launch/hostfile.example configs/gpt2-small.toml --train.steps=1000
# Activate the venv first (source .venv/bin/activate): -x PATH hands its hvdllm to every node.
# As root, Open MPI also needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.
# MPIRUN_FLAGS adds flags to mpirun, e.g. --enable-recovery for parallel.continue_without_dead.
# A SIGTERM to this script stops the run cleanly (checkpoint, exit 0): it is passed on as
# SIGUSR1, which mpirun forwards to every rank; a SIGTERM to mpirun itself would end the job
# with exit status 1.
# The exit status is the run's, from its status.json (`hvdllm report`), not mpirun's: under
# --enable-recovery mpirun returns 0 even when the job failed.
set -euo pipefail
NP=${1:?number of ranks}; HOSTFILE=${2:?hostfile}; CONFIG=${3:-configs/gpt2-small.toml}
shift $(( $# < 3 ? $# : 3 ))
source "$(dirname "${BASH_SOURCE[0]}")/run_status.sh"
STARTED=$(date +%s)
# shellcheck disable=SC2086  # MPIRUN_FLAGS is a list of flags
mpirun ${MPIRUN_FLAGS:-} -np "$NP" --hostfile "$HOSTFILE" --bind-to none --map-by slot \
  -x PATH -x LD_LIBRARY_PATH -x NCCL_DEBUG=WARN \
  hvdllm train --config "$CONFIG" "$@" &
LAUNCHER=$!
trap 'kill -USR1 "$LAUNCHER" 2>/dev/null || true' TERM INT
wait_and_report "$LAUNCHER" "$STARTED" --config "$CONFIG" "$@"
