"""The original LLaVA repository's layout (haotian-liu/LLaVA: `LlavaLlamaForCausalLM`,
`LlavaMistralForCausalLM`, e.g. liuhaotian/llava-v1.5-7b), import only.

Such a checkpoint is a plain Llama / Mistral (config at the top level, weights under `model.*` and
`lm_head.*`) plus `mm_*` keys and the projector's weights (`model.mm_projector.*`). The CLIP tower is not in
it: `mm_vision_tower` names a CLIP checkpoint (hub id or path) whose weights and image processor the
original code loads (`CLIPVisionModel` / `CLIPImageProcessor.from_pretrained`); only a checkpoint trained
with the tower unfrozen carries it (`model.vision_tower.vision_tower.*`), and then those weights are used.

What the original code does at inference, and how it maps onto a vlbridge `llava` model:
  - `mm_vision_select_layer` / `mm_vision_select_feature` ('patch' drops CLS, 'cls_patch' keeps it) ->
    `vision.feature_layer` / `vision.feature_select`;
  - `mm_projector_type` 'linear' (one Linear), 'mlp1x_gelu' (the same Linear under `.0`), 'mlp2x_gelu'
    (Linear, exact GELU, Linear) -> the `linear` / `mlp2x_gelu` connector, with biases;
  - `process_images`: `image_aspect_ratio` 'pad' is `expand2square` with the processor's mean colour, then
    CLIP's processor (shortest edge + centre crop of the same side) -> `image.resize: pad`; anything else but
    'anyres' is CLIP's processor alone -> `image.resize: crop`;
  - `tokenizer_image_token` tokenizes the prompt's pieces between `<image>` markers separately and splices
    the image features at IMAGE_TOKEN_INDEX (-200). Here `<image>` is a special token of the tokenizer
    saved beside the weights (added when missing: its embedding rows are appended, the mean of the others,
    so the logits keep one extra, never-winning column), and each image fills as many placeholders as it
    has features: the same embedding sequence, checked on a probe prompt when loading
    (`_match_image_chunks`);
  - the prompt is conversation.py's SeparatorStyle.TWO ("{system} USER: <image>\\n{question} ASSISTANT:",
    a reply closed by "</s>", `chat_template`) with the `vicuna_v1` system prompt LLaVA-1.5 was trained and
    evaluated with (`llava_v1`'s on request).

Refused, naming the key: `mm_use_im_start_end`, projectors deeper than two layers or other than a Linear
/ GELU MLP ('identity', resamplers), LLaVA-NeXT's 'anyres' / `mm_patch_merge_type` 'spatial*', S2 towers,
towers other than CLIP, MPT LLMs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPVisionModel

from ..config import VLConfig
from ..errors import ConfigError
from ..factory import assemble
from ..frontends.base import IMAGE_TOKEN
from ..tokenization import add_frontend_tokens
from .llava_hf import NOT_ARCHITECTURE, architecture_dict, image_section
from .weights import INDEX, read_safetensors, rename

ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
MODEL_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}

# conversation.py's system prompts of the SeparatorStyle.TWO templates ("v1" / "vicuna_v1" is the one
# LLaVA-1.5 was trained with and scripts/v1_5/eval/*.sh pass as --conv-mode; run_llava.py picks "llava_v1")
SYSTEMS = {
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
}
DEFAULT_CONV_MODE = "vicuna_v1"  # what the published LLaVA-1.5 numbers (and Turbo/FastV/p-MoD on them) use

# config.json keys of the LLaVA wrapper (not of the LLM), NOT_ARCHITECTURE; anything else the LLM's config
# does not know is dropped too (`_text_config`)
_DROPPED_BUFFERS = ("rotary_emb.inv_freq", "embeddings.position_ids")  # buffers older versions saved
# a tower trained unfrozen: CLIPVisionModel's keys as transformers 4 saved them (under `vision_model.`), or as
# transformers 5 names them (PrefixChange in its conversion_mapping)
_TOWER_PREFIXES = [
    ("model.vision_tower.vision_tower.vision_model.", "frontend.vision_tower.model."),
    ("model.vision_tower.vision_tower.", "frontend.vision_tower.model."),
]
_BIN_INDEX = "pytorch_model.bin.index.json"


def detect(path: Path) -> bool:
    config = _read_json(Path(path) / "config.json")
    if "mm_vision_tower" not in config and "vision_tower" not in config:
        return False
    architectures = config.get("architectures") or []
    return config.get("model_type") in MODEL_TYPES or any(a in ARCHITECTURES for a in architectures)


def chat_template(system: str = SYSTEMS[DEFAULT_CONV_MODE]) -> str:
    """conversation.py's SeparatorStyle.TWO prompt (sep " ", sep2 "</s>") as a Jinja chat template: text
    content with `<image>` markers, a leading system message replacing `system`."""
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {json.dumps(system)} -%}}{{%- set turns = messages -%}}"
        "{%- endif -%}"
        "{{- system + ' ' -}}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}{%- set role = 'USER' -%}"
        "{%- elif message['role'] == 'assistant' -%}{%- set role = 'ASSISTANT' -%}"
        "{%- else -%}{{- raise_exception('llava_v1 conversations have user and assistant turns only') -}}"
        "{%- endif -%}"
        "{%- if message['content'] -%}"
        "{{- role + ': ' + message['content'] + (' ' if loop.index0 % 2 == 0 else '</s>') -}}"
        "{%- else -%}{{- role + ':' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


def vl_config(path: Path, *, vision_tower: str | None = None) -> VLConfig:
    """The vlbridge config of the original-layout checkpoint at `path` (`vision_tower` overrides the
    config's `mm_vision_tower`, e.g. a local copy of openai/clip-vit-large-patch14-336)."""
    path = Path(path)
    raw = _checked_config(path)
    tokenizer = _tokenizer(path, _family(raw, path), DEFAULT_CONV_MODE)
    return _vl_config(path, raw, _tower_ref(raw, vision_tower), len(tokenizer))


def load(
    path: Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    reducers=None,
    max_length=None,
    vision_tower: str | None = None,
    conv_mode: str = DEFAULT_CONV_MODE,
):
    """(model in eval mode, processor) from an original LLaVA checkpoint directory.

    `vision_tower` replaces `mm_vision_tower` (the CLIP checkpoint the original code loads the tower and
    image processor from); `conv_mode` picks the system prompt ('llava_v1' or 'vicuna_v1', conversation.py).
    """
    path = Path(path)
    raw = _checked_config(path)
    tower = _tower_ref(raw, vision_tower)
    tokenizer = _tokenizer(path, _family(raw, path), conv_mode)
    config = _vl_config(path, raw, tower, len(tokenizer))
    state = _state(path, raw, tower, config.llm.config["vocab_size"])
    head = state.get("language_model.lm_head.weight")  # tied as the weights are
    config.llm.config["tie_word_embeddings"] = head is None or torch.equal(
        head, state["language_model.model.embed_tokens.weight"]
    )
    return assemble(
        config, tokenizer, state, device=device, dtype=dtype, reducers=reducers, max_length=max_length
    )


def export(model, processor, out: Path) -> None:
    raise ConfigError(
        "llava-original is an import-only layout (the original LLaVA code is not a transformers model "
        "class); export with --format llava-hf or keep --format vlbridge"
    )


# -- config -----------------------------------------------------------------------------------------------
def _checked_config(path: Path) -> dict[str, Any]:
    """config.json, after refusing every setting whose inference path vlbridge's llava does not reproduce."""
    raw = _read_json(path / "config.json")
    if not raw:
        raise ConfigError(f"{path}: no readable config.json")
    family = _family(raw, path)
    if family not in ("llama", "mistral"):
        raise ConfigError(
            f"{path}: an original LLaVA checkpoint on a {family} LLM; vlbridge imports Llama / Mistral"
        )
    if raw.get("mm_use_im_start_end"):
        raise ConfigError(
            f"{path}: mm_use_im_start_end=true (the prompt wraps each image in <im_start> / <im_end> "
            "tokens); vlbridge imports LLaVA checkpoints trained without them (LLaVA-1.5: false)"
        )
    aspect = raw.get("image_aspect_ratio")
    if isinstance(aspect, str) and aspect.startswith("anyres"):
        raise ConfigError(
            f"{path}: image_aspect_ratio={aspect!r} is LLaVA-NeXT's tiling (image_grid_pinpoints); vlbridge "
            "imports single-image LLaVA(-1.5) checkpoints ('pad' or plain CLIP processing)"
        )
    merge = raw.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise ConfigError(
            f"{path}: mm_patch_merge_type={merge!r} (LLaVA-NeXT's spatial merging / image_newline); only "
            "'flat' is imported"
        )
    if raw.get("s2"):
        raise ConfigError(f"{path}: s2=true (multi-scale S2 tower) has no vlbridge equivalent")
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ConfigError(
            f"{path}: mm_vision_select_feature={feature!r}; the original knows 'patch' or 'cls_patch'"
        )
    _projector(raw, path)
    return raw


def _family(raw: dict[str, Any], path: Path) -> str:
    for architecture in raw.get("architectures") or []:
        if architecture in ARCHITECTURES:
            return ARCHITECTURES[architecture]
        if architecture.startswith("Llava") and architecture.endswith("ForCausalLM"):
            return architecture[len("Llava") : -len("ForCausalLM")].lower()
    if raw.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[raw["model_type"]]
    raise ConfigError(f"{path}: not an original LLaVA checkpoint (architectures {raw.get('architectures')})")


def _projector(raw: dict[str, Any], path: Path) -> tuple[str, list[tuple[str, str]]]:
    """The connector type and the projector's (theirs, ours) weight prefixes (as
    multimodal_projector/builder.py builds it)."""
    kind = raw.get("mm_projector_type", "linear")
    if kind == "linear":
        return "linear", [("model.mm_projector.", "frontend.connector.proj.")]
    depth = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if depth and int(depth.group(1)) == 1:  # the builder's one-Linear MLP: a Linear under `.0`
        return "linear", [("model.mm_projector.0.", "frontend.connector.proj.")]
    if depth and int(depth.group(1)) == 2:
        return "mlp2x_gelu", [
            ("model.mm_projector.0.", "frontend.connector.proj.0."),
            ("model.mm_projector.2.", "frontend.connector.proj.2."),
        ]
    raise ConfigError(
        f"{path}: mm_projector_type={kind!r}; vlbridge's connectors reproduce 'linear', 'mlp1x_gelu' and "
        "'mlp2x_gelu' (deeper GELU MLPs, 'identity' and other projectors have no vlbridge connector)"
    )


def _tower_ref(raw: dict[str, Any], override: str | None) -> str:
    tower = override or raw.get("mm_vision_tower") or raw.get("vision_tower")
    if not tower:
        raise ConfigError("the checkpoint's config has no mm_vision_tower (the CLIP checkpoint of its tower)")
    return str(tower)


def _tower_config(tower: str):
    try:
        config = AutoConfig.from_pretrained(tower)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"mm_vision_tower {tower!r} cannot be opened ({err}); the tower and its image processor come "
            "from that CLIP checkpoint: put it in the hub cache or pass vision_tower=<local copy>"
        ) from err
    if config.model_type == "clip":
        config = config.vision_config
    if config.model_type != "clip_vision_model":
        raise ConfigError(
            f"mm_vision_tower {tower!r} is a {config.model_type} checkpoint; the original LLaVA code loads "
            "CLIP towers (CLIPVisionModel) only"
        )
    return config


def _image_section(tower: str, aspect: str | None) -> dict[str, Any]:
    """mm_utils.process_images: expand2square with the mean colour when image_aspect_ratio == 'pad', then the
    tower's CLIPImageProcessor (shortest edge + centre crop); without 'pad', the processor alone."""
    try:
        processor = AutoImageProcessor.from_pretrained(tower)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"mm_vision_tower {tower!r} has no image processor the original code could load ({err})"
        ) from err
    pad = aspect == "pad"
    size, crop = dict(processor.size or {}), dict(getattr(processor, "crop_size", None) or {})
    cropping = bool(getattr(processor, "do_center_crop", False))
    side = size.get("shortest_edge") or size.get("height")
    if pad and cropping and crop != {"height": side, "width": side}:
        raise ConfigError(
            f"mm_vision_tower {tower!r}: padding to square, resizing to {side} and cropping to {crop} has no "
            "vlbridge equivalent (the crop must be the resize side)"
        )
    view = SimpleNamespace(
        size=size,
        crop_size=crop,
        do_pad=pad,
        do_center_crop=cropping,
        resample=getattr(processor, "resample", 3),
        image_mean=processor.image_mean,
        image_std=processor.image_std,
    )
    return image_section(view, Path(tower))


def _text_config(raw: dict[str, Any], family: str, vocab_size: int) -> dict[str, Any]:
    """The LLM's config: config.json's keys that a plain `family` config has, vocabulary grown to
    `vocab_size` when the tokenizer gained `<image>`."""
    known = set(AutoConfig.for_model(family).to_dict())
    given = {k: v for k, v in raw.items() if k in known | {"rope_theta", "rope_scaling"}}
    given = {k: v for k, v in given.items() if k not in NOT_ARCHITECTURE and v is not None}
    text = architecture_dict(AutoConfig.for_model(family, **given))
    text = {k: v for k, v in text.items() if k in known}
    text["vocab_size"] = max(int(text["vocab_size"]), vocab_size)
    return text


def _vl_config(path: Path, raw: dict[str, Any], tower: str, vocab_size: int) -> VLConfig:
    family = _family(raw, path)
    text = _text_config(raw, family, vocab_size)
    connector, _ = _projector(raw, path)
    max_length = (
        raw.get("tokenizer_model_max_length") or text.get("max_position_embeddings") or 2048
    )  # the original truncates the embedded prompt to tokenizer_model_max_length
    return VLConfig.model_validate(
        {
            "llm": {"model_type": family, "config": text},
            "frontend": {
                "type": "llava",
                "vision": {
                    "model_type": "clip_vision_model",
                    "config": architecture_dict(_tower_config(tower)),
                    "feature_layer": raw.get("mm_vision_select_layer", -1),
                    "feature_select": raw.get("mm_vision_select_feature", "patch"),
                },
                "connector": {"type": connector, "act": "gelu", "bias": True},
                "image": _image_section(tower, raw.get("image_aspect_ratio")),
            },
            "chat_content": "text",
            "image_position": "before",  # the eval scripts' DEFAULT_IMAGE_TOKEN + '\n' + question
            "max_length": int(max_length),
        }
    )


# -- tokenizer --------------------------------------------------------------------------------------------
def _tokenizer(path: Path, family: str, conv_mode: str):
    """The tokenizer saved beside the weights (the plain LLM's config tells AutoTokenizer its class where
    tokenizer_config.json does not), with `<image>`, the llava_v1 template and the original's split."""
    if conv_mode not in SYSTEMS:
        raise ConfigError(f"conv_mode={conv_mode!r}; one of {sorted(SYSTEMS)} (conversation.py)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), config=AutoConfig.for_model(family))
    except (ImportError, OSError, ValueError) as err:
        if (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
            raise ConfigError(
                f"{path}: the tokenizer is only a sentencepiece tokenizer.model (as liuhaotian/llava-v1.5-* "
                "ship it); transformers converts it with the `sentencepiece` and `protobuf` packages "
                f"(pip install sentencepiece protobuf), or save a tokenizer.json beside it ({err})"
            ) from err
        raise
    add_frontend_tokens(tokenizer, [IMAGE_TOKEN])
    tokenizer.chat_template = chat_template(SYSTEMS[conv_mode])
    _match_image_chunks(tokenizer, path)
    return tokenizer


def image_chunk_ids(prompt: str, tokenizer, image_id: int) -> list[int]:
    """mm_utils.tokenizer_image_token: the pieces between `<image>` markers tokenized one by one (BOS only
    on the first), joined by `image_id` (the original's IMAGE_TOKEN_INDEX)."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_id)
        ids.extend(chunk[offset:])
    return ids


def _whole_ids(prompt: str, tokenizer) -> list[int]:
    """The prompt tokenized in one call, as VLProcessor does (special tokens unless it starts with BOS)."""
    bos = tokenizer.bos_token
    return tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos))).input_ids


def _match_image_chunks(tokenizer, path: Path) -> None:
    """Make one-call tokenization equal the original's piecewise one around `<image>`.

    A sentencepiece-style tokenizer (Llama, Mistral) prefixes every piece the original tokenizes with "▁"
    (its dummy prefix), so the text after an image starts "▁", "\\n"; transformers' Llama tokenizer prefixes
    only the start of the text (Metaspace prepend_scheme 'first'), not the text after a special token.
    'always' prefixes each piece between special tokens, which is what the original saw; it is saved as
    `legacy: true`, which rebuilds the same pre-tokenizer on reload.
    """
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is in the image?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    want = image_chunk_ids(probe, tokenizer, image_id)
    if _whole_ids(probe, tokenizer) == want:
        return
    metaspace = _first_only_metaspace(tokenizer)
    if metaspace is not None:
        metaspace.prepend_scheme = "always"
        tokenizer.legacy = True
        tokenizer.init_kwargs["legacy"] = True
        if _whole_ids(probe, tokenizer) == want:
            return
    got = _whole_ids(probe, tokenizer)
    raise ConfigError(
        f"{path}: the tokenizer splits the prompt around {IMAGE_TOKEN!r} differently from the original "
        f"LLaVA code (which tokenizes the text between images piece by piece): {got} vs {want}"
    )


def _first_only_metaspace(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    candidates = [pre]
    for i in range(16):  # the members of a Sequence pre-tokenizer
        try:
            candidates.append(pre[i])
        except (TypeError, IndexError, AttributeError):
            break
    for candidate in candidates:
        if type(candidate).__name__ == "Metaspace" and candidate.prepend_scheme == "first":
            return candidate
    return None


# -- weights ----------------------------------------------------------------------------------------------
def _state(path: Path, raw: dict[str, Any], tower: str, vocab_size: int) -> dict[str, torch.Tensor]:
    """Every weight under vlbridge's names: the LLM and projector from the checkpoint, the tower from it
    when it holds one, else from `tower`; embeddings grown to `vocab_size` rows."""
    _, projector = _projector(raw, path)
    state = {k: v for k, v in _read_weights(path).items() if not k.endswith(_DROPPED_BUFFERS)}
    prefixes = [
        *projector,
        *_TOWER_PREFIXES,
        ("model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ]
    state = rename(state, prefixes, path)
    if not any(k.startswith("frontend.vision_tower.") for k in state):
        model = CLIPVisionModel.from_pretrained(tower)
        state.update({f"frontend.vision_tower.model.{k}": v for k, v in model.state_dict().items()})
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        weight = state.get(key)
        if weight is not None and weight.shape[0] < vocab_size:
            extra = weight.float().mean(0, keepdim=True).to(weight.dtype)
            state[key] = torch.cat([weight, extra.expand(vocab_size - weight.shape[0], -1)])
    return state


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """safetensors (model.safetensors or its index), else PyTorch's pytorch_model.bin (or its index), read
    with weights_only=True (tensors only, no code)."""
    if (path / INDEX).is_file() or (path / "model.safetensors").is_file():
        return read_safetensors(path)
    if (path / _BIN_INDEX).is_file():
        shards = sorted(set(json.loads((path / _BIN_INDEX).read_text())["weight_map"].values()))
    elif (path / "pytorch_model.bin").is_file():
        shards = ["pytorch_model.bin"]
    else:
        raise ConfigError(f"{path}: no model.safetensors, pytorch_model.bin or their shard indexes")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            state.update(torch.load(path / shard, map_location="cpu", weights_only=True, mmap=True))
        except RuntimeError:  # saved before torch's zip format: no mmap
            state.update(torch.load(path / shard, map_location="cpu", weights_only=True))
    return state


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
