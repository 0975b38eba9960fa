"""Tokenizers: the offline BPE is lossless, special tokens stay whole, and loading keeps templates."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlbridge.config import TokenizerConfig
from vlbridge.errors import ConfigError
from vlbridge.tokenization import (
    DEFAULT_CHAT_TEMPLATE,
    EOS,
    PAD,
    ROLE_TOKENS,
    add_frontend_tokens,
    load_tokenizer,
    train_bpe,
)

CORPUS = ["What color is the circle? The circle is red.", "How many squares are there? two"] * 10
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "<image>\nWhat color is the circle?"},
    {"role": "assistant", "content": "red"},
]


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return add_frontend_tokens(train_bpe(CORPUS, 300), ["<image>"])


def random_text(seed: int, n: int = 200) -> str:
    """Arbitrary code points: ASCII, Latin-1, CJK, emoji, combining marks and control characters."""
    rng = random.Random(seed)
    ranges = [
        (0x00, 0x7F),
        (0xA0, 0x17F),
        (0x300, 0x36F),
        (0x4E00, 0x4FFF),
        (0x1F600, 0x1F64F),
        (0x0E00, 0x0E7F),
    ]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


@pytest.mark.parametrize(
    "text",
    [
        "What color is the circle?",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\r\n\n  , . 's don 't",
        "héllo wörld — 中文 日本語 🙂👍🏽 e\u0301",
        "",
        *(random_text(seed) for seed in range(3)),
    ],
)
def test_train_bpe_round_trip(tok, text) -> None:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(tok) -> None:
    for token in [PAD, EOS, *ROLE_TOKENS, "<image>"]:
        token_id = tok.convert_tokens_to_ids(token)
        assert token_id != tok.unk_token_id and isinstance(token_id, int)
        assert tok(token, add_special_tokens=False)["input_ids"] == [token_id]
        ids = tok(f"red{token}circle", add_special_tokens=False)["input_ids"]
        assert ids.count(token_id) == 1 and tok.decode(ids) == f"red{token}circle"
    assert len({tok.convert_tokens_to_ids(t) for t in [PAD, EOS, *ROLE_TOKENS, "<image>"]}) == 6
    assert tok.eos_token == EOS and tok.pad_token == PAD and tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert (
        rendered == "<|system|>\nBe brief.<|end|>\n<|user|>\n<image>\nWhat color is the circle?<|end|>\n"
        "<|assistant|>\nred<|end|>\n"
    )


def test_add_frontend_tokens_is_idempotent(tok) -> None:
    size = len(tok)
    assert len(add_frontend_tokens(tok, ["<image>"])) == size
    assert "<image>" in tok.all_special_tokens


def test_save_and_load_keep_template_and_special_tokens(tok, tmp_path) -> None:
    tok.save_pretrained(tmp_path)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    for loaded in (
        AutoTokenizer.from_pretrained(tmp_path),
        load_tokenizer(TokenizerConfig(name_or_path=str(tmp_path))),
    ):
        assert loaded.chat_template == tok.chat_template
        assert (loaded.eos_token, loaded.pad_token) == (EOS, PAD)
        assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
        assert loaded.apply_chat_template(CONVERSATION, tokenize=False) == text
        assert (
            loaded(text, add_special_tokens=False)["input_ids"]
            == tok(text, add_special_tokens=False)["input_ids"]
        )
        assert loaded.convert_tokens_to_ids("<image>") == tok.convert_tokens_to_ids("<image>")
        assert "<image>" in loaded.all_special_tokens and len(loaded) == len(tok)


def base_tokenizer_dir(path, *, eos: str | None) -> str:
    """A pretrained-style tokenizer directory with no chat template (like a base LLM's)."""
    specials = ["<s>", "</s>", "<extra_0>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    base = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token=eos, additional_special_tokens=["<extra_0>"]
    )
    assert base.chat_template is None
    base.save_pretrained(path)
    return str(path)


def test_load_pretrained_without_chat_template(tmp_path) -> None:
    tok = load_tokenizer(TokenizerConfig(name_or_path=base_tokenizer_dir(tmp_path, eos="</s>")))
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    for token in [EOS, *ROLE_TOKENS]:
        assert tok(token, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(token)]
    assert "<extra_0>" in tok.all_special_tokens, "existing special tokens must survive"
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>"
    ids = tok.apply_chat_template(CONVERSATION[1:], tokenize=False, add_generation_prompt=True)
    assert ids.endswith("<|assistant|>\n")

    no_eos = load_tokenizer(TokenizerConfig(name_or_path=base_tokenizer_dir(tmp_path / "no_eos", eos=None)))
    assert no_eos.eos_token == EOS
    assert add_frontend_tokens(no_eos, ["<image>"]).pad_token == EOS


def test_config_chat_template_overrides(tok, tmp_path) -> None:
    tok.save_pretrained(tmp_path)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    loaded = load_tokenizer(TokenizerConfig(name_or_path=str(tmp_path), chat_template=template))
    assert loaded.apply_chat_template(CONVERSATION[2:], tokenize=False) == "assistant: red\n"


def test_load_tokenizer_trains_a_bpe() -> None:
    tok = load_tokenizer(TokenizerConfig(train_vocab_size=300), texts=CORPUS)
    assert len(tok) <= 300 and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    text = "What color is the circle?"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="name_or_path .* or train_vocab_size"):
        load_tokenizer(TokenizerConfig())
    with pytest.raises(ConfigError, match="no training text"):
        load_tokenizer(TokenizerConfig(train_vocab_size=300))
    with pytest.raises(ValidationError, match="train_vocab_size"):
        TokenizerConfig(train_vocab_size=10)
    with pytest.raises(ValidationError, match="vocab_size"):
        TokenizerConfig.model_validate({"vocab_size": 300})
