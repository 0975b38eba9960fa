"""The path a user with internet takes: LLM, vision tower and tokenizer loaded by name/path.

The test writes real Hugging Face checkpoints to disk first (a CLIP dual-encoder, a Qwen2 LLM and
its tokenizer), then builds a VLModel from their paths exactly as a hub id would be resolved.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, CLIPConfig, CLIPModel, Qwen2Config, Qwen2ForCausalLM

from vlbridge.config import TokenizerConfig, VLConfig
from vlbridge.factory import build, load_pretrained
from vlbridge.testing import TINY_LLM_CONFIGS, TINY_TOWER_CONFIGS
from vlbridge.tokenization import load_tokenizer, train_bpe


def write_pretrained(tmp_path):
    tokenizer = train_bpe(["What color is the circle? red", "How many squares? two"] * 20, 300)
    tokenizer.save_pretrained(tmp_path / "llm")
    torch.manual_seed(1)
    llm = Qwen2ForCausalLM(Qwen2Config(**TINY_LLM_CONFIGS["qwen2"], vocab_size=len(tokenizer)))
    llm.save_pretrained(tmp_path / "llm")
    vision = TINY_TOWER_CONFIGS["clip_vision_model"]
    clip = CLIPModel(
        CLIPConfig(
            vision_config=vision,
            text_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            },
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    return llm, clip


def test_build_from_local_pretrained_checkpoints(tmp_path, red_image):
    llm, clip = write_pretrained(tmp_path)
    config = VLConfig.model_validate(
        {
            "llm": {"name_or_path": str(tmp_path / "llm")},
            "frontend": {"type": "llava", "vision": {"name_or_path": str(tmp_path / "clip")}},
        }
    )
    tokenizer = load_tokenizer(TokenizerConfig(name_or_path=str(tmp_path / "llm")))
    n_before = len(tokenizer)
    model, processor = build(config, tokenizer)

    assert len(tokenizer) == n_before + 1  # <image> added, embeddings resized to match
    assert model.language_model.get_input_embeddings().num_embeddings >= len(tokenizer)
    llm_state = llm.state_dict()
    for key, value in model.language_model.state_dict().items():
        if "embed_tokens" not in key and "lm_head" not in key:
            assert torch.equal(value, llm_state[key]), key
    tower = model.frontend.vision_tower.model  # the vision half of the CLIP checkpoint, weights included
    assert torch.equal(
        tower.embeddings.patch_embedding.weight, clip.vision_model.embeddings.patch_embedding.weight
    )

    batch = processor([[{"role": "user", "content": "<image>\nWhat color?"}]], [[red_image]])
    model.eval()
    before = model(**batch).logits
    model.save_pretrained(tmp_path / "vl", tokenizer)
    reloaded, _ = load_pretrained(tmp_path / "vl")
    assert torch.equal(reloaded(**batch).logits, before)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "vl" / "llm"), Qwen2ForCausalLM)
