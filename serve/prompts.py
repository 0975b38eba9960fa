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
    """Builds prompts for one model; thread-safe (requests are prepared in a thread pool)."""

    def __init__(
        self,
        processor: VLProcessor,
        loader: ImageLoader,
        *,
        image_position: str,
        context_length: int,
        max_images: int,
        tokenizer_lock: threading.Lock | None = None,
    ) -> None:
        self.processor = processor
        self.loader = loader
        self.image_position = image_position
        self.context_length = context_length
        self.max_images = max_images
        # Shared with the engine's decoding: a Rust tokenizer must not be reconfigured while in use.
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self._reserved = [processor.image_token, *processor.frontend.special_tokens()]
        self._image_ids = set(processor.image_ids())

    def build(self, messages: list[ChatMessage]) -> Prompt:
        urls = self._image_urls(messages)
        images = [self.loader.load(url, param) for url, param in urls]
        conversation = [self._turn(i, m) for i, m in enumerate(messages)]
        try:
            with self.tokenizer_lock:
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
        if isinstance(message.content, str):
            texts, n_images = [message.content], 0
        else:
            texts = [p.text for p in message.content if not isinstance(p, ImagePart)]
            n_images = sum(isinstance(p, ImagePart) for p in message.content)
        text = "\n".join(texts)
        reserved = [t for t in self._reserved if t in text]
        if reserved:
            raise bad_request(
                f"messages.{index}.content contains {reserved[0]!r}, which this model reserves for images; "
                "send images as image_url content parts and remove the marker from the text",
                f"messages.{index}.content",
            )
        if n_images:
            marks = "\n".join(self.processor.image_token for _ in range(n_images))
            text = f"{marks}\n{text}" if self.image_position == "before" else f"{text}\n{marks}"
        return {"role": _ROLES[message.role], "content": text}
