#!/bin/bash
# horovodrun across nodes; arguments after the config go to `hvdllm train`:
#   mpi_launch/horovodrun.sh 8 node1:4,node2:4 configs/gpt2-small.toml --checkpoint.resume=auto
# Set HOROVODRUN_FLAGS=--gloo to use Horovod's Gloo controller instead of MPI.
# Activate the venv first (source .venv/bin/activate) so horovodrun and hvdllm are on PATH.
# The exit status is the run's, from its status.json (`hvdllm report`), not horovodrun's.
set -euo pipefail
NP=${1:?number of ranks}; HOSTS=${2:?host:slots,...}; CONFIG=${3:-configs/gpt2-small.toml}
shift $(( $# < 3 ? $# : 3 ))
source "$(dirname "${BASH_SOURCE[0]}")/run_status.sh"
STARTED=$(date +%s)
# shellcheck disable=SC2086  # HOROVODRUN_FLAGS is a list of flags
horovodrun ${HOROVODRUN_FLAGS:-} -np "$NP" -H "$HOSTS" hvdllm train --config "$CONFIG" "$@" &
LAUNCHER=$!
trap 'kill -TERM "$LAUNCHER" 2>/dev/null || true' TERM INT  # horovodrun passes it on to the ranks
wait_and_report "$LAUNCHER" "$STARTED" --config "$CONFIG" "$@"
