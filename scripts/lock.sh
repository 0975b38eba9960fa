#!/usr/bin/env bash
# Write the newest versions pyproject.toml's ranges allow into constraints.txt, the lock every script
# installs through. Run the suite on them first: VLBRIDGE_DEPS=newest bash scripts/test.sh; this freezes
# the .venv-newest that run used. Raise an upper bound in pyproject.toml only past versions it passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(VLBRIDGE_DEPS=newest bash scripts/venv.sh)"
[ -x "$venv/bin/python" ] || { echo "no $venv: run VLBRIDGE_DEPS=newest bash scripts/test.sh first" >&2; exit 1; }
{
    echo "# The lock: every package the scripts install, at the versions the suite passed on ($(date +%F))."
    echo "# Written by scripts/lock.sh; torch is the CPU build (an unpinned torch pulls gigabytes of CUDA packages)."
    "$venv/bin/python" -m pip freeze --all --exclude-editable | sed -e 's/^torch==\([^+]*\)+.*/torch==\1/'
} > constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pins"
