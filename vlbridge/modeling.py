"""VLModel: an unmodified Hugging Face causal LLM plus a front-end and optional token reducers.

`forward` splices image embeddings into `inputs_embeds` and calls the LLM with labels;
`generate` does the same for the prompt and then decodes with the LLM's ordinary KV cache.
Reducers attach after the front-end and patch the tower or decoder layers in place.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import VLConfig
from .errors import ConfigError
from .families import choose_attention, choose_dtype
from .frontends.base import Frontend
from .lora import merge
from .reducers.base import Meter, Reducer
from .registry import FRONTENDS, REDUCERS


def text_config_of(llm: PreTrainedModel):
    return llm.config.get_text_config()


def build_llm(config: VLConfig, tokenizer, device: str = "cpu", dtype: torch.dtype | None = None):
    """The causal LM: pretrained (name/path) or from a config dict sized to the tokenizer."""
    cfg = config.llm
    kwargs = {"attn_implementation": choose_attention(cfg.attn_implementation, device)}
    dtype = dtype or choose_dtype(cfg.dtype, device)
    if cfg.name_or_path is not None:
        llm = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=dtype, **kwargs, **cfg.config)
    else:
        hf_config = AutoConfig.for_model(cfg.model_type, **cfg.config)
        hf_config.vocab_size = len(tokenizer)
        for name in ("bos", "eos", "pad"):
            setattr(hf_config, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
        llm = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **kwargs)
    if llm.get_input_embeddings().num_embeddings < len(tokenizer):
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return llm


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
        # RoPE positions one image spans when a tower reducer keeps the dense layout (None: its token count)
        self.image_span: int | None = None
        self._visual_mask: torch.Tensor | None = None
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
        """
        llm = build_llm(config, tokenizer, device, dtype)
        frontend_cls = FRONTENDS.get(config.frontend.type)
        frontend = frontend_cls(config.frontend, text_config_of(llm), load_weights=load_weights)
        frontend.bind_tokenizer(tokenizer)
        dtype = llm.get_input_embeddings().weight.dtype
        reducers = [REDUCERS.get(section.type)(section) for section in config.reducers]
        return cls(config, llm, frontend.to(dtype), [r.to(dtype) for r in reducers]).to(device)

    @classmethod
    def from_pretrained(cls, path, *, device: str = "cpu"):
        from .checkpoint import load_model

        return load_model(path, device=device)[0]

    def save_pretrained(self, path, tokenizer=None) -> None:
        from .checkpoint import save_model

        save_model(self, path, tokenizer)

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

    def embed(self, input_ids: torch.Tensor, pixel_values=None) -> torch.Tensor:
        """Token embeddings with image features spliced in: [B, T, D]."""
        inputs_embeds = self.language_model.get_input_embeddings()(input_ids)
        self._visual_mask = self.frontend.visual_mask(input_ids) if len(self.reducers) else None
        return self.frontend.embed(input_ids, inputs_embeds, pixel_values)

    def visual_mask_for(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Which positions of the sequence an LLM layer is running on are visual tokens [B, T] (bool).

        None when the layer sees something other than the prompt `embed` last prepared: decode steps
        (new text tokens only) and text-only batches. Beam search and `num_return_sequences` repeat each
        prompt consecutively, so the prompt's mask is repeat-interleaved to the LLM's batch.
        """
        mask = self._visual_mask
        if mask is None or hidden_states.shape[1] != mask.shape[1] or not mask.any():
            return None
        batch = hidden_states.shape[0]
        if batch != mask.shape[0]:
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
        return mask

    def position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The prompt's RoPE positions [B, T] when images keep a span other than their token count, else
        None (the LLM counts positions itself).

        Each image's tokens spread evenly over `image_span` positions, so the text after a reduced image
        sits where it would after the full one: a model that learned where the question is still finds it.
        """
        span = self.image_span
        if span is None or span == (tokens := self.frontend.num_image_tokens(None)):
            return None
        visual = self.frontend.visual_mask(input_ids)
        index = (visual.long().cumsum(-1) - 1) % tokens  # each visual token's index within its image
        widths = torch.where(visual, (index + 1) * span // tokens - index * span // tokens, 1)
        if attention_mask is not None:
            widths = widths * attention_mask.to(widths.dtype)
        return widths.cumsum(-1) - widths

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values=None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        inputs_embeds = self.embed(input_ids, pixel_values)
        kwargs.setdefault("position_ids", self.position_ids(input_ids, attention_mask))
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs
        )

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pixel_values=None, **kwargs
    ) -> torch.Tensor:
        """New tokens only, [B, T_new]. Prompts must be left-padded (VLProcessor does that).

        The front-end's special tokens (image placeholders, markers) are never generated.
        """
        inputs_embeds = self.embed(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.setdefault("suppress_tokens", self.frontend.special_token_ids)
        # generate continues given positions by one per new token
        kwargs.setdefault("position_ids", self.position_ids(input_ids, attention_mask))
        return self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
        )
