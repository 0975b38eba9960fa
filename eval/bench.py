"""`vlbridge bench`: efficiency of several model configurations, side by side in one process.

A benchmark YAML names a baseline and a list of cases; each case is a VLConfig (deep-merged over
`defaults`), an input image size and, optionally, the module modes of a training step. Every case
is built with random weights, fed the same prompt, and measured the same way (`efficiency.py`);
ratios are taken against the baseline measured in the same run. Results go to `results.json`,
`report.md` and, with matplotlib installed (the `eval` extra), `report.png`.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from pydantic import Field, model_validator
from rich.console import Console
from transformers import LogitsProcessorList

from vlbridge.config import Strict, VLConfig, deep_merge
from vlbridge.errors import ConfigError
from vlbridge.factory import build, load_pretrained
from vlbridge.families import choose_dtype
from vlbridge.llm_calls import returned_cache
from vlbridge.processing import VLProcessor, pad_batch
from vlbridge.recipe import LoRASettings, Mode, StageConfig, load_yaml_config
from vlbridge.reducers import Meter
from vlbridge.tokenization import generation_kwargs, train_bpe
from vlbridge.training.stages import apply_stage

from .bench_report import RATIO_KEYS, console_table, markdown, plot
from .efficiency import (
    TokenClock,
    cache_bytes,
    cache_lengths,
    count_flops_by_module,
    median_seconds,
    parameter_counts,
    peak_memory,
    synchronize,
    track_cpu_memory,
)
from .flops import (
    DecoderShape,
    connector_flops,
    llm_prefill_flops,
    reducer_overhead_flops,
    vit_prefill_flops,
    vit_tokens,
)

_WORDS = (
    "the red circle is left of a small blue square above two green triangles near a large diamond".split()
)


class BenchCase(Strict):
    name: str
    model: dict[str, Any] = Field(default_factory=dict)  # merged over BenchConfig.defaults
    image_size: int | tuple[int, int] = 224  # input image (width, height) before the front-end's transform
    train_modules: dict[str, Mode] = Field(default_factory=dict)  # empty: no train-step measurement
    gradient_checkpointing: bool = False  # the train step with the LLM and tower recomputed in backward
    group: str | None = None  # cases of one group form a line in the plot (e.g. a resolution sweep)


class BenchConfig(Strict):
    name: str
    baseline: str
    cases: list[BenchCase]
    defaults: dict[str, Any] = Field(default_factory=dict)
    # a checkpoint every case opens (vlbridge's or an imported layout, e.g. transformers' LLaVA) instead of a
    # random model built from `defaults`; the cases' `model` sections may then only add reducers
    checkpoint: str | None = None
    device: str = "auto"
    seed: int = 0
    repeats: int = Field(default=3, ge=1)
    batch_size: int = Field(default=1, ge=1)
    prompt_words: int = Field(default=32, ge=1)
    answer_words: int = Field(default=16, ge=1)
    new_tokens: int = Field(default=32, ge=0)  # 0: no generation measurement (prefill-only sweeps)
    # logits of every prompt position (a training-style forward) or of the last one (what generate runs)
    prefill_logits: Literal["all", "last"] = "all"
    warmup: int = Field(default=1, ge=0)  # untimed calls before each timing
    vocab_size: int = Field(default=512, ge=300)  # BPE the prompts are written in (the LLM's may be larger)
    lora: LoRASettings = Field(default_factory=LoRASettings)
    measure_flops: bool = True

    @model_validator(mode="after")
    def _baseline_is_a_case(self) -> BenchConfig:
        names = [c.name for c in self.cases]
        if len(set(names)) != len(names):
            raise ValueError(f"case names must be unique, got {names}")
        if self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not one of the cases {names}")
        if self.new_tokens == 1:
            raise ValueError("new_tokens=1 leaves no decode step to time: set 0 (no generation) or >= 2")
        if self.checkpoint is not None:
            extra = {
                c.name: sorted(set(c.model) - {"reducers"}) for c in self.cases if set(c.model) - {"reducers"}
            }
            if extra or self.defaults:
                raise ValueError(
                    f"with checkpoint={self.checkpoint!r} the model comes from the checkpoint: cases may "
                    f"only add reducers (model.reducers), and defaults must be empty; got "
                    f"{extra or self.defaults}"
                )
        return self


_VITS = ("clip_vision_model", "siglip_vision_model")  # towers the analytic ViT formula covers


def _device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"bench device {requested!r} but CUDA is not available; use device: auto or cpu")
    return torch.device(requested)


def _text(n_words: int, offset: int = 0) -> str:
    return " ".join(_WORDS[(offset + i) % len(_WORDS)] for i in range(n_words))


def _image(size: int | tuple[int, int]) -> Image.Image:
    width, height = (size, size) if isinstance(size, int) else size
    gen = torch.Generator().manual_seed(width * 10007 + height)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


class Bench:
    """Runs the cases of one BenchConfig; `results` holds one dict of metrics per case."""

    def __init__(self, config: BenchConfig, console: Console | None = None) -> None:
        self.config, self.console = config, console or Console()
        self.device = _device(config.device)
        self.results: list[dict[str, Any]] = []
        if self.device.type == "cpu":
            track_cpu_memory()  # before any model is built, so no case inherits reusable freed memory

    def case_config(self, case: BenchCase) -> VLConfig:
        return VLConfig.model_validate(deep_merge(self.config.defaults, case.model))

    def run(self) -> list[dict[str, Any]]:
        for case in self.config.cases:
            self.console.print(f"[bold]bench[/bold] {case.name} ...")
            self.results.append(self.measure(case))
            gc.collect()
        add_ratios(self.results, self.config.baseline)
        return self.results

    def _build(self, case: BenchCase):
        if self.config.checkpoint is not None:
            reducers = case.model.get("reducers") or None
            model, processor = load_pretrained(
                self.config.checkpoint, device=str(self.device), reducers=reducers
            )
            processor.max_length = 10**6
            return model, processor.tokenizer, processor
        config = self.case_config(case)
        tokenizer = train_bpe([_text(len(_WORDS), i) for i in range(len(_WORDS))], self.config.vocab_size)
        torch.manual_seed(self.config.seed)
        dtype = choose_dtype(config.llm.dtype, self.device)
        model, processor = build(config, tokenizer, device=str(self.device), dtype=dtype)
        processor.max_length = 10**6
        return model.eval(), tokenizer, processor

    def _messages(self, processor: VLProcessor, answer: bool) -> list[dict]:
        messages = [{"role": "user", "content": processor.place_images(_text(self.config.prompt_words), 1)}]
        if answer:
            messages.append({"role": "assistant", "content": _text(self.config.answer_words, 3)})
        return messages

    def measure(self, case: BenchCase) -> dict[str, Any]:
        cfg, device = self.config, self.device
        model, tokenizer, processor = self._build(case)
        image = _image(case.image_size)
        batch = processor([self._messages(processor, False)] * cfg.batch_size, [[image]] * cfg.batch_size)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        ids = batch["input_ids"]
        visual = torch.isin(ids[0], torch.tensor(model.frontend.special_token_ids, device=device))
        out: dict[str, Any] = {
            "name": case.name,
            "group": case.group,
            "image_size": case.image_size,
            "frontend": model.config.frontend.type,
            "visual_tokens": int(visual.sum()),
            "sequence_length": ids.shape[1],
            "text_tokens": ids.shape[1] - int(visual.sum()),
            "total_params": parameter_counts(model)[1],
        }

        logits = {"logits_to_keep": 1} if cfg.prefill_logits == "last" else {}

        @torch.no_grad()
        def prefill():
            return model(**batch, use_cache=True, **logits)

        out["prefill_s"] = median_seconds(prefill, device, cfg.repeats, cfg.warmup)
        with peak_memory(device) as peak:
            past = returned_cache(prefill())
        if peak["bytes"] is not None:
            out["prefill_peak_mb"] = peak["bytes"] / 2**20
        out["kv_cache_mb"] = cache_bytes(past) / 2**20
        out["cache_lengths"] = cache_lengths(past)  # entries per decoder layer (per row)
        # what p-MoD's paper counts: the cache's visual entries summed over layers (text is never dropped)
        out["visual_kv_entries"] = sum(n - out["text_tokens"] for n in out["cache_lengths"])
        del past
        out.update(self._split_times(model, batch, logits))
        out.update(self._token_stages(model, batch, prefill))
        if cfg.measure_flops:
            out.update(self._flops(model, batch, prefill, out))
        if cfg.new_tokens:
            out.update(self._generate(model, tokenizer, batch))
        if case.train_modules:
            out.update(self._train_step(model, processor, case, image))
        return out

    def _split_times(self, model, batch, logits: dict[str, int]) -> dict[str, Any]:
        """The prefill in two parts: the front-end (tower, connector, splice) and the LLM on its output."""
        cfg, device = self.config, self.device

        @torch.no_grad()
        def embed():
            return model.llm_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])

        embed_s = median_seconds(embed, device, cfg.repeats, cfg.warmup)
        inputs = embed()

        @torch.no_grad()
        def llm():
            return model.language_model(**inputs.kwargs(), use_cache=True, **logits)

        return {"embed_s": embed_s, "llm_prefill_s": median_seconds(llm, device, cfg.repeats, cfg.warmup)}

    @staticmethod
    def _token_stages(model, batch, prefill) -> dict[str, Any]:
        """Visual tokens per stage from one metered prefill: leaving the tower (per image, per block
        when a tower reducer merged), entering the LLM, and processed by every decoder layer."""
        model.meter = meter = Meter()
        try:
            prefill()
        finally:
            model.meter = None
        visual_in = model.frontend.visual_mask(batch["input_ids"]).sum(1).tolist()
        depth = model.language_model.config.get_text_config().num_hidden_layers
        layers = [sum(row) for row in meter.visual_per_layer(depth, visual_in)]
        out: dict[str, Any] = {"layer_visual_tokens": layers}
        if sum(visual_in):
            out["llm_visual_kept"] = sum(layers) / (depth * sum(visual_in))
        if (tower := meter.last(Meter.TOWER_TOKENS)) is not None:
            out["tower_tokens"] = list(tower)
        return out

    def _flops(self, model, batch, prefill, measured: dict[str, Any]) -> dict[str, Any]:
        """torch's FLOP counter, split into front-end and LLM (in-LLM reducers' routers and scores run
        inside the decoder layers, so they count there), beside the analytic formulas (eval/flops.py)
        evaluated on the token counts this prefill used."""
        counted = count_flops_by_module(prefill, ("VLModel.frontend", "VLModel.language_model"))
        batch_size, seq = batch["input_ids"].shape
        shape = DecoderShape.of(model.language_model.config)
        positions = 1 if self.config.prefill_logits == "last" else seq
        llm = llm_prefill_flops(shape, measured["cache_lengths"], batch=batch_size, logits=positions)
        llm += reducer_overhead_flops(model.reducers, shape, batch_size, seq)
        out = {
            "prefill_gflops": sum(counted.values()) / 1e9,
            "tower_gflops": counted["VLModel.frontend"] / 1e9,
            "llm_gflops": counted["VLModel.language_model"] / 1e9,
            "llm_gflops_analytic": llm / 1e9,
        }
        tower = getattr(model.frontend, "vision_tower", None)
        vit = model.config.frontend.type == "llava" and tower.model.config.model_type in _VITS
        if vit and tower.cfg.stem == "patch":  # the formula knows the patchify embedding, not a conv stem
            config = tower.model.config
            tokens = measured.get("tower_tokens") or vit_tokens(config, tower.family.has_cls)
            visual = int(model.frontend.visual_mask(batch["input_ids"]).sum())  # connector outputs
            front = vit_prefill_flops(config, tokens, images=batch_size)
            front += connector_flops(model.frontend.connector, visual)
            out["tower_gflops_analytic"] = front / 1e9
        return out

    def _generate(self, model, tokenizer, batch) -> dict[str, Any]:
        """Greedy generation of exactly `new_tokens`: its wall time, and the decode rate timed inside it."""
        cfg, device = self.config, self.device
        kwargs = generation_kwargs(tokenizer) | {
            "max_new_tokens": cfg.new_tokens,
            "min_new_tokens": cfg.new_tokens,
            "do_sample": False,
        }
        for _ in range(cfg.warmup):
            model.generate(**batch, **kwargs)
        totals, decodes = [], []
        for _ in range(cfg.repeats):
            clock = TokenClock(device)
            synchronize(device)
            start = time.perf_counter()
            model.generate(**batch, **kwargs, logits_processor=LogitsProcessorList([clock]))
            synchronize(device)
            totals.append(time.perf_counter() - start)
            decodes.append(clock.decode_seconds())
        rate = cfg.batch_size * (cfg.new_tokens - 1) / statistics.median(decodes)
        return {"generate_s": statistics.median(totals), "decode_tokens_per_s": rate}

    def _train_step(self, model, processor, case: BenchCase, image) -> dict[str, Any]:
        cfg, device = self.config, self.device
        stage = StageConfig(name="bench", modules=case.train_modules, steps=1, lr=1e-5)
        apply_stage(model, stage, cfg.lora)
        model.train()
        if case.gradient_checkpointing:
            model.activation_checkpointing()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        encoded = processor.encode(self._messages(processor, True), [image], sample_id="bench")
        batch = pad_batch([encoded] * cfg.batch_size, processor.tokenizer.pad_token_id, processor.layout)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        def step():
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = median_seconds(step, device, cfg.repeats, cfg.warmup)
        with peak_memory(device) as peak:  # activations and gradients of one step (weights excluded)
            step()
        out = {"train_step_s": seconds, "trainable_params": parameter_counts(model)[0]}
        if peak["bytes"] is not None:
            out["train_peak_mb"] = peak["bytes"] / 2**20
        return out


def add_ratios(results: list[dict[str, Any]], baseline: str) -> None:
    """`<metric>_ratio` = case / baseline for every ratio metric both measured."""
    base = next(r for r in results if r["name"] == baseline)
    for r in results:
        for key in RATIO_KEYS:
            if r.get(key) is not None and base.get(key):
                r[f"{key}_ratio"] = r[key] / base[key]


def run_bench(path: str | Path, overrides: list[str] | None = None, output: str | Path | None = None) -> Path:
    config = load_yaml_config(path, BenchConfig, overrides, what="benchmark")
    bench = Bench(config)
    started = time.perf_counter()
    results = bench.run()
    out = Path(output or f"runs/bench/{config.name}")
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": config.model_dump(mode="json"),
        "device": str(bench.device),
        "torch_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    (out / "report.md").write_text(markdown(config, results, str(bench.device)))
    plotted = plot(results, out / "report.png")
    bench.console.print(console_table(config, results))
    bench.console.print(f"wrote {out}/results.json, report.md" + (", report.png" if plotted else ""))
    return out
