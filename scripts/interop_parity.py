"""Import parity, measured: tiny transformers LLaVA / LLaVA-NeXT checkpoints of every LLM family opened by
vlbridge, against transformers' own forward and generate on the same image and question.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/interop_parity.py

Prints max |Δlogit| over the prompt (fp32) and whether the 8 greedy tokens are identical.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from PIL import Image

from vlbridge.factory import load_pretrained
from vlbridge.testing import TINY_LLM_CONFIGS, write_tiny_llava_hf, write_tiny_llava_next

IMAGES = {
    "wide": Image.new("RGB", (70, 30), (220, 40, 40)),
    "tall": Image.new("RGB", (24, 60), (30, 40, 220)),
}
QUESTION = "What color is it?"


def compare(path: Path, hf_model, hf_processor, image) -> tuple[float, bool]:
    model, processor = load_pretrained(path)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = hf_processor.apply_chat_template(conversation, add_generation_prompt=True)
    want = hf_processor(images=[image], text=text, return_tensors="pt")
    got = processor([[{"role": "user", "content": processor.place_images(QUESTION, 1)}]], [[image]])
    assert torch.equal(want["input_ids"], got["input_ids"]), "different prompts"
    tok = processor.tokenizer
    greedy = {
        "max_new_tokens": 8,
        "do_sample": False,
        "suppress_tokens": [tok.convert_tokens_to_ids("<image>")],
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    with torch.no_grad():
        delta = (hf_model(**want).logits - model(**got).logits).abs().max().item()
        theirs = hf_model.generate(**want, **greedy)[0, want["input_ids"].shape[1] :]
        ours = model.generate(**got, **greedy)[0]
    return delta, torch.equal(theirs, ours)


def main() -> None:
    print("| layout | family | image | max abs dlogit | greedy identical |")
    print("|---|---|---|---|---|")
    for family in TINY_LLM_CONFIGS:
        for layout, write in (("llava", write_tiny_llava_hf), ("llava_next", write_tiny_llava_next)):
            path = Path(tempfile.mkdtemp()) / layout
            hf_model, hf_processor = write(path, family)
            for name, image in IMAGES.items():
                delta, same = compare(path, hf_model, hf_processor, image)
                print(f"| {layout} | {family} | {name} | {delta:.2e} | {same} |")


if __name__ == "__main__":
    main()
