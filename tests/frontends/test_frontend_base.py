"""What every front-end declares about itself matches what it does to the LLM."""

from __future__ import annotations

import pytest

from vlbridge.testing import TINY_FRONTEND_CONFIGS, tiny_model


@pytest.mark.parametrize("frontend", list(TINY_FRONTEND_CONFIGS))
def test_the_declared_fusion_kind_is_what_the_front_end_installs_in_the_llm(frontend):
    model = tiny_model(frontend={"type": frontend})[0]
    hooked = [n for n, m in model.language_model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert model.frontend.fusion_kind == ("deep" if hooked else "early"), hooked
    # a per-row visual memory ties a batch's rows together; the server then runs it statically
    assert model.keeps_batch_state == model.frontend.batch_state == (frontend == "adem_vl")


@pytest.mark.parametrize(
    ("reducer", "tied"),
    [({"type": "pmod"}, True), ({"type": "fastv", "k": 1}, True), ({"type": "turbo", "r": 2}, False)],
    ids=["pmod", "fastv", "turbo"],
)
def test_in_llm_reducers_tie_a_batch_together_tower_reducers_do_not(reducer, tied):
    llava = {"type": "llava", "connector": {"merge": 1}}  # a tower reducer needs the tower's own grid
    assert tiny_model(frontend=llava, reducers=[reducer])[0].keeps_batch_state is tied
