#!/usr/bin/env bash
# The main job: install, train a small VLM from scratch on synthetic shapes, evaluate it, then chat with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/vlbridge train recipes/quickstart.yaml --overwrite "$@"
.venv/bin/vlbridge chat runs/quickstart --image runs/quickstart/examples/example-0.png "What color is the circle?"
