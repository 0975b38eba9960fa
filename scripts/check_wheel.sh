#!/usr/bin/env bash
# Build the wheel, install it into a clean venv and import every package from outside the source tree.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$root/.venv/bin/python" -m pip wheel -q --no-deps -w "$work/dist" "$root"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q -c "$root/constraints.txt" "$work"/dist/vlbridge-*.whl
cd "$work"
"$work/venv/bin/python" - <<'PY'
import importlib, pathlib, vlbridge
packages = ["vlbridge", "vlbridge.data", "vlbridge.frontends", "vlbridge.reducers", "vlbridge.training",
            "vlbridge.eval", "vlbridge.serve", "vlbridge.eval.vqa", "vlbridge.cli", "vlbridge.modeling",
            "vlbridge.eval.tasks", "vlbridge.eval.metrics", "vlbridge.eval.loaders", "vlbridge.eval.backends"]
for name in packages:
    module = importlib.import_module(name)
    assert "site-packages" in module.__file__, (name, module.__file__)
# Eval suites and task YAMLs are package data: the installed package must find and validate them.
from vlbridge.eval.tasks import SUITE_DIR, load_suite
assert "site-packages" in str(SUITE_DIR) and (SUITE_DIR / "shapes.yaml").is_file(), SUITE_DIR
assert [t.name for t in load_suite("shapes")[1]] == ["shapes_vqa", "shapes_caption"]
print("wheel install OK:", pathlib.Path(vlbridge.__file__).parent)
PY
"$work/venv/bin/vlbridge" --help > /dev/null
echo "vlbridge CLI from the wheel OK"
