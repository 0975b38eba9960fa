#!/usr/bin/env bash
# Install vlbridge with its dev, eval, serve and deepspeed extras and run the test suite offline (tiny random
# models only).
# VLBRIDGE_DEPS=newest|lowest runs it on the newest / lowest versions the ranges allow (scripts/install.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev,eval,serve,deepspeed
venv="$(bash scripts/venv.sh)"
# System packages the tests drive: Java (pycocoevalcap's tokenizer and METEOR), Chromium (the chat page).
if ! command -v java > /dev/null; then
    apt-get update -q && apt-get install -y -q default-jre-headless
fi
if [ ! -x /usr/bin/chromium ]; then
    apt-get update -q && apt-get install -y -q chromium
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
HF_HOME="$(mktemp -d)"
export HF_HOME
"$venv/bin/python" - <<'PY'
import importlib.metadata as metadata, sys
names = ["torch", "transformers", "tokenizers", "peft", "accelerate", "datasets", "huggingface_hub", "numpy",
         "pydantic", "fastapi", "openai", "deepspeed"]
print(f"dependencies (python {sys.version.split()[0]}):",
      " ".join(f"{n}=={metadata.version(n)}" for n in names), flush=True)
PY
"$venv/bin/ruff" check .
"$venv/bin/python" -m pytest -q "$@"
