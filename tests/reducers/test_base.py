"""The reducer plumbing shared by every reducer: CLI specs, config errors, front-end gates, visual masks."""

from __future__ import annotations

import pytest
from PIL import Image

from vlbridge.errors import ConfigError
from vlbridge.reducers import parse_reducer_spec
from vlbridge.testing import chat, tiny_model


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
    model, _, _ = tiny_model(frontend={"type": frontend})
    with pytest.raises(ConfigError, match=f"{frontend!r} front-end does not support"):
        model.frontend.reduce_tower(lambda tower: None, "turbo")


def test_llava_refuses_tower_reducers_that_would_break_its_grid_merge():
    model, _, _ = tiny_model()  # the tiny llava merges 2x2 neighbours in its connector
    with pytest.raises(ConfigError, match="merge: 1"):
        model.frontend.reduce_tower(lambda tower: None, "turbo")


def test_llava_recounts_placeholders_after_the_tower_is_patched():
    model, _, _ = tiny_model(frontend={"type": "llava", "connector": {"merge": 1}})
    before = model.frontend.num_image_tokens()

    def drop_last_token(tower):
        forward = tower.forward
        tower.forward = lambda pixels: (forward(pixels)[0][:, :-1], None)

    model.frontend.reduce_tower(drop_last_token, "test")
    assert model.frontend.num_image_tokens() == before - 1


def test_solo_visual_mask_covers_patches_and_row_separators_only():
    model, tokenizer, processor = tiny_model(frontend={"type": "solo"})
    batch = processor([chat("what is it?")], [[Image.new("RGB", (32, 32))]])
    ids = batch["input_ids"][0]
    mask = model.frontend.visual_mask(batch["input_ids"])[0]
    tokens = tokenizer.convert_ids_to_tokens(ids[mask].tolist())
    assert set(tokens) == {"<vpatch>", "<vrow_sep>"}
    assert "<vision>" in tokenizer.convert_ids_to_tokens(ids[~mask].tolist())


def test_a_bad_reducer_added_at_load_time_is_a_config_error(tmp_path):
    from vlbridge.checkpoint import load_model

    model, tokenizer, _ = tiny_model(frontend={"type": "llava", "connector": {"merge": 1}})
    model.save_pretrained(tmp_path, tokenizer)
    with pytest.raises(ConfigError, match="invalid reducer --reducer options"):
        load_model(tmp_path, reducers=[{"type": "turbo", "no_such_option": 1}])
