"""The llama-server peer (`tandem_tools.llama_server`, `tandem_tools.llama_peer`): the command line and its mapping
onto the wheel's parameters, the request, the timings, the process and the bench figures, against a fake llama-server
(a small Python HTTP server speaking its `/completion` dialect); one integration test against the real peer (the
xllamacpp wheel), skipped where the wheel or the shipped GGUF files are absent."""

from __future__ import annotations

import json
import platform
import stat
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tandem import llama_lib
from tandem_tools import llama_peer
from tandem_tools import llama_server as ls
from tandem_tools.replay_summary import RequestRecord, peer_summary, render_peer_markdown

PEER_PROBLEM = llama_peer.problem()  # '' where the xllamacpp wheel can serve here

# what the fake answers: the next 3 ids after the prompt's last, counting up; with -md, 4 drafted, 3 accepted. It
# writes each request body to $FAKE_LOG (one JSON line) so that a test can read what was sent.
FAKE = '''#!PYTHON
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
spec = "-md" in argv

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def send(self, body, code=200):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self.send({"status": "ok"})
        elif self.path == "/props":
            self.send({"build_info": "fake", "argv": argv})
        else:
            self.send({"error": "no"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps(body) + "\\n")
        if body["prompt"] == [666]:
            return self.send({"error": {"code": 400, "message": "bad prompt"}}, 400)
        n = min(3, body["n_predict"])
        toks = [body["prompt"][-1] + 1 + i for i in range(n)]
        timings = {"prompt_n": len(body["prompt"]), "prompt_ms": 5.0, "predicted_n": n, "predicted_ms": 20.0,
                   "predicted_per_token_ms": 10.0}
        if spec:
            timings |= {"draft_n": 4, "draft_n_accepted": 3}
        final = {"stop": True, "stop_type": "limit", "timings": timings}
        if not body.get("stream"):
            return self.send(final | {"tokens": toks, "content": "x"})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for t in toks:
            self.wfile.write(("data: " + json.dumps({"stop": False, "tokens": [t]}) + "\\n\\n").encode())
        self.wfile.write(("data: " + json.dumps(final | {"tokens": []}) + "\\n\\n").encode())

ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    binary = tmp_path / "llama-server"
    binary.write_text(FAKE.replace("PYTHON", sys.executable))
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("TANDEM_LLAMA_SERVER", str(binary))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "requests.jsonl"))
    monkeypatch.delenv("TANDEM_LLAMA_SERVER_ARGS", raising=False)
    for name in ("target.gguf", "draft.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    return tmp_path


def sent(folder: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (folder / "requests.jsonl").read_text().splitlines()]


def test_command_and_request() -> None:
    cmd = ls.server_command(Path("/b/llama-server"), Path("t.gguf"), 8080, 2, 1024)
    assert cmd[:3] == ["/b/llama-server", "-m", "t.gguf"] and "-md" not in cmd and "--spec-type" not in cmd
    assert cmd[cmd.index("-t") + 1] == cmd[cmd.index("-tb") + 1] == "2" and cmd[cmd.index("-c") + 1] == "1024"
    assert {"--no-webui", "127.0.0.1"} <= set(cmd) and cmd[cmd.index("-np") + 1] == "1"
    spec = ls.server_command(Path("b"), Path("t.gguf"), 1, 2, 512, Path("d.gguf"), 1, ls.SpecSettings(8, 2, 0.5),
                             ["--foo"])
    assert spec[spec.index("-md") + 1] == "d.gguf"
    assert spec[spec.index("-td") + 1] == spec[spec.index("-tbd") + 1] == "1"
    assert spec[spec.index("--spec-draft-n-max") + 1] == "8" and spec[spec.index("--spec-draft-p-min") + 1] == "0.5"
    assert spec[-1] == "--foo"
    greedy = ls.completion_request([1, 2], 16)
    assert greedy["prompt"] == [1, 2] and greedy["n_predict"] == 16 and greedy["cache_prompt"] is False
    assert greedy["temperature"] == 0 and greedy["top_k"] == 1 and greedy["samplers"] == ["top_k"]
    assert greedy["return_tokens"] is True and "seed" not in greedy
    sampled = ls.completion_request([1], 4, temperature=0.7, seed=3, ignore_eos=True, stream=True)
    assert "top_k" not in sampled and sampled["seed"] == 3 and sampled["ignore_eos"] and sampled["stream"]
    assert ls.context_size([[1] * 300, [2] * 10], 100) == 512


def test_peer_takes_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default program is this Python running the peer module; the peer parses what `server_command` builds and
    sets the wheel's parameters as llama-server's parser would."""
    monkeypatch.delenv("TANDEM_LLAMA_SERVER", raising=False)
    monkeypatch.setattr(llama_peer, "problem", lambda: "")
    program, why = ls.peer_program()
    assert program == [sys.executable, "-m", "tandem_tools.llama_peer"] and why == ""
    cmd = ls.server_command(program, Path("t.gguf"), 8081, 2, 512, Path("d.gguf"), 1, ls.SpecSettings(8, 2, 0.5))
    assert cmd[:5] == [*program, "-m", "t.gguf"]
    args = llama_peer.parser().parse_args(cmd[3:])
    assert (args.model, args.host, args.port, args.threads, args.threads_batch, args.ctx_size) == (
        "t.gguf", "127.0.0.1", 8081, 2, 2, 512)
    assert (args.parallel, args.cache_ram, args.webui, args.model_draft, args.threads_draft) == (
        1, 0, False, "d.gguf", 1)
    assert (args.spec_type, args.spec_draft_n_max, args.spec_draft_n_min, args.spec_draft_p_min) == (
        "draft-simple", 8, 2, 0.5)
    with pytest.raises(SystemExit):  # a flag the peer does not know: an error, not ignored
        llama_peer.parser().parse_args([*cmd[3:], "--no-such-flag"])
    if PEER_PROBLEM:  # the wheel is absent or cannot load here: the parsing above is all that can be checked
        return
    import xllamacpp as xl
    p = llama_peer.common_params(args)
    assert (p.model.path, p.hostnames, p.port, p.n_ctx, p.n_parallel, p.cache_ram_mib, p.ui) == (
        "t.gguf", ["127.0.0.1"], 8081, 512, 1, 0, False)
    assert p.cpuparams.n_threads == p.cpuparams_batch.n_threads == 2
    d = p.speculative.draft
    assert p.speculative.types == [xl.common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE]
    assert (d.mparams.path, d.n_max, d.n_min, d.cpuparams.n_threads, d.cpuparams_batch.n_threads) == (
        "d.gguf", 8, 2, 1, 1)
    assert d.p_min == pytest.approx(0.5)
    alone = llama_peer.common_params(llama_peer.parser().parse_args(ls.server_command([], Path("t"), 1, 1, 256)))
    assert alone.speculative.types == [xl.common_speculative_type.COMMON_SPECULATIVE_TYPE_NONE]


def test_parse_completion() -> None:
    body = {"tokens": [5, 6], "stop_type": "eos", "timings": {
        "prompt_n": 9, "prompt_ms": 12.5, "predicted_n": 2, "predicted_ms": 40.0, "draft_n": 6, "draft_n_accepted": 4}}
    r = ls.parse_completion(body, 0.1, tokens=[4])
    assert r.tokens == [4, 5, 6] and r.prompt_n == 9 and r.predicted_ms == 40.0 and r.stop_type == "eos"
    assert (r.draft_n, r.draft_n_accepted) == (6, 4)
    assert ls.parse_completion({"tokens": [1]}, 0.1).draft_n == 0  # no timings: zeros, not a crash
    with pytest.raises(RuntimeError, match="bad"):
        ls.parse_completion({"error": {"message": "bad"}}, 0.1)
    assert ls.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and ls.common_prefix([], [1]) == 0


def test_missing_peer_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_LLAMA_SERVER", str(tmp_path / "nope"))
    said: list[str] = []
    peers = ls.Peers(["ar", ls.BASE, ls.SPEC], "t.gguf", "d.gguf", 1, 256, warn=said.append)
    assert peers.modes == [] and set(peers.skipped) == {ls.BASE, ls.SPEC}
    assert "is not an executable file" in said[0] and len(said) == 2
    with peers:  # nothing to start or stop
        pass
    assert ls.Peers(["ar"], "t", "d", 1, 256).skipped == {}
    monkeypatch.delenv("TANDEM_LLAMA_SERVER")
    monkeypatch.setattr(llama_lib.importlib.util, "find_spec", lambda name: None)
    said.clear()
    ls.Peers([ls.BASE], "t.gguf", "d.gguf", 1, 256, warn=said.append)
    assert said == [f"mode llama-server skipped: the llama-server peer cannot run: the xllamacpp wheel is not "
                    f"installed ({llama_lib.INSTALL}); or set TANDEM_LLAMA_SERVER to a llama-server binary"]
    monkeypatch.undo()
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        monkeypatch.setattr(llama_lib, "cpu_flags", lambda: {"sse4_2", "avx"})
        assert "this CPU lacks AVX2, FMA, F16C" in ls.peer_program()[1]


def test_peers_against_fake_server(fake: Path) -> None:
    peers = ls.Peers([ls.SPEC, ls.BASE, "spec"], str(fake / "target.gguf"), str(fake / "draft.gguf"), 2, 512,
                     draft_threads=1, log_dir=fake)
    assert peers.modes == [ls.BASE, ls.SPEC]
    with peers:
        runners = peers.runners(max_tokens=8, ignore_eos=False)
        assert set(runners) == {ls.BASE, ls.SPEC}
        tokens, wall, stats = runners[ls.BASE]([10, 11])
        assert tokens == [12, 13, 14] and wall > 0 and stats == {"drafted": 0, "accepted": 0}
        assert runners[ls.SPEC]([20])[2] == {"drafted": 4, "accepted": 3}
        peers.compare({"ar": [12, 13, 99], ls.BASE: [12, 13, 14], ls.SPEC: [21, 22, 23]}, "ar")
        peers.compare({"ar": [5], ls.BASE: [6], ls.SPEC: [6]}, "ar")
        streamed = peers.run(ls.BASE, [30], 8, stream=True)
        assert streamed.tokens == [31, 32, 33] and len(streamed.arrivals_s) == 3
        assert streamed.predicted_per_token_ms == 10.0
        with pytest.raises(RuntimeError, match="HTTP 400"):
            peers.run(ls.BASE, [666], 8)
        procs = [s.proc for s in peers.servers.values()]
    assert all(p is not None and p.poll() is not None for p in procs)  # stopped
    bodies = sent(fake)
    assert bodies[0]["n_predict"] == 4  # the warm-up
    assert {"prompt": [10, 11], "n_predict": 8, "cache_prompt": False, "top_k": 1}.items() <= bodies[2].items()
    assert "--spec-draft-n-max" in peers.info["modes"][ls.SPEC]["command"]
    assert peers.info["modes"][ls.BASE]["build_info"] == "fake"
    results = {m: {"tokens_per_s": tps, "greedy_equal_to_target": "0/2"} for m, tps in
               (("ar", 10.0), ("spec", 15.0), (ls.BASE, 20.0), (ls.SPEC, 30.0))}
    results["spec"]["greedy_equal_to_target"] = "2/2"
    lines = ls.local_report(peers, results)
    assert results["ar"]["vs_llama_server"] == 0.5 and results[ls.SPEC]["vs_llama_server"] == 1.5
    assert results[ls.BASE]["equal_prefix_tokens"] == 2 and results[ls.BASE]["reference_tokens"] == 4
    assert results[ls.SPEC]["server_drafted"] == 4 and results[ls.BASE]["server_decode_tokens_per_s"] == 150.0
    assert results[ls.SPEC]["greedy_equal_to_llama_server"] == "1/2"
    assert "greedy_equal_to_llama_server" not in results[ls.BASE]
    assert len(lines) == 3 and lines[2] == ("speculation's greedy output == its own target alone: llama-server-spec "
                                            "== llama-server 1/2 (llama.cpp's is not bit-exact); tandem's == ar: "
                                            "spec 2/2")
    assert peers.info["peer"] == "one's own llama-server binary (TANDEM_LLAMA_SERVER)"


def test_replay_records_and_summary(fake: Path) -> None:
    row = SimpleNamespace(max_tokens=8, temperature=0.0, seed=None, response_format=None, structured_outputs=None)
    constrained = SimpleNamespace(**(vars(row) | {"response_format": {"type": "json_object"}}))
    with ls.Peers([ls.BASE, ls.SPEC], str(fake / "target.gguf"), str(fake / "draft.gguf"), 1, 256) as peers:
        recs = [ls.replay_record(peers, m, i, [i * 10], r) for i, r in enumerate((row, row, constrained))
                for m in peers.modes]
    assert recs[0].tokens == 3 and recs[0].ttft_s is not None and recs[0].tpot_s is not None
    assert recs[-1].error == "skipped: constrained output"
    cloud = [RequestRecord("cloud", 0.0, 0, 1, 8, tokens=3, e2e_s=recs[0].e2e_s * 2, output_sha="differs"),
             RequestRecord("cloud", 0.0, 1, 1, 8, tokens=3, e2e_s=recs[2].e2e_s * 2, output_sha=recs[2].output_sha)]
    ours = [RequestRecord("spec", 0.0, i, 1, 8, tokens=3, e2e_s=1.0, output_sha=c.output_sha if i else "x")
            for i, c in enumerate(cloud)]
    summary = peer_summary(recs, cloud + ours, greedy={0, 1})
    rows = {r["mode"]: r for r in summary["rows"]}
    assert rows[ls.BASE]["requests"] == 2 and rows[ls.BASE]["not_run"] == 1
    assert rows[ls.BASE]["equal_to_cloud"] == "1/2" and rows[ls.SPEC]["acceptance_rate"] == 0.75
    assert rows[ls.SPEC]["equal_to_llama_server"] == "2/2" and rows[ls.BASE]["equal_to_llama_server"] is None
    assert summary["speculation_equal"] == [
        {"mode": ls.SPEC, "reference": ls.BASE, "rtt_ms": None, "equal": 2, "compared": 2},
        {"mode": "spec", "reference": "cloud", "rtt_ms": 0.0, "equal": 1, "compared": 2}]
    ratios = {(r["mode"], r["rtt_ms"]): r["vs_llama_server"] for r in summary["vs_llama_server"]}
    assert ratios[("cloud", 0.0)] == pytest.approx(0.5) and (ls.SPEC, None) in ratios
    md = render_peer_markdown(summary, peers.info)
    assert "| llama-server | 2 |" in md and "tok/s vs llama-server alone" in md
    assert "| llama-server-spec | llama-server | - | 2/2 |" in md and "| spec | cloud | 0 | 1/2 |" in md
    assert "one's own llama-server binary" in md


@pytest.mark.timeout(300)
@pytest.mark.skipif(bool(PEER_PROBLEM), reason=f"no llama-server peer: {PEER_PROBLEM}")
def test_real_llama_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wheel's server, the 0.5B GGUF as target and as its own draft, 1 thread: greedy ids back, timings filled,
    drafts (mostly) accepted, the equality counted, and both servers stopped cleanly by SIGTERM."""
    from tandem import gguf

    try:
        model = gguf.shipped_path("qwen2.5-coder-0.5b-instruct")
    except Exception as e:  # the data packages are not installed
        pytest.skip(f"no GGUF file: {e}")
    monkeypatch.delenv("TANDEM_LLAMA_SERVER", raising=False)
    monkeypatch.delenv("TANDEM_LLAMA_SERVER_ARGS", raising=False)
    peers = ls.Peers([ls.BASE, ls.SPEC], str(model), str(model), 1, 256, log_dir=tmp_path)
    assert peers.modes == [ls.BASE, ls.SPEC] and peers.info["peer"].startswith("xllamacpp ")
    with peers:
        prompt = [151644, 872, 198, 7985, 264, 729, 13, 151645, 198, 151644, 77091, 198]  # a chat prompt's ids
        alone = peers.run(ls.BASE, prompt, 12, ignore_eos=True)
        spec = peers.run(ls.SPEC, prompt, 12, ignore_eos=True)
        streamed = peers.run(ls.BASE, prompt, 12, ignore_eos=True, stream=True)
        again = peers.run(ls.BASE, prompt, 12, ignore_eos=True)
        peers.compare({"ar": alone.tokens, ls.BASE: alone.tokens, ls.SPEC: spec.tokens}, "ar")
        procs = [s.proc for s in peers.servers.values()]
    assert all(p is not None and p.returncode == 0 for p in procs), (tmp_path / "llama-server.log").read_text()[-2000:]
    assert len(alone.tokens) == 12 and alone.predicted_n == 12 and alone.prompt_n == len(prompt)
    assert alone.prompt_ms > 0 and alone.predicted_ms > 0 and alone.predicted_per_token_ms > 0
    assert again.prompt_n == len(prompt)  # no prompt cache: the prefill again
    assert streamed.tokens == alone.tokens == again.tokens and len(streamed.arrivals_s) == 12
    assert spec.draft_n > 0 and spec.draft_n_accepted >= spec.draft_n // 2
    assert spec.tokens[:4] == alone.tokens[:4]  # same weights, greedy: the same start
    assert peers.figures(ls.SPEC)["greedy_equal_to_llama_server"] == f"{int(spec.tokens == alone.tokens)}/1"
    assert peers.info["modes"][ls.BASE]["build_info"]


def test_bench_local_runs_the_peers(tmp_path: Path, fake: Path, monkeypatch: pytest.MonkeyPatch, tiny_target: Any,
                                    tiny_draft: Any) -> None:
    """`bench local` on the tiny pair with the fake server as the peer (its GGUF files stand-ins): the peers run in
    the loop, their ratios and timings reach the report; the roofline is stubbed out (not what is tested here)."""
    from rich.console import Console

    from tandem.config import CoreSettings
    from tandem_tools import roofline
    from tandem_tools.bench_local import run_bench_local

    for model, name in ((tiny_target, "target"), (tiny_draft, "draft")):
        model.model.save_pretrained(tmp_path / name)
        model.tokenizer.save_pretrained(tmp_path / name)
    monkeypatch.setattr(roofline, "pair_roofline", lambda *a, **k: {"target": {"pass_ms": {1: 1.0}}})
    monkeypatch.setattr(roofline, "describe", lambda roof: [])
    monkeypatch.setattr(ls, "gguf_file", lambda name: fake / ("target.gguf" if name.endswith("target") else "x.gguf"))
    settings = CoreSettings(target=str(tmp_path / "target"), draft=str(tmp_path / "draft"), gamma=3, threads=1)
    trace = tmp_path / "trace.jsonl"  # a trace, not held-out code: quicker to make
    trace.write_text("".join(json.dumps({"prompt": p, "max_tokens": 8}) + "\n" for p in ("def f(x):", "import os")))
    console = Console(record=True, width=250)
    report: Any = run_bench_local(settings, [ls.BASE, ls.SPEC], 2, 16, 8, None, console=console, trace=trace)
    results = report["results"]
    assert list(results) == ["ar", ls.BASE, ls.SPEC] and results[ls.BASE]["vs_llama_server"] == 1.0
    assert results[ls.SPEC]["acceptance_rate"] == 0.75 and results[ls.BASE]["tokens"] == 6
    assert results[ls.BASE]["reference_tokens"] == results["ar"]["tokens"]
    assert report["llama_server"]["threads"] == 1 and set(report["llama_server"]["modes"]) == {ls.BASE, ls.SPEC}
    assert "vs llama-server" in console.export_text()
    bodies = sent(fake)
    assert len(bodies) == 2 + 2 * 2 and bodies[2]["n_predict"] == 8 and bodies[2]["ignore_eos"] is False

    monkeypatch.setenv("TANDEM_LLAMA_SERVER", str(tmp_path / "absent"))
    console = Console(record=True, width=250)
    report = run_bench_local(settings, ["spec", ls.BASE], 1, 16, 8, None, console=console, trace=trace)
    assert set(report["results"]) == {"ar", "spec"} and "llama_server" not in report
    assert "mode llama-server skipped: TANDEM_LLAMA_SERVER=" in console.export_text()
