"""The OpenAI API complete under speculation, through real clients (the openai SDK, LangChain, jsonschema): the
target's logprobs, sampling controls, structured output, n choices and per-request speculative figures, on the
cloud (the target alone) and through the edge (speculative) alike; and no field accepted and ignored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from servers import BackgroundEdge, BackgroundServer

from cloud_server.main import ServerHandle
from cloud_server.settings import ServerSettings
from edge_client.settings import EdgeSettings
from tandem.models import LoadedModel

PROMPTS = ["Hello, wor", "def add(a, b):", "The answer is", "1, 2, 3,", "{{ a }}", "zz"]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99},
                                           "tag": {"type": "string", "enum": ["x", "yz"]}},
          "required": ["ok", "n", "tag"], "additionalProperties": False}
TOLERANCE = 1e-4  # logprobs: the verification pass and the one-token step round differently, by ~1e-6 here


@pytest.fixture(scope="module")
def cloud(tiny_target: LoadedModel) -> Iterator[ServerHandle]:
    s = ServerSettings(target="tiny-target", model_name="tiny", http_port=0, grpc_port=0, max_prompt_tokens=64,
                       max_draft_tokens=16, max_tokens_limit=64, max_body_bytes=256 * 1024, shutdown_grace_s=0.5)
    with BackgroundServer(s, tiny_target) as handle:
        yield handle


@pytest.fixture(scope="module", params=["grpc", "http"])
def edge(request: pytest.FixtureRequest, cloud: ServerHandle, tiny_draft: LoadedModel) -> Iterator[str]:
    transport = request.param
    port = cloud.grpc_port if transport == "grpc" else cloud.http_port
    s = EdgeSettings(cloud=f"127.0.0.1:{port}", transport=transport, port=0, timeout_s=30, retries=0, gamma=4,
                     max_tokens_limit=64, max_body_bytes=256 * 1024)
    with BackgroundEdge(s, tiny_draft) as p:
        yield f"http://127.0.0.1:{p}"


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=60, max_retries=0)


def cloud_url(h: ServerHandle) -> str:
    return f"http://127.0.0.1:{h.http_port}"


def same_logprobs(a: list[Any], b: list[Any]) -> None:
    assert [x.token for x in a] == [x.token for x in b]
    for x, y in zip(a, b, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=TOLERANCE)
        assert [t.token for t in x.top_logprobs] == [t.token for t in y.top_logprobs]
        assert [t.logprob for t in x.top_logprobs] == pytest.approx([t.logprob for t in y.top_logprobs],
                                                                     abs=TOLERANCE)


@pytest.mark.parametrize("schema", [False, True], ids=["free", "json_schema"])
def test_greedy_output_and_logprobs_through_the_edge_equal_the_cloud_alone(
    cloud: ServerHandle, edge: str, schema: bool,
) -> None:
    extra: dict[str, Any] = {}
    if schema:
        extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA,
                                                                           "strict": True}}
    for prompt in PROMPTS:
        answers = [
            client(base).chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=40, temperature=0,
                logprobs=True, top_logprobs=3, **extra)
            for base, model in ((cloud_url(cloud), "tiny"), (edge, "tandem"))
        ]
        alone, spec = (a.choices[0] for a in answers)
        assert spec.message.content == alone.message.content and spec.finish_reason == alone.finish_reason
        assert alone.logprobs is not None and spec.logprobs is not None and alone.logprobs.content
        same_logprobs(spec.logprobs.content, alone.logprobs.content)
        assert "".join(x.token for x in alone.logprobs.content).startswith(alone.message.content or "\0")
        if schema:
            assert alone.finish_reason == "stop"
            jsonschema.validate(json.loads(alone.message.content or ""), SCHEMA)


def test_completions_logprobs_streamed_and_not(cloud: ServerHandle, edge: str) -> None:
    for base, model in ((cloud_url(cloud), "tiny"), (edge, "tandem")):
        c = client(base)
        whole = c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True})
        lp = whole.choices[0].logprobs
        assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
        assert "".join(lp.tokens) == whole.choices[0].text
        assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset == sorted(lp.text_offset or [])
        streamed: list[float] = []
        text = ""
        for chunk in c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=2,
                                          stream=True, extra_body={"ignore_eos": True}):
            for ch in chunk.choices:
                text += ch.text
                if ch.logprobs is not None:
                    streamed.extend(ch.logprobs.token_logprobs or [])
        assert text == whole.choices[0].text
        assert streamed == pytest.approx(lp.token_logprobs, abs=TOLERANCE)


def test_no_logprobs_unless_asked(cloud: ServerHandle, edge: str) -> None:
    for base, model in ((cloud_url(cloud), "tiny"), (edge, "tandem")):
        r = client(base).completions.create(model=model, prompt=PROMPTS[1], max_tokens=4, temperature=0)
        assert r.choices[0].logprobs is None


def test_logit_bias_and_penalties_act_alike_on_both_sides(cloud: ServerHandle, edge: str,
                                                          tiny_target: LoadedModel) -> None:
    q = tiny_target.tokenizer.encode("q", add_special_tokens=False)[0]
    outs = []
    for base, model in ((cloud_url(cloud), "tiny"), (edge, "tandem")):
        c = client(base)
        forced = c.completions.create(model=model, prompt=PROMPTS[2], max_tokens=6, temperature=0,
                                      logit_bias={str(q): 100}, extra_body={"ignore_eos": True})
        assert forced.choices[0].text == "qqqqqq"
        plain = c.completions.create(model=model, prompt=PROMPTS[3], max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True})
        shaped = c.completions.create(model=model, prompt=PROMPTS[3], max_tokens=30, temperature=0,
                                      presence_penalty=1.5, frequency_penalty=1.0,
                                      extra_body={"ignore_eos": True, "repetition_penalty": 1.3, "min_p": 0.1})
        assert shaped.choices[0].text != plain.choices[0].text  # the controls change the output...
        outs.append(shaped.choices[0].text)
    assert outs[0] == outs[1]  # ...and the edge's speculation keeps the target's


def test_structured_output_forms(cloud: ServerHandle, edge: str, tiny_target: LoadedModel) -> None:
    # a random model may write one string forever: a bias towards closing it, within the grammar
    closing = {str(t): 4 for t in tiny_target.tokenizer.encode('"}', add_special_tokens=False)}
    for base, model in ((cloud_url(cloud), "tiny"), (edge, "tandem")):
        c = client(base)
        obj = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=40,
                                        temperature=0, response_format={"type": "json_object"}, logit_bias=closing)
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
        regex = c.completions.create(model=model, prompt="a", max_tokens=10, temperature=0.8, seed=3,
                                     extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
        text = regex.choices[0].text
        assert len(text) == 6 and text[:3].isdigit() and text[3] == "-" and text[4:].isalpha()
        choice = c.completions.create(model=model, prompt="b", max_tokens=10, temperature=0,
                                      extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
        assert choice.choices[0].text in ("red", "green", "blue")
        lark = c.completions.create(model=model, prompt="c", max_tokens=10, temperature=0,
                                    extra_body={"structured_outputs": {"grammar": 'start: "ab" ("c" | "d")+'}})
        assert lark.choices[0].text.startswith("ab")


def test_a_bad_grammar_is_a_400(cloud: ServerHandle, edge: str) -> None:
    for base, model in ((cloud_url(cloud), "tiny"), (edge, "tandem")):
        with pytest.raises(openai.BadRequestError, match="regex"):
            client(base).completions.create(model=model, prompt="a", max_tokens=4,
                                            extra_body={"structured_outputs": {"regex": "[0-"}})


def test_n_choices_are_independent_and_seeded(cloud: ServerHandle, edge: str) -> None:
    for base, model in ((cloud_url(cloud), "tiny"), (edge, "tandem")):
        c = client(base)
        kw: dict[str, Any] = dict(model=model, prompt=PROMPTS[4], max_tokens=16, temperature=1.2, n=3, seed=11,
                                  extra_body={"ignore_eos": True})
        a, b = c.completions.create(**kw), c.completions.create(**kw)
        texts = [ch.text for ch in sorted(a.choices, key=lambda ch: ch.index)]
        assert [ch.index for ch in sorted(a.choices, key=lambda ch: ch.index)] == [0, 1, 2]
        assert texts == [ch.text for ch in sorted(b.choices, key=lambda ch: ch.index)]  # seeded
        assert len(set(texts)) > 1  # independent
        assert a.usage is not None and a.usage.completion_tokens == 48
        greedy = c.completions.create(model=model, prompt=PROMPTS[4], max_tokens=8, temperature=0, n=2)
        assert greedy.choices[0].text == greedy.choices[1].text
        streamed: dict[int, str] = {}
        for chunk in c.completions.create(**kw, stream=True):
            for ch in chunk.choices:
                streamed[ch.index] = streamed.get(ch.index, "") + ch.text
        assert [streamed[i] for i in range(3)] == texts


def test_speculative_metrics_per_request(cloud: ServerHandle, edge: str) -> None:
    body = {"model": "tandem", "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "return_metrics": True}
    r = httpx.post(edge + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    m = r.json()["metrics"]["speculative_decoding"]
    assert m["num_drafts"] > 0 and 0 < m["num_accepted_tokens"] <= m["num_draft_tokens"]
    assert m["mean_acceptance_length"] == pytest.approx(1 + m["num_accepted_tokens"] / m["num_drafts"])
    assert m["acceptance_rate"] == pytest.approx(m["num_accepted_tokens"] / m["num_draft_tokens"])
    assert sum(m["num_accepted_tokens_per_pos"]) == m["num_accepted_tokens"]
    assert m["edge"]["mode"] == "spec" and m["edge"]["bytes_sent"] > 0 and m["edge"]["rtt_ms"] > 0
    assert m["edge"]["stale_blocks"] >= 0
    assert "metrics" not in httpx.post(edge + "/v1/completions", json=body | {"return_metrics": False},
                                       timeout=60).json()
    last = None
    with httpx.stream("POST", edge + "/v1/completions", json=body | {"stream": True}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                last = json.loads(line[6:])
    assert last is not None and last["choices"] == []
    assert last["metrics"]["speculative_decoding"]["num_drafts"] > 0
    # a stop string ends the request before the loop does: its figures so far
    text = httpx.post(edge + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    stopped = httpx.post(edge + "/v1/completions", json=body | {"stop": text[10:13]}, timeout=60)
    assert stopped.status_code == 200 and stopped.json()["choices"][0]["finish_reason"] == "stop", stopped.text
    assert stopped.json()["metrics"]["speculative_decoding"]["num_drafts"] > 0
    alone = httpx.post(cloud_url(cloud) + "/v1/completions", json=body | {"model": "tiny"}, timeout=60).json()
    assert alone["metrics"]["speculative_decoding"]["num_drafts"] == 0  # the target alone drafts nothing


@pytest.mark.parametrize("field", ["tools", "tool_choice", "user", "echo", "best_of", "suffix",
                                   "parallel_tool_calls", "functions"])
def test_unimplemented_fields_are_refused_by_name(cloud: ServerHandle, edge: str, field: str) -> None:
    for base, model in ((cloud_url(cloud), "tiny"), (edge, "tandem")):
        for route, body in (("/v1/completions", {"prompt": "a"}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})):
            r = httpx.post(base + route, json={"model": model, "max_tokens": 2, **body, field: [{"x": 1}]},
                           timeout=30)
            assert r.status_code == 400, (route, field, r.text)
            assert field in r.json()["error"]["message"]


def test_langchain_structured_output(cloud: ServerHandle, edge: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    for base, model in ((cloud_url(cloud), "tiny"), (edge, "tandem")):
        llm = langchain_openai.ChatOpenAI(base_url=base + "/v1", api_key="none", model=model, temperature=0,
                                          max_tokens=40, max_retries=0, timeout=60)
        structured = llm.with_structured_output({"title": "r", **SCHEMA}, method="json_schema", strict=True)
        out = structured.invoke("Answer in JSON.")
        jsonschema.validate(out, SCHEMA)
        assert llm.invoke("Hi").content is not None
