#!/usr/bin/env bash
# All test tiers: unit and e2e in one process; each file of tests/parallel under
# `mpirun -np 2` (and the Gloo ones under `horovodrun -np 2 --gloo`); tests/multihost on
# test hosts in network namespaces (skipped by name, saying why, where they cannot be made). A deadlock fails
# through pytest-timeout inside and `timeout` outside. Exits non-zero if any rank of any
# tier fails; ends with the summary over all tiers.
#   scripts/test.sh [unit|parallel|multihost]   (default: all)
set -uo pipefail
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
export PATH="$PWD/$VENV/bin:$PATH"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export PYTHONUNBUFFERED=1
RESULTS=test-results
rm -rf "$RESULTS" && mkdir -p "$RESULTS"
TIER=${1:-all}
status=0

if [ "$TIER" = all ] || [ "$TIER" = unit ]; then
  echo "=== unit + e2e (1 process) ==="
  "$PY" -m pytest -q -p no:cacheprovider --timeout=600 --junitxml="$RESULTS/unit.xml" tests/unit tests/e2e || status=1
fi

if [ "$TIER" = all ] || [ "$TIER" = parallel ]; then
  for file in tests/parallel/test_*.py; do
    name=$(basename "$file" .py)
    junit="--junitxml=$RESULTS/$name-mpi-rank\${OMPI_COMM_WORLD_RANK:-0}.xml"
    echo "=== $file under mpirun -np 2 ==="
    timeout -k 10 900 mpirun -np 2 --bind-to none bash -c \
      "exec $PY -m pytest -q -p no:cacheprovider --color=no --timeout=300 $junit $file" || status=1
    if grep -q "^# gloo: yes" "$file"; then
      junit="--junitxml=$RESULTS/$name-gloo-rank\${HOROVOD_RANK:-0}.xml"
      echo "=== $file under horovodrun -np 2 --gloo ==="
      timeout -k 10 900 "$VENV/bin/horovodrun" -np 2 --gloo bash -c \
        "exec $PWD/$PY -m pytest -q -p no:cacheprovider --color=no --timeout=300 $junit $file" || status=1
    fi
  done
fi

if [ "$TIER" = all ] || [ "$TIER" = multihost ]; then
  echo "=== multihost: 3 test hosts (tests/multihost/hosts.sh) ==="
  if why=$(bash tests/multihost/hosts.sh check 2>&1); then
    "$PY" -m pytest -q -p no:cacheprovider --timeout=900 --junitxml="$RESULTS/multihost.xml" tests/multihost \
      || status=1
  else
    echo "SKIPPED tier multihost: $why"
  fi
fi

"$PY" scripts/junit_summary.py "$RESULTS" || status=1
exit $status
