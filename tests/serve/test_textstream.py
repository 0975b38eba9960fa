"""Incremental text with stop strings: nothing that could still become a stop string is shown early."""

from __future__ import annotations

from vlbridge.serve.textstream import TextStream


def _decode(tokens: list[int]) -> str:
    return "".join(chr(t) for t in tokens)


def _feed(stream: TextStream, text: str) -> list[str]:
    return [stream.push(ord(ch)) for ch in text]


def test_text_flows_out_as_it_comes_without_stops():
    stream = TextStream(_decode, [])
    assert _feed(stream, "abc") == ["a", "b", "c"]
    assert stream.finish() == ""


def test_a_possible_stop_prefix_is_held_then_released():
    stream = TextStream(_decode, ["END"])
    assert _feed(stream, "xEN") == ["x", "", ""]
    assert _feed(stream, "d") == ["ENd"]  # "ENd" can no longer become "END"


def test_a_stop_string_ends_the_text_before_it():
    stream = TextStream(_decode, ["END", "##"])
    out = _feed(stream, "hi E") + _feed(stream, "ND more")
    assert "".join(out) == "hi " and stream.stopped
    assert stream.finish() == ""


def test_the_earliest_of_several_stops_wins_inside_one_token():
    stream = TextStream(lambda toks: "".join(["ab##cdEND"][t] for t in toks), ["END", "##"])
    assert stream.push(0) == "ab" and stream.stopped


def test_half_a_character_is_held_until_complete():
    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9!"}

    def decode(tokens):
        return b"".join(pieces[t] for t in tokens).decode("utf-8", errors="replace")

    stream = TextStream(decode, [])
    assert [stream.push(t) for t in (1, 2, 3)] == ["caf", "", "é!"]


def test_finish_flushes_held_text():
    stream = TextStream(_decode, ["STOP"])
    assert _feed(stream, "go ST") == ["g", "o", " ", "", ""]
    assert stream.finish() == "ST"
