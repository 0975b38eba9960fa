"""Typed model configuration: the single source of truth that recipes and checkpoints instantiate.

`VLConfig` describes a whole vision-language model (LLM, front-end, reducers). Sections whose
`type` names a registered component are validated by that component's own config class, so an
unknown key anywhere is an error that names it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    model_validator,
)

from .errors import ConfigError
from .registry import FRONTENDS, REDUCERS, Registry


def format_validation_error(err: ValidationError, source: str, what: str = "recipe") -> str:
    """A pydantic error as one line per wrong field: where, what is wrong, and what was given."""
    lines = [f"invalid {what} {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        seen = e.get("input")
        shown = repr(seen) if not isinstance(seen, dict) else "{...}"
        lines.append(f"  {loc}: {e['msg']} (got {shown[:80]})")
    return "\n".join(lines)


class Strict(BaseModel):
    """Base of every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class Typed(Strict):
    """A config section whose `type` selects a registered component."""

    type: str


def dispatch_on_type(registry: Registry[Any], base: type[Typed]):
    def validate(value: Any) -> Any:
        if isinstance(value, str):
            value = {"type": value}
        if isinstance(value, Typed):
            value = value.model_dump()
        if isinstance(value, dict) and isinstance(value.get("type"), str):
            cls = registry.config_class(value["type"]) or base
            return cls.model_validate(value)
        return value

    return BeforeValidator(validate)


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: nested dicts are merged, everything else replaced."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class LLMConfig(Strict):
    """Which causal LLM to wrap: a hub id / local path, or a transformers config built from scratch."""

    name_or_path: str | None = None
    model_type: str = "llama"
    config: dict[str, Any] = Field(default_factory=dict)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class VisionTowerConfig(Strict):
    """A transformers vision backbone (CLIP, SigLIP, ConvNeXt, ResNet, ...), pretrained or from config."""

    name_or_path: str | None = None
    model_type: str = "clip_vision_model"
    config: dict[str, Any] = Field(default_factory=dict)
    # the hidden state the front-end reads; a list (ViTs) concatenates several along channels (LLaVA's
    # vision_feature_layer as a list)
    feature_layer: int | list[int] = -2
    feature_select: Literal["patch", "cls_patch"] = "patch"
    # conv: a ViT's patchify convolution becomes a small conv stack (vision_stems.py); for towers from scratch
    stem: Literal["patch", "conv"] = "patch"
    # sincos: a ViT's position table starts as 2D sine-cosine rows (vision_positions.py); from scratch only
    position_init: Literal["learned", "sincos"] = "learned"

    @model_validator(mode="after")
    def _from_scratch_options(self) -> VisionTowerConfig:
        if self.name_or_path is None:
            return self
        for key, value, default, what in (
            ("stem", self.stem, "patch", "patch embedding"),
            ("position_init", self.position_init, "learned", "position table"),
        ):
            if value != default:
                raise ConfigError(
                    f"vision.{key}={value!r} would throw away the {what} of the pretrained tower "
                    f"{self.name_or_path!r}; it is for towers trained from scratch (leave name_or_path unset "
                    f"and give model_type + config), or keep {key}={default!r}"
                )
        return self


class ConnectorConfig(Strict):
    """Maps vision features to the LLM width; `merge=2` first concatenates 2x2 neighbours (4x fewer)."""

    type: str = "mlp2x_gelu"
    merge: int = Field(default=1, ge=1)
    position_embedding: bool = False  # learned per-token embedding: CNN towers carry no absolute position
    # mlp2x_gelu's activation: a name in transformers' ACT2FN (LLaVA's projector_hidden_act)
    act: str = "gelu"
    bias: bool = True  # biases on the projection layers (LLaVA's multimodal_projector_bias)


class ImageConfig(Strict):
    """How a PIL image becomes pixels: square resize (or pad to square first) and normalisation."""

    size: int | None = None
    # squash: to size x size; pad: to a square of the mean colour first; crop: shortest edge to size, then
    # the centre size x size (CLIP's image processor)
    resize: Literal["squash", "pad", "crop"] = "squash"
    resample: Literal["bilinear", "bicubic", "nearest"] = "bicubic"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


class FrontendConfig(Typed):
    """Base of every front-end config (how images reach the LLM)."""

    type: str = "llava"


class ReducerConfig(Typed):
    """Base of every token-reducer config (how many visual tokens the model pays for)."""


class TokenizerConfig(Strict):
    """A pretrained tokenizer, or a byte-level BPE trained on the recipe's text (from-scratch recipes)."""

    name_or_path: str | None = None
    train_vocab_size: int | None = Field(default=None, ge=64)
    chat_template: str | None = None


# How conversations mark where an image goes, unless a model's config says otherwise (`image_token`):
# LLaVA's data convention, used by vlbridge's data formats and eval requests.
IMAGE_MARKER = "<image>"


class VLConfig(Strict):
    """A whole vision-language model: saved as `config.json` in every checkpoint."""

    llm: LLMConfig = Field(default_factory=LLMConfig)
    frontend: Annotated[SerializeAsAny[FrontendConfig], dispatch_on_type(FRONTENDS, FrontendConfig)] = Field(
        default={"type": "llava"}, validate_default=True
    )
    reducers: list[Annotated[SerializeAsAny[ReducerConfig], dispatch_on_type(REDUCERS, ReducerConfig)]] = (
        Field(default_factory=list)
    )
    image_token: str = IMAGE_MARKER  # the marker this model's conversations use where an image goes
    # How the chat template takes a message's content: text with image markers, or transformers' list of
    # {"type": "image"} / {"type": "text", "text": ...} parts (the templates of imported LLaVA checkpoints)
    chat_content: Literal["text", "parts"] = "text"
    # Where chat front-ends (CLI, server) put images relative to the user's text; match the training data.
    image_position: Literal["before", "after"] = "before"
    max_length: int = Field(default=2048, ge=8)
