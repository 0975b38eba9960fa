"""RecordIndex: JSON lists and JSON lines read record by record from byte offsets, equal to `json.load`."""

from __future__ import annotations

import json
import pickle

import pytest

from vlbridge.data import records
from vlbridge.data.formats import LlavaJsonConfig, load_source
from vlbridge.data.records import RecordIndex
from vlbridge.errors import DataError

# Records whose text trips naive scanners: brackets and quotes inside strings, escapes, unicode.
TRICKY = [
    {"id": "a", "conversations": [{"from": "human", "value": "<image>\nbraces {inside} [a string]"}]},
    {
        "id": 'q"uo\\"te',
        "text": 'he said "}]" and left\\',
        "nested": {"list": [[{}], [], {"k": [1, {"x": "]"}]}]},
    },
    {"id": "ünï", "text": "日本語のテキスト 😀 — \u2028 line sep", "emoji": ["😀", "👍🏽"], "n": -1.5e3},
    {"id": "esc", "text": 'tab\tnewline\nback\\slash \\\\" end', "u": "\\u0041 is not A", "null": None},
    {},
]


def write(path, rows, *, style: str) -> None:
    """The same rows as a JSON list (compact, pretty or unescaped unicode) or JSON lines."""
    texts = {
        "compact": lambda: json.dumps(rows, separators=(",", ":")),
        "pretty": lambda: json.dumps(rows, indent=2),
        "unicode": lambda: json.dumps(rows, ensure_ascii=False, indent=1),
        "jsonl": lambda: "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n",
    }
    path.write_text(texts[style](), encoding="utf-8")


@pytest.mark.parametrize("style", ["compact", "pretty", "unicode", "jsonl"])
def test_index_equals_json_load(tmp_path, style) -> None:
    path = tmp_path / ("rows.jsonl" if style == "jsonl" else "rows.json")
    write(path, TRICKY, style=style)
    index = RecordIndex.build(path)
    assert len(index) == len(TRICKY)
    assert list(index) == TRICKY
    assert index[-1] == TRICKY[-1] and index[1:3] == TRICKY[1:3]
    with pytest.raises(IndexError):
        index[len(TRICKY)]


def test_records_spanning_many_blocks(tmp_path, monkeypatch) -> None:
    """A tiny read block puts every record, string and multi-byte character across block boundaries."""
    monkeypatch.setattr(records, "BLOCK", 7)
    rows = TRICKY * 5 + [{"long": "x" * 100 + "é" * 50 + '\\"' * 20, "deep": [[[[[[{"a": "]}"}]]]]]]}]
    for style in ("compact", "pretty", "unicode"):
        path = tmp_path / f"{style}.json"
        write(path, rows, style=style)
        assert list(RecordIndex.build(path)) == rows, style


def test_a_byte_order_mark_is_skipped(tmp_path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(TRICKY).encode())
    assert list(RecordIndex.build(path)) == TRICKY


def test_index_holds_offsets_only_and_pickles_small(tmp_path) -> None:
    rows = [{"id": i, "text": "word " * 50} for i in range(2000)]
    path = tmp_path / "rows.json"
    write(path, rows, style="pretty")
    index = RecordIndex.build(path)
    assert index.starts.dtype.name == "int64" and index.starts.nbytes == 8 * len(rows)
    blob = pickle.dumps(index)
    assert len(blob) < 2 * (index.starts.nbytes + index.ends.nbytes) + 500  # not the records
    assert index[1999] == rows[1999]  # opens the file in this process
    copy = pickle.loads(pickle.dumps(index))
    assert copy[1234] == rows[1234] and copy[0] == rows[0]


def test_llava_source_reads_through_the_index(tmp_path) -> None:
    path = tmp_path / "llava.json"
    rows = [
        {"id": f"s{i}", "image": "a.png", "conversations": [{"from": "gpt", "value": "hi"}]} for i in range(3)
    ]
    write(path, rows, style="pretty")
    samples = load_source(LlavaJsonConfig(path=str(path)))
    assert isinstance(samples.rows, RecordIndex)
    assert [s["id"] for s in samples] == ["s0", "s1", "s2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"a": 1},\n{"b": 2},\n{"c": tru}\n]', r"invalid JSON at line 3 \(record 2\)"),
        ('[{"a": 1},\n\n{"b": "no end}\n', r"invalid JSON at line 3: the file ends inside record 1"),
        ('[{"a": 1}\n{"b": 2}]', r"invalid JSON at line 2: expected ',' or ']' after record 0"),
        ('[{"a": 1},]', r"invalid JSON at line 1: a ',' before ']'"),
        ('[{"a": 1}] x', "extra data after the closing"),
        ("", "the file is empty"),
        ('{"data": []}', "expected a list of records"),
        ('[{"a": 1},\n2]', r"expected a list of records \(JSON objects\), one per sample \(line 2\)"),
    ],
)
def test_bad_json_list_names_file_and_line(tmp_path, text, message) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"bad\.json: .*{message}"):
        RecordIndex.build(path)


def test_bad_json_lines_name_the_line(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: expected a list of records .*line 3 is not an object"):
        RecordIndex.build(path)
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: invalid JSON at line 2"):
        RecordIndex.build(path)
    with pytest.raises(DataError, match="file not found"):
        RecordIndex.build(tmp_path / "missing.jsonl")


def test_an_unclosed_string_stops_at_the_record_limit(tmp_path, monkeypatch) -> None:
    """A string left open must not make the scan hold the rest of a huge file."""
    monkeypatch.setattr(records, "BLOCK", 64)
    monkeypatch.setattr(records, "MAX_RECORD", 1000)
    path = tmp_path / "open.json"
    path.write_text('[{"a": "never closed}, ' + '{"b": 1}, ' * 500 + "]")
    with pytest.raises(DataError, match="over 1,000 bytes in record 0: a string or bracket is not closed"):
        RecordIndex.build(path)
