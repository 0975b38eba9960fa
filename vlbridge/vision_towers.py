"""Vision backbones from transformers, behind one interface: pixels in, a [B, N, C] feature grid out.

ViTs (CLIP, SigLIP) return token sequences, CNNs (ConvNeXt, ResNet) return feature maps; the small
per-family table below says where the features are and which normalisation the family expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from .config import VisionTowerConfig
from .errors import ConfigError
from .registry import VISION_TOWERS
from .vision_positions import install_sincos_positions
from .vision_stems import install_conv_stem

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TowerFamily:
    """What differs between backbone families: token layout, CLS token, default normalisation."""

    layout: str  # "tokens" ([B, N, C]) or "grid" ([B, C, H, W])
    has_cls: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


for _name, _family in {
    "clip_vision_model": TowerFamily("tokens", True, CLIP_MEAN, CLIP_STD),
    "siglip_vision_model": TowerFamily("tokens", False, HALF, HALF),
    "siglip2_vision_model": TowerFamily("tokens", False, HALF, HALF),
    "convnext": TowerFamily("grid", False, IMAGENET_MEAN, IMAGENET_STD),
    "convnextv2": TowerFamily("grid", False, IMAGENET_MEAN, IMAGENET_STD),
    "resnet": TowerFamily("grid", False, IMAGENET_MEAN, IMAGENET_STD),
}.items():
    VISION_TOWERS.register(_name)(_family)

# Multimodal configs whose vision half is what a user usually means by e.g. "openai/clip-vit-base-patch32".
_VISION_SUBCONFIG = {
    "clip": "clip_vision_model",
    "siglip": "siglip_vision_model",
    "siglip2": "siglip2_vision_model",
}


def load_tower_config(cfg: VisionTowerConfig):
    """The transformers config of the tower, from a path/hub id or built from `model_type` + overrides."""
    if cfg.name_or_path is None:
        return AutoConfig.for_model(cfg.model_type, **cfg.config)
    hf_config = AutoConfig.from_pretrained(cfg.name_or_path)
    if hf_config.model_type in _VISION_SUBCONFIG:
        hf_config = hf_config.vision_config
    for key, value in cfg.config.items():
        setattr(hf_config, key, value)
    return hf_config


class VisionTower(nn.Module):
    """A transformers backbone plus feature-layer selection; returns [B, N, C] and the (h, w) grid."""

    def __init__(self, cfg: VisionTowerConfig, *, load_weights: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        hf_config = load_tower_config(cfg)
        self.family: TowerFamily = VISION_TOWERS.get(hf_config.model_type)
        if cfg.feature_select == "cls_patch" and not self.family.has_cls:
            raise ConfigError(
                f"vision.feature_select='cls_patch' but {hf_config.model_type} has no CLS token; use 'patch'"
            )
        if cfg.name_or_path is not None and load_weights:
            self.model = AutoModel.from_pretrained(cfg.name_or_path, config=hf_config)
        else:
            self.model = AutoModel.from_config(hf_config)
        if cfg.stem == "conv":
            install_conv_stem(self.model, hf_config.model_type)
        if cfg.position_init == "sincos":
            install_sincos_positions(self.model, hf_config.model_type, self.family.has_cls)
        self.hf_config = self.model.config

    def resolved_config(self) -> VisionTowerConfig:
        """Same tower, described by its full config instead of a hub id (weights come from the checkpoint)."""
        exclude = {"model_type", "transformers_version", "architectures", "_name_or_path"}
        config = {k: v for k, v in self.hf_config.to_dict().items() if k not in exclude}
        return self.cfg.model_copy(
            update={"name_or_path": None, "model_type": self.hf_config.model_type, "config": config}
        )

    @property
    def native_image_size(self) -> int | None:
        return getattr(self.hf_config, "image_size", None)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.family.layout == "grid":  # oneDNN convolutions run ~15% faster on channels-last input
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[self.cfg.feature_layer]
        if self.family.layout == "grid":  # [B, C, H, W] -> [B, H*W, C]
            b, c, h, w = hidden.shape
            return hidden.flatten(2).transpose(1, 2), (h, w)
        if self.family.has_cls and self.cfg.feature_select == "patch":
            hidden = hidden[:, 1:]  # [B, N, C] without CLS
        n = hidden.shape[1] - (1 if self.cfg.feature_select == "cls_patch" else 0)
        side = int(round(n**0.5))
        return hidden, (side, n // max(side, 1))
