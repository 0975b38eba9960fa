"""OpenAI chat messages -> a tokenized prompt with its images, checked against the server's limits.

Images are laid out as the checkpoint was trained (`VLConfig.image_position`): each user turn becomes
its text with one `<image>` marker per attached image before or after it, exactly as `vlbridge chat`
builds prompts, so the server and the CLI answer the same question the same way.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from vlbridge.errors import VLBridgeError
from vlbridge.processing import Encoded, VLProcessor

from .errors import bad_request
from .media import ImageLoader
from .protocol import ChatMessage, ImagePart

# A tokenizer's normalizer may merge characters before splitting (NFC composes up to 3 code points into
# one): the character bound divides by this much more than the widest token.
NORMALIZATION_SLACK = 4
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Prompt:
    """One request's prompt: token ids (images expanded) and processed pixels, plus what it cost."""

    encoded: Encoded
    n_images: int
    image_tokens: int

    @property
    def tokens(self) -> int:
        return len(self.encoded.input_ids)


class PromptBuilder:
    """Builds prompts for one model; thread-safe (requests are prepared in a thread pool).

    `processor` must own its tokenizer (no other thread may use it): builds take turns on it.
    """

    def __init__(
        self,
        processor: VLProcessor,
        loader: ImageLoader,
        *,
        image_position: str,
        context_length: int,
        max_images: int,
    ) -> None:
        self.processor = processor
        self.loader = loader
        self.image_position = image_position
        self.context_length = context_length
        self.max_images = max_images
        self._tokenizer_lock = threading.Lock()
        self._reserved = [processor.image_token, *processor.layout.special_tokens]
        self._image_ids = set(processor.image_ids())
        # Characters one token can cover, at most, times NORMALIZATION_SLACK: `len(text) // _chars_per_token`
        # tokens is a lower bound on any text's count, known before tokenizing.
        widest = max(map(len, processor.tokenizer.get_vocab()))
        self._chars_per_token = widest * NORMALIZATION_SLACK
        # The most JSON a request's text can take and still fit: 12 bytes a character (an escaped surrogate
        # pair), plus room for the request's structure. Larger bodies are refused before parsing.
        self.max_text_bytes = context_length * self._chars_per_token * 12 + 64 * 1024

    def build(self, messages: list[ChatMessage]) -> Prompt:
        urls = self._image_urls(messages)
        self._check_text_fits(messages)
        images = [self.loader.load(url, param) for url, param in urls]
        conversation = [self._turn(i, m) for i, m in enumerate(messages)]
        try:
            with self._tokenizer_lock:
                encoded = self.processor.encode(conversation, images, add_generation_prompt=True)
        except VLBridgeError as err:
            raise bad_request(f"messages: {err}", "messages") from err
        image_tokens = sum(t in self._image_ids for t in encoded.input_ids)
        prompt = Prompt(encoded, len(images), image_tokens)
        if prompt.tokens >= self.context_length:
            raise bad_request(
                f"the prompt is {prompt.tokens} tokens ({image_tokens} of them for {len(images)} images), "
                f"but this model's context length is {self.context_length} tokens, which must also hold at "
                "least one generated token; shorten the conversation or send fewer images",
                "messages",
                "context_length_exceeded",
            )
        return prompt

    def _check_text_fits(self, messages: list[ChatMessage]) -> None:
        """Refuse, before any image is loaded or anything tokenized, a conversation whose text alone must
        exceed the context: tokenizing megabytes takes seconds; counting characters does not."""
        chars = sum(len(text) for message in messages for text in _texts(message))
        tokens = chars // self._chars_per_token
        if tokens >= self.context_length:
            raise bad_request(
                f"the messages hold {chars:,} characters of text, at least {tokens:,} tokens, but this "
                f"model's context length is {self.context_length} tokens; shorten the conversation",
                "messages",
                "context_length_exceeded",
            )

    def _image_urls(self, messages: list[ChatMessage]) -> list[tuple[str, str]]:
        """(url, param path) of every image part, after the role and count checks (nothing loaded yet)."""
        found = []
        for i, message in enumerate(messages):
            parts = message.content if isinstance(message.content, list) else []
            for j, part in enumerate(parts):
                if isinstance(part, ImagePart):
                    if message.role != "user":
                        raise bad_request(
                            f"messages.{i}: images are only accepted in user messages, not {message.role}",
                            f"messages.{i}.content.{j}",
                        )
                    found.append((part.image_url.url, f"messages.{i}.content.{j}.image_url"))
        if len(found) > self.max_images:
            raise bad_request(
                f"too many images: {len(found)} in this request, this server accepts at most "
                f"{self.max_images}; send fewer images per request",
                "messages",
                "too_many_images",
            )
        return found

    def _turn(self, index: int, message: ChatMessage) -> dict:
        """{"role", "content"} with `<image>` markers placed as the model was trained."""
        text = "\n".join(_texts(message))
        parts = [] if isinstance(message.content, str) else message.content
        n_images = sum(isinstance(p, ImagePart) for p in parts)
        reserved = [t for t in self._reserved if t in text]
        if reserved:
            raise bad_request(
                f"messages.{index}.content contains {reserved[0]!r}, which this model reserves for images; "
                "send images as image_url content parts and remove the marker from the text",
                f"messages.{index}.content",
            )
        return {"role": _ROLES[message.role], "content": self.processor.place_images(text, n_images)}


def _texts(message: ChatMessage) -> list[str]:
    if isinstance(message.content, str):
        return [message.content]
    return [p.text for p in message.content if not isinstance(p, ImagePart)]
