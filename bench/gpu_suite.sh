#!/usr/bin/env bash
# Every GPU figure in one command (see bench/gpu_suite.py): bash bench/gpu_suite.sh [--device cpu --quick]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
exec "$PYTHON" bench/gpu_suite.py "$@"
