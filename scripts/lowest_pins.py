"""Constraints for VLBRIDGE_DEPS=lowest: each runtime dependency (core, serve, eval, deepspeed) pinned at its
range's lower bound, the dev tools and torch as constraints.txt locks them; the rest resolves to the newest
that fits."""

import re
from pathlib import Path

import tomllib

root = Path(__file__).resolve().parents[1]
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
extras = project["optional-dependencies"]
runtime = [*project["dependencies"], *extras["serve"], *extras["eval"], *extras["deepspeed"]]
pins = {}
for requirement in runtime:
    name, low = re.match(r"([A-Za-z0-9_.-]+)\s*(?:>=|==)\s*([^,;\s]+)", requirement).groups()
    pins[name.lower()] = f"{name}=={low}"
locked = (root / "constraints.txt").read_text().splitlines()
for requirement in extras["dev"]:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group().lower()
    pins[name] = next(line for line in locked if line.lower().startswith(f"{name}=="))
print("\n".join(pins.values()))
