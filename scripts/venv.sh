#!/usr/bin/env bash
# The venv of the dependency set VLBRIDGE_DEPS names (see scripts/install.sh): .venv for the lock.
deps="${VLBRIDGE_DEPS:-locked}"
if [ "$deps" = locked ]; then echo .venv; else echo ".venv-$deps"; fi
