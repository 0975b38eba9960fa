"""`vlbridge` command line: train | chat | data. Errors meant for users print without a traceback."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import VLBridgeError


def _train(args: argparse.Namespace) -> None:
    from .recipe import load_recipe
    from .training.run import run_training

    recipe = load_recipe(args.recipe, args.overrides)
    if args.output_dir:
        recipe.output_dir = args.output_dir
    run_training(recipe, resume=args.resume, overwrite=args.overwrite, evaluate=not args.no_eval)


def _chat(args: argparse.Namespace) -> None:
    import torch

    from .checkpoint import load_model, resolve_checkpoint
    from .data.formats import load_image
    from .processing import VLProcessor
    from .tokenization import generation_kwargs

    model, tokenizer = load_model(resolve_checkpoint(args.checkpoint), reducers=reducer_sections(args))
    processor = VLProcessor(tokenizer, model.frontend, max_length=model.config.max_length)
    images = [load_image(p, "command line") for p in args.image]
    marks = "\n".join("<image>" for _ in images)
    content = (
        args.prompt
        if not images
        else (
            f"{marks}\n{args.prompt}"
            if model.config.image_position == "before"
            else f"{args.prompt}\n{marks}"
        )
    )
    batch = processor([[{"role": "user", "content": content}]], [images])
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = (
        {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    )
    tokens = model.generate(
        **batch, max_new_tokens=args.max_new_tokens, **generation_kwargs(tokenizer), **sampling
    )
    print(tokenizer.decode(tokens[0], skip_special_tokens=True).strip())


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


def _export(args: argparse.Namespace) -> None:
    from .checkpoint import load_model, resolve_checkpoint, save_model

    model, tokenizer = load_model(resolve_checkpoint(args.checkpoint))
    if args.merge_lora:
        model.merge_lora()
    save_model(model, args.out, tokenizer)
    print(args.out)


def _data(args: argparse.Namespace) -> None:
    from .data import shapes, shapes_samples

    scenes = shapes.generate(args.variant, args.split, args.n, seed=args.seed)
    export = {"llava": shapes_samples.export_llava, "datasets": shapes_samples.export_datasets}[args.format]
    print(export(scenes, args.out, questions_per_image=args.questions_per_image))


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

    export = sub.add_parser("export", help="copy a checkpoint, optionally with LoRA merged into the weights")
    export.add_argument("checkpoint")
    export.add_argument("out")
    export.add_argument("--merge-lora", action="store_true")
    export.set_defaults(func=_export)

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
