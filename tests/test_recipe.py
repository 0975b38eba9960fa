"""Recipes: YAML + dotted overrides -> validated configs; every error names the key and the value seen."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlbridge.errors import ConfigError
from vlbridge.frontends.llava import LlavaConfig
from vlbridge.recipe import load_recipe, parse_recipe

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


@pytest.fixture
def quickstart(tmp_path) -> Path:
    return Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.train.stages and recipe.model.frontend.type


def test_frontend_section_is_validated_by_its_registered_class(quickstart):
    recipe = load_recipe(quickstart)
    assert isinstance(recipe.model.frontend, LlavaConfig)
    dumped = recipe.model_dump(mode="json")
    raw = yaml.safe_load(quickstart.read_text())["model"]["frontend"]["vision"]["model_type"]
    assert dumped["model"]["frontend"]["vision"]["model_type"] == raw  # subclass fields survive dumps
    assert parse_recipe(dumped) == recipe


def test_overrides_set_nested_values_lists_and_types(quickstart):
    recipe = load_recipe(
        quickstart,
        [
            "train.stages.0.lr=3e-4",
            "model.frontend.connector.merge=2",
            "data.train.n=10",
            "model.frontend.vision.config.depths=[1,1,1]",
        ],
    )
    assert recipe.train.stages[0].lr == pytest.approx(3e-4)
    assert recipe.model.frontend.connector.merge == 2
    assert recipe.data.train.n == 10
    assert recipe.model.frontend.vision.config["depths"] == [1, 1, 1]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.stages.0.lr=fast", ["train.stages.0.lr", "'fast'"]),
        ("model.llm.colour=red", ["model.llm.colour", "Extra inputs are not permitted", "'red'"]),
        (
            "model.frontend.connector.merge=0",
            ["model.frontend.connector.merge", "greater than or equal to 1"],
        ),
        ("train.stages.0.modules.llm=partly", ["train.stages.0.modules.llm", "'partly'"]),
        ("data.train.type=imagenet", ["unknown data format 'imagenet'", "shapes"]),
        ("model.frontend.type=perceiver", ["unknown front-end 'perceiver'", "llava"]),
    ],
)
def test_bad_values_are_errors_naming_key_and_value(quickstart, override, expected):
    with pytest.raises(ConfigError) as err:
        load_recipe(quickstart, [override])
    for fragment in expected:
        assert fragment in str(err.value)


def test_override_syntax_and_missing_items(quickstart):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_recipe(quickstart, ["train.stages.0.lr"])
    with pytest.raises(ConfigError, match="has no item '5'"):
        load_recipe(quickstart, ["train.stages.5.lr=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_duplicate_stage_names_rejected(quickstart):
    tree = yaml.safe_load(quickstart.read_text())
    tree["train"]["stages"] = tree["train"]["stages"] * 2
    with pytest.raises(ConfigError, match="stage names must be unique"):
        parse_recipe(tree)
