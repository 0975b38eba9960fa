"""transformers' LLaVA layouts (`LlavaForConditionalGeneration` + `LlavaProcessor` and the LLaVA-NeXT pair,
the `llava-hf` checkpoints that transformers, vLLM, SGLang and TGI load), in and out.

Import maps the checkpoint onto a vlbridge `llava` model: the tower and LLM configs as they are, the
feature layer(s) and select strategy, the projector (activation, bias), the image processor's resize /
crop / pad and normalisation, the tokenizer and the processor's chat template (content parts). Weights are
read with safetensors and renamed; nothing is downloaded unless `path` is a hub id and the machine is online.

Export writes the same layout from a vlbridge `llava` model whose every part has a transformers
counterpart, and refuses, naming the part, when one has none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, PretrainedConfig

from ..config import VLConfig
from ..errors import ConfigError
from ..factory import assemble
from ..frontends.base import IMAGE_TOKEN
from .weights import read_safetensors, rename

ARCHITECTURE = "LlavaForConditionalGeneration"
# transformers' model_type -> vlbridge front-end
FRONTENDS = {"llava": "llava", "llava_next": "llava_next"}
_CLS_TOWERS = {"clip_vision_model"}  # towers whose first token is a CLS token
_RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_CODES = {name: code for code, name in _RESAMPLE_NAMES.items()}
# transformers' config keys that describe the checkpoint, not the architecture
NOT_ARCHITECTURE = {
    "model_type",
    "architectures",
    "transformers_version",
    "_name_or_path",
    "dtype",
    "torch_dtype",
}
# their state-dict prefixes (the legacy layout transformers still writes, then the current one) -> ours
PREFIXES = [
    ("language_model.model.", "language_model.model."),
    ("model.language_model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.", "frontend.vision_tower.model."),
    ("model.vision_tower.", "frontend.vision_tower.model."),
    ("multi_modal_projector.linear_1.", "frontend.connector.proj.0."),
    ("model.multi_modal_projector.linear_1.", "frontend.connector.proj.0."),
    ("multi_modal_projector.linear_2.", "frontend.connector.proj.2."),
    ("model.multi_modal_projector.linear_2.", "frontend.connector.proj.2."),
    ("image_newline", "frontend.image_newline.weight"),  # LLaVA-NeXT
    ("model.image_newline", "frontend.image_newline.weight"),
]


def detect(path: Path) -> bool:
    config = _read_json(path / "config.json")
    # the original LLaVA repository also wrote model_type "llava"; its configs name the tower instead
    return config.get("model_type") in FRONTENDS and "mm_vision_tower" not in config


def architecture_dict(config: PretrainedConfig) -> dict[str, Any]:
    """A sub-model's transformers config as the `config:` of a vlbridge section."""
    return {k: v for k, v in config.to_dict().items() if k not in NOT_ARCHITECTURE}


def vl_config(path: Path, processor) -> VLConfig:
    """The vlbridge config of the checkpoint at `path`: transformers' config plus its processor's settings."""
    hf = AutoConfig.from_pretrained(str(path))
    strategy = hf.vision_feature_select_strategy
    tower = hf.vision_config.model_type
    if strategy == "default" and tower not in _CLS_TOWERS:
        raise ConfigError(
            f"{path}: vision_feature_select_strategy 'default' drops the first token of a {tower} tower, "
            "which has no CLS token (it drops a patch); vlbridge reproduces 'default' on CLIP towers only"
        )
    if processor.image_token != IMAGE_TOKEN:
        raise ConfigError(
            f"{path}: the processor's image token is {processor.image_token!r}; vlbridge's llava front-end "
            f"fills {IMAGE_TOKEN!r} placeholders"
        )
    template = processor.chat_template or processor.tokenizer.chat_template
    frontend = FRONTENDS[hf.model_type]
    image = image_section(processor.image_processor, path)
    extra = {}
    if frontend == "llava_next":  # tiles fit by resizing and padding, the base view squashed
        image["resize"] = "squash"
        extra["image_grid_pinpoints"] = [list(pair) for pair in hf.image_grid_pinpoints]
    text = architecture_dict(hf.text_config)
    if text.get("final_logit_softcapping") is not None:  # Gemma-2: transformers' LLaVA takes the bare
        text["final_logit_softcapping"] = None  # lm_head's logits
    return VLConfig.model_validate(
        {
            "llm": {"model_type": hf.text_config.model_type, "config": text},
            "frontend": {
                "type": frontend,
                "vision": {
                    "model_type": tower,
                    "config": architecture_dict(hf.vision_config),
                    "feature_layer": hf.vision_feature_layer,
                    # 'full' keeps every token: the CLS token where the tower has one
                    "feature_select": "cls_patch" if strategy == "full" and tower in _CLS_TOWERS else "patch",
                },
                "connector": {
                    "type": "mlp2x_gelu",
                    "act": hf.projector_hidden_act,
                    "bias": hf.multimodal_projector_bias,
                },
                "image": image,
                **extra,
            },
            "chat_content": "parts" if template and "'type'" in template.replace('"', "'") else "text",
            "max_length": getattr(hf.text_config, "max_position_embeddings", None) or 4096,
        }
    )


def image_section(image_processor, path: Path) -> dict[str, Any]:
    """transformers' CLIP / LLaVA image processor settings as a vlbridge `image:` section."""
    size, crop = dict(image_processor.size or {}), dict(getattr(image_processor, "crop_size", None) or {})
    pad = bool(getattr(image_processor, "do_pad", False))
    cropping = bool(getattr(image_processor, "do_center_crop", False))
    if "shortest_edge" in size:
        side = size["shortest_edge"]
        square_crop = crop.get("height") == crop.get("width") == side
        if not (cropping and square_crop) and not pad:
            raise ConfigError(
                f"{path}: the image processor resizes the shortest edge to {side} and crops to "
                f"{crop or 'nothing'}; vlbridge reproduces a centre crop of the same side (CLIP's processor) "
                "or padding to square"
            )
    elif size.get("height") == size.get("width") and size.get("height"):
        side = size["height"]
        if cropping and crop != {"height": side, "width": side}:
            raise ConfigError(
                f"{path}: a {side}px resize followed by a {crop} crop has no vlbridge equivalent"
            )
    else:
        raise ConfigError(
            f"{path}: image processor size {size} is not square; vlbridge's llava needs square input"
        )
    resample = int(getattr(image_processor, "resample", 3))
    if resample not in _RESAMPLE_NAMES:
        raise ConfigError(f"{path}: image resample mode {resample} is not one of {sorted(_RESAMPLE_NAMES)}")
    return {
        "size": side,
        "resize": "pad" if pad else ("crop" if "shortest_edge" in size else "squash"),
        "resample": _RESAMPLE_NAMES[resample],
        "mean": tuple(image_processor.image_mean),
        "std": tuple(image_processor.image_std),
    }


def load(
    path: Path, *, device: str = "cpu", dtype: torch.dtype | None = None, reducers=None, max_length=None
):
    """(model in eval mode, processor) from a transformers LLaVA checkpoint directory."""
    hf_processor = AutoProcessor.from_pretrained(str(path))
    config = vl_config(path, hf_processor)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if hf_processor.chat_template:
        tokenizer.chat_template = hf_processor.chat_template
    state = rename(read_safetensors(path), PREFIXES, path)
    # tied as the weights are, whatever the text config says: transformers' LLaVA-NeXT keeps a separate
    # lm_head even for LLMs that tie theirs
    head = state.get("language_model.lm_head.weight")
    table = state["language_model.model.embed_tokens.weight"]
    config.llm.config["tie_word_embeddings"] = head is None or torch.equal(head, table)
    return assemble(
        config, tokenizer, state, device=device, dtype=dtype, reducers=reducers, max_length=max_length
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# -- export ---------------------------------------------------------------------------------------------
def parts_template(template: str, marker: str, position: str) -> str:
    """`template` (which takes text content with image markers) behind a preamble that turns transformers'
    content parts into that text, images laid out as vlbridge's processor lays them (`place_images`)."""
    joined = "(images ~ '\\n' ~ text)" if position == "before" else "(text ~ '\\n' ~ images)"
    return (
        "{%- set ns = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set ns.messages = ns.messages + [message] -%}"
        "{%- else -%}{%- set parts = namespace(images=[], texts=[]) -%}"
        "{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{%- set parts.images = parts.images + ['{marker}'] -%}}"
        "{%- elif part['type'] == 'text' -%}{%- set parts.texts = parts.texts + [part['text']] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set text = parts.texts | join('\\n') -%}{%- set images = parts.images | join('\\n') -%}"
        f"{{%- if images and text -%}}{{%- set text = {joined} -%}}"
        "{%- elif images -%}{%- set text = images -%}{%- endif -%}"
        "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': text}] -%}"
        "{%- endif -%}{%- endfor -%}{%- set messages = ns.messages -%}" + template
    )


def refuse_unless_exportable(model, processor) -> None:
    """A ConfigError naming the first part of `model` that transformers' LLaVA has no counterpart for."""
    config = model.config
    frontend = config.frontend
    reasons = []
    if frontend.type not in FRONTENDS.values():
        reasons.append(
            f"the {frontend.type!r} front-end (transformers' LLaVA and LLaVA-NeXT are vlbridge's 'llava' "
            "and 'llava_next')"
        )
    else:
        vision, connector = frontend.vision, frontend.connector
        if vision.model_type not in ("clip_vision_model", "siglip_vision_model"):
            reasons.append(f"a {vision.model_type} tower (LLaVA takes CLIP or SigLIP towers)")
        if vision.stem != "patch":
            reasons.append("vision.stem='conv' (transformers' towers patchify with one convolution)")
        if vision.position_init != "learned":
            reasons.append(f"vision.position_init={vision.position_init!r}")
        plain = connector.merge == 1 and not connector.position_embedding
        if connector.type not in ("linear", "mlp2x_gelu") or not plain:
            reasons.append("a connector other than linear / mlp2x_gelu without merge or position embedding")
    if config.reducers:
        reasons.append(f"active reducers {[r.type for r in config.reducers]} (LLaVA runs every visual token)")
    if model.lora_groups():
        reasons.append("unmerged LoRA adapters (export with --merge-lora)")
    if getattr(model.language_model.config.get_text_config(), "final_logit_softcapping", None) is not None:
        reasons.append("the LLM's final_logit_softcapping (LLaVA takes the bare lm_head's logits)")
    if processor.image_token != IMAGE_TOKEN:
        reasons.append(f"image_token={processor.image_token!r} (LlavaProcessor expands {IMAGE_TOKEN!r})")
    if reasons:
        raise ConfigError(
            "this model cannot be written as transformers' LlavaForConditionalGeneration: "
            + "; ".join(reasons)
            + "; keep --format vlbridge"
        )


_CLASSES = ("Config", "ForConditionalGeneration", "ImageProcessorPil", "Processor")


def image_processor_settings(frontend) -> dict[str, Any]:
    """The settings of transformers' (CLIP-style) image processor that reproduce the front-end's pixels."""
    image = frontend.config.image
    processor = frontend.layout.image_processor
    side = frontend.tower_size
    square = {"height": side, "width": side}
    anyres = frontend.config.type == "llava_next"  # tiles padded; the crop is a no-op on its views
    crop = image.resize == "crop"
    return {
        "size": {"shortest_edge": side} if crop or anyres else square,
        "crop_size": square,
        "do_center_crop": crop or anyres,
        "do_pad": image.resize == "pad" or anyres,
        "image_mean": list(processor.mean),
        "image_std": list(processor.std),
        "resample": _RESAMPLE_CODES[image.resample],
    }


def export(model, processor, out: Path) -> None:
    """Write `model` (LoRA merged) and its processor as a LlavaForConditionalGeneration (or, for llava_next,
    LlavaNextForConditionalGeneration) checkpoint that transformers' AutoProcessor and model class load
    without vlbridge."""
    import transformers

    from ..checkpoint import atomic_dir

    refuse_unless_exportable(model, processor)
    prefix = "LlavaNext" if model.config.frontend.type == "llava_next" else "Llava"
    classes = {part: getattr(transformers, prefix + part) for part in _CLASSES}
    next_only = {}
    if prefix == "LlavaNext":
        next_only = {"image_grid_pinpoints": [list(pair) for pair in model.frontend.anyres.pinpoints]}
    frontend, tower = model.frontend, model.frontend.vision_tower
    llm, connector = model.language_model, frontend.config.connector
    has_cls = tower.family.has_cls
    strategy = "default" if has_cls and frontend.config.vision.feature_select == "patch" else "full"
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    hf_config = classes["Config"](
        **next_only,
        text_config=llm.config.get_text_config(),
        vision_config=tower.hf_config,
        image_token_id=image_token_id,
        vision_feature_layer=frontend.config.vision.feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=connector.act if connector.type == "mlp2x_gelu" else "linear",
        multimodal_projector_bias=connector.bias,
        **({} if next_only else {"image_seq_length": frontend.layout.num_image_tokens()}),
        tie_word_embeddings=llm.config.get_text_config().tie_word_embeddings,
    )
    hf = classes["ForConditionalGeneration"](hf_config).eval()
    hf.model.language_model.load_state_dict(llm.base_model.state_dict())
    hf.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    hf.model.vision_tower.load_state_dict(tower.model.state_dict())
    projector = hf.model.multi_modal_projector
    if connector.type == "mlp2x_gelu":
        projector.linear_1.load_state_dict(frontend.connector.proj[0].state_dict())
        projector.linear_2.load_state_dict(frontend.connector.proj[2].state_dict())
    else:  # linear: the second layer is the identity (exact)
        projector.linear_1.load_state_dict(frontend.connector.proj.state_dict())
        with torch.no_grad():
            projector.linear_2.weight.copy_(torch.eye(projector.linear_2.weight.shape[0]))
            if projector.linear_2.bias is not None:
                projector.linear_2.bias.zero_()
    if next_only:
        with torch.no_grad():
            hf.model.image_newline.copy_(frontend.image_newline.weight)
    images = classes["ImageProcessorPil"](**image_processor_settings(frontend), **next_only)
    template = processor.tokenizer.chat_template
    if processor.chat_content == "text":
        template = parts_template(template, IMAGE_TOKEN, processor.image_position)
    hf_processor = classes["Processor"](
        image_processor=images,
        tokenizer=processor.tokenizer,
        patch_size=tower.hf_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(has_cls),
        chat_template=template,
    )
    with atomic_dir(out) as tmp:
        hf.save_pretrained(tmp)
        hf_processor.save_pretrained(tmp)
