"""The front-end interface: everything a VLModel needs to know about how images reach the LLM."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from ..config import FrontendConfig
from ..errors import ConfigError, DataError
from ..vision_towers import TowerSpec, VisionTower
from .layout import ImageLayout, TowerShrink


@dataclass
class Embedded:
    """What a front-end makes of a tokenized prompt and its images, for one LLM call."""

    inputs_embeds: torch.Tensor  # [B, T, D], images spliced in
    image_hidden_states: torch.Tensor | None = None  # the images' embeddings [N_img, T_img, D]
    # keywords of every LLM call over these prompts (decode steps included) that a deep-fusion
    # front-end's hooks read inside the layers (`llm_calls.VISUAL_MEMORY`)
    call_kwargs: dict[str, Any] = field(default_factory=dict)


IMAGE_TOKEN = "<image>"  # the placeholder token of the front-ends that fill one token per image feature


class Frontend(nn.Module, ABC):
    """Turns images into something the LLM consumes.

    The processing half is an `ImageLayout` computed from the config alone (`image_layout`); the model
    half is this module. Early-fusion front-ends splice embeddings into `inputs_embeds` at placeholder
    tokens; the default `embed` does that with one `masked_scatter` after a strict count check.
    Deep-fusion front-ends also hook into the LLM's layers in `attach`; `embed` runs before every LLM call
    (training forward, generation prefill), so it is where they set the visual memory those hooks read.
    """

    fusion_kind: Literal["early", "deep"] = "early"  # deep: images also enter inside the LLM's layers
    # True when `embed` leaves state for the LLM's layers that holds one row per sample of the batch it
    # embedded: such a batch cannot gain or lose rows mid-generation (the server runs it statically).
    batch_state: bool = False

    def __init__(
        self,
        config: FrontendConfig,
        text_config: PretrainedConfig,
        layout: ImageLayout | None = None,
        *,
        load_weights: bool = True,  # False: pretrained parts start random (a checkpoint fills them)
    ) -> None:
        super().__init__()
        self.config = config
        self.layout = layout or type(self).image_layout(config)
        self.text_hidden_size = text_config.hidden_size
        self.image_token_id: int | None = None
        self.special_token_ids: list[int] = []

    @classmethod
    @abstractmethod
    def image_layout(cls, config: FrontendConfig, shrink: TowerShrink | None = None) -> ImageLayout:
        """How one image enters the sequence under `config`, computed without building anything.

        `shrink` is set when a tower reducer merges the tower's tokens (`image_layout(VLConfig)`); front-ends
        that cannot take a shorter tower sequence refuse it with `refuse_shrink`.
        """

    @classmethod
    def refuse_shrink(cls, config: FrontendConfig, shrink: TowerShrink | None) -> None:
        if shrink is not None:
            raise tower_reduction_refused(config.type)

    def bind_tokenizer(self, tokenizer) -> None:
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.layout.image_token)
        self.special_token_ids = tokenizer.convert_tokens_to_ids(list(self.layout.special_tokens))

    def attach(self, language_model: nn.Module) -> None:
        """Install hooks inside the LLM (deep fusion); early-fusion front-ends need none."""

    # -- model side ------------------------------------------------------------------------
    @abstractmethod
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images -> LLM-width embeddings [N_img, T_img, D]."""

    def group_paths(self) -> dict[str, str]:
        """Named parts a training stage can freeze, LoRA-wrap or train fully -> attribute path."""
        return {}

    def trained_token_ids(self) -> list[int]:
        """Added tokens whose LLM embedding rows carry meaning, so they train even under LoRA on the LLM
        (PEFT trainable tokens). Placeholders that `embed` overwrites need none."""
        return []

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions holding image content [B, T] (bool): what in-LLM reducers may route or prune."""
        return input_ids == self.image_token_id

    def reducible_tower(self, reducer: str) -> tuple[VisionTower, int]:
        """The vision tower a tower reducer may patch in place, and its input size.

        Front-ends whose later stages need the tower's full 2-D grid (crop stitching, multiscale pooling,
        a learned per-position embedding) or that have no tower refuse (their `image_layout` refuses the
        reducer's count too).
        """
        raise tower_reduction_refused(self.config.type)

    def resolved_config(self) -> FrontendConfig:
        """This front-end's config with every pretrained reference replaced by what a checkpoint holds."""
        return self.config

    def embed(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, pixel_values) -> Embedded:
        """`inputs_embeds` with the image embeddings spliced into the placeholder positions."""
        mask = input_ids == self.image_token_id  # [B, T]
        n_slots = int(mask.sum())
        if pixel_values is None or len(pixel_values) == 0:
            if n_slots:
                raise DataError(
                    f"the batch has {n_slots} image placeholder tokens but no images; pass the pixel_values "
                    "that VLProcessor returns with the input_ids, or remove the placeholders"
                )
            return Embedded(inputs_embeds)
        features = self.encode(pixel_values)
        return Embedded(self.scatter(input_ids, inputs_embeds, features), features)

    def scatter(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """Place `features` [N_img, T_img, D] at the placeholder positions, after a strict count check."""
        mask = input_ids == self.image_token_id  # [B, T]
        n_slots = int(mask.sum())
        features = features.to(inputs_embeds.dtype)
        n_images, per_image = features.shape[:2]
        if n_slots != n_images * per_image:
            raise DataError(
                f"image placeholder count mismatch: {n_slots} {self.layout.image_token!r} tokens in "
                f"input_ids but {n_images} images x {per_image} tokens = {n_images * per_image} "
                "features; build inputs with VLProcessor so each <image> expands to the front-end's token "
                "count, and do not truncate inside an image"
            )
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features.reshape(-1, features.shape[-1]))


def tower_reduction_refused(frontend: str) -> ConfigError:
    return ConfigError(
        f"a tower reducer (turbo, tome) shortens the vision tower's token sequence, which the {frontend!r} "
        "front-end does not support; use it with the 'llava' front-end, or use an in-LLM reducer "
        "(pmod, fastv)"
    )


class TowerFrontend(Frontend):
    """A front-end built on one `VisionTower` (llava, inf_llava, adem_vl): the tower, its geometry
    (`TowerSpec`) and the resolved config live here once."""

    def __init__(self, config: FrontendConfig, *args, load_weights: bool = True, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.spec = TowerSpec.from_config(config.vision)
        self.vision_tower = VisionTower(self.spec, load_weights=load_weights)

    @property
    def tower_size(self) -> int:
        """The side in pixels of the images the tower sees."""
        return self.spec.input_size(self.config.image)

    def tower_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The tower's features [N, T, C] and grid (h, w), with the pixels cast to the tower's dtype."""
        dtype = next(self.vision_tower.parameters()).dtype
        return self.vision_tower(pixel_values.to(dtype))

    def group_paths(self) -> dict[str, str]:
        return {"vision_tower": "vision_tower.model"}

    def resolved_config(self) -> FrontendConfig:
        resolved = self.config.model_copy(deep=True)
        resolved.vision = self.vision_tower.resolved_config()
        resolved.image.size = self.tower_size
        processor = self.layout.image_processor
        resolved.image.mean, resolved.image.std = processor.mean, processor.std
        return resolved
