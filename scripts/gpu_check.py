"""The GPU checks, in one run (`scripts/gpu_check.sh` starts it on a lent machine): figures to one JSON.

1. SDPA's flash backend in bf16 (torch's own kernels; the flash-attn package is not needed): a causal
   attention under `sdpa_kernel(FLASH_ATTENTION)` against the math backend, and its speed.
2. Every front-end: one bf16-autocast training step (finite loss, gradients in every trainable part)
   and a greedy generate.
3. Batch-1 decode of a 0.5B-shaped random LLM (Qwen2-0.5B's shapes) in the serving engine, against the
   memory-bandwidth limit (serve/roofline.py).
4. Output tokens/s at 64 closed-loop clients against `vlbridge serve` on that model.

Without CUDA the same steps run on the CPU at small sizes (`--small`): a dry run of the script itself.

    python scripts/gpu_check.py --output runs/gpu_check.json [--small] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from vlbridge.factory import build
from vlbridge.processing import pad_batch
from vlbridge.testing import TINY_FRONTEND_CONFIGS, chat, tiny_model, tiny_tokenizer, train_batch

# Qwen2-0.5B's shapes (494 M parameters with the tied 151,936-row embedding)
HALF_B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}
SMALL = {**HALF_B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "vocab_size": 4096}
SMALL |= {"num_attention_heads": 4, "num_key_value_heads": 2}


def timed(fn, repeats: int = 20) -> float:
    """Median milliseconds of `fn()` (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def flash_attention(device: str, small: bool) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    length = 256 if small else 4096
    q, k, v = (torch.randn(4, 16, length, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        math_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    if device != "cuda":
        return {"flash": "not on CPU", "math_ms": math_ms}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        flash_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    return {
        "shape": list(q.shape),
        "max_abs_diff_vs_fp32_math": (out.float() - reference).abs().max().item(),
        "flash_ms": flash_ms,
        "math_bf16_ms": math_ms,
        "speedup": math_ms / flash_ms,
    }


def scene(size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 30, 30))
    return image


def frontend_step(kind: str, device: str) -> dict:
    """One bf16-autocast training step and a greedy generate of the tiny `kind` model on `device`."""
    vl = tiny_model("llama", frontend={"type": kind})
    model, tokenizer, processor = vl
    model.to(device).train()
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in train_batch(vl, scene()).items()}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(**batch).loss
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.eval()
    prompt = processor.encode(chat("What color is the circle?"), [scene()], add_generation_prompt=True)
    inputs = pad_batch([prompt], tokenizer.pad_token_id, model.frontend.layout)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return {
        "loss": loss.item(),
        "finite": bool(torch.isfinite(loss)),
        "trainable_tensors": len(trainable),
        "without_gradient": missing[:5],
        "generated": tokenizer.decode(out[0, -8:].tolist()),
    }


def half_b_checkpoint(device: str, small: bool) -> Path:
    """A random 0.5B-shaped LLM under a llava front-end, saved (bf16 on CUDA)."""
    from vlbridge.testing import tiny_vl_config

    config = tiny_vl_config("qwen2", llm={"config": SMALL if small else HALF_B})
    config.frontend.connector.merge = 1
    torch.manual_seed(0)
    model, processor = build(config, tiny_tokenizer(config))
    out = Path(tempfile.mkdtemp(prefix="vlbridge-gpu-check-")) / "half_b"
    model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(out, processor.tokenizer)
    return out


def decode_roofline(checkpoint: Path, device: str) -> dict:
    from vlbridge.factory import load_pretrained
    from vlbridge.serve.roofline import decode_roofline as measure

    model, processor = load_pretrained(checkpoint, device=device)
    params = sum(p.numel() for p in model.language_model.parameters())
    return {"llm_parameters": params, "dtype": str(next(model.parameters()).dtype)} | measure(
        model, processor.tokenizer, processor, tokens=128, bandwidth_mib=2048 if device == "cuda" else 256
    )


def serve_64(checkpoint: Path, seconds: float) -> dict:
    from vlbridge.serve.loadgen import (
        NO_REUSE,
        ServerProcess,
        image_chat,
        request_body,
        run_level,
        vlbridge_serve,
    )

    server = ServerProcess(vlbridge_serve(str(checkpoint), "--max-batch-size", "64", *NO_REUSE))
    try:
        server.wait_ready()
        body = request_body(image_chat(), 64)
        asyncio.run(run_level(server.url, 1, 0, body, "continuous"))
        summary = asyncio.run(run_level(server.url, 64, seconds, body, "continuous")).summary()
        return summary | {"engine": server.stats()}
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="runs/gpu_check.json")
    parser.add_argument("--small", action="store_true", help="small sizes (the default without CUDA)")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of the 64-client load")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.machine()}
    report |= {"torch": torch.__version__, "small": small}
    import transformers

    report["transformers"] = transformers.__version__
    steps = {
        "flash_attention": lambda: flash_attention(device, small),
        "frontends": lambda: {kind: frontend_step(kind, device) for kind in TINY_FRONTEND_CONFIGS},
    }
    for name, step in steps.items():
        report[name] = run_step(name, step)
    checkpoint = half_b_checkpoint(device, small)
    report["decode_roofline"] = run_step("decode_roofline", lambda: decode_roofline(checkpoint, device))
    report["serve_64_clients"] = run_step("serve_64_clients", lambda: serve_64(checkpoint, args.seconds))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def run_step(name: str, step) -> dict:
    """A step's figures, or its error: one failing check must not hide the others' figures."""
    started = time.perf_counter()
    try:
        result = step()
    except Exception as err:  # noqa: BLE001 - reported in the JSON, the run goes on
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
