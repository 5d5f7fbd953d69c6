#!/bin/bash
# mpirun on a hostfile:  mpi_launch/mpirun.sh 8 mpi_launch/hostfile.example configs/gpt2-small.toml
set -euo pipefail
NP=${1:?number of ranks}; HOSTFILE=${2:?hostfile}; CONFIG=${3:-configs/gpt2-small.toml}
exec mpirun -np "$NP" --hostfile "$HOSTFILE" --bind-to none --map-by slot \
  -x PATH -x LD_LIBRARY_PATH -x NCCL_DEBUG=WARN \
  hvdllm train --config "$CONFIG"
