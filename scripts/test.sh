#!/usr/bin/env bash
# Install vlbridge with its dev, eval and serve extras and run the test suite offline (tiny random models only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev,eval,serve
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
HF_HOME="$(mktemp -d)"
export HF_HOME
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
