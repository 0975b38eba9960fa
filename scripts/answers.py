"""Greedy answers to every question of a LLaVA-JSON file (`vlbridge data`), from one engine, as JSON lines.

    python scripts/answers.py transformers EXPORTED_DIR DATA.json  # transformers alone, vlbridge unimportable
    python scripts/answers.py vlbridge CHECKPOINT DATA.json

The transformers side opens an exported checkpoint with AutoProcessor and the class its config names and
prompts it through the processor's chat template with content parts; the vlbridge side is `vlbridge chat`'s
path (load_pretrained, place_images, generate). Both decode 16 greedy tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

NEW_TOKENS = 16


def questions(data: Path) -> list[tuple[str, Image.Image]]:
    records = json.loads(data.read_text())
    out = []
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        out.append((question, Image.open(data.parent / record["image"]).convert("RGB")))
    return out


def transformers_answers(path: str, items) -> list[str]:
    sys.modules["vlbridge"] = None  # prove the export needs nothing of vlbridge
    import torch
    import transformers
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    architecture = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(path).eval()
    answers = []
    for question, image in items:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = processor(images=[image], text=text, return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        new = tokens[0, inputs["input_ids"].shape[1] :]
        answers.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers


def vlbridge_answers(path: str, items) -> list[str]:
    import torch

    from vlbridge.factory import load_pretrained

    model, processor = load_pretrained(path)
    answers = []
    for question, image in items:
        batch = processor([[{"role": "user", "content": processor.place_images(question, 1)}]], [[image]])
        with torch.no_grad():
            tokens = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        answers.append(processor.tokenizer.decode(tokens[0], skip_special_tokens=True).strip())
    return answers


def main() -> None:
    engine, path, data = sys.argv[1:4]
    answer = {"transformers": transformers_answers, "vlbridge": vlbridge_answers}[engine]
    for text in answer(path, questions(Path(data))):
        print(json.dumps(text))


if __name__ == "__main__":
    main()
