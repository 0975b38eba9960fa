"""Checkpoint directories: Hugging Face-native files, written atomically, loaded back exactly.

Layout: `config.json` (resolved VLConfig), `llm/` (base LLM, loadable by AutoModelForCausalLM),
`frontend.safetensors`, `reducers.safetensors` (reducer parameters such as p-MoD routers, if any),
`adapters/<group>/` (PEFT adapters, if any), tokenizer files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from peft import PeftModel
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from .config import VLConfig, format_validation_error
from .errors import ConfigError
from .lora import clean_state_dict

CONFIG_FILE = "config.json"
FRONTEND_FILE = "frontend.safetensors"
REDUCERS_FILE = "reducers.safetensors"


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temp dir beside `path`; on success it replaces `path` in one rename (old copy removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: Path, path: Path) -> None:
    """Put the finished directory `tmp` at `path` by renames only (an older `path` is removed after)."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model(model, path, tokenizer=None, *, state: dict | None = None) -> None:
    """Write the whole model (and tokenizer) into `path` atomically; `state` as in `write_model_files`."""
    with atomic_dir(path) as tmp:
        write_model_files(model, tmp, tokenizer, state=state)


def write_model_files(model, out: Path, tokenizer=None, *, state: dict | None = None, weights: bool = True):
    """`state`: the whole model's weights under its own names, when the module does not hold them itself
    (gathered from shards). `weights=False` writes only config and tokenizer (a sharded training
    checkpoint keeps its weights in the shards)."""
    if weights:
        _write_weights(model, out, model.state_dict() if state is None else _tied_as_in(model, state))
    resolved = model.config.model_copy(deep=True)
    resolved.llm.name_or_path, resolved.llm.config = "llm", {}
    resolved.frontend = model.frontend.resolved_config()
    (out / CONFIG_FILE).write_text(json.dumps(resolved.model_dump(mode="json"), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def _tied_as_in(model, state: dict) -> dict:
    """`state` with the names of one shared parameter (tied embeddings) holding one tensor again, as the
    module's own state dict does: a state gathered from shards has a copy under each name, which
    `save_pretrained` would then write twice."""
    state = dict(state)
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for first, *others in names.values():
        for name in others:
            if first in state and name in state:
                state[name] = state[first]
    return state


def _write_weights(model, out: Path, state: dict) -> None:
    def part(path: str) -> dict:
        return {k[len(path) + 1 :]: v for k, v in state.items() if k.startswith(path + ".")}

    llm = model.language_model
    base = llm.get_base_model() if isinstance(llm, PeftModel) else llm
    base.save_pretrained(out / "llm", state_dict=clean_state_dict(part("language_model")))
    frontend = clean_state_dict(part("frontend"))
    save_file({k: v.contiguous() for k, v in frontend.items()}, str(out / FRONTEND_FILE))
    reducer_state = clean_state_dict(part("reducers"))
    if reducer_state:
        save_file({k: v.contiguous() for k, v in reducer_state.items()}, str(out / REDUCERS_FILE))
    paths = model.group_paths()
    for group, module in model.lora_groups().items():
        module.save_pretrained(str(out / "adapters" / group), state_dict=part(paths[group]))


def read_config(path, reducers: list | None = None) -> VLConfig:
    """The resolved VLConfig a checkpoint was saved with, its LLM pointed at the checkpoint's `llm/`.

    `reducers` (config sections or dicts) are added to those the checkpoint already has: training-free
    ones (turbo, tome, fastv) switch on for any trained model this way.
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{path} is not a vlbridge checkpoint (no {CONFIG_FILE}); pass a run or checkpoint dir"
        )
    config = VLConfig.model_validate_json((path / CONFIG_FILE).read_text())
    if config.llm.name_or_path and not Path(config.llm.name_or_path).is_absolute():
        local = path / config.llm.name_or_path
        if local.exists():
            config.llm.name_or_path = str(local)
    return add_reducers(config, reducers) if reducers else config


def add_reducers(config: VLConfig, reducers: list) -> VLConfig:
    """`config` with `reducers` (sections or dicts, e.g. from `--reducer`) after its own."""
    try:
        config.reducers = [*config.reducers, *reducers]
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "--reducer options", what="reducer")) from None
    return config


def load_weights(model, path, *, saved_reducers: int, device: str = "cpu") -> None:
    """Fill a model built from the checkpoint's config with its trained weights and adapters; only the
    first `saved_reducers` reducers have saved parameters (the rest were added at load time)."""
    path = Path(path)
    state = load_file(str(path / FRONTEND_FILE), device=str(device))
    model.frontend.load_state_dict(state, strict=True)
    if (path / REDUCERS_FILE).is_file():
        state = load_file(str(path / REDUCERS_FILE), device=str(device))
        model.reducers[:saved_reducers].load_state_dict(state, strict=True)
    adapters = path / "adapters"
    for group_dir in sorted(adapters.iterdir()) if adapters.is_dir() else []:
        module = model.get_group(group_dir.name)
        model.set_group(group_dir.name, PeftModel.from_pretrained(module, str(group_dir), is_trainable=False))


def resolve_checkpoint(path) -> Path:
    """A checkpoint dir itself, a run dir's final `model/`, or else the run's latest training checkpoint."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / "model" / CONFIG_FILE).is_file():
        return path / "model"
    found = sorted((path / "checkpoints").glob(f"step-*/{CONFIG_FILE}"))
    if found:
        return found[-1].parent
    raise ConfigError(
        f"no vlbridge model under {path}: expected {CONFIG_FILE}, model/ or checkpoints/step-*/"
    )
