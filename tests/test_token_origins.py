"""Where each token came from: the loop's record (`GenerationStats.origins`, and per verified block `shapes`: nodes
sent, the path accepted) agrees with its counts, and the streaming API's extension (`return_token_origins`) carries
it, with each token's text, on both servers; the page is served."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import tree_drafter
from servers import BackgroundEdge, BackgroundServer

from cloud_server.main import ServerHandle
from edge_client.settings import EdgeSettings
from tandem.adaptive import AdaptiveGamma
from tandem.blocks import Candidate, DraftBlock, VerifyResult
from tandem.costs import CostCurve, Ewma
from tandem.drafting import ModelDrafter
from tandem.local import LocalVerifier
from tandem.models import LoadedModel
from tandem.pool import PhrasePool
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import generate_speculative
from tandem.value import BlockValue, Calibration
from tests.test_edge_e2e import server_settings

PROMPTS = [[10, 20, 30, 40, 50, 60, 70], [5, 9, 14, 3, 22, 40, 41, 5, 9, 14], [33] * 6 + [34, 35]]
GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)


def test_a_verdicts_origins() -> None:
    block = DraftBlock([1, 2, 3, 4, 5], sources=["draft", "draft", "vetted", "pool", "pool"],
                       candidates=[Candidate(1, [7, 8])])
    plain = VerifyResult(3, [1, 2, 3, 9], None, [])
    assert plain.emitted_origins(block) == "ddpt"
    assert plain.emitted_origins(DraftBlock([1, 2, 3, 4])) == "dddt"  # no sources: all the draft model's
    assert VerifyResult(2, [2, 3], "stop", []).emitted_origins(block, skipped=1) == "dp"  # cut
    taken = VerifyResult(4, [1, 2, 7, 8, 9], None, [], candidate=0)  # main[:2], then the candidate
    assert taken.emitted_origins(block) == "ddppt" and taken.on_chain(block) == 2
    tree = DraftBlock([1, 2, 3], candidates=[Candidate(-1, [6]), Candidate(0, [7])], branch_confidence=[0.5, 0.5])
    sibling = VerifyResult(2, [1, 7, 9], None, [], candidate=1)  # main[:1], then the sibling after it
    assert sibling.emitted_origins(tree) == "dbt" and sibling.on_chain(tree) == 1
    assert VerifyResult(1, [6, 9], None, [], candidate=0).emitted_origins(tree) == "bt"  # instead of main token 0


@pytest.mark.parametrize("pooled", [False, True], ids=["model", "trees-and-pool"])
def test_the_loops_origins_match_its_counts(tiny_target: LoadedModel, tiny_draft: LoadedModel, pooled: bool) -> None:
    from_pool = 0
    for prompt in PROMPTS:
        want = generate_autoregressive(tiny_target, prompt, GREEDY).tokens
        pool = PhrasePool()
        pool.feed(prompt + want)  # the target's own continuation: the pool's phrases get accepted
        drafter = tree_drafter(tiny_draft, pool) if pooled else ModelDrafter(tiny_draft)
        got = generate_speculative(drafter, LocalVerifier(tiny_target), prompt, GREEDY, 3 + 5 * pooled)
        origins, s = got.stats.origins, got.stats
        assert got.tokens == want and len(origins) == len(want) and set(origins) <= set("dbpt")
        assert len(origins) - origins.count("t") == s.accepted and origins.count("t") == s.rounds
        from_pool += origins.count("p")
    assert from_pool > 0 or not pooled


def test_the_loops_rounds_say_what_was_sent_and_which_path_was_taken(tiny_target: LoadedModel,
                                                                      tiny_draft: LoadedModel) -> None:
    taken = 0
    for prompt in PROMPTS:
        # a flat cost curve: a position of the pass is free, so every second choice with a chance is sent
        value = BlockValue(AdaptiveGamma(draft_s=Ewma(0.01), costs=CostCurve({1: 0.1, 64: 0.1})), Calibration(), False)
        got = generate_speculative(ModelDrafter(tiny_draft, value=value, tree=True), LocalVerifier(tiny_target),
                                   prompt, GREEDY, 16)
        s, shapes, origins = got.stats, got.stats.shapes, got.stats.origins
        assert len(shapes) == s.rounds and sum(r.nodes for r in shapes) == s.drafted
        assert sum(r.accepted for r in shapes) == s.accepted and sum(r.tokens for r in shapes) == len(got.tokens)
        assert sum(r.nodes > r.chain for r in shapes) > len(shapes) / 2  # siblings beside most chains
        at = 0
        for r in shapes:  # each round's tokens: the chain's accepted, the sibling's, the target's
            assert r.accepted - r.branch <= r.chain and r.branch <= r.nodes - r.chain
            assert origins[at : at + r.tokens] == ("d" * (r.accepted - r.branch) + "b" * r.branch + "t")[: r.tokens]
            at += r.tokens
        taken += sum(r.branch for r in shapes)
    assert taken > 0


# --- the API's extension, on both servers


@pytest.fixture(scope="module")
def cloud(tiny_target: LoadedModel) -> Iterator[ServerHandle]:
    with BackgroundServer(server_settings(), tiny_target) as handle:
        yield handle


@pytest.fixture(scope="module")
def edge(cloud: ServerHandle, tiny_draft: LoadedModel) -> Iterator[str]:
    # blocks at the floor, not by value (which follows timings): two runs' origins compare token for token
    settings = EdgeSettings(cloud=f"127.0.0.1:{cloud.grpc_port}", transport="grpc", timeout_s=10, retries=0, port=0,
                            gamma=4, block_value=False)
    with BackgroundEdge(settings, tiny_draft) as port:
        yield f"http://127.0.0.1:{port}"


CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 24,
                        "temperature": 0, "ignore_eos": True}


def stream(url: str, model: str, headers: dict[str, str] | None = None, **kw: Any) -> list[dict[str, Any]]:
    body = CHAT | {"model": model, "stream": True, "stream_options": {"include_usage": True}} | kw
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def marks(chunks: list[dict[str, Any]]) -> tuple[str, list[str], str, list[dict[str, int]]]:
    origins, pieces, text, rounds = "", [], "", []
    for c in chunks:
        for choice in c["choices"]:
            text += choice["delta"].get("content", "")
            if "tandem" in choice:
                mark = choice["tandem"]
                origins += mark["origins"]
                pieces += mark["pieces"]
                rounds += mark["rounds"]
                # a chunk carries the verified blocks its tokens end: all of them, or none (not speculative)
                assert sum(r["tokens"] for r in mark["rounds"]) in (0, len(mark["origins"]))
    return origins, pieces, text, rounds


@pytest.mark.parametrize("where", ["cloud", "edge", "edge-cloud-mode", "edge-alone"])
def test_streams_carry_each_tokens_origin_and_text(cloud: ServerHandle, edge: str, where: str) -> None:
    url, model = (f"http://127.0.0.1:{cloud.http_port}", "tiny") if where == "cloud" else (edge, "tandem")
    headers = {"edge-cloud-mode": {"x-tandem-mode": "cloud"}, "edge-alone": {"x-tandem-mode": "edge"}}.get(where)
    greedy = httpx.post(url + "/v1/chat/completions", json=CHAT | {"model": model}, timeout=30).json()
    plain = stream(url, model, headers)
    assert all("tandem" not in choice for c in plain for choice in c["choices"])  # only when asked for
    chunks = stream(url, model, headers, return_token_origins=True, return_metrics=True)
    origins, pieces, text, rounds = marks(chunks)
    assert len(origins) == len(pieces) == chunks[-1]["usage"]["completion_tokens"] == 24
    assert "".join(pieces) == text == marks(plain)[2]
    spec = chunks[-1]["metrics"]["speculative_decoding"]
    if where == "edge":
        assert text == greedy["choices"][0]["message"]["content"]
        assert set(origins) <= set("dt") and origins.count("d") == spec["num_accepted_tokens"]
        assert origins.count("t") == spec["num_drafts"] == spec["edge"]["target_passes"] == len(rounds)
        assert sum(r["nodes"] for r in rounds) == spec["num_draft_tokens"] and sum(r["tokens"] for r in rounds) == 24
        assert sum(r["accepted"] for r in rounds) == spec["num_accepted_tokens"]
        assert all(r["branch"] == 0 and r["nodes"] == r["chain"] >= r["accepted"] for r in rounds)  # no tree here
    elif where == "edge-alone":
        assert origins == "e" * 24 and spec["edge"]["lossy"] and rounds == []
    else:
        assert origins == "t" * 24 and text == greedy["choices"][0]["message"]["content"] and rounds == []
    whole = httpx.post(url + "/v1/chat/completions", json=CHAT | {"model": model, "return_token_origins": True},
                       headers=headers, timeout=30).json()["choices"][0]
    assert whole["tandem"] == {"origins": origins, "pieces": pieces, "rounds": rounds}


def test_edge_request_headers_are_checked(edge: str) -> None:
    ok = httpx.post(edge + "/v1/chat/completions", json=CHAT | {"model": "tandem", "return_metrics": True},
                    headers={"x-tandem-gamma": "2"}, timeout=30).json()
    assert ok["tandem"]["gamma"] == 2 and ok["metrics"]["speculative_decoding"]["edge"]["mode"] == "spec"
    for name, value in (("x-tandem-gamma", "99"), ("x-tandem-gamma", "many"), ("x-tandem-mode", "fast")):
        r = httpx.post(edge + "/v1/chat/completions", json=CHAT | {"model": "tandem"}, headers={name: value},
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", (name, value)


@pytest.mark.parametrize("where", ["cloud", "edge"])
def test_the_page_is_served_with_a_strict_policy(cloud: ServerHandle, edge: str, where: str) -> None:
    url = f"http://127.0.0.1:{cloud.http_port}" if where == "cloud" else edge
    page = httpx.get(url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f'data-side="{where}"' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe" not in policy and "connect-src 'self'" in policy
    assert "access-control-allow-origin" not in page.headers
    for name, kind in (("app.js", "text/javascript"), ("rounds.js", "text/javascript"), ("style.css", "text/css"),
                       ("favicon.svg", "image/svg+xml")):
        asset = httpx.get(f"{url}/ui/{name}", timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert "innerHTML" not in asset.text  # model text is set as text only
    assert httpx.get(url + "/ui/index.html", timeout=10).status_code == 404
    assert "/" not in httpx.get(url + "/openapi.json", timeout=10).json()["paths"]


def test_an_openai_client_reads_the_stream_and_keeps_the_extension(edge: str) -> None:
    import openai

    client = openai.OpenAI(base_url=edge + "/v1", api_key="unused")
    chunks = list(client.chat.completions.create(model="tandem", messages=CHAT["messages"], max_tokens=8,
                                                 temperature=0, stream=True,
                                                 extra_body={"return_token_origins": True, "ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    extras = [(c.choices[0].model_extra or {}).get("tandem") for c in chunks if c.choices]
    assert "".join("".join(e["pieces"]) for e in extras if e) == text
    assert sum(len(e["origins"]) for e in extras if e) == 8
