#!/usr/bin/env bash
# The main job on the built-in corpus: doctor, prepare the Python standard library, train.
set -euo pipefail
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
NP=${NP:-2}

hvdllm doctor --ranks "$NP"
if [ ! -f data/demo/manifest.json ]; then
  mpirun -np "$NP" --bind-to none hvdllm prepare --preset python-stdlib --out data/demo \
    --seq-len 128 --vocab-size 4096
fi
hvdllm verify data/demo
