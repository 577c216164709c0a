#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite. GPU tests skip without a GPU.
# Extra arguments go to pytest (e.g. -m slow, -k blockmask).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
