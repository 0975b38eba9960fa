"""The front-end interface: everything a VLModel needs to know about how images reach the LLM."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from ..config import FrontendConfig, ImageConfig
from ..errors import ConfigError, DataError
from ..image_processing import ImageProcessor
from ..vision_towers import VisionTower


class Frontend(nn.Module, ABC):
    """Turns images into something the LLM consumes.

    Early-fusion front-ends splice embeddings into `inputs_embeds` at placeholder tokens; the
    default `embed` does that with one `masked_scatter` after a strict count check. Deep-fusion
    front-ends also hook into the LLM's layers in `attach`; `embed` runs before every LLM call (training
    forward, generation prefill), so it is where they set the visual memory those hooks read.
    """

    image_token: str = "<image>"
    fusion_kind: Literal["early", "deep"] = "early"  # deep: images also enter inside the LLM's layers
    # True when `embed` leaves state for the LLM's layers that holds one row per sample of the batch it
    # embedded: such a batch cannot gain or lose rows mid-generation (the server runs it statically).
    batch_state: bool = False

    def __init__(self, config: FrontendConfig, text_config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.text_hidden_size = text_config.hidden_size
        self.image_token_id: int | None = None
        self.special_token_ids: list[int] = []

    # -- processing side -------------------------------------------------------------------
    @property
    @abstractmethod
    def image_processor(self) -> ImageProcessor:
        """PIL -> pixel tensor for one image."""

    @abstractmethod
    def num_image_tokens(self, pixels: torch.Tensor) -> int:
        """How many placeholder tokens one processed image occupies in the LLM sequence."""

    @classmethod
    def tokens_for(cls, config: FrontendConfig) -> list[str]:
        """Special tokens this front-end needs in the vocabulary (known before the model is built)."""
        return [cls.image_token]

    def special_tokens(self) -> list[str]:
        return type(self).tokens_for(self.config)

    def bind_tokenizer(self, tokenizer) -> None:
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.special_token_ids = tokenizer.convert_tokens_to_ids(self.special_tokens())

    def attach(self, language_model: nn.Module) -> None:
        """Install hooks inside the LLM (deep fusion); early-fusion front-ends need none."""

    def placeholder(self, pixels: torch.Tensor) -> str:
        """The text that stands for one processed image after `<image>` expansion."""
        return self.image_token * self.num_image_tokens(pixels)

    def collate(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(pixels)

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

    def reduce_tower(self, patch: Callable[[VisionTower], None], reducer: str) -> int:
        """Let a tower reducer patch this front-end's vision tower, then recount the placeholders; returns
        the count per image before the patch (the span a reducer may keep the image's positions on).

        Front-ends whose later stages need the tower's full 2-D grid (crop stitching, multiscale
        pooling, a learned per-position embedding) or that have no tower refuse.
        """
        raise ConfigError(
            f"reducer {reducer!r} shortens the vision tower's token sequence, which the "
            f"{self.config.type!r} front-end does not support; use it with the 'llava' front-end, or "
            "use an in-LLM reducer (pmod, fastv)"
        )

    def resolved_config(self) -> FrontendConfig:
        """This front-end's config with every pretrained reference replaced by what a checkpoint holds."""
        return self.config

    def embed(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, pixel_values
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(`inputs_embeds` [B, T, D] with image embeddings spliced into the placeholder positions, the
        image embeddings [N_img, T_img, D] or None without images)."""
        mask = input_ids == self.image_token_id  # [B, T]
        n_slots = int(mask.sum())
        if pixel_values is None or len(pixel_values) == 0:
            if n_slots:
                raise DataError(
                    f"the batch has {n_slots} image placeholder tokens but no images; pass the pixel_values "
                    "that VLProcessor returns with the input_ids, or remove the placeholders"
                )
            return inputs_embeds, None
        features = self.encode(pixel_values)
        return self.scatter(input_ids, inputs_embeds, features), features

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
                f"image placeholder count mismatch: {n_slots} {self.image_token!r} tokens in input_ids but "
                f"{n_images} images x {per_image} tokens = {n_images * per_image} "
                "features; build inputs with VLProcessor so each <image> expands to the front-end's token "
                "count, and do not truncate inside an image"
            )
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features.reshape(-1, features.shape[-1]))


# -- shared by front-ends built on a VisionTower ---------------------------------------------------------
def tower_input_size(tower: VisionTower, image: ImageConfig) -> int:
    """The tower's input side in pixels: frontend.image.size, else the one in the tower's config."""
    size = image.size or tower.native_image_size
    if size is None:
        raise ConfigError(
            f"frontend.image.size (the tower's input size) is required for a {tower.hf_config.model_type} "
            "tower (its config has no image_size)"
        )
    return size


def tower_image_processor(tower: VisionTower, image: ImageConfig, size: int) -> ImageProcessor:
    """Images to `size` pixels, normalised as frontend.image says or else as the tower's family expects."""
    return ImageProcessor(
        size=size,
        mean=image.mean or tower.family.mean,
        std=image.std or tower.family.std,
        resize=image.resize,
        resample=image.resample,
    )


@torch.no_grad()
def probe_tower(tower: VisionTower, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The tower's features [1, N, C] and grid (h, w) for one blank `size`-pixel image, run in eval mode."""
    was_training = tower.training
    tower.eval()
    features, grid = tower(torch.zeros(1, 3, size, size))
    tower.train(was_training)
    return features, grid
