"""Vision backbones from transformers, behind one interface: pixels in, a [B, N, C] feature grid out.

ViTs (CLIP, SigLIP) return token sequences, CNNs (ConvNeXt, ResNet) return feature maps; the small
per-family table below says where the features are and which normalisation the family expects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from .config import ImageConfig, VisionTowerConfig
from .errors import ConfigError
from .image_processing import ImageProcessor
from .registry import VISION_TOWERS
from .vision_positions import install_sincos_positions
from .vision_stems import install_conv_stem

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


def _vit_side(hf: PretrainedConfig, size: int, hidden: int) -> int:
    return size // hf.patch_size


def _vit_width(hf: PretrainedConfig, hidden: int) -> int:
    return hf.hidden_size


def _convnext_side(hf: PretrainedConfig, size: int, hidden: int) -> int:
    """Patchify stem (stride patch_size), then a stride-2 downsampling before every stage but the first."""
    side = size // hf.patch_size
    for _ in range(max(hidden - 1, 0)):
        side //= 2
    return side


def _convnext_width(hf: PretrainedConfig, hidden: int) -> int:
    return hf.hidden_sizes[max(hidden - 1, 0)]


def _resnet_side(hf: PretrainedConfig, size: int, hidden: int) -> int:
    """7x7/2 convolution and 3x3/2 max-pool (both padded: ceil), then stride 2 in every stage but the first
    (and there too with downsample_in_first_stage)."""
    side = _half(_half(size))
    for stage in range(hidden):
        if stage > 0 or hf.downsample_in_first_stage:
            side = _half(side)
    return side


def _half(side: int) -> int:
    """Output side of a padded stride-2 convolution or pooling: ceil(side / 2)."""
    return (side + 1) // 2


def _resnet_width(hf: PretrainedConfig, hidden: int) -> int:
    return hf.embedding_size if hidden == 0 else hf.hidden_sizes[hidden - 1]


@dataclass(frozen=True)
class TowerFamily:
    """What differs between backbone families: token layout, CLS token, default normalisation, and the
    geometry of each hidden state (grid side at an input size, channel width), read from the config."""

    layout: str  # "tokens" ([B, N, C]) or "grid" ([B, C, H, W])
    has_cls: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    side: Callable[[PretrainedConfig, int, int], int]  # (config, input size, hidden state) -> grid side
    width: Callable[[PretrainedConfig, int], int]  # (config, hidden state) -> channels
    depth_key: str  # the config field counting blocks (ViTs) or stages (CNNs)


def _depth(hf: PretrainedConfig, key: str) -> int:
    value = getattr(hf, key)
    return len(value) if isinstance(value, list | tuple) else value


_VIT = {"side": _vit_side, "width": _vit_width, "depth_key": "num_hidden_layers"}
_CONVNEXT = {"side": _convnext_side, "width": _convnext_width, "depth_key": "hidden_sizes"}
for _name, _family in {
    "clip_vision_model": TowerFamily("tokens", True, CLIP_MEAN, CLIP_STD, **_VIT),
    "siglip_vision_model": TowerFamily("tokens", False, HALF, HALF, **_VIT),
    "siglip2_vision_model": TowerFamily("tokens", False, HALF, HALF, **_VIT),
    "convnext": TowerFamily("grid", False, IMAGENET_MEAN, IMAGENET_STD, **_CONVNEXT),
    "convnextv2": TowerFamily("grid", False, IMAGENET_MEAN, IMAGENET_STD, **_CONVNEXT),
    "resnet": TowerFamily(
        "grid", False, IMAGENET_MEAN, IMAGENET_STD, _resnet_side, _resnet_width, "hidden_sizes"
    ),
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


@dataclass(frozen=True)
class TowerSpec:
    """A vision tower as its config describes it: what it returns for an image of a given size, known
    without building or running it (processors count image tokens from this, as transformers' do)."""

    cfg: VisionTowerConfig
    hf_config: PretrainedConfig
    family: TowerFamily

    @classmethod
    def from_config(cls, cfg: VisionTowerConfig) -> TowerSpec:
        hf_config = load_tower_config(cfg)
        family = VISION_TOWERS.get(hf_config.model_type)
        if cfg.feature_select == "cls_patch" and not family.has_cls:
            raise ConfigError(
                f"vision.feature_select='cls_patch' but {hf_config.model_type} has no CLS token; use 'patch'"
            )
        return cls(cfg, hf_config, family)

    @property
    def depth(self) -> int:
        """Encoder blocks (ViTs) or stages (CNNs): the tower has depth + 1 hidden states."""
        return _depth(self.hf_config, self.family.depth_key)

    @property
    def feature_states(self) -> list[int]:
        """The indices of the hidden states the front-end reads (vision.feature_layer, made non-negative)."""
        layers = (
            self.cfg.feature_layer if isinstance(self.cfg.feature_layer, list) else [self.cfg.feature_layer]
        )
        states = self.depth + 1
        for layer in layers:
            if not -states <= layer < states:
                raise ConfigError(
                    f"vision.feature_layer={layer} is outside the {self.hf_config.model_type} tower's "
                    f"{states} hidden states; pick one in [{-states}, {states - 1}]"
                )
        if len(layers) > 1 and self.family.layout != "tokens":
            raise ConfigError(
                f"vision.feature_layer={layers}: several layers are concatenated along channels, which "
                f"needs one token grid for all; the {self.hf_config.model_type} tower's stages differ; give "
                "one layer"
            )
        return [layer % states for layer in layers]

    @property
    def feature_state(self) -> int:
        """The one hidden state the front-end reads (what needs a single layer, e.g. token merging)."""
        states = self.feature_states
        if len(states) > 1:
            raise ConfigError(
                f"vision.feature_layer={self.cfg.feature_layer} reads several layers; token merging in the "
                "tower needs one (merged layers would disagree on their token count)"
            )
        return states[0]

    def input_size(self, image: ImageConfig) -> int:
        """The tower's input side in pixels: frontend.image.size, else the one in the tower's config."""
        size = image.size or getattr(self.hf_config, "image_size", None)
        if size is None:
            raise ConfigError(
                f"frontend.image.size (the tower's input size) is required for a {self.hf_config.model_type} "
                "tower (its config has no image_size)"
            )
        return size

    def image_processor(self, image: ImageConfig, size: int) -> ImageProcessor:
        """Images to `size` pixels, normalised as frontend.image says, else as the tower's family expects."""
        return ImageProcessor(
            size=size,
            mean=image.mean or self.family.mean,
            std=image.std or self.family.std,
            resize=image.resize,
            resample=image.resample,
        )

    def grid(self, size: int) -> tuple[int, int]:
        """(h, w) of the feature grid for a `size`-pixel square image."""
        side = self.family.side(self.hf_config, size, self.feature_states[0])
        return side, side

    @property
    def width(self) -> int:
        """Channels of the selected features."""
        return sum(self.family.width(self.hf_config, state) for state in self.feature_states)

    @property
    def keeps_cls(self) -> bool:
        return self.family.has_cls and self.cfg.feature_select == "cls_patch"

    def sequence(self, size: int) -> int:
        """Tokens inside a ViT's encoder for a `size`-pixel image (its CLS token included)."""
        h, w = self.grid(size)
        return h * w + int(self.family.has_cls)

    def tokens(self, size: int) -> int:
        """Tokens per image the tower returns (`VisionTower.forward`): the grid, plus CLS when selected."""
        h, w = self.grid(size)
        return h * w + int(self.keeps_cls)


class VisionTower(nn.Module):
    """A transformers backbone plus feature-layer selection; returns [B, N, C] and the (h, w) grid."""

    def __init__(self, spec: TowerSpec, *, load_weights: bool = True) -> None:
        super().__init__()
        self.spec = spec
        cfg, hf_config = spec.cfg, spec.hf_config
        self.cfg = cfg
        self.family: TowerFamily = spec.family
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

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.family.layout == "grid":  # oneDNN convolutions run ~15% faster on channels-last input
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = torch.cat([out.hidden_states[i] for i in self.spec.feature_states], dim=-1)
        if self.family.layout == "grid":  # [B, C, H, W] -> [B, H*W, C]
            b, c, h, w = hidden.shape
            return hidden.flatten(2).transpose(1, 2), (h, w)
        if self.family.has_cls and self.cfg.feature_select == "patch":
            hidden = hidden[:, 1:]  # [B, N, C] without CLS
        n = hidden.shape[1] - (1 if self.cfg.feature_select == "cls_patch" else 0)
        side = int(round(n**0.5))
        return hidden, (side, n // max(side, 1))
