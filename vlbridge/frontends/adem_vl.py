"""ADEM-VL front-end: deep fusion through a parameter-free cross-attention at every decoder layer's MLP.

Hao et al., "ADEM-VL: Adaptive and Embedded Fusion for Efficient Vision-Language Tuning" (arXiv 2410.17779).
One tower pass gives a CLS feature and a patch grid. The grid is pooled to a few scales and projected to
the visual memory V (shared by all layers); only ψ_cls(CLS) enters the input sequence, after a text
prefix. Forward hooks installed in `attach` add α·drop_γ(SiLU(u)·SiLU(V+E₁)ᵀ)·(V+E₂) to each MLP output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from transformers import PretrainedConfig

from ..config import FrontendConfig, ImageConfig, Strict, VisionTowerConfig
from ..errors import ConfigError, DataError
from ..families import family_of
from ..llm_calls import VISUAL_MEMORY
from ..registry import FRONTENDS
from ..vision_towers import TowerSpec
from .adem_vl_fusion import VisualMemory, fuse, hook_block_mlps, hook_decoder_mlps, multiscale
from .base import IMAGE_TOKEN, Embedded, TowerFrontend
from .layout import ImageLayout, TowerShrink


class TowerAdapterConfig(Strict):
    """Bottleneck adapter in parallel with each ViT block's MLP: scale·W_up·Drop(GELU(W_down·LN₂x))."""

    dim: int = Field(default=12, ge=1)
    scale: float = 0.1
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)


class AdemVLConfig(FrontendConfig):
    type: str = "adem_vl"
    # The CLS token feeds ψ_cls; towers without one (SigLIP, CNNs) need feature_select 'patch' and use the
    # mean patch feature instead. feature_layer -2 with CLIP = the paper's 23 of 24 blocks (+ ln_post).
    vision: VisionTowerConfig = Field(default_factory=lambda: VisionTowerConfig(feature_select="cls_patch"))
    image: ImageConfig = Field(default_factory=ImageConfig)
    tower_adapters: TowerAdapterConfig | None = Field(default_factory=TowerAdapterConfig)
    scales: list[int] = Field(default_factory=lambda: [256, 64], min_length=1)  # S: visual features per scale
    projector_dim: int = Field(default=128, ge=1)  # hidden width of ψ and ψ_cls
    alpha: float = 0.1  # output scale of the fusion
    beta: float = 0.01  # scale of the projected visual features V
    gamma: float = Field(default=0.1, ge=0.0, lt=1.0)  # fraction of visual features each token drops
    prefix: str = "Image: "  # text before the one ψ_cls(CLS) slot

    @field_validator("scales")
    @classmethod
    def _square_scales(cls, scales: list[int]) -> list[int]:
        for s in scales:
            if s < 1 or math.isqrt(s) ** 2 != s:
                raise ValueError(
                    f"every scale is a square number of features (a √s×√s grid), got {s} in {scales}; "
                    "e.g. [256, 64] for a 16x16 patch grid or [16, 4] for 4x4"
                )
        return scales


class TowerAdapter(nn.Module):
    """scale·W_up·Drop(GELU(W_down·x)), no biases, W_up zero-initialised so the tower starts unchanged."""

    def __init__(self, width: int, cfg: TowerAdapterConfig) -> None:
        super().__init__()
        self.down = nn.Linear(width, cfg.dim, bias=False)
        self.up = nn.Linear(cfg.dim, width, bias=False)
        nn.init.zeros_(self.up.weight)
        self.dropout = nn.Dropout(cfg.dropout)
        self.scale = cfg.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(F.gelu(self.down(x))))


def low_rank_projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """ψ(x) = W₂·SiLU(W₁x + b₁) + b₂ with Xavier-uniform weights and zero biases (spec §2.4)."""
    layers = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))
    for linear in (layers[0], layers[2]):
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)
    return layers


class FusionParameters(nn.Module):
    """What the fusion learns: ψ, ψ_cls, and the offsets E₁ (keys) and E₂ (values) shared by all layers."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_visual: int) -> None:
        super().__init__()
        self.psi = low_rank_projector(in_dim, hidden, out_dim)
        self.psi_cls = low_rank_projector(in_dim, hidden, out_dim)
        self.key_offset = nn.Parameter(0.02 * torch.randn(num_visual, out_dim))  # E₁ ~ N(0, 0.02²)
        self.value_offset = nn.Parameter(torch.zeros(num_visual, out_dim))  # E₂ = 0

    def memory(self, visual: torch.Tensor) -> VisualMemory:
        """V [B, N_v, D] -> keys SiLU(V+E₁) and values V+E₂, computed once for all layers."""
        return VisualMemory(keys=F.silu(visual + self.key_offset), values=visual + self.value_offset)


def _vit_part(model: nn.Module, name: str) -> nn.Module | None:
    """A ViT tower's `encoder` or `post_layernorm` (top level, or under `vision_model` in older layouts)."""
    return getattr(getattr(model, "vision_model", model), name, None)


@FRONTENDS.register("adem_vl", config=AdemVLConfig)
class AdemVLFrontend(TowerFrontend):
    """Vision tower (+ optional adapters) -> multiscale visual memory read inside every decoder layer."""

    config: AdemVLConfig
    fusion_kind = "deep"
    batch_state = True  # the visual memory [B, N_v, D] its decoder hooks read

    def __init__(self, config: AdemVLConfig, text_config: PretrainedConfig, *args, **kwargs) -> None:
        family = family_of(text_config.model_type)  # an LLM it cannot hook is refused first
        super().__init__(config, text_config, *args, **kwargs)
        self.family = family
        width = self.spec.width
        self.tower_adapters = self._build_adapters(width) if config.tower_adapters is not None else None
        self.fusion = FusionParameters(width, config.projector_dim, self.text_hidden_size, self.num_visual)

    @classmethod
    def image_layout(cls, config: AdemVLConfig, shrink: TowerShrink | None = None) -> ImageLayout:
        """One ψ_cls(CLS) slot after a text prefix; checks that every scale fits the tower's grid."""
        cls.refuse_shrink(config, shrink)
        spec = TowerSpec.from_config(config.vision)
        size = spec.input_size(config.image)
        h, w = spec.grid(size)
        too_big = [s for s in config.scales if math.isqrt(s) > min(h, w)]
        if too_big:
            raise ConfigError(
                f"frontend.scales={config.scales}: {too_big} do not fit the tower's {h}x{w} feature "
                f"grid at frontend.image.size={size}; use scales of at most {min(h, w) ** 2} features, "
                f"e.g. [{h * w}, {(h // 2) * (w // 2)}]"
            )
        return ImageLayout(
            spec.image_processor(config.image, size), IMAGE_TOKEN, (IMAGE_TOKEN,), 1, config.prefix
        )

    def _build_adapters(self, width: int) -> nn.ModuleList:
        """One adapter per ViT block, run by a hook on the block's MLP (spec §2.2)."""
        tower = self.vision_tower
        encoder = _vit_part(tower.model, "encoder")
        if tower.family.layout != "tokens" or encoder is None:
            raise ConfigError(
                f"frontend.tower_adapters run beside transformer blocks, but the "
                f"{tower.hf_config.model_type} tower has none; use a ViT tower (CLIP, SigLIP) or set "
                "frontend.tower_adapters: null"
            )
        adapters = nn.ModuleList(TowerAdapter(width, self.config.tower_adapters) for _ in encoder.layers)
        hook_block_mlps(encoder.layers, adapters)
        return adapters

    def attach(self, language_model: nn.Module) -> None:
        """Hook the fusion into every decoder layer's MLP; the LLM itself stays untouched."""
        hook_decoder_mlps(language_model, self.family, self._fuse)

    # -- processing side -------------------------------------------------------------------
    # -- processing side -------------------------------------------------------------------
    @property
    def num_visual(self) -> int:
        """N_v: visual features every text token can read."""
        return sum(self.config.scales)

    def group_paths(self) -> dict[str, str]:
        paths = {**super().group_paths(), "fusion": "fusion"}
        if self.tower_adapters is not None:
            paths["tower_adapters"] = "tower_adapters"
        return paths

    # -- model side ------------------------------------------------------------------------
    def _tower_features(
        self, pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """One tower pass -> CLS [N_img, C], patch grid [N_img, h*w, C] and its (h, w) (spec §2.2).

        ViTs: the selected layer through the tower's final LayerNorm (CLIP's ln_post). Without a CLS
        token (feature_select 'patch'), the mean patch feature stands in for it.
        """
        hidden, grid = self.tower_features(pixel_values)  # [N_img, (1+)h*w, C]
        norm = _vit_part(self.vision_tower.model, "post_layernorm")
        if norm is not None:
            hidden = norm(hidden)
        if self.config.vision.feature_select == "cls_patch":
            return hidden[:, 0], hidden[:, 1:], grid
        return hidden.mean(dim=1), hidden, grid

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images -> the one embedding each puts in the sequence, ψ_cls(CLS): [N_img, 1, D]."""
        cls, _, _ = self._tower_features(pixel_values)
        return self.fusion.psi_cls(cls)[:, None]

    def embed(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, pixel_values) -> Embedded:
        """Splice ψ_cls(CLS) at each placeholder and make the visual memory the decoder hooks read (the
        `visual_memory` keyword of every LLM call over these prompts, decode steps included); the image
        embeddings returned are that memory's prompts, β·ψ(P_ms) [N_img, N_v, D].

        V = β·ind·ψ(P_ms) per row of `input_ids` (spec §2.4): rows without a placeholder get V = 0.
        """
        batch = input_ids.shape[0]
        visual = inputs_embeds.new_zeros(batch, self.num_visual, self.text_hidden_size)  # [B, N_v, D]
        projected = None
        if pixel_values is None or len(pixel_values) == 0:
            inputs_embeds = super().embed(input_ids, inputs_embeds, None).inputs_embeds  # refuses stray ones
        else:
            cls, patches, grid = self._tower_features(pixel_values)
            inputs_embeds = self.scatter(input_ids, inputs_embeds, self.fusion.psi_cls(cls)[:, None])
            prompts = multiscale(patches, grid, self.config.scales)  # [N_img, N_v, C]
            projected = self.config.beta * self.fusion.psi(prompts)  # [N_img, N_v, D]
            visual = visual.index_put((self._image_rows(input_ids),), projected.to(visual.dtype))
        return Embedded(inputs_embeds, projected, {VISUAL_MEMORY: self.fusion.memory(visual)})

    def _image_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The batch row of each image, in pixel order (images follow their samples' order)."""
        per_row = (input_ids == self.image_token_id).sum(dim=1)  # [B]
        crowded = (per_row > 1).nonzero().flatten().tolist()
        if crowded:
            raise DataError(
                f"adem_vl reads one image per sample, but row(s) {crowded} hold {per_row.max()} images; "
                "split multi-image samples or use an early-fusion front-end such as llava"
            )
        return per_row.nonzero().flatten()

    def _fuse(self, u: torch.Tensor, memory: VisualMemory | None) -> torch.Tensor:
        """The term every decoder hook adds next to mlp(u): [B, T, D]."""
        if memory is None:
            raise DataError(
                "adem_vl's decoder hooks ran in an LLM call without the visual memory; call the model "
                "through VLModel.forward / generate (they pass the `visual_memory` keyword), not the bare LLM"
            )
        keys, values = memory.for_batch(u.shape[0])
        return fuse(u, keys, values, self.config.gamma, self.config.alpha)
