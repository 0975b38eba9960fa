"""`vlbridge` command line: train | chat | serve | export | bench | eval | data.

Errors meant for users print without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import VLBridgeError


def _train(args: argparse.Namespace) -> None:
    from .eval.after_training import evaluate_and_report
    from .recipe import load_recipe
    from .training.run import run_training

    recipe = load_recipe(args.recipe, args.overrides)
    if args.output_dir:
        recipe.output_dir = args.output_dir
    evaluate = None if args.no_eval else evaluate_and_report
    run_training(recipe, resume=args.resume, overwrite=args.overwrite, evaluate=evaluate)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave_without_finalizing()


def _leave_without_finalizing() -> None:
    """End a finished torchrun worker with exit handlers run and output flushed, but without interpreter
    finalisation: gloo's threads outlive `destroy_process_group`, and tearing the interpreter down beside
    them sometimes aborted a rank ("terminate called without an active exception") after a complete run,
    which torchrun reports as a failed job."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _chat(args: argparse.Namespace) -> None:
    import torch

    from .checkpoint import resolve_checkpoint
    from .data.io import load_image
    from .factory import load_pretrained
    from .tokenization import generation_kwargs

    model, processor = load_pretrained(resolve_checkpoint(args.checkpoint), reducers=reducer_sections(args))
    images = [load_image(p, "command line") for p in args.image]
    turn = {"role": "user", "content": processor.place_images(args.prompt, len(images))}
    batch = processor([[turn]], [images])
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = (
        {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    )
    tokens = model.generate(
        **batch, max_new_tokens=args.max_new_tokens, **generation_kwargs(processor.tokenizer), **sampling
    )
    print(processor.tokenizer.decode(tokens[0], skip_special_tokens=True).strip())


def reducer_sections(args: argparse.Namespace) -> list[dict]:
    """The `--reducer TYPE[:key=value,...]` options as reducer config sections."""
    from .reducers import parse_reducer_spec

    return [parse_reducer_spec(spec) for spec in getattr(args, "reducer", None) or []]


def add_reducer_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reducer",
        action="append",
        metavar="TYPE[:k=v,...]",
        help="switch on a token reducer for this run, e.g. turbo:r=16 (repeatable)",
    )


def _serve(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from .errors import ConfigError
    from .serve.config import MediaConfig, ServerConfig
    from .serve.server import run

    if args.allowed_domains and not args.allow_remote_images:
        raise ConfigError("--allowed-domains only applies with --allow-remote-images; add that flag")
    try:
        media = MediaConfig(
            allow_remote=args.allow_remote_images,
            allowed_domains=args.allowed_domains or [],
            timeout_s=args.image_timeout,
            max_bytes=args.max_image_bytes,
            max_pixels=args.max_image_pixels,
            max_images=args.max_images,
        )
        config = ServerConfig(
            checkpoint=args.checkpoint,
            host=args.host,
            port=args.port,
            api_key=args.api_key or os.environ.get("VLBRIDGE_API_KEY") or None,
            model_name=args.model_name,
            device=args.device,
            reducers=reducer_sections(args),
            batching=args.batching,
            max_batch_size=args.max_batch_size,
            max_model_len=args.max_model_len,
            encoder_cache_mb=args.encoder_cache_mb,
            prefix_cache_mb=args.prefix_cache_mb,
            compile=args.compile,
            prepack=not args.no_prepack,
            media=media,
        )
    except ValidationError as err:
        raise ConfigError(f"vlbridge serve: {err}") from err
    run(config)


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .checkpoint import resolve_checkpoint
    from .factory import load_pretrained
    from .registry import CHECKPOINT_FORMATS

    model, processor = load_pretrained(resolve_checkpoint(args.checkpoint))
    if args.merge_lora or args.format != "vlbridge":  # other layouts have no adapters
        model.merge_lora()
    if args.format == "vlbridge":
        model.save_pretrained(args.out, processor.tokenizer)
    else:
        CHECKPOINT_FORMATS.get(args.format).export(model, processor, Path(args.out))
    print(args.out)


def _data(args: argparse.Namespace) -> None:
    from .data import shapes, shapes_samples

    scenes = shapes.generate(args.variant, args.split, args.n, seed=args.seed)
    export = {"llava": shapes_samples.export_llava, "datasets": shapes_samples.export_datasets}[args.format]
    print(export(scenes, args.out, questions_per_image=args.questions_per_image))


def _eval(args: argparse.Namespace) -> None:
    """`vlbridge eval CHECKPOINT|--endpoint URL --suite ...`, or `vlbridge eval compare DIR...`."""
    from .errors import ConfigError

    targets = [t for t in args.targets if "=" not in t]
    overrides = [t for t in args.targets if "=" in t] + args.overrides
    if targets[:1] == ["compare"]:
        from .eval.compare import compare

        compare(targets[1:], args.output)
        return
    from .eval.backends import EndpointBackend, ModelBackend
    from .eval.runner import run_eval

    if args.endpoint:
        if args.reducer:
            raise ConfigError("--reducer applies to a checkpoint; start the server with it instead")
        if targets or not args.model:
            raise ConfigError("with --endpoint give --model NAME (the served model's name) and no checkpoint")
        backend = EndpointBackend(
            args.endpoint,
            args.model,
            api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
            image_position=args.image_position or "before",
            concurrency=args.batch_size,
            timeout=args.timeout,
        )
    elif len(targets) == 1:
        backend = ModelBackend.from_checkpoint(targets[0], reducers=reducer_sections(args))
        if args.image_position and args.image_position != backend.image_position:
            raise ConfigError(
                f"--image-position {args.image_position}: this checkpoint was trained with images "
                f"{backend.image_position} the text; prompts follow the checkpoint"
            )
    else:
        got = " ".join(targets) or "none"
        raise ConfigError(f"give one checkpoint (or --endpoint URL --model NAME); got {got}")
    run_eval(
        backend,
        suite=args.suite,
        tasks=args.task,
        overrides=overrides,
        limit=args.limit,
        batch_size=args.batch_size,
        output=args.output,
        progress=not args.no_progress,
    )


def _bench(args: argparse.Namespace) -> None:
    from .eval.bench import run_bench

    run_bench(args.config, args.overrides, args.output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlbridge", description="Vision-language models over any HF causal LLM."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (and evaluate) a model from a recipe YAML")
    train.add_argument("recipe", help="path to a recipe, e.g. recipes/quickstart.yaml")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.stages.0.lr=3e-4")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="start over, deleting the run's checkpoints")
    train.add_argument("--output-dir", help="run directory (default runs/<recipe name>)")
    train.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    train.set_defaults(func=_train)

    chat = sub.add_parser("chat", help="answer a question about images with a trained model")
    chat.add_argument("checkpoint", help="a run directory or checkpoint directory")
    chat.add_argument("prompt", help="the question")
    chat.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--seed", type=int)
    add_reducer_option(chat)
    chat.set_defaults(func=_chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible chat server (with a chat page at /)")
    serve.add_argument("checkpoint", help="a run directory or checkpoint directory")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $VLBRIDGE_API_KEY)")
    serve.add_argument("--model-name", help="model id clients send (default: the checkpoint folder name)")
    serve.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    add_reducer_option(serve)
    serve.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    serve.add_argument("--allowed-domains", nargs="+", help="only fetch images from these domains")
    serve.add_argument("--image-timeout", type=float, default=10.0, help="seconds per remote image")
    serve.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024)
    serve.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    serve.add_argument("--max-images", type=int, default=8, help="images per request")
    serve.add_argument("--max-batch-size", type=int, default=32, help="rows decoded together (1: none)")
    serve.add_argument("--batching", default="auto", choices=["auto", "continuous", "static"])
    serve.add_argument("--max-model-len", type=int, help="context length (default: the LLM's position limit)")
    serve.add_argument(
        "--encoder-cache-mb", type=float, default=256, help="features of images seen before (0: off)"
    )
    serve.add_argument(
        "--prefix-cache-mb", type=float, default=1024, help="KV of finished requests, for next turns (0: off)"
    )
    serve.add_argument(
        "--compile",
        action="store_true",
        help="compile batch-1 decode (torch.compile; ~2x on a CPU, slower start)",
    )
    serve.add_argument(
        "--no-prepack",
        action="store_true",
        help="CPU: BLAS on the dense weights, no packed copy (saves the LLM's linear weights' memory once; "
        "batched steps run slower)",
    )
    serve.set_defaults(func=_serve)

    export = sub.add_parser(
        "export", help="write a checkpoint in vlbridge's layout (LoRA merged on request) or another engine's"
    )
    export.add_argument("checkpoint")
    export.add_argument("out")
    export.add_argument("--merge-lora", action="store_true")
    export.add_argument(
        "--format",
        default="vlbridge",
        help="vlbridge (default) or llava-hf (transformers' LlavaForConditionalGeneration, which vLLM, "
        "SGLang and TGI load; LoRA merged)",
    )
    export.set_defaults(func=_export)

    ev = sub.add_parser(
        "eval",
        help="benchmark a checkpoint or endpoint on eval suites; `eval compare DIR...` compares runs",
        description="vlbridge eval CHECKPOINT --suite NAME | vlbridge eval --endpoint URL --model NAME "
        "--suite NAME | vlbridge eval compare DIR... ; task settings as TASK.key.sub=value "
        "(e.g. vqav2.data.path=DIR)",
    )
    ev.add_argument("targets", nargs="*", help="a checkpoint or run dir; or `compare` and eval output dirs")
    ev.add_argument("--suite", help="suite name (eval/suites/) or YAML path, e.g. shapes, vqa, captions")
    ev.add_argument("--task", action="append", default=[], help="task name or YAML (repeatable)")
    ev.add_argument("--limit", type=int, help="first N examples of each task")
    ev.add_argument(
        "--batch-size", type=int, default=16, help="prompts per batch (endpoint: concurrent requests)"
    )
    ev.add_argument("--output", help="output dir (default runs/eval/<model>-<suite>); compare: the PNG path")
    ev.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    ev.add_argument("--model", help="model name to send to the endpoint")
    ev.add_argument("--api-key", help="endpoint API key (default $OPENAI_API_KEY)")
    ev.add_argument(
        "--image-position", choices=["before", "after"], help="endpoint: images before/after the text"
    )
    ev.add_argument("--timeout", type=float, default=120.0, help="endpoint: seconds per request")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_reducer_option(ev)
    ev.set_defaults(func=_eval, overrides=[])

    bench = sub.add_parser("bench", help="measure efficiency of model configurations side by side")
    bench.add_argument("config", help="benchmark YAML, e.g. eval/benchmarks/frontends.yaml")
    bench.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. repeats=5")
    bench.add_argument("--output", help="output directory (default runs/bench/<name>)")
    bench.set_defaults(func=_bench)

    data = sub.add_parser("data", help="export the synthetic shapes dataset to LLaVA JSON or a datasets dir")
    data.add_argument("out")
    data.add_argument("--variant", default="base", choices=["base", "hires", "many"])
    data.add_argument("--split", default="train", choices=["train", "val", "test"])
    data.add_argument("--n", type=int, default=1000)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--format", default="llava", choices=["llava", "datasets"])
    data.add_argument("--questions-per-image", type=int, default=1)
    data.set_defaults(func=_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow flags (`train r.yaml --resume a.b=1`); argparse stops collecting them at a flag.
    if hasattr(args, "overrides"):
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        args.func(args)
    except VLBridgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
