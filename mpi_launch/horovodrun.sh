#!/bin/bash
# horovodrun across nodes:  mpi_launch/horovodrun.sh 8 node1:4,node2:4 configs/gpt2-small.toml
# Add --gloo to use Horovod's Gloo controller instead of MPI.
set -euo pipefail
NP=${1:?number of ranks}; HOSTS=${2:?host:slots,...}; CONFIG=${3:-configs/gpt2-small.toml}
exec horovodrun -np "$NP" -H "$HOSTS" hvdllm train --config "$CONFIG"
