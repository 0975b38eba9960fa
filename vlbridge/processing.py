"""VLProcessor: chat messages + images -> token ids, labels and pixels, for any tokenizer/chat template.

Labels come from character spans: the conversation is rendered once with the tokenizer's own chat
template, assistant replies are located by rendering growing prefixes, and the tokens whose
offsets fall inside those spans are the only supervised ones. One function serves every template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image
from transformers import AutoTokenizer

from .checkpoint import read_config
from .config import VLConfig
from .errors import DataError
from .frontends.layout import ImageLayout, image_layout

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One tokenized conversation, not yet padded."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: list[torch.Tensor] = field(default_factory=list)


@dataclass
class DropCounter:
    """Samples removed by truncation rules, by reason; reported at the end of data preparation."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count

    def merge(self, counts: dict[str, int]) -> None:
        """Add counts made elsewhere (a DataLoader worker's, which cannot reach this counter)."""
        for reason, count in counts.items():
            self.add(reason, count)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class VLProcessor:
    """Tokenizer + the front-end's image layout (pixel transform, placeholder expansion).

    Built from a config and a tokenizer alone (`from_config`, `from_pretrained`): nothing here needs the
    model. `image_token` is the marker users write where an image goes; `image_position` is where chat
    front-ends put the images of a user turn (`user_turn`).
    """

    def __init__(
        self,
        tokenizer,
        layout: ImageLayout,
        *,
        image_token: str = "<image>",
        image_position: Literal["before", "after"] = "before",
        chat_content: Literal["text", "parts"] = "text",
        max_length: int = 2048,
    ) -> None:
        self.tokenizer = tokenizer
        self.layout = layout
        self.image_token = image_token
        self.image_position = image_position
        self.chat_content = chat_content
        self.max_length = max_length

    @classmethod
    def from_config(cls, config: VLConfig, tokenizer, *, max_length: int | None = None) -> VLProcessor:
        """The processor of a model built from `config`; the tokenizer must hold the layout's tokens."""
        return cls(
            tokenizer,
            image_layout(config),
            image_token=config.image_token,
            image_position=config.image_position,
            chat_content=config.chat_content,
            max_length=max_length or config.max_length,
        )

    @classmethod
    def from_pretrained(cls, path, *, max_length: int | None = None) -> VLProcessor:
        """The processor saved with a checkpoint (its config.json and tokenizer files)."""
        config = read_config(path)
        return cls.from_config(config, AutoTokenizer.from_pretrained(str(path)), max_length=max_length)

    def place_images(self, text: str, n_images: int) -> str:
        """A user turn's text with its images' markers where this model was trained to see them."""
        return place_images(text, n_images, marker=self.image_token, position=self.image_position)

    # -- text ------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self.chat_content == "parts":
            messages = [{**m, "content": as_parts(m["content"], self.image_token)} for m in messages]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Render the conversation; return it with the [start, end) character spans of assistant replies."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (full.startswith(prefix) and full.startswith(upto)):
                raise DataError(
                    "the chat template is not prefix-stable (rendering the first turns is not a prefix of "
                    "the whole conversation), so assistant tokens cannot be located; use a template without "
                    "history rewriting"
                )
            end = len(upto.rstrip())
            spans.append((len(prefix), end))
        return full, spans

    # -- samples ---------------------------------------------------------------------------
    def encode(
        self,
        messages: list[dict],
        images: list[Image.Image] | None = None,
        *,
        add_generation_prompt: bool = False,
        sample_id: str = "?",
    ) -> Encoded:
        """Tokenize one conversation with `<image>` expanded; labels only on assistant replies."""
        images = images or []
        if add_generation_prompt:
            text, spans = self.render(messages, add_generation_prompt=True), []
        else:
            text, spans = self.assistant_spans(messages)
        n_marks = text.count(self.image_token)
        if n_marks != len(images):
            raise DataError(
                f"sample {sample_id}: {n_marks} {self.image_token!r} markers in the messages but "
                f"{len(images)} images; put one marker per image in the user text"
            )
        pixels = [self.layout.image_processor(image) for image in images]
        text, spans = self._expand(text, spans, pixels)
        # As transformers' processors do: the tokenizer's own special tokens (a BOS) unless the template
        # already wrote them.
        bos = self.tokenizer.bos_token
        special = not (bos and text.startswith(bos))
        enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        image_ids = set(self.image_ids())  # never targets, even inside an assistant reply
        labels = [
            tok
            if tok not in image_ids and any(s < end and e > start for start, end in spans)
            else IGNORE_INDEX
            for tok, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]
        return Encoded(list(enc["input_ids"]), labels, pixels)

    def _expand(self, text: str, spans: list[tuple[int, int]], pixels: list[torch.Tensor]):
        """Replace each `<image>` by the front-end's placeholder text, shifting assistant spans to match."""
        mark = self.image_token
        positions, cursor = [], 0
        for _ in pixels:
            positions.append(text.index(mark, cursor))
            cursor = positions[-1] + len(mark)
        replacements = [self.layout.placeholder(px) for px in pixels]
        deltas = [len(r) - len(mark) for r in replacements]

        def shift(b: int) -> int:
            return b + sum(d for at, d in zip(positions, deltas, strict=True) if at < b)

        pieces, cursor = [], 0
        for at, replacement in zip(positions, replacements, strict=True):
            pieces += [text[cursor:at], replacement]
            cursor = at + len(mark)
        pieces.append(text[cursor:])
        return "".join(pieces), [(shift(s), shift(e)) for s, e in spans]

    def truncate(self, sample: Encoded, drops: DropCounter | None = None) -> Encoded | None:
        """Cut to max_length, or drop (and count) the sample when that would cut an image or every answer."""
        if len(sample.input_ids) <= self.max_length:
            return sample
        image_ids = set(self.image_ids())
        if any(t in image_ids for t in sample.input_ids[self.max_length :]):
            reason = "image_truncated"
        elif all(t == IGNORE_INDEX for t in sample.labels[: self.max_length]):
            reason = "no_answer_left"
        else:
            keep = self.max_length
            return Encoded(sample.input_ids[:keep], sample.labels[:keep], sample.pixel_values)
        if drops is not None:
            drops.add(reason)
        return None

    def image_ids(self) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(t) for t in self.layout.special_tokens]

    # -- inference ---------------------------------------------------------------------------
    def __call__(
        self, conversations: list[list[dict]], images: list[list[Image.Image]] | None = None
    ) -> dict:
        """Prompts for generation: left-padded ids, attention mask and pixels (batch of conversations)."""
        images = images or [[] for _ in conversations]
        encoded = [
            self.encode(m, imgs, add_generation_prompt=True, sample_id=str(i))
            for i, (m, imgs) in enumerate(zip(conversations, images, strict=True))
        ]
        batch = pad_batch(encoded, self.tokenizer.pad_token_id, self.layout, side="left")
        del batch["labels"]
        return batch


def as_parts(content: str, marker: str) -> list[dict]:
    """Text with image markers -> transformers' content parts, in order; the newline a marker line ends
    with belongs to the marker (the templates that take parts write their own)."""
    parts: list[dict] = []
    pieces = content.split(marker)
    for i, piece in enumerate(pieces):
        if piece.strip("\n"):
            parts.append({"type": "text", "text": piece.strip("\n")})
        if i < len(pieces) - 1:
            parts.append({"type": "image"})
    return parts


def place_images(text: str, n_images: int, *, marker: str, position: Literal["before", "after"]) -> str:
    """`text` with one `marker` line per image before or after it (the one layout of a user turn)."""
    if not n_images:
        return text
    marks = "\n".join([marker] * n_images)
    return f"{marks}\n{text}" if position == "before" else f"{text}\n{marks}"


def pad_batch(samples: list[Encoded], pad_id: int, layout: ImageLayout, side: str = "right") -> dict:
    """Pad to the longest sample; labels padded with IGNORE_INDEX; pixels collated by the front-end."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = torch.tensor(s.input_ids)
        labels[row, cols] = torch.tensor(s.labels)
        mask[row, cols] = 1
    pixels = [p for s in samples for p in s.pixel_values]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    batch["pixel_values"] = layout.collate(pixels) if pixels else None
    return batch
