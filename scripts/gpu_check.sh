#!/usr/bin/env bash
# The GPU checks in one call of the `device` tool (issue: serving and GPU figures):
#   run: bash scripts/gpu_check.sh        carry: [".whl"]        timeout_s: 540
# The machine has its own torch and transformers and reaches no registry: vlbridge installs from this
# checkout without dependencies, and the few it lacks (pydantic, FastAPI, uvicorn...) come as wheels that
# `bash scripts/gpu_check.sh --fetch-wheels` downloads here into .whl/ (ignored by git) beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
# the lock's versions of what the machine lacks
mapfile -t WHEELS < <(grep -E '^(pydantic|pydantic_core|annotated-types|annotated-doc|typing-inspection|fastapi|starlette|uvicorn)==' constraints.txt)
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    exit 0
fi
PYTHON="${PYTHON:-python3}"  # PYTHON=.venv/bin/python: a dry run on this CPU
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PYTHON" -c "import pydantic, fastapi, uvicorn" 2>/dev/null ||
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
"$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/vlbridge .
export PYTHONPATH=/tmp/vlbridge:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia-smi.csv" || true
"$PYTHON" scripts/gpu_check.py --output "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
