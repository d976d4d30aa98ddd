"""The shipped code-completion trace: well formed, and cut only from held-out files the models never trained on."""

from __future__ import annotations

import importlib.util
import json
import platform
import re
from pathlib import Path

import pytest

from tandem_tools.train.data import split_of, stdlib_root

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "benchmarks" / "traces" / "code-completion.jsonl"
MANIFEST = ROOT / "tests" / "fixtures" / "test_pair" / "files.json"
SOURCE = re.compile(r"^(?P<path>[\w./-]+\.py):(?P<first>\d+)-(?P<last>\d+)$")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in TRACE.read_text().splitlines()]


def test_trace_shape(rows: list[dict]) -> None:
    assert len(rows) >= 50
    for r in rows:
        assert set(r) == {"prompt", "max_tokens", "source"}
        assert isinstance(r["prompt"], str) and r["prompt"].strip()
        assert type(r["max_tokens"]) is int and 64 <= r["max_tokens"] <= 256
    assert len({r["prompt"] for r in rows}) == len(rows)
    assert len({r["max_tokens"] for r in rows}) > 10  # a spread of lengths, not one value


def test_sources_are_heldout_line_ranges(rows: list[dict]) -> None:
    manifest = {f["path"]: f["split"] for f in json.loads(MANIFEST.read_text())["files"]}
    for r in rows:
        m = SOURCE.match(r["source"])
        assert m, r["source"]
        first, last = int(m["first"]), int(m["last"])
        assert 10 <= last - first + 1 <= 40
        assert r["prompt"].count("\n") == last - first + 1
        assert split_of(m["path"]) == "heldout", r["source"]
        assert manifest.get(m["path"]) == "heldout", r["source"]  # and so it was for the test pair
    assert len({SOURCE.match(r["source"])["path"] for r in rows}) >= 15  # type: ignore[index]


def test_trace_regenerates_from_this_stdlib(rows: list[dict]) -> None:
    """On the interpreter the test pair was trained with, the prompts are the cited lines, and the script
    reproduces the file exactly."""
    if platform.python_version() != json.loads(MANIFEST.read_text())["python"]:
        pytest.skip("a different stdlib: line numbers may differ")
    for r in rows:
        m = SOURCE.match(r["source"])
        assert m
        lines = (stdlib_root() / m["path"]).read_text(encoding="utf-8").splitlines(keepends=True)
        assert "".join(lines[int(m["first"]) - 1 : int(m["last"])]) == r["prompt"]
    spec = importlib.util.spec_from_file_location("make_trace", ROOT / "benchmarks" / "make_trace.py")
    assert spec and spec.loader
    make_trace = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_trace)
    assert make_trace.make_trace(len(rows)) == rows


CHAT = ROOT / "benchmarks" / "traces" / "chat.jsonl"


def test_the_chat_trace_is_hand_written_chat_and_loads() -> None:
    from tandem_tools.replay_summary import load_trace

    raw = [json.loads(line) for line in CHAT.read_text().splitlines()]
    assert len(raw) >= 40 and all(r["source"] == "hand-written" for r in raw)
    assert sum(len(r["messages"]) > 1 for r in raw) >= 5  # multi-turn requests too
    rows = load_trace(CHAT)
    assert len(rows) == len(raw) and all(r.messages and r.messages[-1]["role"] == "user" for r in rows)
    assert len({json.dumps(r["messages"]) for r in raw}) == len(raw)


def test_chat_rows_use_the_chat_template(tmp_path: Path) -> None:
    from tandem.models import load_model
    from tandem_tools.replay_summary import load_trace

    tok = load_model("test-target").tokenizer  # no chat template: the messages' text, joined
    row = load_trace(CHAT)[0]
    assert row.ids(tok) == tok.encode("\n".join(m["content"] for m in row.messages or ()), add_special_tokens=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}], "max_tokens": 8}) + "\n")
    with pytest.raises(ValueError, match="messages"):
        load_trace(bad)


KINDS = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities", "retrieval",
         "short-answer", "translation", "summarization", "structured"}


def test_the_kinds_trace_has_one_request_per_kind() -> None:
    """benchmarks/traces/kinds.jsonl (`bench replay`'s per-kind table): one question per kind, written here, none
    of them in the other chat traces."""
    from tandem_tools.replay_summary import TRACES, load_trace

    raw = [json.loads(line) for line in (TRACES / "kinds.jsonl").read_text().splitlines()]
    assert all(set(r) == {"messages", "max_tokens", "source", "kind"} for r in raw)
    assert all(r["source"] == "written for the per-kind check" and r["max_tokens"] == 64 for r in raw)
    rows = load_trace(TRACES / "kinds.jsonl")
    assert sorted(r.kind or "" for r in rows) == sorted(KINDS)
    others = {m["content"] for t in ("chat.jsonl", "structured.jsonl", "grammar-overhead-chat.jsonl")
              for line in (TRACES / t).read_text().splitlines() for m in json.loads(line)["messages"]}
    assert all(r.messages and len(r.messages) == 1 and r.messages[0]["content"] not in others for r in rows)


def test_the_edits_trace_asks_to_rework_text_it_carries() -> None:
    """benchmarks/traces/edits.jsonl (the phrase pool's check): requests written here whose answers repeat much of
    their own prompt, one per kind of edit."""
    from tandem_tools.replay_summary import TRACES, load_trace

    raw = [json.loads(line) for line in (TRACES / "edits.jsonl").read_text().splitlines()]
    assert all(r["source"] == "written for the pool check" and r["kind"].startswith("edit-") for r in raw)
    rows = load_trace(TRACES / "edits.jsonl")
    assert len({r.kind for r in rows}) == len(rows) == 3
    assert all(r.messages and "\n\n" in r.messages[0]["content"] for r in rows)  # an instruction, then the text
