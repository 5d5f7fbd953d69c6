#!/usr/bin/env bash
# The main job on the built-in corpus (the Python standard library; no download):
# doctor, prepare the shards on 2 ranks, train a small GPT with horovodrun -np 2 for a few
# minutes into runs/demo/, then report and sample from the best checkpoint.
set -euo pipefail
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
NP=${NP:-2}
RUN=runs/demo

hvdllm doctor --ranks "$NP"
if ! hvdllm verify data/demo >/dev/null 2>&1; then
  echo "== preparing data/demo from the Python standard library on $NP ranks"
  mpirun -np "$NP" --bind-to none hvdllm prepare --preset python-stdlib --out data/demo \
    --seq-len 128 --vocab-size 4096 --overwrite
fi
echo "== training (horovodrun -np $NP): $RUN"
rm -rf "$RUN"
horovodrun -np "$NP" -H "localhost:$NP" hvdllm train --config configs/demo.toml --train.run_dir="$RUN"
echo "== report"
hvdllm report "$RUN"
echo "== a sample from $RUN/checkpoints/best.pt"
hvdllm generate --checkpoint "$RUN/checkpoints/best.pt" --prompt "def " --max-new-tokens 120 --temperature 0.7
