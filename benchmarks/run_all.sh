#!/usr/bin/env bash
# Every benchmark, each against its baseline in the same run; JSON (and PNG) under
# benchmarks/results/. Needs the demo data (make demo, or the prepare line below).
# Each benchmark's flags and their defaults: hvdllm bench NAME --help.
set -euo pipefail
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ! hvdllm verify data/demo >/dev/null 2>&1; then
  mpirun -np 2 --bind-to none hvdllm prepare --preset python-stdlib --out data/demo --seq-len 128 --overwrite
fi
echo "== communication (mpirun -np 2), with the Horovod cycle/fusion sweep"
mpirun -np 2 --bind-to none hvdllm bench comm --sizes "${COMM_SIZES:-8B:64MB}" --tune-preset gpt-mini \
  --json "$OUT/comm.json" | tail -12
echo "== optimizer step: LAMB vs AdamW (foreach), GPT-2 small shapes"
hvdllm bench optim --json "$OUT/optim.json" | tail -1
echo "== loader vs np.memmap"
hvdllm bench loader --data data/demo --json "$OUT/loader.json" | tail -1
echo "== prepare: against raw encode_batch, 1 -> 2 ranks, peak RSS on 10 and 200 MB"
hvdllm bench prepare --json "$OUT/prepare.json" | tail -3
echo "== framework overhead: hvdllm train vs a plain PyTorch loop (1 rank, 2 threads)"
hvdllm bench overhead --config configs/demo.toml --json "$OUT/overhead.json" | tail -1
echo "== weak scaling 1 -> 2 ranks: Horovod vs torch DDP (gloo)"
hvdllm bench scaling --config configs/demo.toml --json "$OUT/scaling.json" | tail -1
echo "== pipeline bubble and activation memory: GPipe vs 1F1B against (p-1)/(m+p-1)"
hvdllm bench pipeline --json "$OUT/pipeline.json" | tail -2
echo "== warm start: a model grown from a smaller trained one vs the same model from scratch"
hvdllm bench grow --config configs/demo.toml --small-steps 120 --steps 120 --eval-every 10 \
  --json "$OUT/grow.json" | tail -1
echo "== ZeRO: zero 1 and 2 against zero 0 on 2 ranks (tokens/s, optimizer-state bytes per rank)"
hvdllm bench zero --config configs/demo.toml --json "$OUT/zero.json" | tail -4
