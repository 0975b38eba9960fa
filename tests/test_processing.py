"""VLProcessor: label masking for any chat template, `<image>` expansion, truncation and padding."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlbridge.errors import DataError
from vlbridge.frontends.llava import LlavaConfig, LlavaFrontend
from vlbridge.processing import IGNORE_INDEX, DropCounter, VLProcessor, pad_batch
from vlbridge.tokenization import add_frontend_tokens, train_bpe

CORPUS = ["What color is the circle? red blue green square triangle yes no left right"] * 10

CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# template name -> (jinja or None for the default, extra special tokens, end-of-turn token)
TEMPLATES = {
    "default": (None, [], "<|end|>"),
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama3": (
        LLAMA3,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
    ),
}

SINGLE = [{"role": "user", "content": "What color is the circle?"}, {"role": "assistant", "content": "red"}]
MULTI = SINGLE + [
    {"role": "user", "content": "And the square?"},
    {"role": "assistant", "content": "blue green"},
    {"role": "user", "content": "yes?"},
    {"role": "assistant", "content": "no"},
]
SYSTEM = [{"role": "system", "content": "Answer in one word."}, *MULTI]


@pytest.fixture(scope="module")
def frontend() -> LlavaFrontend:
    """A tiny randomly initialised CLIP tower: 32 px images, 8 px patches -> 16 image tokens."""
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    cfg = LlavaConfig.model_validate(
        {"vision": {"model_type": "clip_vision_model", "config": vision}, "connector": {"type": "linear"}}
    )
    return LlavaFrontend.image_layout(cfg)


def make_processor(frontend, template: str = "default", max_length: int = 2048) -> VLProcessor:
    jinja, specials, _ = TEMPLATES[template]
    tok = train_bpe(CORPUS, 300)
    if jinja is not None:
        tok.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
        tok.chat_template = jinja
        if template == "llama3":
            tok.bos_token = "<|begin_of_text|>"
    tok = add_frontend_tokens(tok, list(frontend.special_tokens))
    return VLProcessor(tok, frontend, max_length=max_length)


def supervised_runs(enc) -> list[list[int]]:
    """Maximal runs of labelled tokens; each label must equal its input id."""
    runs, current = [], []
    for token, label in zip(enc.input_ids, enc.labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def image(color=(255, 0, 0), size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("messages", [SINGLE, MULTI, SYSTEM], ids=["single", "multi", "system"])
def test_labels_are_exactly_the_assistant_replies(frontend, template, messages) -> None:
    proc = make_processor(frontend, template)
    end = TEMPLATES[template][2]
    enc = proc.encode(messages)
    replies = [m["content"] + end for m in messages if m["role"] == "assistant"]
    assert [proc.tokenizer.decode(run) for run in supervised_runs(enc)] == replies
    # nothing else is supervised: the rendered prompt without the replies has no labels
    assert sum(label != IGNORE_INDEX for label in enc.labels) == sum(map(len, supervised_runs(enc)))
    assert proc.tokenizer.decode(enc.input_ids) == proc.render(messages)


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_generation_prompt_ends_where_the_reply_starts(frontend, template) -> None:
    proc = make_processor(frontend, template)
    for messages in (SINGLE, MULTI, SYSTEM):
        full = proc.encode(messages, [])
        prompt = proc.encode(messages[:-1], add_generation_prompt=True)
        assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids
        assert all(label == IGNORE_INDEX for label in prompt.labels)
        # the first token after the prompt is the first supervised token of the last reply
        assert full.labels[len(prompt.input_ids)] == full.input_ids[len(prompt.input_ids)]
        assert full.labels[len(prompt.input_ids) - 1] == IGNORE_INDEX


@pytest.mark.parametrize("template", ["default", "llama3"])
def test_image_expands_to_the_frontend_token_count(frontend, template) -> None:
    proc = make_processor(frontend, template)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    messages = [{"role": "user", "content": "Look<image>\nWhat color is the circle?"}, SINGLE[1]]
    enc = proc.encode(messages, [image()])
    n = frontend.num_image_tokens(enc.pixel_values[0])
    assert n == 16
    positions = [i for i, t in enumerate(enc.input_ids) if t == image_id]
    assert len(positions) == n and positions == list(range(positions[0], positions[0] + n))
    assert all(enc.labels[i] == IGNORE_INDEX for i in positions)
    assert [proc.tokenizer.decode(r) for r in supervised_runs(enc)] == ["red" + TEMPLATES[template][2]]
    assert len(enc.pixel_values) == 1 and enc.pixel_values[0].shape == (3, 32, 32)
    # the text around the image is tokenized exactly as without it
    without = proc.encode([{"role": "user", "content": "Look\nWhat color is the circle?"}, SINGLE[1]])
    assert [t for t in enc.input_ids if t != image_id] == without.input_ids


def test_multiple_images_in_one_conversation(frontend) -> None:
    proc = make_processor(frontend)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    messages = [
        {"role": "user", "content": "<image>\nWhat color is the circle?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And here <image> and <image>?"},
        {"role": "assistant", "content": "blue green"},
    ]
    images = [image((255, 0, 0)), image((0, 0, 255)), image((0, 255, 0))]
    enc = proc.encode(messages, images)
    assert enc.input_ids.count(image_id) == 3 * frontend.num_image_tokens(enc.pixel_values[0])
    assert [px[:, 0, 0].argmax().item() for px in enc.pixel_values] == [0, 2, 1]
    assert [proc.tokenizer.decode(r) for r in supervised_runs(enc)] == ["red<|end|>", "blue green<|end|>"]
    assert all(
        label == IGNORE_INDEX for t, label in zip(enc.input_ids, enc.labels, strict=True) if t == image_id
    )


def test_marker_image_count_mismatch(frontend) -> None:
    proc = make_processor(frontend)
    two_marks = [{"role": "user", "content": "<image> and <image>"}, SINGLE[1]]
    with pytest.raises(DataError, match=r"sample s7: 2 '<image>' markers .* 1 images"):
        proc.encode(two_marks, [image()], sample_id="s7")
    with pytest.raises(DataError, match="0 '<image>' markers"):
        proc.encode(SINGLE, [image()])
    with pytest.raises(DataError, match="1 '<image>' markers .* 0 images"):
        proc.encode([{"role": "user", "content": "<image>"}, SINGLE[1]])


def test_truncation_keeps_text_cuts_and_drops_image_cuts(frontend) -> None:
    proc = make_processor(frontend)
    long_answer = [
        {"role": "user", "content": "<image>\nWhat?"},
        {"role": "assistant", "content": "red " * 30},
    ]
    image_last = [
        {"role": "user", "content": "circle " * 20 + "<image>"},
        {"role": "assistant", "content": "red"},
    ]
    long_question = [
        {"role": "user", "content": "<image>\n" + "circle " * 30},
        {"role": "assistant", "content": "red"},
    ]
    drops = DropCounter()

    enc = proc.encode(long_answer, [image()])
    proc.max_length = len(enc.input_ids) - 5
    cut = proc.truncate(enc, drops)
    assert cut is not None and len(cut.input_ids) == len(cut.labels) == proc.max_length
    assert cut.input_ids == enc.input_ids[: proc.max_length] and cut.labels == enc.labels[: proc.max_length]
    assert cut.pixel_values is enc.pixel_values and drops.total == 0

    enc = proc.encode(image_last, [image()])
    proc.max_length = len(enc.input_ids) - 10  # inside the image tokens
    assert proc.truncate(enc, drops) is None
    assert drops.counts == {"image_truncated": 1}

    enc = proc.encode(long_question, [image()])
    proc.max_length = len(enc.input_ids) - 5  # after the image, before the answer
    assert proc.truncate(enc, drops) is None
    assert drops.counts == {"image_truncated": 1, "no_answer_left": 1} and drops.total == 2

    proc.max_length = len(enc.input_ids)
    assert proc.truncate(enc, drops) is enc


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch(frontend, side) -> None:
    proc = make_processor(frontend)
    pad = proc.tokenizer.pad_token_id
    short = proc.encode(
        [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "no"}], [image()]
    )
    long = proc.encode(MULTI[:1] + [{"role": "user", "content": "<image>"}, MULTI[3]], [image((0, 0, 255))])
    batch = pad_batch([short, long], pad, frontend, side=side)
    width = len(long.input_ids)
    n = len(short.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["input_ids"][1].tolist() == long.input_ids and batch["attention_mask"][1].all()
    kept = slice(0, n) if side == "right" else slice(width - n, width)
    padded = slice(n, width) if side == "right" else slice(0, width - n)
    assert batch["input_ids"][0, kept].tolist() == short.input_ids
    assert batch["labels"][0, kept].tolist() == short.labels
    assert (batch["input_ids"][0, padded] == pad).all()
    assert (batch["labels"][0, padded] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [int(kept.start <= i < kept.stop) for i in range(width)]
    assert torch.equal(batch["pixel_values"], torch.stack([*short.pixel_values, *long.pixel_values]))
    assert pad_batch([proc.encode(SINGLE)], pad, frontend)["pixel_values"] is None


def test_call_builds_left_padded_generation_prompts(frontend) -> None:
    proc = make_processor(frontend)
    batch = proc([SINGLE[:1], [{"role": "user", "content": "<image> and <image>"}]], [[], [image(), image()]])
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][0, 0]
    assert "labels" not in batch and batch["pixel_values"].shape == (2, 3, 32, 32)
    assert proc.tokenizer.decode(batch["input_ids"][0, -2:]) == "<|assistant|>\n"


def test_history_rewriting_template_is_rejected(frontend) -> None:
    proc = make_processor(frontend)
    # marks the last turn differently, so rendering a prefix is not a prefix of the whole conversation
    proc.tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if loop.last %} (last){% endif %}"
        "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    with pytest.raises(DataError, match="not prefix-stable"):
        proc.encode(MULTI)
