"""`tandem bench local` and `tandem demo` end to end on the tiny pair: every mode runs, every output equals the
target alone, and the figures they print are the ones they return."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from tandem.config import CoreSettings
from tandem.models import LoadedModel


def _save(tmp_path: Path, tiny_target: LoadedModel, tiny_draft: LoadedModel) -> tuple[str, str]:
    for model, name in ((tiny_target, "target"), (tiny_draft, "draft")):
        model.model.save_pretrained(tmp_path / name)
        model.tokenizer.save_pretrained(tmp_path / name)
    return str(tmp_path / "target"), str(tmp_path / "draft")


def test_bench_local_on_a_chat_trace(tmp_path: Path, tiny_target: LoadedModel, tiny_draft: LoadedModel) -> None:
    from tandem_tools.bench_local import run_bench_local

    target, draft = _save(tmp_path, tiny_target, tiny_draft)
    trace = tmp_path / "chat.jsonl"
    trace.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "max_tokens": 16}) + "\n"
                             for q in ("hello there", "what is up")))
    settings = CoreSettings(target=target, draft=draft, gamma=3, threads=1)
    out = tmp_path / "local.json"
    report = run_bench_local(settings, ["spec", "spec-tree", "hf-assisted"], 2, 0, 16, out,
                             console=Console(file=None, quiet=True), trace=trace)
    results = report["results"]
    assert isinstance(results, dict) and set(results) == {"ar", "spec", "spec-tree", "hf-assisted"}
    assert all(r["greedy_equal_to_target"] == "2/2" for r in results.values())
    assert 0 < results["spec"]["target_passes_per_token"] <= 1
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(results))


def test_demo_runs_the_real_path(tmp_path: Path, tiny_target: LoadedModel, tiny_draft: LoadedModel) -> None:
    from tandem_tools.demo_run import MODES, run_demo

    target, draft = _save(tmp_path, tiny_target, tiny_draft)
    settings = CoreSettings(target=target, draft=draft, gamma=3, threads=1)
    console = Console(record=True, width=160)
    runs = run_demo(settings, "abc", 12, console=console)
    assert [r.mode for r in runs] == list(MODES[:3])
    assert all(len(r.result.tokens) > 0 for r in runs)
    assert len({tuple(r.result.tokens) for r in runs}) == 1  # every mode gave the same (the target's) output
    text = console.export_text()
    assert "fastest here" in text and "NO (a bug)" not in text


def test_demo_web_serves_the_page_until_interrupted(tmp_path: Path, tiny_target: LoadedModel,
                                                    tiny_draft: LoadedModel) -> None:
    """`tandem demo --web`: the cloud and the edge start, the page's address is printed, Ctrl-C stops both."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    import httpx

    target, draft = _save(tmp_path, tiny_target, tiny_draft)
    proc = subprocess.Popen([sys.executable, "-m", "tandem_tools.cli", "demo", "--web", "--port", "0", "--target",
                             target, "--draft", draft, "--gamma", "3"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=os.environ | {"COLUMNS": "200"}, text=True)
    try:
        seen = ""
        deadline = time.monotonic() + 120
        while "Ctrl-C" not in seen and time.monotonic() < deadline and proc.poll() is None:
            seen += proc.stdout.readline() if proc.stdout else ""
        found = re.search(r"open (http://127\.0\.0\.1:\d+)/", seen)
        assert found, seen
        url = found.group(1)
        page = httpx.get(url + "/", timeout=30)
        assert page.status_code == 200 and 'data-side="edge"' in page.text
        answer = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "tandem", "messages": [{"role": "user", "content": "abc"}], "max_tokens": 8, "temperature": 0,
            "return_token_origins": True}).json()["choices"][0]
        assert len(answer["tandem"]["origins"]) == len(answer["tandem"]["pieces"]) > 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
