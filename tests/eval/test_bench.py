"""`vlbridge bench`: measured figures that can be checked against arithmetic on the models themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from torch import nn

from vlbridge.cli import main
from vlbridge.config import deep_merge
from vlbridge.eval.bench import Bench, BenchConfig
from vlbridge.recipe import load_yaml_config
from vlbridge.reducers.pmod import PModConfig, host_budget
from vlbridge.testing import TINY_FRONTEND_CONFIGS, TINY_LLM_CONFIGS, tiny_model, tiny_vl_config

LORA_R = 4


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """Two tiny LLaVA cases: 2x2-merged connector (baseline, LoRA step) vs unmerged (full step)."""
    tmp = tmp_path_factory.mktemp("bench")
    llava = tiny_vl_config("llama", "clip_vision_model").model_dump(mode="json")
    frontend = llava.pop("frontend")
    config = {
        "name": "tiny",
        "baseline": "merged",
        "defaults": llava,
        "repeats": 1,
        "batch_size": 2,
        "prompt_words": 6,
        "new_tokens": 3,
        "lora": {"r": LORA_R, "alpha": 8, "dropout": 0.0},
        "cases": [
            {
                "name": "merged",
                "image_size": 32,
                "model": {"frontend": frontend},
                "train_modules": {"llm": "lora", "connector": "full"},
            },
            {
                "name": "unmerged",
                "image_size": [40, 24],
                "model": {"frontend": deep_merge(frontend, {"connector": {"merge": 1}})},
                "train_modules": {"llm": "full"},
            },
            {
                "name": "unmerged_recomputed",
                "image_size": [40, 24],
                "model": {"frontend": deep_merge(frontend, {"connector": {"merge": 1}})},
                "train_modules": {"llm": "full"},
                "gradient_checkpointing": True,
            },
            *(
                {"name": f"{kind}_{side}", "group": kind, "image_size": side, "model": {"frontend": fe}}
                for kind in ("solo", "adem_vl")
                for fe in [TINY_FRONTEND_CONFIGS[kind]("clip_vision_model")]
                for side in (16, 32)
            ),
        ],
    }
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp / "out"
    assert main(["bench", str(path), "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    return out, {r["name"]: r for r in results}


def test_token_counts_match_the_front_end(bench_run):
    _, results = bench_run
    merged, _, _ = tiny_model("llama", "clip_vision_model")
    tokens = merged.frontend.layout.num_image_tokens()
    assert results["merged"]["visual_tokens"] == tokens
    assert results["unmerged"]["visual_tokens"] == 4 * tokens
    assert results["unmerged"]["sequence_length"] - results["merged"]["sequence_length"] == 3 * tokens
    assert results["solo_16"]["visual_tokens"] == 2 * 2 + 2 + 1  # 8-px patches: grid + separators + markers
    assert results["solo_32"]["visual_tokens"] == 4 * 4 + 4 + 1
    assert (
        results["adem_vl_16"]["visual_tokens"] == results["adem_vl_32"]["visual_tokens"] == 1
    )  # deep fusion


def test_kv_cache_and_flops_follow_the_architecture(bench_run):
    _, results = bench_run
    llm = TINY_LLM_CONFIGS["llama"]
    head_dim = llm["hidden_size"] // llm["num_attention_heads"]
    for r in results.values():
        per_token = 2 * llm["num_hidden_layers"] * llm["num_key_value_heads"] * head_dim * 4  # K and V, fp32
        assert r["kv_cache_mb"] * 2**20 == pytest.approx(2 * r["sequence_length"] * per_token)  # batch 2
        # timings are only checked for presence: under load a tiny model's medians cross each other
        assert r["prefill_gflops"] > 0 and r["prefill_s"] > 0 and r["generate_s"] > 0
    assert results["unmerged"]["prefill_gflops"] > results["merged"]["prefill_gflops"]


def test_trainable_parameters_are_counted_per_mode(bench_run):
    _, results = bench_run
    model, _, _ = tiny_model("llama", "clip_vision_model")
    llm = model.language_model
    lora = sum(
        LORA_R * (m.in_features + m.out_features)
        for name, m in llm.named_modules()
        if isinstance(m, nn.Linear) and not name.endswith("lm_head")
    )
    connector = sum(p.numel() for p in model.frontend.connector.parameters())
    assert results["merged"]["trainable_params"] == lora + connector
    unmerged, _, _ = tiny_model("llama", "clip_vision_model", frontend={"connector": {"merge": 1}})
    frontend = sum(p.numel() for p in unmerged.frontend.parameters())
    assert results["unmerged"]["trainable_params"] == results["unmerged"]["total_params"] - frontend
    assert results["unmerged"]["train_step_s"] > 0
    recomputed = results["unmerged_recomputed"]  # same parameters, trained with activation checkpointing
    assert recomputed["trainable_params"] == results["unmerged"]["trainable_params"]
    assert recomputed["train_step_s"] > 0 and "train_peak_mb_ratio" in recomputed


def test_ratios_and_reports(bench_run):
    out, results = bench_run
    assert results["merged"]["prefill_s_ratio"] == 1.0
    unmerged = results["unmerged"]
    expected = unmerged["kv_cache_mb"] / results["merged"]["kv_cache_mb"]
    assert unmerged["kv_cache_mb_ratio"] == pytest.approx(expected)
    report = (out / "report.md").read_text()
    assert "| merged | 32 |" in report and "| unmerged | 40x24 |" in report
    assert (out / "report.png").stat().st_size > 0
    assert "solo_32" in report and "train step s" in report


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"baseline": "nope"}, "baseline 'nope' is not one of the cases ['a']"),
        ({"new_tokens": 1}, "new_tokens=1 leaves no decode step to time"),
    ],
)
def test_bad_settings_are_a_one_line_error(tmp_path, capsys, settings, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "baseline": "a", "cases": [{"name": "a"}], **settings}))
    assert main(["bench", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# -- reducers: visual tokens per stage, per-layer cache, FLOPs by formula and by counter ----------------
@pytest.fixture(scope="module")
def reducer_run(tmp_path_factory):
    """A 4-layer tiny LLaVA (16 visual tokens) dense, with p-MoD, FastV (K=2, R=0.5) and ToMe (r=2)."""
    tmp = tmp_path_factory.mktemp("bench_reducers")
    llava = tiny_vl_config("llama", "clip_vision_model", llm={"config": {"num_hidden_layers": 4}})
    defaults = deep_merge(llava.model_dump(mode="json"), {"frontend": {"connector": {"merge": 1}}})
    reducers = {"pmod": {"type": "pmod"}, "fastv": {"type": "fastv"}, "tome": {"type": "tome", "r": 2}}
    config = {
        "name": "tiny_reducers",
        "baseline": "dense",
        "defaults": defaults,
        "repeats": 1,
        "warmup": 0,
        "prompt_words": 6,
        "new_tokens": 2,
        "prefill_logits": "last",
        "cases": [
            {"name": "dense", "image_size": 32},
            *({"name": name, "image_size": 32, "model": {"reducers": [r]}} for name, r in reducers.items()),
            {"name": "stem", "image_size": 32, "model": {"frontend": {"vision": {"stem": "conv"}}}},
        ],
    }
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp / "out"
    assert main(["bench", str(path), "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    return out, {r["name"]: r for r in results}


def test_per_layer_visual_tokens_and_cache_entries(reducer_run):
    _, results = reducer_run
    dense, pmod, fastv, tome = (results[n] for n in ("dense", "pmod", "fastv", "tome"))
    seq, visual = dense["sequence_length"], dense["visual_tokens"]
    assert visual == 16 and dense["text_tokens"] == seq - 16
    assert dense["layer_visual_tokens"] == [16] * 4 and dense["cache_lengths"] == [seq] * 4
    kept = [16] + [host_budget([16], r)[0] for r in PModConfig().layer_ratios(4)[1:]]
    assert pmod["layer_visual_tokens"] == kept == [16, 12, 4, 2]
    assert pmod["cache_lengths"] == [seq - 16 + k for k in kept]
    assert pmod["llm_visual_kept"] == pytest.approx(sum(kept) / 64)
    assert (dense["visual_kv_entries"], pmod["visual_kv_entries"]) == (64, sum(kept))
    assert pmod["visual_kv_entries_ratio"] == pytest.approx(sum(kept) / 64)
    assert fastv["layer_visual_tokens"] == [16, 16, 8, 8]
    assert fastv["cache_lengths"] == [seq, seq, seq - 8, seq - 8]
    assert tome["tower_tokens"] == [17, 15, 15]  # CLS + 16 patches; block 0 merges 2, the last is unused
    assert tome["visual_tokens"] == 14 and tome["layer_visual_tokens"] == [14] * 4
    llm = TINY_LLM_CONFIGS["llama"]
    per_entry = 2 * llm["num_key_value_heads"] * (llm["hidden_size"] // llm["num_attention_heads"]) * 4
    for r in results.values():  # KV bytes read from the cache = Σ_l 2·n_l·d_kv·bytes
        assert r["kv_cache_mb"] * 2**20 == sum(r["cache_lengths"]) * per_entry
    assert pmod["kv_cache_mb_ratio"] == pytest.approx(sum(pmod["cache_lengths"]) / (4 * seq))


def test_flops_by_counter_match_the_formulas(reducer_run):
    _, results = reducer_run
    for name, r in results.items():
        assert r["llm_gflops"] == pytest.approx(r["llm_gflops_analytic"], rel=1e-12), name
        assert r["prefill_gflops"] == pytest.approx(r["tower_gflops"] + r["llm_gflops"], rel=1e-12)
    assert results["dense"]["tower_gflops"] == pytest.approx(results["dense"]["tower_gflops_analytic"])
    assert "tower_gflops_analytic" not in results["stem"]  # the ViT formula has no conv stem in it
    tome = results["tome"]  # the formula leaves out the bipartite matching's similarity matmul
    assert tome["tower_gflops_analytic"] < tome["tower_gflops"] < 1.01 * tome["tower_gflops_analytic"]
    assert results["pmod"]["llm_gflops_ratio"] < results["fastv"]["llm_gflops_ratio"] < 1
    assert results["tome"]["tower_gflops_ratio"] < 1


def test_reducer_report_columns(reducer_run):
    out, results = reducer_run
    report = (out / "report.md").read_text()
    for column in ("LLM visual kept", "front-end s", "LLM prefill s", "LLM GFLOPs formula", "KV cache MB"):
        assert column in report
    assert "| pmod | 32 | 16 | 0.531 |" in report
    assert all(r["embed_s"] > 0 and r["llm_prefill_s"] > 0 for r in results.values())


def test_shipped_reducer_benchmark_is_valid():
    path = Path(__file__).parents[2] / "eval" / "benchmarks" / "reducers.yaml"
    config = load_yaml_config(path, BenchConfig, [], what="benchmark")
    bench = Bench(config)
    kinds = {case.name: [r.type for r in bench.case_config(case).reducers] for case in config.cases}
    assert kinds["dense"] == [] and kinds["pmod"] == ["pmod"] and kinds["fastv"] == ["fastv"]
    assert {"turbo_r16", "turbo_50", "turbo_75", "tome_r16"} <= set(kinds)


def test_a_checkpoint_case_opens_an_imported_model_and_reduces_it(tmp_path):
    model, tokenizer, _ = tiny_model(frontend={"type": "llava", "connector": {"merge": 1}})
    model.save_pretrained(tmp_path / "ckpt", tokenizer)
    main(
        ["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--format", "llava-hf"]
    )  # transformers' LLaVA
    turbo = {"reducers": [{"type": "turbo", "tokens": 8, "min_tokens": 0}]}
    config = BenchConfig(
        name="imported",
        baseline="as_imported",
        checkpoint=str(tmp_path / "hf"),
        repeats=1,
        warmup=0,
        new_tokens=2,
        measure_flops=False,
        cases=[
            {"name": "as_imported", "image_size": 32},
            {"name": "turbo_half", "image_size": 32, "model": turbo},
        ],
    )
    as_imported, halved = Bench(config).run()
    assert (as_imported["visual_tokens"], halved["visual_tokens"]) == (16, 8)
    assert halved["prefill_s_ratio"] > 0 and halved["kv_cache_mb_ratio"] < 1  # side by side, measured
    with pytest.raises(ValueError, match="cases may only add reducers"):
        BenchConfig.model_validate(
            {
                **config.model_dump(),
                "cases": [{"name": "as_imported", "model": {"frontend": {"type": "solo"}}}],
            }
        )


def test_shipped_imported_benchmark_is_valid():
    path = Path(__file__).parents[2] / "eval" / "benchmarks" / "imported.yaml"
    config = load_yaml_config(path, BenchConfig, ["checkpoint=/any/llava"], what="benchmark")
    assert config.checkpoint == "/any/llava" and config.baseline == "as_imported"


def test_shipped_checkpointing_benchmark_is_valid():
    path = Path(__file__).parents[2] / "eval" / "benchmarks" / "checkpointing.yaml"
    config = load_yaml_config(path, BenchConfig, [], what="benchmark")
    assert [c.gradient_checkpointing for c in config.cases] == [False, True]
