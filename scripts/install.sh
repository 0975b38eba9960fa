#!/usr/bin/env bash
# Create a venv (if needed) and install vlbridge into it, with torch pinned to the CPU build.
# Usage: bash scripts/install.sh [extras]     e.g. bash scripts/install.sh dev
#
# VLBRIDGE_DEPS picks the dependency set (CI tests all three):
#   locked  (default) constraints.txt, the exact set the suite last passed on, into .venv
#   newest  the newest versions pyproject.toml's ranges allow (pip install -U), into .venv-newest
#   lowest  every runtime dependency at its range's lower bound, into .venv-lowest
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
deps="${VLBRIDGE_DEPS:-locked}"
venv="$(bash scripts/venv.sh)"
spec="."
[ -n "$extras" ] && spec=".[$extras]"
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
case "$deps" in
    locked) cp constraints.txt "$pins"; upgrade=() ;;
    # torch stays pinned: an unpinned torch pulls gigabytes of CUDA packages
    newest) grep '^torch==' constraints.txt > "$pins"; upgrade=(--upgrade --upgrade-strategy eager) ;;
    lowest) python3 scripts/lowest_pins.py > "$pins"; upgrade=() ;;
    *) echo "VLBRIDGE_DEPS must be locked, newest or lowest, not '$deps'" >&2; exit 2 ;;
esac
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade -c "$pins" pip
"$venv/bin/python" -m pip install -q "${upgrade[@]}" -c "$pins" -e "$spec"
