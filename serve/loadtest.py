"""Load benchmark of `vlbridge serve`: closed-loop streaming clients against a real server process.

    python -m vlbridge.serve.loadtest CHECKPOINT [--clients 1 4 16 64] [--duration 30] [--max-tokens 32]

CHECKPOINT is a run/checkpoint directory, or `random:tiny` / `random:mid` for a random model written to
a temporary directory. For each client count, every client sends image + question requests (streamed,
fixed length via `ignore_eos`) back to back for `--duration` seconds; reported: requests/s, output
tokens/s, p50/p95 time to first token and inter-token latency, errors, and the server's peak resident
memory. The same engine with `--max-batch-size 1` (one request at a time) serves `--baseline-clients`
in the same run for the batching speed-up; `--roofline` adds batch-1 decode speed against memory
bandwidth (serve/roofline.py). Results go to OUTPUT/results.json and a markdown table on stdout.

`--peer transformers` instead puts `vlbridge serve` beside `transformers serve` on the same model
(serve/peer.py): image chats against its llava-hf export, text chats against the LLM alone (continuous
batching on, which the peer has for text only), at `--peer-clients` (1 16 64), with output tokens/s, p50/p99
time to first token, errors, the ratio, and whether both give the same greedy answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .loadgen import NO_REUSE, ServerProcess, image_chat, request_body, serve_levels, vlbridge_serve
from .peer import peer_comparison, peer_markdown

# A mid-size random model: a 12-layer, 768-wide Llama (≈75 M LLM parameters, 300 MB in fp32, far beyond
# any CPU cache, so decode is bandwidth-bound) over a small ViT; the tiny one is vlbridge.testing's.
MID_OVERRIDES = {
    "llm": {
        "config": {
            "hidden_size": 768,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
            "max_position_embeddings": 2048,
        }
    },
    "frontend": {
        "type": "llava",
        "vision": {"config": {"hidden_size": 256, "intermediate_size": 512, "image_size": 64}},
        "connector": {"merge": 1},  # as LLaVA's: one token a patch, so transformers' LLaVA can load it
        "image": {"size": 64},
    },
    "max_length": 1024,
}

TINY_OVERRIDES = {"frontend": {"connector": {"merge": 1}}}  # vlbridge.testing's tiny model, as LLaVA's


def own_levels(args, checkpoint: str, max_batch: int, levels: list[int], batch: str) -> dict:
    """vlbridge's engine at `max_batch` under fixed-length image chats, with its counters."""
    flags = ("--max-batch-size", str(max_batch), "--model-name", "bench", *NO_REUSE)
    flags += ("--compile",) if args.compile else ()
    server = ServerProcess(vlbridge_serve(checkpoint, *flags), args.threads)
    body = request_body(image_chat(), args.max_tokens)
    return serve_levels(server, levels, args.duration, body, batch, lambda url: {"engine": server.stats()})


def random_checkpoint(size: str) -> str:
    """Write a random model (`tiny` or `mid`) to a temporary directory; returns its path."""
    from vlbridge.testing import tiny_model

    out = Path(tempfile.mkdtemp(prefix=f"vlbridge-{size}-")) / size
    if size not in ("tiny", "mid"):
        raise SystemExit(f"unknown random model size {size!r}: use random:tiny or random:mid")
    overrides = MID_OVERRIDES if size == "mid" else TINY_OVERRIDES
    model, tokenizer, _ = tiny_model("llama", "clip_vision_model", **overrides)
    answer_in_visible_text(model.language_model, tokenizer)
    model.save_pretrained(out, tokenizer)
    return str(out)


def answer_in_visible_text(language_model, tokenizer) -> None:
    """Zero the output rows of tokens that show no text (special tokens, end of text included) or part of
    a character (a lone UTF-8 byte). Random weights otherwise pick them as readily as any, and an answer
    no server can show has no time to first token; a zero logit loses to the largest of the others, so
    answers are also as long as `max_tokens` on any server, without `ignore_eos`."""
    import torch

    texts = [tokenizer.decode([i], skip_special_tokens=True) for i in range(len(tokenizer))]
    hidden = [i for i, text in enumerate(texts) if not text or "\ufffd" in text]
    with torch.no_grad():
        language_model.get_output_embeddings().weight[hidden] = 0


def roofline(checkpoint: str, threads: int | None) -> dict:
    import torch

    from vlbridge.checkpoint import resolve_checkpoint
    from vlbridge.factory import load_pretrained

    from .roofline import decode_roofline

    if threads:
        torch.set_num_threads(threads)
    model, processor = load_pretrained(resolve_checkpoint(checkpoint))
    return decode_roofline(model, processor.tokenizer, processor)


def own_markdown(report: dict) -> list[str]:
    rows = [
        "| batching | clients | req/s | out tok/s | TTFT p50/p95 ms | ITL p50/p95 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("batched", "one_at_a_time"):
        for lv in report[mode]["levels"]:
            rows.append(
                f"| {lv['batching']} | {lv['clients']} | {lv['requests_per_s']} "
                f"| {lv['output_tokens_per_s']} "
                f"| {lv['ttft_ms_p50']} / {lv['ttft_ms_p95']} | {lv['itl_ms_p50']} / {lv['itl_ms_p95']} "
                f"| {lv['errors']} |"
            )
    rows.append("")
    rows.append(
        f"peak server RSS: batched {report['batched']['peak_rss_mb']} MB, "
        f"one at a time {report['one_at_a_time']['peak_rss_mb']} MB"
    )
    return rows


def markdown(report: dict) -> str:
    rows = peer_markdown(report["peer"]) if "peer" in report else own_markdown(report)
    if report.get("speedup"):
        rows.append(
            f"output tokens/s at {report['speedup']['clients']} clients, batched / one at a time: "
            f"**{report['speedup']['ratio']:.2f}x**"
        )
    if report.get("roofline"):
        r = report["roofline"]
        per_token = r["weight_bytes_per_token"] + r["kv_bytes_per_token"]
        rows.append(
            f"batch-1 decode limit {r['bandwidth_limit_tokens_per_s']:.0f} tok/s ({per_token:,} B/token at "
            f"{r['memory_bandwidth_gb_s']:.1f} GB/s read):"
        )
        for mode in ("eager", "compiled"):
            m = r[mode]
            rows.append(
                f"- {mode}: {m['decode_tokens_per_s']:.1f} tok/s, {m['decode_step_ms_p50']:.1f} ms/step "
                f"-> **{100 * m['fraction_of_limit']:.1f} %** of the limit ({m['threads']} threads)"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlbridge.serve.loadtest", description=__doc__.split("\n")[0]
    )
    parser.add_argument("checkpoint", help="run/checkpoint dir, or random:tiny / random:mid")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--baseline-clients", type=int, default=16, help="clients for the max-batch-1 run")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per load level")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (fixed: ignore_eos)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, help="server torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--roofline", action="store_true", help="also batch-1 decode vs memory bandwidth")
    parser.add_argument("--output", default="runs/serve_load")
    parser.add_argument(
        "--peer",
        choices=["transformers"],
        help="instead of batched vs one at a time, vlbridge beside `transformers serve` on the same model",
    )
    parser.add_argument("--peer-clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--peer-chats", nargs="+", choices=["image", "text"], default=["image", "text"])
    parser.add_argument("--compile", action="store_true", help="servers compile decoding (both, with --peer)")
    args = parser.parse_args(argv)

    checkpoint = args.checkpoint
    if checkpoint.startswith("random:"):
        checkpoint = random_checkpoint(checkpoint.split(":", 1)[1])
    report: dict = {"checkpoint": args.checkpoint, "duration_s": args.duration, "max_tokens": args.max_tokens}
    if args.peer:
        report["peer"] = peer_comparison(
            checkpoint,
            args.peer_chats,
            args.peer_clients,
            duration=args.duration,
            max_tokens=args.max_tokens,
            max_batch_size=args.max_batch_size,
            threads=args.threads,
            compile=args.compile,
        )
    else:
        report["batched"] = own_levels(args, checkpoint, args.max_batch_size, args.clients, "continuous")
        report["one_at_a_time"] = own_levels(args, checkpoint, 1, [args.baseline_clients], "max batch 1")
    batched = {lv["clients"]: lv for lv in report.get("batched", {}).get("levels", [])}
    if args.baseline_clients in batched:
        base = report["one_at_a_time"]["levels"][0]["output_tokens_per_s"]
        ratio = batched[args.baseline_clients]["output_tokens_per_s"] / base if base else float("inf")
        report["speedup"] = {"clients": args.baseline_clients, "ratio": ratio}
    if args.roofline:
        report["roofline"] = roofline(checkpoint, args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / "report.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
