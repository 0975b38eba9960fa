#!/usr/bin/env bash
# Create .venv (if needed) and install vlbridge into it, with torch pinned to the CPU build.
# Usage: bash scripts/install.sh [extras]     e.g. bash scripts/install.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install -q -c constraints.txt -e "$spec"
