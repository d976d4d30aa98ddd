"""The chat page in a real browser: headless Chromium from Debian's packages, driven by Playwright through its
executable path (one browser for the module; tiny models; a few seconds a test). Skipped where either is missing;
`.ci/run` installs both."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from servers import BackgroundEdge, BackgroundServer

from cloud_server.main import ServerHandle
from edge_client.settings import EdgeSettings
from tandem.costs import CostCurve
from tandem.models import LoadedModel
from tests.test_edge_e2e import server_settings

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is in the dev extra")
CHROMIUM = os.environ.get("TANDEM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
QUESTION = "Hello there"
MARKUP = "<img src=x onerror=window.pwned=1>"
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, errors  # no script error on the page, ever


@pytest.fixture(scope="module")
def cloud(tiny_target: LoadedModel) -> Iterator[ServerHandle]:
    with BackgroundServer(server_settings(), tiny_target) as handle:
        yield handle


def edge_settings(cloud: ServerHandle, **kw: Any) -> EdgeSettings:
    base: dict[str, Any] = dict(cloud=f"127.0.0.1:{cloud.grpc_port}", transport="grpc", timeout_s=5, retries=0,
                                port=0, gamma=4, shutdown_grace_s=0.5)
    return EdgeSettings(**(base | kw))


@pytest.fixture(scope="module")
def edge(cloud: ServerHandle, tiny_draft: LoadedModel) -> Iterator[str]:
    with BackgroundEdge(edge_settings(cloud), tiny_draft) as port:
        yield f"http://127.0.0.1:{port}"


def open_page(page: Any, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_selector("#status:has-text('Connected')", timeout=WAIT_MS)


def ask(page: Any, text: str, max_tokens: int = 24, schema: str = "") -> Any:
    """Type a question as a user does (settings first), send it with Enter; the answer's element once it ended."""
    page.locator("#settings").evaluate("d => d.open = true")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#schema", schema)
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    run = page.locator(".msg.assistant").last.locator(".run").first
    run.locator("xpath=self::*[@data-state='done' or @data-state='error' or @data-state='stopped']").wait_for(
        timeout=WAIT_MS)
    return run


def greedy(url: str, model: str, text: str, max_tokens: int = 24, **kw: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "top_p": 1} | kw
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json()["choices"][0])


def counts(run: Any) -> dict[str, int]:
    return {o: run.locator(f".tok-{o}").count() for o in "dbpte"}


def rounds(run: Any) -> list[dict[str, Any]]:
    """Each round's group on the page: its figures, tokens shown, badge (generated content) and hover title."""
    return list(run.locator(".round").evaluate_all("""gs => gs.map(g => ({
        ...Object.fromEntries(Object.entries(g.dataset).map(([k, v]) => [k, k === "badge" ? v : Number(v)])),
        shown: g.querySelectorAll(".tok").length, origins: [...g.children].map(t => t.className.slice(8)).join(""),
        after: getComputedStyle(g, "::after").content, title: g.title, branched: g.classList.contains("branched")}))
    """))


def test_a_typed_question_streams_the_greedy_answer_marked_by_origin(page: Any, edge: str) -> None:
    open_page(page, edge)
    run = ask(page, QUESTION)
    assert run.get_attribute("data-state") == "done"
    want = greedy(edge, "tandem", QUESTION)
    assert want["finish_reason"] == "length"  # no stop token inside a block: every accepted token is shown
    assert run.locator(".answer").text_content() == want["message"]["content"]
    n, data = counts(run), run.evaluate("e => ({...e.dataset})")
    assert sum(n.values()) == int(data["tokens"]) == 24 and n["e"] == 0
    assert n["d"] + n["b"] + n["p"] == int(data["accepted"]) > 0  # the request's own figures
    assert n["t"] == int(data["targetPasses"]) == int(data["drafts"])
    # each verified block's tokens grouped, its badge accepted/nodes, its path in the title; the running line
    shapes = rounds(run)
    assert len(shapes) == int(data["drafts"]) == int(data["treeRounds"])
    assert sum(r["shown"] for r in shapes) == sum(r["tokens"] for r in shapes) == 24
    assert sum(r["nodes"] for r in shapes) == int(data["treeNodes"])
    assert sum(r["accepted"] for r in shapes) == int(data["accepted"])
    for i, r in enumerate(shapes):
        assert r["after"].startswith(f'"{r["accepted"]}/{r["nodes"]}"') and r["title"].startswith(f"round {i + 1}: ")
        assert f"accepted {r['accepted'] - r['branch']} of {r['chain']} on the chain" in r["title"]
        assert r["origins"].endswith("t") or i == len(shapes) - 1  # the target's token closes a round
    assert run.locator(".tree-line").inner_text().startswith(f"draft tree: {len(shapes)} round")
    figures = run.locator(".figures").inner_text()
    for name in ("tokens/s", "target passes per token", "acceptance per position", "round trip", "mode"):
        assert name in figures
    assert "spec" in figures and " ms" in figures

    # a second turn: the conversation goes on, marked likewise
    second = ask(page, "and then?")
    assert second.get_attribute("data-state") == "done" and second.locator(".tok").count() > 0
    assert page.locator(".msg.user").count() == 2


def test_tree_rounds_show_the_siblings_sent_and_taken(page: Any, cloud: ServerHandle, tiny_draft: LoadedModel,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """On a flat cost curve (a position of the pass is free) the draft's second choices are sent beside the chain
    wherever they have a chance, and the target takes some: the page tells those rounds and tokens apart."""
    edge = BackgroundEdge(edge_settings(cloud, pipeline=False), tiny_draft)
    policy = edge.server.service.client.gamma_policy
    policy.costs = CostCurve({1: 0.1, 64: 0.1})
    monkeypatch.setattr(policy, "observe_verify", lambda *a: None)  # the curve stays flat
    with edge as port:
        open_page(page, f"http://127.0.0.1:{port}")
        run = ask(page, QUESTION, max_tokens=64)
    assert run.get_attribute("data-state") == "done"
    shapes, n, data = rounds(run), counts(run), run.evaluate("e => ({...e.dataset})")
    assert sum(r["nodes"] > r["chain"] for r in shapes) > len(shapes) / 2  # siblings beside most chains
    taken = [r for r in shapes if r["branched"]]
    assert len(taken) == int(data["treeTaken"]) > 0 and n["b"] == sum(r["origins"].count("b") for r in taken) > 0
    for r in taken:  # the chain's accepted tokens, then the sibling's, then the target's (the last round: maybe cut)
        assert r["origins"] == ("d" * (r["accepted"] - 1) + "bt")[: r["tokens"]] and ", then 1 sibling;" in r["title"]
    line = run.locator(".tree-line").inner_text()
    assert f"{len(shapes)} rounds, {int(data['treeNodes'])} nodes sent" in line and f"{len(taken)} sibling" in line
    assert f"{n['b']} sibling" in run.locator(".figures").inner_text()


def test_the_cloud_only_rerun_shows_a_speedup(page: Any, edge: str) -> None:
    open_page(page, edge)
    ask(page, QUESTION)
    page.get_by_role("button", name="Rerun cloud-only and compare").click()
    speedup = page.locator(".speedup[data-speedup]")
    speedup.wait_for(timeout=WAIT_MS)
    assert float(speedup.get_attribute("data-speedup") or 0) > 0
    assert "x cloud-only" in speedup.inner_text() and "same answer" in speedup.inner_text()
    spec, alone = page.locator(".run").nth(0), page.locator(".run").nth(1)
    assert alone.get_attribute("data-mode") == "cloud" and counts(alone)["t"] == 24 == sum(counts(alone).values())
    assert rounds(alone) == [] and alone.locator(".tree-line").count() == 0  # the target alone: no rounds
    assert spec.locator(".answer").text_content() == alone.locator(".answer").text_content()


def test_a_wrong_key_is_refused_clearly(page: Any, cloud: ServerHandle, tiny_draft: LoadedModel) -> None:
    with BackgroundEdge(edge_settings(cloud, edge_api_keys=["sesame"]), tiny_draft) as port:
        page.goto(f"http://127.0.0.1:{port}/")
        page.locator("#key-panel").wait_for(state="visible", timeout=WAIT_MS)
        page.fill("#key-input", "not-the-key")
        page.press("#key-input", "Enter")
        error = page.locator("#error")
        error.wait_for(state="visible", timeout=WAIT_MS)
        assert "refused the API key" in error.inner_text()
        page.fill("#key-input", "sesame")
        page.press("#key-input", "Enter")
        page.wait_for_selector("#status:has-text('Connected')", timeout=WAIT_MS)
        assert page.locator("#error").is_hidden() and page.locator("#key-panel").is_hidden()
        assert ask(page, QUESTION, max_tokens=4).get_attribute("data-state") == "done"


def test_a_stopped_cloud_shows_a_message_not_a_hang(page: Any, tiny_target: LoadedModel,
                                                    tiny_draft: LoadedModel) -> None:
    server = BackgroundServer(server_settings(), tiny_target)
    handle = server.start()
    with BackgroundEdge(edge_settings(handle), tiny_draft) as port:
        open_page(page, f"http://127.0.0.1:{port}")
        server.stop(grace=0.1)
        run = ask(page, QUESTION)
        assert run.get_attribute("data-state") == "error"
        message = page.locator("#error").inner_text()
        assert "The cloud is not answering" in message and "unreachable" in message
        assert page.locator("#send").is_enabled()  # ready for the next question


@pytest.mark.parametrize("side", ["edge", "cloud"])
def test_markup_in_an_answer_is_shown_as_text(page: Any, edge: str, cloud: ServerHandle, side: str) -> None:
    """A JSON schema forces the answer to be markup: it must be shown literally and run nothing."""
    url = edge if side == "edge" else f"http://127.0.0.1:{cloud.http_port}"
    open_page(page, url)
    schema = json.dumps({"type": "string", "const": MARKUP})
    run = ask(page, QUESTION, max_tokens=48, schema=schema)
    assert run.get_attribute("data-state") == "done"
    text = run.locator(".answer").text_content()
    assert text == f'"{MARKUP}"'
    assert page.locator(".answer img").count() == 0 and page.evaluate("window.pwned") is None
    if side == "cloud":  # the cloud's page: the target alone, every token its own, no rerun offered
        assert counts(run)["t"] == int(run.get_attribute("data-tokens") or 0) > 0
        assert page.locator("button.compare").count() == 0 and page.locator("#mode").is_hidden()
