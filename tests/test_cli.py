"""The command line: chat answers from a checkpoint; user errors print one line, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlbridge.cli import main
from vlbridge.testing import tiny_model


@pytest.fixture
def checkpoint(tmp_path):
    model, tokenizer, _ = tiny_model("llama", "clip_vision_model")
    model.save_pretrained(tmp_path / "run" / "model", tokenizer)
    return tmp_path / "run"


def test_chat_answers_from_a_run_dir(checkpoint, red_image, tmp_path, capsys):
    image = tmp_path / "red.png"
    red_image.save(image)
    args = ["chat", str(checkpoint), "What color is it?", "--image", str(image), "--max-new-tokens", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # greedy: same answer twice


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["chat", "{tmp}/nowhere", "hi"], "no vlbridge model under"),
        (["chat", "{ckpt}", "hi", "--image", "{tmp}/missing.png"], "image file not found"),
        (["train", "{tmp}/missing.yaml"], "recipe file not found"),
    ],
)
def test_user_errors_are_one_line(checkpoint, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, ckpt=checkpoint) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_overrides_after_flags_reach_the_recipe(capsys):
    recipe = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    assert main(["train", str(recipe), "--no-eval", "model.llm.bogus_key=1"]) == 2
    assert "bogus_key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(recipe), "--bogus-flag"])
    assert "unrecognized arguments: --bogus-flag" in capsys.readouterr().err
