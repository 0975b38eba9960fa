"""LLaVA-NeXT front-end: "anyres" tiling of a high-resolution image through a base-resolution tower.

Liu et al., "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge" (2024), as transformers implements it
(`LlavaNextImageProcessorPil`, `LlavaNextForConditionalGeneration`, `LlavaNextProcessor`). An image of
H x W pixels picks the best resolution among `image_grid_pinpoints` (most of the image kept, least padding),
is resized to fit it (aspect kept) and centred on a black canvas of that size, and the canvas is cut into
tower-sized tiles; a base view is the whole image squashed to the tower's size. Every view goes through
the tower and the connector; the tiles' feature maps are stitched back into one grid, the rows and
columns that only saw padding are cut away (unpadding), the learned `image_newline` closes every row,
and the base view's features come first. The token count therefore depends on the image's size, and is
known from the config and that size alone (`AnyRes.num_tokens`), as `LlavaNextProcessor` counts it.

The pixel item of one image (what `image_processor` returns, `placeholder` reads and `collate` stacks) is
one float tensor [V, 3, s + 1, s]: V = 1 + tiles views of s x s pixels (base view first, then the tiles
row by row), each with one extra trailing row that carries no pixels. On view 0 of an image, channel 0 of
that row holds the header [1, H // 256, H % 256, W // 256, W % 256] (the image's original size as base-256
digits, exact in float16 and bfloat16 too); it is zero everywhere else. A batch is the images' items
concatenated along the view axis [ΣV, 3, s + 1, s], a plain tensor the serving engine moves to the device
like any other; the headers say where each image starts and how its grid is unpadded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..config import ConnectorConfig, FrontendConfig, ImageConfig, VisionTowerConfig
from ..connectors import Connector
from ..errors import ConfigError, DataError
from ..image_processing import to_tensor
from ..registry import FRONTENDS
from ..vision_towers import TowerSpec
from .base import IMAGE_TOKEN, Embedded, TowerFrontend
from .layout import ImageLayout, TowerShrink

# LLaVA-NeXT's pinpoints for its 336-px tower ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
# in tiles (rows, columns): the default, scaled to the tower's size.
DEFAULT_TILE_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
HEADER = 5  # header entries: [image start flag, H // 256, H % 256, W // 256, W % 256]
MAX_SIDE = 256 * 256 - 1  # the largest side two base-256 digits hold


class LlavaNextConfig(FrontendConfig):
    """LLaVA's sections plus the candidate resolutions.

    `image.size` is the tower's input side s (default: the tower's own); it is both the tile size and the
    base view's size. `image_grid_pinpoints` are (height, width) pairs in pixels, each a multiple of s;
    None: LLaVA-NeXT's five (1x2, 2x1, 2x2, 3x1, 1x3 tiles) at s.
    """

    type: str = "llava_next"
    vision: VisionTowerConfig = Field(default_factory=VisionTowerConfig)
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    image_grid_pinpoints: list[list[int]] | None = None

    @field_validator("image_grid_pinpoints")
    @classmethod
    def _pairs(cls, value: list[list[int]] | None) -> list[list[int]] | None:
        if value is None:
            return value
        if not value or any(len(pair) != 2 or min(pair) < 1 for pair in value):
            raise ConfigError(
                f"frontend.image_grid_pinpoints={value} must be a non-empty list of [height, width] pairs of "
                "positive pixel sizes, e.g. [[336, 672], [672, 336], [672, 672]]"
            )
        return value

    @model_validator(mode="after")
    def _what_anyres_needs(self) -> LlavaNextConfig:
        if self.vision.feature_select != "patch":
            raise ConfigError(
                f"frontend.vision.feature_select={self.vision.feature_select!r} keeps the CLS token, which "
                "has no place in the stitched tile grid; llava_next needs feature_select='patch' "
                "(transformers' vision_feature_select_strategy 'default' on CLIP, 'full' on towers without "
                "CLS)"
            )
        if self.connector.merge != 1 or self.connector.position_embedding:
            raise ConfigError(
                "llava_next projects every tile token on its own (transformers' 2-layer projector); set "
                "frontend.connector.merge: 1 and frontend.connector.position_embedding: false"
            )
        if self.image.resize != "squash":
            raise ConfigError(
                f"frontend.image.resize={self.image.resize!r}: llava_next resizes the tiles to fit (aspect "
                "kept, padded) and squashes the base view, as transformers does; set frontend.image.resize: "
                "squash"
            )
        return self


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) among `pinpoints` that keeps most of an H x W image when it is resized to fit,
    then wastes least canvas; the first such one on ties (transformers' `select_best_resolution`)."""
    best, most_kept, least_wasted = None, 0, float("inf")
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_w * pin_h - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (pin_h, pin_w), kept, wasted
    return best


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """(h, w) of an H x W image resized to fit inside target_h x target_w, aspect kept (transformers'
    `get_patch_output_size`: the limiting side is exact, the other rounded up and capped)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpadded(height: int, width: int, rows: int, cols: int) -> tuple[slice, slice]:
    """The rows and columns of a rows x cols feature grid (the padded canvas) that hold an H x W image
    (transformers' `unpad_image`: the padding is cut evenly from both sides of the short direction)."""
    if width / height > cols / rows:  # wider than the grid: padding above and below
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        return slice(pad, rows - pad), slice(0, cols)
    kept = int(round(width * (rows / height), 7))
    pad = (cols - kept) // 2
    return slice(0, rows), slice(pad, cols - pad)


@dataclass(frozen=True)
class AnyRes:
    """The geometry of LLaVA-NeXT's tiling: tile (tower input) side s in pixels, feature grid side g of one
    view, and the candidate resolutions (height, width) in pixels."""

    tile: int
    grid: int
    pinpoints: tuple[tuple[int, int], ...]

    def tiles(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of tiles an H x W image is cut into."""
        best_h, best_w = select_best_resolution(height, width, self.pinpoints)
        return best_h // self.tile, best_w // self.tile

    def views(self, height: int, width: int) -> int:
        """Tower inputs for an H x W image: the base view and the tiles."""
        rows, cols = self.tiles(height, width)
        return 1 + rows * cols

    def kept(self, height: int, width: int) -> tuple[slice, slice]:
        """Rows and columns of the stitched (rows·g) x (cols·g) feature grid that survive unpadding."""
        rows, cols = self.tiles(height, width)
        return unpadded(height, width, rows * self.grid, cols * self.grid)

    def num_tokens(self, height: int, width: int) -> int:
        """LLM tokens of an H x W image: the base view's g² features, then each kept row of the tile grid
        with its newline (`LlavaNextProcessor._get_number_of_features`)."""
        rows, cols = self.kept(height, width)
        n_rows, n_cols = rows.stop - rows.start, cols.stop - cols.start
        return self.grid * self.grid + n_rows * (n_cols + 1)


def write_header(item: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Mark view 0 of `item` [V, 3, s + 1, s] as an image start of original size H x W."""
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise DataError(f"a {width}x{height} image is beyond llava_next's {MAX_SIDE}-pixel limit per side")
    digits = [1, height // 256, height % 256, width // 256, width % 256]
    item[0, 0, -1, :HEADER] = torch.tensor(digits, dtype=item.dtype)
    return item


def read_headers(pixel_values: torch.Tensor, anyres: AnyRes) -> list[tuple[int, int, int]]:
    """(H, W, V) of every image in a batch of pixel items [ΣV, 3, s + 1, s], in order."""
    s = anyres.tile
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, s + 1, s):
        raise DataError(
            f"llava_next expects pixel_values [views, 3, {s + 1}, {s}] (its image processor's items, "
            f"concatenated by its layout's collate), got {tuple(pixel_values.shape)}"
        )
    rows = pixel_values[:, 0, -1, :].round().long().tolist()  # one small host copy
    images, at = [], 0
    while at < len(rows):
        flag, h_hi, h_lo, w_hi, w_lo = rows[at][:HEADER]
        height, width = h_hi * 256 + h_lo, w_hi * 256 + w_lo
        if flag != 1 or height < 1 or width < 1:
            raise DataError(
                f"view {at} of pixel_values should start an image but carries no llava_next header; build "
                "the pixels with VLProcessor (the front-end's image processor and collate) and keep them "
                "whole"
            )
        views = anyres.views(height, width)
        if at + views > len(rows) or any(any(r) for r in rows[at + 1 : at + views]):
            raise DataError(
                f"the {width}x{height} image starting at view {at} of pixel_values should have {views} "
                "views; pixel_values were cut or reordered after collate"
            )
        if any(rows[at][HEADER:]):
            raise DataError(f"view {at} of pixel_values has a corrupt llava_next header row")
        images.append((height, width, views))
        at += views
    return images


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (transformers' `convert_to_rgb`)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class AnyResImageProcessor:
    """PIL image -> its pixel item [1 + tiles, 3, s + 1, s] (module docstring), normalised as `mean`/`std`.

    Exactly transformers' `LlavaNextImageProcessorPil` with size {"shortest_edge": s}, crop_size s x s and
    the same resample/mean/std: tiles from the image resized to fit the best resolution (PIL, `resample`)
    and centred on a black canvas; the base view is the image resized to s x s. Transparent pixels are
    composited onto white first, as transformers does.
    """

    anyres: AnyRes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        width, height = image.size
        s, resample = self.anyres.tile, Image.Resampling[self.resample.upper()]
        best_h, best_w = select_best_resolution(height, width, self.anyres.pinpoints)
        fit_h, fit_w = fit_size(height, width, best_h, best_w)
        canvas = Image.new("RGB", (best_w, best_h), (0, 0, 0))
        canvas.paste(image.resize((fit_w, fit_h), resample), ((best_w - fit_w) // 2, (best_h - fit_h) // 2))
        rows, cols = best_h // s, best_w // s
        tiles = to_tensor(canvas, self.mean, self.std).reshape(3, rows, s, cols, s).permute(1, 3, 0, 2, 4)
        base = to_tensor(image.resize((s, s), resample), self.mean, self.std)
        item = torch.zeros(1 + rows * cols, 3, s + 1, s)
        item[:, :, :s] = torch.cat([base[None], tiles.reshape(rows * cols, 3, s, s)])
        return write_header(item, height, width)


@dataclass(frozen=True)
class AnyResLayout(ImageLayout):
    """Each image is its own count of `<image>` tokens (`AnyRes.num_tokens` of its original size)."""

    anyres: AnyRes | None = field(default=None)

    def num_image_tokens(self, pixels: torch.Tensor | None = None) -> int:
        if pixels is None:
            raise ConfigError(
                "llava_next gives every image its own token count (it depends on the image's size); nothing "
                "that needs one count for all images (tower reducers' image positions) works with it"
            )
        ((height, width, _),) = read_headers(pixels, self.anyres)
        return self.anyres.num_tokens(height, width)

    def collate(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """Items of any view count -> all their views in order [ΣV, 3, s + 1, s]."""
        return torch.cat(pixels)


class ImageNewline(nn.Module):
    """The learned embedding that closes every row of the stitched tile grid, [D] (a module, so that it is
    a module group of its own)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) / math.sqrt(dim))  # transformers: normal, std 1/sqrt(D)


@FRONTENDS.register("llava_next", config=LlavaNextConfig)
class LlavaNextFrontend(TowerFrontend):
    """Vision tower + connector over every view + tile stitching, unpadding and row newlines."""

    config: LlavaNextConfig

    def __init__(self, config: LlavaNextConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.anyres: AnyRes = self.layout.anyres
        self.connector = Connector(
            config.connector, self.spec.width, self.text_hidden_size, self.spec.tokens(self.tower_size)
        )
        self.image_newline = ImageNewline(self.text_hidden_size)

    @classmethod
    def image_layout(cls, config: LlavaNextConfig, shrink: TowerShrink | None = None) -> AnyResLayout:
        cls.refuse_shrink(config, shrink)
        spec = TowerSpec.from_config(config.vision)
        s = spec.input_size(config.image)
        grid_h, grid_w = spec.grid(s)
        if s < HEADER or grid_h != grid_w or grid_h < 1:
            raise ConfigError(
                f"llava_next needs a square feature grid of at least one token from a tower input of at "
                f"least {HEADER} px; the {spec.hf_config.model_type} tower gives {grid_h}x{grid_w} at {s} px"
            )
        pinpoints = config.image_grid_pinpoints or [[r * s, c * s] for r, c in DEFAULT_TILE_GRIDS]
        if any(side % s for pair in pinpoints for side in pair):
            fixed = [[max(round(side / s), 1) * s for side in pair] for pair in pinpoints]
            raise ConfigError(
                f"frontend.image_grid_pinpoints={pinpoints} must be multiples of the tower's {s}-px input "
                f"(the tile size); e.g. {fixed}"
            )
        anyres = AnyRes(s, grid_h, tuple((h, w) for h, w in pinpoints))
        mean = config.image.mean or spec.family.mean
        std = config.image.std or spec.family.std
        processor = AnyResImageProcessor(anyres, tuple(mean), tuple(std), config.image.resample)
        return AnyResLayout(processor, IMAGE_TOKEN, (IMAGE_TOKEN,), None, anyres=anyres)

    def group_paths(self) -> dict[str, str]:
        return {**super().group_paths(), "connector": "connector", "image_newline": "image_newline"}

    def resolved_config(self) -> LlavaNextConfig:
        resolved = super().resolved_config()
        resolved.image_grid_pinpoints = [list(pair) for pair in self.anyres.pinpoints]
        return resolved

    def encode_images(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Pixel items [ΣV, 3, s + 1, s] -> each image's LLM embeddings [T_i, D] (T_i = `AnyRes.num_tokens`).

        One tower call and one connector call over all views; then per image: base view features, then the
        stitched tile grid, unpadded, each row followed by `image_newline`.
        """
        images = read_headers(pixel_values, self.anyres)
        s, g = self.anyres.tile, self.anyres.grid
        features, grid = self.tower_features(pixel_values[:, :, :s])  # [ΣV, g², C]
        if tuple(grid) != (g, g):
            raise ConfigError(f"the tower gave a {grid} grid for {s}-px views, its config says {(g, g)}")
        projected = self.connector(features, grid)  # [ΣV, g², D]
        newline = self.image_newline.weight.to(projected.dtype)
        out, at = [], 0
        for height, width, views in images:
            rows, cols = self.anyres.tiles(height, width)
            base, tiles = projected[at], projected[at + 1 : at + views]
            stitched = tiles.reshape(rows, cols, g, g, -1).permute(0, 2, 1, 3, 4)  # [rows, g, cols, g, D]
            stitched = stitched.reshape(rows * g, cols * g, -1)[self.anyres.kept(height, width)]  # [r, c, D]
            ends = newline.expand(stitched.shape[0], 1, -1)
            out.append(torch.cat([base, torch.cat([stitched, ends], dim=1).flatten(0, 1)]))
            at += views
        return out

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """All images' embeddings packed in batch order, [1, ΣT_i, D] (one row: counts differ per image)."""
        return torch.cat(self.encode_images(pixel_values))[None]

    def embed(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, pixel_values) -> Embedded:
        """`Frontend.embed`, with a count check that names each image's count before `scatter`'s."""
        if pixel_values is None or len(pixel_values) == 0:
            return super().embed(input_ids, inputs_embeds, pixel_values)
        images = self.encode_images(pixel_values)
        n_slots = int((input_ids == self.image_token_id).sum())
        counts = [len(features) for features in images]
        if n_slots != sum(counts):
            raise DataError(
                f"image placeholder count mismatch: {n_slots} {self.layout.image_token!r} tokens in "
                f"input_ids but the {len(counts)} images make {counts} = {sum(counts)} features; build "
                "inputs with VLProcessor so each <image> expands to its image's token count, and do not "
                "truncate inside an image"
            )
        features = torch.cat(images)[None]
        return Embedded(self.scatter(input_ids, inputs_embeds, features), features)


__all__ = [
    "AnyRes",
    "AnyResImageProcessor",
    "AnyResLayout",
    "LlavaNextConfig",
    "LlavaNextFrontend",
    "fit_size",
    "select_best_resolution",
    "unpadded",
]
