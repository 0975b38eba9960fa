"""Tokenizers: load a pretrained one, or train a byte-level BPE offline for from-scratch recipes.

Whatever its origin, the tokenizer leaves here with a chat template, a pad token and the
front-end's special tokens, so the rest of the code never special-cases it.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .config import TokenizerConfig
from .errors import ConfigError

# Newline-terminated role headers keep the reply's first token identical at train and test time.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
EOS, PAD = "<|end|>", "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` (lossless for any input, tiny for synthetic data)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )


def load_tokenizer(cfg: TokenizerConfig, texts: Iterable[str] | None = None):
    """Pretrained tokenizer from a name/path, or a freshly trained BPE when `train_vocab_size` is set."""
    if cfg.name_or_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path)
    elif cfg.train_vocab_size is not None:
        if texts is None:
            raise ConfigError("tokenizer.train_vocab_size is set but no training text was given")
        tokenizer = train_bpe(texts, cfg.train_vocab_size)
    else:
        raise ConfigError("tokenizer: set either name_or_path (pretrained) or train_vocab_size (train a BPE)")
    if cfg.chat_template is not None:
        tokenizer.chat_template = cfg.chat_template
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [EOS, *ROLE_TOKENS]}, replace_extra_special_tokens=False
        )
        tokenizer.eos_token = tokenizer.eos_token or EOS
    return tokenizer


def add_frontend_tokens(tokenizer, tokens: list[str]):
    """Register the front-end's placeholder tokens as special (never split, never merged)."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def generation_kwargs(tokenizer) -> dict:
    """Stop on the tokenizer's eos and on the chat template's end-of-turn token, pad with its pad id."""
    stops = [tokenizer.eos_token_id]
    end_of_turn = tokenizer.get_vocab().get(EOS)
    if end_of_turn is not None and end_of_turn not in stops:
        stops.append(end_of_turn)
    return {"eos_token_id": stops, "pad_token_id": tokenizer.pad_token_id}
