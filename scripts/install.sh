#!/usr/bin/env bash
# Set up .venv with everything hvdllm needs, Horovod included. Idempotent: a second run
# only checks what is there (seconds). Variables a cluster may set:
#   PYTHON       interpreter for the venv           (default python3)
#   VENV         where the venv goes                (default .venv)
#   TORCH_SPEC   pip spec for torch; empty keeps the torch already in the venv
#                (default torch==2.13.0, the CPU build; a GPU cluster passes its own)
#   HOROVOD_VERSION                                 (default 0.28.1)
#   HVDLLM_CACHE wheel cache                         (default ~/.cache/hvdllm)
set -euo pipefail

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
HVDLLM_CACHE=${HVDLLM_CACHE:-$HOME/.cache/hvdllm}
# safetensors for `hvdllm export --format hf`; transformers only for its test (loading the export),
# pinned to a release that takes the tokenizers and huggingface_hub already here; optuna for `hvdllm tune`.
# zstandard and pyarrow: `hvdllm prepare` reads .zst, Parquet, Arrow and `datasets` folders; datasketch only
# for a test (near-duplicate recall and precision against its MinHashLSH).
PY_DEPS="numpy h5py mpi4py tokenizers zstandard pyarrow tqdm tensorboard matplotlib safetensors pytest pytest-timeout datasketch==2.0.0 transformers==5.18.0 optuna==5.0.0"

say() { echo "[install] $*"; }
die() { echo "[install] error: $*" >&2; exit 1; }

need_tool() {  # need_tool CMD "what to install"
  command -v "$1" >/dev/null 2>&1 || die "no '$1' found: install $2"
}

need_tool "$PYTHON" "Python 3.11+ with venv (apt-get install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "$("$PYTHON" --version 2>&1) is too old: hvdllm needs Python 3.11+ (tomllib); set PYTHON=python3.11"
need_tool gcc "a C/C++ compiler (apt-get install build-essential, or 'module load gcc')"
need_tool g++ "a C++17 compiler (apt-get install g++, or 'module load gcc')"

# --- MPI: use whatever the cluster provides; only install Open MPI when there is none. ---
if command -v mpicxx >/dev/null 2>&1 || command -v mpicc >/dev/null 2>&1; then
  say "MPI found: $(command -v mpicxx || command -v mpicc)"
else
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "no MPI compiler wrapper found: installing Open MPI with apt (openmpi-bin libopenmpi-dev)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
  else
    die "no MPI found: 'module load openmpi' (or mpich), or as root: apt-get install openmpi-bin libopenmpi-dev"
  fi
fi

# --- CMake: Horovod's bundled Gloo needs CMake 3.x (CMake 4 refuses it without a policy floor). ---
if ! command -v cmake >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "no cmake found: installing it with apt"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null
  else
    die "no cmake found: apt-get install cmake (or 'module load cmake', 3.13 or newer)"
  fi
fi
export CMAKE_POLICY_VERSION_MINIMUM=3.5

# --- The venv and the Python packages. ---
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check -q"
# Builds below run without isolation (Horovod must see the venv's torch): they need these.
"$PY" -c "import setuptools, wheel" 2>/dev/null || $PIP install "setuptools>=64" wheel

if [ -n "$TORCH_SPEC" ] && ! "$PY" - "$TORCH_SPEC" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
spec = sys.argv[1]
want = spec.split("==", 1)[1] if "==" in spec else None
have = version("torch").split("+")[0]
sys.exit(0 if want is None or have == want else 1)
PYEOF
then
  say "installing $TORCH_SPEC"
  $PIP install "$TORCH_SPEC"
fi

if ! "$PY" -c "import numpy, h5py, mpi4py, tokenizers, zstandard, pyarrow, tqdm, tensorboard, matplotlib, safetensors, pytest, pytest_timeout, datasketch, transformers, optuna" 2>/dev/null; then
  say "installing $PY_DEPS"
  $PIP install $PY_DEPS
fi
# Horovod's runtime needs; installed here since its wheel is installed without dependency resolution.
if ! "$PY" -c "import cloudpickle, psutil, yaml, packaging" 2>/dev/null; then
  $PIP install cloudpickle psutil pyyaml packaging
fi

# --- Horovod: built from the sdist once per (Horovod, torch, Python, MPI, CUDA), then cached. ---
horovod_sound() {
  "$VENV/bin/horovodrun" --check-build 2>/dev/null | "$PY" -c '
import re, sys
text = sys.stdin.read()
ok = all(re.search(r"\[X\] " + name, text) for name in ("PyTorch", "MPI", "Gloo"))
sys.exit(0 if ok else 1)'
}

build_key() {
  "$PY" - <<'PYEOF'
import platform, subprocess, torch
mpi = subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout.splitlines()
mpi = mpi[0].replace(" ", "_").replace("(", "").replace(")", "") if mpi else "nompi"
cuda = torch.version.cuda if torch.cuda.is_available() else "cpu"
print(f"torch-{torch.__version__}_py{platform.python_version()}_{mpi}_cuda-{cuda}".replace("/", "_"))
PYEOF
}

if "$PY" -c "import horovod, sys; sys.exit(horovod.__version__ != '$HOROVOD_VERSION')" 2>/dev/null && horovod_sound; then
  say "Horovod $HOROVOD_VERSION already built with PyTorch, MPI and Gloo"
else
  KEY="horovod-${HOROVOD_VERSION}_$(build_key)"
  WHEEL_DIR="$HVDLLM_CACHE/wheels/$KEY"
  if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    say "building Horovod $HOROVOD_VERSION from the PyPI sdist (a few minutes; cached as $KEY)"
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    $PIP download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$WORK"
    tar -xzf "$WORK"/horovod-"$HOROVOD_VERSION".tar.gz -C "$WORK"
    SRC="$WORK/horovod-$HOROVOD_VERSION"
    # Horovod 0.28.1 pins C++14; PyTorch >= 2.1 headers need C++17.
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
    export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
      say "torch sees CUDA: building NCCL operations"
      export HOROVOD_GPU_OPERATIONS=NCCL
      # pip's torch ships NCCL as the nvidia-nccl package; point Horovod at it unless set.
      NCCL_DIR=$("$PY" -c "import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))" 2>/dev/null || true)
      if [ -z "${HOROVOD_NCCL_HOME:-}" ] && [ -n "$NCCL_DIR" ]; then
        export HOROVOD_NCCL_INCLUDE="$NCCL_DIR/include" HOROVOD_NCCL_LIB="$NCCL_DIR/lib"
      fi
    fi
    MAKEFLAGS="-j$(nproc)" $PIP wheel --no-build-isolation --no-deps "$SRC" -w "$WORK/wheel" \
      > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; die "Horovod build failed (log above)"; }
    mkdir -p "$WHEEL_DIR.tmp"
    cp "$WORK"/wheel/horovod-*.whl "$WHEEL_DIR.tmp/"
    rm -rf "$WHEEL_DIR" && mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
  else
    say "using cached Horovod wheel $KEY"
  fi
  $PIP install --force-reinstall --no-deps "$WHEEL_DIR"/horovod-*.whl
  horovod_sound || { "$VENV/bin/horovodrun" --check-build >&2 || true; \
    die "Horovod was built without PyTorch, MPI or Gloo (see --check-build above); remove $WHEEL_DIR and retry"; }
  say "Horovod $HOROVOD_VERSION installed with PyTorch, MPI and Gloo"
fi

# --- hvdllm itself, editable, so the source tree is what runs. ---
if ! "$PY" -c "import hvdllm" 2>/dev/null || [ ! -x "$VENV/bin/hvdllm" ]; then
  $PIP install --no-deps --no-build-isolation -e .
fi
say "ready: $VENV/bin/hvdllm"
