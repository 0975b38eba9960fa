"""An imported transformers LLaVA checkpoint answers through `vlbridge chat`, `vlbridge serve` (the official
openai client) and the eval backend exactly as transformers' own `generate` does."""

from __future__ import annotations

import torch
from PIL import Image
from serve_kit import LiveServer, image_message

from vlbridge.cli import main
from vlbridge.eval.backends.base import Request
from vlbridge.eval.backends.model import ModelBackend
from vlbridge.serve.config import ServerConfig
from vlbridge.testing import write_tiny_llava_hf

QUESTION = "What color is it?"
NEW = 8


def test_chat_serve_and_eval_give_transformers_greedy_answer(tmp_path, capsys):
    hf_model, hf_processor = write_tiny_llava_hf(tmp_path / "llava", "qwen2")
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    image.save(tmp_path / "image.png")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = hf_processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = hf_processor(images=[image], text=text, return_tensors="pt")
    tok = hf_processor.tokenizer
    with torch.no_grad():
        tokens = hf_model.generate(
            **inputs,
            max_new_tokens=NEW,
            min_new_tokens=NEW,  # every path runs all the steps
            do_sample=False,
            suppress_tokens=[hf_model.config.image_token_id, tok.eos_token_id],
        )
    want = tok.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert want  # a real answer to compare

    # transformers runs all NEW steps (eos suppressed); vlbridge's paths must give the same NEW tokens
    main(["chat", str(tmp_path / "llava"), "--image", str(tmp_path / "image.png"), QUESTION,
          "--max-new-tokens", str(NEW)])  # fmt: skip
    chatted = capsys.readouterr().out.strip()

    backend = ModelBackend.from_checkpoint(tmp_path / "llava", device="cpu")
    evaluated = backend.generate(
        [Request([{"role": "user", "content": f"<image>\n{QUESTION}"}], [image])], NEW
    )[0]

    with LiveServer(ServerConfig(checkpoint=str(tmp_path / "llava"))) as live:
        reply = live.client().chat.completions.create(
            model="llava", messages=[image_message(QUESTION, image)], max_tokens=NEW, temperature=0
        )
    served = reply.choices[0].message.content.strip()
    assert chatted == evaluated == served == want
