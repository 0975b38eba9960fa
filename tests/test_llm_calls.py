"""The transformers contract: how the installed transformers calls a causal LM, its decoder stack, its
decoder layers and its attention function, checked for every LLM family against what
`vlbridge.llm_calls` reads and writes.

These run first and a failure stops the run (tests/conftest.py): a transformers release that renames
an argument fails here, naming the call and the keyword, instead of as dozens of feature tests.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
import transformers
from transformers import AttentionInterface, AttentionMaskInterface, AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from vlbridge import llm_calls
from vlbridge.families import family_of
from vlbridge.testing import TINY_LLM_CONFIGS

pytestmark = pytest.mark.contract
VERSION = f"transformers {transformers.__version__}"
SPY = "vlbridge_contract_spy"
EXTRA = "vlbridge_contract_extra"  # an extra keyword of the LLM call, as the size bias passes key_bias
attention_calls: list[dict[str, Any]] = []


def _spy_attention(module, query, key, value, attention_mask, **kwargs):
    """Records, then attends as SDPA (or, with Gemma-2's logit soft-capping, as the family's eager code)."""
    attention_calls.append({"query": query, "key": key, "mask": attention_mask, **kwargs})
    attend = sdpa_attention_forward
    if kwargs.get("softcap") is not None:
        attend = sys.modules[type(module).__module__].eager_attention_forward
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min
            )
    return attend(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(SPY, _spy_attention)
AttentionMaskInterface.register(SPY, sdpa_mask)


def tiny_llm(family: str, attention: str | None = None):
    """transformers' default attention (SDPA; eager for Gemma-2) unless `attention` names one."""
    ids = {"vocab_size": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    config = AutoConfig.for_model(family, **ids, **TINY_LLM_CONFIGS[family])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


def cache_problem(kwargs: dict[str, Any], cache: Any, call: str) -> str | None:
    """None when `llm_calls.cache_in` finds the cache a call received; else what transformers did."""
    if llm_calls.cache_in(kwargs) is cache:
        return None
    names = [name for name, value in kwargs.items() if value is cache] or ["no keyword at all"]
    return (
        f"{VERSION}: {call} received the KV cache as {', '.join(f'`{n}=`' for n in names)}, which "
        f"vlbridge.llm_calls does not read (CACHE_NAMES = {llm_calls.CACHE_NAMES}): add the name there"
    )


class Recorder:
    """Keyword arguments of every call of the LLM's decoder stack, one decoder layer and its attention."""

    def __init__(self, llm) -> None:
        family = family_of(llm.config.model_type)
        layers = llm.get_submodule(family.layers)
        self.stack = llm.get_submodule(family.layers.rpartition(".")[0])
        self.layer = layers[1]
        self.calls: dict[str, list[tuple[tuple, dict[str, Any]]]] = {"stack": [], "layer": []}
        for name, module in (("stack", self.stack), ("layer", self.layer)):
            module.register_forward_pre_hook(self._record(name), with_kwargs=True)

    def _record(self, name: str):
        def hook(_, args, kwargs):
            self.calls[name].append((args, dict(kwargs)))

        return hook


@pytest.fixture(scope="module", params=list(TINY_LLM_CONFIGS))
def prefill_and_step(request):
    """A left-padded batch of two through the LLM with a cache, then one decode step, recorded."""
    llm = tiny_llm(request.param)
    llm.set_attn_implementation(SPY)
    recorder = Recorder(llm)
    ids = torch.randint(4, 60, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    cache = transformers.DynamicCache(config=llm.config)
    attention_calls.clear()
    with torch.no_grad():
        out = llm(**llm_calls.with_cache(llm, cache, input_ids=ids), attention_mask=mask, use_cache=True)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        llm(
            **llm_calls.with_cache(llm, cache, input_ids=ids[:, -1:]),
            attention_mask=step_mask,
            use_cache=True,
            **{EXTRA: torch.ones(2, 8)},
        )
    return llm, recorder, cache, out, list(attention_calls)


def test_the_llm_takes_and_returns_the_cache_under_a_name_llm_calls_knows(prefill_and_step):
    llm, _, cache, out, _ = prefill_and_step
    assert llm_calls.returned_cache(out) is cache, (
        f"{VERSION}: {type(llm).__name__}.forward returned the cache under none of {llm_calls.CACHE_NAMES}"
    )
    assert cache.get_seq_length() == 8 and len(cache.layers) == llm.config.num_hidden_layers


def test_the_decoder_stack_gets_the_cache_and_the_2d_padding_mask(prefill_and_step):
    llm, recorder, cache, _, _ = prefill_and_step
    call = f"{type(recorder.stack).__name__}.forward"
    for _, kwargs in recorder.calls["stack"]:
        problem = cache_problem(kwargs, cache, call)
        assert problem is None, problem
        mask = kwargs.get(llm_calls.MASK)
        assert torch.is_tensor(mask) and mask.dim() == 2, (
            f"{VERSION}: {call} no longer receives the 2-D padding mask as `{llm_calls.MASK}=` "
            f"(got {type(mask).__name__}); p-MoD and FastV read it there"
        )
        assert kwargs.get("inputs_embeds") is not None or kwargs.get("input_ids") is not None, (
            f"{VERSION}: {call} receives neither inputs_embeds= nor input_ids=; p-MoD and FastV read them"
        )


def test_a_decoder_layer_gets_hidden_states_first_then_cache_mask_positions_and_rope(prefill_and_step):
    _, recorder, cache, _, _ = prefill_and_step
    call = f"{type(recorder.layer).__name__}.forward"
    (prompt_args, prompt), (_, step) = recorder.calls["layer"]
    assert len(prompt_args) == 1 and prompt_args[0].shape[:2] == (2, 7), (
        f"{VERSION}: {call} no longer gets hidden_states as its one positional argument; "
        "vlbridge.reducers.decoder.ReducedForward relies on it"
    )
    for kwargs in (prompt, step):
        problem = cache_problem(kwargs, cache, call)
        assert problem is None, problem
        for name in (llm_calls.MASK, llm_calls.POSITION_IDS, llm_calls.ROPE):
            assert name in kwargs, (
                f"{VERSION}: {call} no longer receives `{name}=`; p-MoD and FastV rewrite it"
            )
        cos, sin = kwargs[llm_calls.ROPE]
        length = 7 if kwargs is prompt else 1
        assert cos.shape == sin.shape and cos.dim() == 3 and cos.shape[1] == length, (
            f"{VERSION}: {call}'s `{llm_calls.ROPE}=` is no longer (cos, sin) of shape [B, T, d]"
        )
    assert step[llm_calls.POSITION_IDS].shape[-1] == 1


def test_extra_call_keywords_reach_the_registered_attention_function(prefill_and_step):
    llm, _, _, _, calls = prefill_and_step
    layers = llm.config.num_hidden_layers
    assert len(calls) == 2 * layers, (
        f"{VERSION}: the attention function registered with AttentionInterface.register was called "
        f"{len(calls)} times for 2 calls of a {layers}-layer LLM; the size bias (llm_proportional) needs it"
    )
    prompt, step = calls[0], calls[-1]
    assert EXTRA not in prompt and torch.equal(step.get(EXTRA), torch.ones(2, 8)), (
        f"{VERSION}: a keyword of the LLM call no longer reaches the attention function; "
        "the size bias passes `key_bias=` that way"
    )
    assert step["query"].shape[2] == 1 and step["key"].shape[2] == 8  # [B, H, T, d] over the whole cache
    mask = prompt["mask"]
    assert mask is None or mask.dtype == torch.bool, (
        f"{VERSION}: an SDPA-style attention function now gets a {mask.dtype} mask; "
        "vlbridge.reducers.size_bias.biased_mask expects bool or None"
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_mask_formats_p_mod_and_fastv_write_are_those_transformers_builds(attention):
    llm = tiny_llm("llama", attention)
    assert llm_calls.attention_implementation(llm.config) == attention
    recorder = Recorder(llm)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 0] = 0
    with torch.no_grad():
        llm(input_ids=torch.randint(4, 60, (2, 5)), attention_mask=mask)
    built = recorder.calls["layer"][0][1][llm_calls.MASK]
    expected = torch.bool if attention == "sdpa" else torch.float32
    assert built.dtype == expected and built.shape == (2, 1, 5, 5), (
        f"{VERSION}: {attention} layers now get a {built.dtype} mask of shape {tuple(built.shape)}; "
        f"vlbridge.reducers.decoder.attention_mask writes {expected} [B, 1, q, K]"
    )


def test_generate_hands_every_call_keywords_to_the_forward():
    llm = tiny_llm("llama")
    seen: list[Any] = []
    llm.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs.get(EXTRA)), with_kwargs=True)
    with llm_calls.every_call(llm, **{EXTRA: 3}):
        llm.generate(input_ids=torch.randint(4, 60, (1, 4)), max_new_tokens=3, do_sample=False)
    assert seen == [3, 3, 3]
    llm.generate(input_ids=torch.randint(4, 60, (1, 4)), max_new_tokens=1, do_sample=False)
    assert seen[-1] is None  # gone after the block


def test_activation_checkpointing_is_found_and_bypassed_as_reduced_layers_need():
    llm = tiny_llm("qwen2")
    layer = llm.model.layers[1]
    assert llm_calls.checkpointing(layer) is None
    llm.activation_checkpointing_enable({"use_reentrant": False})
    llm.train()
    checkpoint = llm_calls.checkpointing(layer)
    assert callable(checkpoint), (
        f"{VERSION}: activation_checkpointing_enable no longer sets layer.gradient_checkpointing and "
        "layer._gradient_checkpointing_func; vlbridge.llm_calls.checkpointing reads them"
    )
    forward = llm_calls.plain_forward(layer)
    assert forward.func is not type(layer).forward, (
        f"{VERSION}: {type(layer).__name__}.forward is no longer a wrapper around the layer's own forward "
        "(`__wrapped__`); reduced layers would be checkpointed twice"
    )


def test_layer_kinds_name_every_layer():
    for family in TINY_LLM_CONFIGS:
        config = tiny_llm(family).config
        kinds = llm_calls.layer_kinds(config)
        assert len(kinds) == config.num_hidden_layers and set(kinds) <= {
            "full_attention",
            "sliding_attention",
        }
    assert "sliding_attention" in llm_calls.layer_kinds(tiny_llm("gemma2").config)


def test_a_renamed_cache_keyword_fails_the_contract_naming_it(prefill_and_step, monkeypatch):
    """The contract is not vacuous: without the keyword this transformers uses, it fails and says which."""
    _, recorder, cache, _, _ = prefill_and_step
    kwargs = recorder.calls["layer"][0][1]
    used = next(name for name in llm_calls.CACHE_NAMES if kwargs.get(name) is cache)
    monkeypatch.setattr(llm_calls, "CACHE_NAMES", tuple(n for n in llm_calls.CACHE_NAMES if n != used))
    problem = cache_problem(kwargs, cache, "the layer")
    assert problem is not None and f"`{used}=`" in problem
