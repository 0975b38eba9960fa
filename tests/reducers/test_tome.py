"""ToMe: the invariants of reduction_baselines.md §B that Turbo's tests do not already cover.

ToMe runs through Turbo's code with λ = 0 and no token threshold, so what is checked here is that
identity, its unmerge, its equality with Turbo at λ = 0, towers without CLS and the command line.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from vlbridge import testing as kit
from vlbridge.cli import main
from vlbridge.reducers import Meter
from vlbridge.reducers.merge import match, merge, merge_weighted, unmerge
from vlbridge.reducers.tome import TomeConfig
from vlbridge.testing import tiny_model, train_batch

CLIP, SIGLIP = "clip_vision_model", "siglip_vision_model"


def build(family: str = "llama", tower: str = CLIP, reducers: list | None = None):
    """A tiny llava model on an 8x8 patch grid (65 tokens with CLS), 3 blocks, no connector merge."""
    frontend = {"connector": {"merge": 1}, "vision": {"config": {"patch_size": 4, "num_hidden_layers": 3}}}
    return tiny_model(family, tower, frontend=frontend, reducers=reducers or [])


def merger_of(model):
    return model.reducers[0].merger


def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_defaults_have_no_threshold_and_no_semantic_term():
    cfg = TomeConfig()
    assert (cfg.r, cfg.min_tokens, cfg.proportional) == (16, 0, True)
    with pytest.raises(ValidationError, match="lam"):
        TomeConfig(lam=5)
    model, _, _ = build(reducers=[{"type": "tome", "r": 8}])
    assert merger_of(model).semantic is None
    assert set(merger_of(model).schedule_for(65).lam) == {0.0}


@pytest.mark.parametrize("tower", [CLIP, SIGLIP])
def test_r_zero_is_the_identity(tower, red_image):
    plain = build(tower=tower)
    tome = build(tower=tower, reducers=[{"type": "tome", "r": 0}])
    batch = train_batch(plain, red_image)
    assert torch.equal(tome[0](**batch).logits, plain[0](**batch).logits)


def test_equals_turbo_with_lambda_zero_and_no_threshold():
    x = pixels()
    tome = build(reducers=[{"type": "tome", "r": 8}])[0]
    turbo = build(reducers=[{"type": "turbo", "r": 8, "lam": 0, "min_tokens": 0}])[0]
    assert torch.equal(tome.frontend.encode(x), turbo.frontend.encode(x))
    with_threshold = build(reducers=[{"type": "turbo", "r": 8, "lam": 0, "min_tokens": 60}])[0]
    assert (
        with_threshold.frontend.layout.num_image_tokens() == 64 - 8
    )  # block 1 sees 57 < 60 tokens: no merge


def test_unmerge_gives_every_source_its_group_average():
    g = torch.Generator().manual_seed(3)
    metric, x = torch.randn(2, 15, 8, generator=g), torch.randn(2, 15, 4, generator=g)
    plan = match(metric, 5, protect_first=True)
    merged, sizes = merge_weighted(x, torch.ones(2, 15, 1), plan)
    restored = unmerge(merged, plan)
    assert restored.shape == x.shape
    for b in range(2):
        joins = {
            2 * int(s): 2 * int(d) + 1 for s, d in zip(plan.sources[b], plan.destinations[b], strict=True)
        }
        group_of = [joins.get(i, i) for i in range(15)]  # each token's representative
        for i in range(15):
            members = [t for t in range(15) if group_of[t] == group_of[i]]
            torch.testing.assert_close(restored[b, i], x[b, members].mean(0))
    assert torch.equal(sizes, merge(torch.ones(2, 15, 1), plan))  # sizes count the group members


def test_towers_without_cls_can_merge_every_even_token():
    """No protected token: r is clipped to ⌊N/2⌋ and token 0 may merge."""
    model, _, _ = build(tower=SIGLIP, reducers=[{"type": "tome", "r": [40, 0, 0], "order": "raster"}])
    model.meter = Meter()
    model.frontend.encode(pixels())
    assert model.meter.last(Meter.TOWER_TOKENS) == [64, 32, 32, 32]
    state = merger_of(model).state
    assert (state.positions[..., 0] % 2 == 1).all()  # only odd tokens represent groups: token 0 merged too
    assert (state.sizes.sum(1) == 64).all()


def test_cached_decode_equals_full_recompute(red_image):
    vl = build("mistral", SIGLIP, reducers=[{"type": "tome", "r": 8}])
    kit.assert_cached_decode_matches_recompute(vl, "What color is the circle?", red_image, atol=1e-4)


def test_chat_switches_a_reducer_on_from_the_command_line(red_image, tmp_path, capsys):
    model, tokenizer, _ = build()
    model.save_pretrained(tmp_path / "run" / "model", tokenizer)
    image = tmp_path / "red.png"
    red_image.save(image)
    args = [
        "chat",
        str(tmp_path / "run"),
        "What color is it?",
        "--image",
        str(image),
        "--max-new-tokens",
        "4",
    ]
    assert main([*args, "--reducer", "tome:r=[8,8,8]"]) == 0
    assert capsys.readouterr().out.strip()
