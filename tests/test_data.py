"""Bad data is a one-line error naming the file and the 1-based line or example; dropped
examples are counted, reported, and stop the run past a set fraction."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from taid import data as D
from taid.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def tok():
    from taid.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def chat(user: str = "Hi", assistant: str | None = "Hello there.") -> dict:
    turns = [{"role": "user", "content": user}]
    if assistant is not None:
        turns.append({"role": "assistant", "content": assistant})
    return {"messages": turns}


def write_lines(path: Path, rows: list) -> Path:
    path.write_bytes(
        b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows)
    )
    return path


def examples(path: Path, tok, *overrides: str):
    cfg = load_config(SMOKE, [f"data.path={path}", *overrides]).data
    return D.load_examples(cfg, tok)[0]


@pytest.mark.parametrize(
    "rows, match",
    [
        ([], r"empty.jsonl'?: the file is empty"),
        (
            [chat(), chat(), b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'],
            r"bad.jsonl:3: not valid UTF-8 \(byte 0xe9 at column \d+\)",
        ),
        ([chat(), chat(), chat(), b'{"messages": [}\n'], r"bad.jsonl:4: not valid JSON \(.+\)"),
        ([chat(), [1, 2]], r"bad.jsonl:2: a JSON list, not an object"),
        (
            [chat(), {"messages": "Hi there"}],
            r"bad.jsonl:2: cannot be tokenized as messages data \(the chat turns must be a "
            r"non-empty list of .+, got a str\)",
        ),
        (
            [chat(), {"messages": [{"content": "Hi"}, {"role": "assistant", "content": "x"}]}],
            r"bad.jsonl:2: .+turn 1 has no 'role'",
        ),
        (
            [chat(), {"messages": [{"role": "user", "content": "Hi"}, "Hello"]}],
            r"bad.jsonl:2: .+turn 2 is a str",
        ),
    ],
)
def test_bad_rows_are_named_by_file_and_line(tmp_path, tok, rows, match):
    name = "empty.jsonl" if not rows else "bad.jsonl"
    path = write_lines(tmp_path / name, rows)
    with pytest.raises(ConfigError, match=match) as info:
        examples(path, tok)
    assert "\n" not in str(info.value)


def test_blank_lines_keep_the_line_numbers_of_a_file(tmp_path, tok):
    path = write_lines(tmp_path / "bad.jsonl", [chat(), b"\n", b"\n", b"{oops}\n"])
    with pytest.raises(ConfigError, match=r"bad.jsonl:4: not valid JSON"):
        examples(path, tok)


def test_a_json_file_is_named_by_line_and_must_hold_objects(tmp_path, tok):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"messages": []},\n {"messages": ]\n]\n')
    with pytest.raises(ConfigError, match=r"bad.json:3: not valid JSON"):
        examples(path, tok)
    path.write_text(json.dumps({"messages": chat()["messages"]}))
    with pytest.raises(ConfigError, match=r"bad.json: a .json file must hold a list of objects"):
        examples(path, tok)
    path.write_text(json.dumps([chat(), {"messages": 3}]))
    with pytest.raises(ConfigError, match=r"bad.json example 2: .+got a int"):
        examples(path, tok)


def test_invalid_utf8_in_a_text_file_is_named_by_line(tmp_path, tok):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"one line\nanother line\nand caf\xe9\n")
    with pytest.raises(ConfigError, match=r"bad.txt:3: not valid UTF-8"):
        examples(path, tok, "data.eval_size=0")


def test_a_missing_field_names_the_field_and_the_setting(tmp_path, tok):
    path = write_lines(
        tmp_path / "pairs.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}]
    )
    with pytest.raises(ConfigError, match=r"pairs.jsonl:2: .+no field 'response'.+data.format"):
        examples(path, tok)


def test_dropped_examples_are_counted_by_reason_and_reported(tmp_path, tok, caplog):
    rows = [chat(f"Question {i}?", f"Answer {i}.") for i in range(18)]
    rows.append(chat("No answer here", None))  # no assistant turn
    rows.append(chat("word " * 200, "Too late."))  # the prompt fills max_length
    path = write_lines(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="taid"):
        got = examples(path, tok, "data.eval_size=0", "data.max_dropped_fraction=0.1")
    assert len(got) == 18
    message = caplog.text
    assert "dropped 2 of 20 examples" in message
    assert (
        "1 with no target token" in message and "1 whose prompt fills data.max_length=96" in message
    )


def test_dropping_more_than_the_set_fraction_stops_before_training(tmp_path, tok):
    rows = [chat(f"Q{i}", f"A{i}.") for i in range(8)] + [chat("x", None)] * 2
    path = write_lines(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(
        ConfigError,
        match=r"dropped 2 of 10 examples.+more than "
        r"data.max_dropped_fraction=0.1",
    ):
        examples(path, tok)
    assert len(examples(path, tok, "data.max_dropped_fraction=0.2", "data.eval_size=0")) == 8


def test_the_shipped_data_loads_without_drops(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="taid"):
        got = examples(ROOT / "data" / "quickstart.jsonl", tok)
    assert got and "dropped" not in caplog.text
