"""The reducer plumbing shared by every reducer: CLI specs, config errors, front-end gates, visual masks."""

from __future__ import annotations

import pytest
from PIL import Image

from vlbridge.errors import ConfigError
from vlbridge.frontends.layout import image_layout
from vlbridge.reducers import parse_reducer_spec
from vlbridge.testing import chat, tiny_model, tiny_vl_config


def test_reducer_spec_parses_types_scalars_and_lists():
    assert parse_reducer_spec("pmod") == {"type": "pmod"}
    assert parse_reducer_spec("turbo:r=[16, 8],lam=500,proportional=false,name=x") == {
        "type": "turbo",
        "r": [16, 8],
        "lam": 500,
        "proportional": False,
        "name": "x",
    }


@pytest.mark.parametrize("spec", [":r=1", "turbo:r", "turbo:=3"])
def test_reducer_spec_errors_name_the_expected_form(spec):
    with pytest.raises(ConfigError, match="key=value|TYPE"):
        parse_reducer_spec(spec)


def test_unknown_reducer_lists_the_known_ones():
    # Raised inside config validation (pydantic wraps it; recipe loading turns that into a ConfigError).
    with pytest.raises(ValueError, match="unknown reducer 'nope'; available"):
        tiny_model(reducers=[{"type": "nope"}])


@pytest.mark.parametrize("frontend", ["solo", "inf_llava", "adem_vl"])
def test_frontends_without_a_plain_tower_grid_refuse_tower_reducers(frontend):
    refused = f"{frontend!r} front-end does not support"
    config = tiny_vl_config(frontend={"type": frontend}, reducers=[{"type": "turbo"}])
    with pytest.raises(ConfigError, match=refused):  # the processor, built from the config alone
        image_layout(config)
    with pytest.raises(ConfigError, match=refused):
        tiny_model(frontend={"type": frontend}, reducers=[{"type": "turbo"}])
    model, _, _ = tiny_model(frontend={"type": frontend})
    with pytest.raises(ConfigError, match=refused):  # and the model side, for reducers attached by hand
        model.frontend.reducible_tower("turbo")


def test_llava_refuses_tower_reducers_that_would_break_its_grid_merge():
    # the tiny llava merges 2x2 neighbours in its connector
    with pytest.raises(ConfigError, match="merge: 1"):
        image_layout(tiny_vl_config(reducers=[{"type": "turbo"}]))


def test_solo_visual_mask_covers_patches_and_row_separators_only():
    model, tokenizer, processor = tiny_model(frontend={"type": "solo"})
    batch = processor([chat("what is it?")], [[Image.new("RGB", (32, 32))]])
    ids = batch["input_ids"][0]
    mask = model.frontend.visual_mask(batch["input_ids"])[0]
    tokens = tokenizer.convert_ids_to_tokens(ids[mask].tolist())
    assert set(tokens) == {"<vpatch>", "<vrow_sep>"}
    assert "<vision>" in tokenizer.convert_ids_to_tokens(ids[~mask].tolist())


def test_a_bad_reducer_added_at_load_time_is_a_config_error(tmp_path):
    from vlbridge.factory import load_pretrained

    model, tokenizer, _ = tiny_model(frontend={"type": "llava", "connector": {"merge": 1}})
    model.save_pretrained(tmp_path, tokenizer)
    with pytest.raises(ConfigError, match="invalid reducer --reducer options"):
        load_pretrained(tmp_path, reducers=[{"type": "turbo", "no_such_option": 1}])
