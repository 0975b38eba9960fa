"""VLModel: an unmodified Hugging Face causal LLM plus a front-end and optional token reducers.

`forward` splices image embeddings into `inputs_embeds` and calls the LLM with labels;
`generate` does the same for the prompt and then decodes with the LLM's ordinary KV cache.
Reducers attach after the front-end and patch the tower or decoder layers in place.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .checkpoint import save_model
from .config import VLConfig
from .errors import ConfigError
from .families import choose_attention, choose_dtype
from .frontends.base import Embedded, Frontend
from .frontends.layout import image_layout
from .llm_calls import KEY_BIAS, VISUAL_MASK, every_call
from .lora import merge
from .reducers.base import Meter, Reducer
from .registry import FRONTENDS, REDUCERS


def text_config_of(llm: PreTrainedModel):
    return llm.config.get_text_config()


def build_llm(config: VLConfig, tokenizer, device: str = "cpu", dtype: torch.dtype | None = None):
    """The causal LM: pretrained (name/path) or from a config dict sized to the tokenizer. On the meta
    device a pretrained LLM is built from its config alone (shapes, no weights read)."""
    cfg = config.llm
    kwargs = {"attn_implementation": choose_attention(cfg.attn_implementation, device)}
    dtype = dtype or choose_dtype(cfg.dtype, device)
    if cfg.name_or_path is not None and device != "meta":
        llm = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=dtype, **kwargs, **cfg.config)
    elif cfg.name_or_path is not None:
        hf_config = AutoConfig.from_pretrained(cfg.name_or_path, **cfg.config)
        llm = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **kwargs)
    else:
        hf_config = AutoConfig.for_model(cfg.model_type, **cfg.config)
        # sized to the tokenizer unless the config says (an imported checkpoint's padded vocabulary)
        if "vocab_size" not in cfg.config:
            hf_config.vocab_size = len(tokenizer)
        for name in ("bos", "eos", "pad"):
            if cfg.config.get(f"{name}_token_id") is None:
                setattr(hf_config, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
        llm = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **kwargs)
    if llm.get_input_embeddings().num_embeddings < len(tokenizer):
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=device != "meta")
    return llm


@dataclass
class VLModelOutput(CausalLMOutputWithPast):
    """The LLM's output plus what the front-end made of the images, as transformers' VLMs return it."""

    # [N_img, V, D]; where counts differ per image, llava_next packs them [1, ΣV, D], solo gives [ΣV, D]
    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class LLMInputs:
    """Everything one LLM call over a prompt needs, made in one place (`VLModel.llm_inputs`): `forward`,
    `generate` and the serving engine all call the LLM with these."""

    inputs_embeds: torch.Tensor  # [B, T, D], images spliced in
    attention_mask: torch.Tensor  # [B, T], 1 = real token
    position_ids: torch.Tensor | None  # [B, T]; None: the LLM counts positions itself
    image_hidden_states: torch.Tensor | None  # the front-end's output (as VLModelOutput's)
    visual_mask: torch.Tensor | None  # [B, T] bool, where in-LLM reducers read which tokens are visual
    key_bias: torch.Tensor | None  # [B, T] log size of merged visual tokens, for the size bias
    frontend_kwargs: dict[str, Any]  # what a deep-fusion front-end's hooks read in every call (decode too)

    def plugin_kwargs(self) -> dict[str, Any]:
        """vlbridge's own keywords of the LLM call, which transformers hands down to the decoder layers and
        the attention function, where the plug-ins inside the LLM read them."""
        given = {VISUAL_MASK: self.visual_mask, KEY_BIAS: self.key_bias}
        return {**{name: value for name, value in given.items() if value is not None}, **self.frontend_kwargs}

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the LLM call."""
        positions = {} if self.position_ids is None else {"position_ids": self.position_ids}
        return {
            "inputs_embeds": self.inputs_embeds,
            "attention_mask": self.attention_mask,
            **positions,
            **self.plugin_kwargs(),
        }


class VLModel(nn.Module):
    """language_model (any AutoModelForCausalLM, possibly PEFT-wrapped) + frontend."""

    def __init__(
        self,
        config: VLConfig,
        language_model: PreTrainedModel,
        frontend: Frontend,
        reducers: list[Reducer] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.language_model = language_model
        self.frontend = frontend
        self.reducers = nn.ModuleList(reducers or [])
        self.meter: Meter | None = None  # set a Meter to record what the reducers do
        frontend.attach(language_model)
        for reducer in self.reducers:
            reducer.attach(self)

    @classmethod
    def from_config(
        cls,
        config: VLConfig,
        tokenizer,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        load_weights: bool = True,
    ):
        """Build a fresh model; the tokenizer must already hold the front-end's special tokens.

        `dtype` overrides the config's choice (training keeps fp32 master weights under autocast).
        `device="meta"` builds the structure only, reading no weights and allocating no memory: sharded
        training builds it so on all but one rank, which sends its weights to the others.
        """
        with torch.device("meta") if device == "meta" else nullcontext():
            llm = build_llm(config, tokenizer, device, dtype)
            frontend_cls = FRONTENDS.get(config.frontend.type)
            layout = image_layout(config)
            load_weights = load_weights and device != "meta"
            frontend = frontend_cls(config.frontend, text_config_of(llm), layout, load_weights=load_weights)
            frontend.bind_tokenizer(tokenizer)
            dtype = llm.get_input_embeddings().weight.dtype
            reducers = [REDUCERS.get(section.type)(section) for section in config.reducers]
            return cls(config, llm, frontend.to(dtype), [r.to(dtype) for r in reducers]).to(device)

    def save_pretrained(self, path, tokenizer=None) -> None:
        """Write a checkpoint directory atomically (`vlbridge.factory.load_pretrained` opens it)."""
        save_model(self, path, tokenizer)

    def activation_checkpointing(self) -> list[str]:
        """Recompute the LLM's decoder layers and the vision tower's blocks in backward (transformers'
        non-reentrant checkpointing, through PEFT wrappers); returns the parts that support it."""
        options = {"use_reentrant": False}
        self.language_model.activation_checkpointing_enable(options)
        parts = ["llm"]
        tower = getattr(self.frontend, "vision_tower", None)
        if tower is not None and tower.model.supports_gradient_checkpointing:
            tower.model.activation_checkpointing_enable(options)
            parts.append("vision_tower")
        return parts

    @property
    def keeps_batch_state(self) -> bool:
        """True when a batch's rows are tied together until it is done: a deep-fusion front-end's per-row
        memory, or in-LLM reducers' per-layer caches of different lengths."""
        return self.frontend.batch_state or any(not reducer.aligned_cache for reducer in self.reducers)

    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    def group_paths(self) -> dict[str, str]:
        """Named parts a training stage can freeze, LoRA-wrap or train fully -> attribute path."""
        return {
            "llm": "language_model",
            **{k: f"frontend.{v}" for k, v in self.frontend.group_paths().items()},
            **{
                k: f"reducers.{i}.{v}"
                for i, reducer in enumerate(self.reducers)
                for k, v in reducer.group_paths().items()
            },
        }

    def get_group(self, name: str) -> nn.Module:
        return self.get_submodule(self._group_path(name))

    def set_group(self, name: str, module: nn.Module) -> None:
        parent, _, attr = self._group_path(name).rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, attr, module)

    def _group_path(self, name: str) -> str:
        paths = self.group_paths()
        if name not in paths:
            raise ConfigError(f"unknown module group {name!r}; this model has: {', '.join(paths)}")
        return paths[name]

    def lora_groups(self) -> dict[str, PeftModel]:
        return {name: m for name in self.group_paths() if isinstance(m := self.get_group(name), PeftModel)}

    def merge_lora(self) -> VLModel:
        """Fold every LoRA adapter into its base weights (other trained modules are untouched)."""
        for name, module in self.lora_groups().items():
            self.set_group(name, merge(module))
        return self

    def llm_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values=None,
        image_features: torch.Tensor | None = None,
    ) -> LLMInputs:
        """The one path from a tokenized prompt (and its images) to what the LLM is called with.

        `image_features` [N_img, T_img, D]: the front-end's `encode` of the images, made beforehand (the
        server's encoder cache reuses them), for front-ends whose `embed` is the default splice.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        token_embeds = self.language_model.get_input_embeddings()(input_ids)
        if image_features is None:
            embedded = self.frontend.embed(input_ids, token_embeds, pixel_values)
        else:
            embedded = Embedded(
                self.frontend.scatter(input_ids, token_embeds, image_features), image_features
            )
        visual = self.frontend.visual_mask(input_ids)
        routed = any(reducer.reads_visual_mask for reducer in self.reducers) and bool(visual.any())
        return LLMInputs(
            inputs_embeds=embedded.inputs_embeds,
            attention_mask=attention_mask,
            position_ids=self._image_positions(input_ids, attention_mask, visual),
            image_hidden_states=embedded.image_hidden_states,
            frontend_kwargs=embedded.call_kwargs,
            visual_mask=visual if routed else None,
            key_bias=self._key_bias(input_ids, visual),
        )

    def position_after(self, tokens: int, images: int) -> int:
        """The RoPE position of the token after a prompt's first `tokens` tokens, which hold `images` whole
        images: each image keeps the reducers' `image_span` positions (`_image_positions`)."""
        span = self._from_reducers("image_span")
        return tokens if span is None else tokens + images * (span - self.frontend.layout.num_image_tokens())

    def _from_reducers(self, method: str) -> Any:
        """The first contribution of the reducers' `method` (None: none contributes)."""
        return next((v for r in self.reducers if (v := getattr(r, method)()) is not None), None)

    def _image_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: torch.Tensor
    ) -> torch.Tensor | None:
        """The prompt's RoPE positions [B, T] when images keep a span other than their token count, else
        None (the LLM counts positions itself).

        Each image keeps the reducers' `image_span` positions, so the text after a reduced image sits where
        it would after the full one: a model that learned where the question is still finds it. Its tokens
        sit at the reducers' `image_positions` (each merged token at its representative patch's position),
        or spread evenly over the span.
        """
        span = self._from_reducers("image_span")
        if span is None:
            return None
        tokens = self.frontend.layout.num_image_tokens()
        images = int(visual.sum()) // tokens
        offsets = self._from_reducers("image_positions") if images else None
        if offsets is None:
            if span == tokens:
                return None
            offsets = (torch.arange(tokens, device=input_ids.device) * span // tokens).expand(images, -1)
        if offsets.shape != (images, tokens):
            raise RuntimeError(
                f"the reducer's image positions {tuple(offsets.shape)} are not those of the prompt's "
                f"{images} images of {tokens} tokens"
            )
        offsets = offsets.to(input_ids.device)
        following = torch.cat([offsets[:, 1:], offsets.new_full((images, 1), span)], dim=1)
        first = torch.zeros_like(offsets, dtype=torch.bool)
        first[:, 0] = True
        widths = torch.ones_like(input_ids)  # positions each token advances the next one by
        widths[visual] = (following - offsets.masked_fill(first, 0)).flatten()
        widths = widths * attention_mask.to(widths.dtype)
        lead = torch.zeros_like(input_ids)  # an image's first token may sit after its span's start
        lead[visual] = offsets.masked_fill(~first, 0).flatten()
        return widths.cumsum(-1) - widths + lead

    def _key_bias(self, input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor | None:
        """log of the patches each visual token stands for, at its position [B, T] (0 on text); None when
        no reducer weighs tokens by size or the prompt has no image."""
        sizes = self._from_reducers("image_sizes") if visual.any() else None
        if sizes is None:
            return None
        if sizes.numel() != int(visual.sum()):
            raise RuntimeError(
                f"the reducer's token sizes {tuple(sizes.shape)} are not those of the prompt's "
                f"{int(visual.sum())} visual tokens"
            )
        bias = torch.zeros(input_ids.shape, device=input_ids.device)
        bias[visual] = sizes.to(bias.device, torch.float32).log().flatten()
        return bias

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values=None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> VLModelOutput:
        inputs = self.llm_inputs(input_ids, attention_mask, pixel_values)
        out = self.language_model(**{**inputs.kwargs(), **kwargs}, labels=labels)
        return VLModelOutput(**out, image_hidden_states=inputs.image_hidden_states)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pixel_values=None, **kwargs
    ) -> torch.Tensor:
        """New tokens only, [B, T_new]. Prompts must be left-padded (VLProcessor does that).

        The front-end's special tokens (image placeholders, markers) are never generated. `generate` takes
        no model keywords it does not know, so the plug-ins' keywords join each of its forward calls.
        """
        inputs = self.llm_inputs(input_ids, attention_mask, pixel_values)
        kwargs.setdefault("suppress_tokens", self.frontend.special_token_ids)
        call = {k: v for k, v in inputs.kwargs().items() if k not in inputs.plugin_kwargs()}
        with every_call(self.language_model, **inputs.plugin_kwargs()):
            return self.language_model.generate(**{**call, **kwargs})
