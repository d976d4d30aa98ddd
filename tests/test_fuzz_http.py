"""Generated bad input over HTTP: schemathesis against the live OpenAPI schema of the cloud and of the edge endpoint.

Every operation gets schema-valid (positive) and schema-violating (negative) requests, with a valid key; verify,
continue and delete also run against live sessions. Every check schemathesis has: no 5xx, the status, content type,
headers and body conform to the schema, invalid data is rejected, valid data is accepted, a request without a key
gets 401, an undeclared method 405 with `Allow`. The server must serve normally afterwards.

CI runs TANDEM_FUZZ_CASES (default 60) cases per API; the full count:
    TANDEM_FUZZ_CASES=500 HF_HUB_OFFLINE=1 python -m pytest -q -s tests/test_fuzz_http.py
The cases are the same each run; TANDEM_FUZZ_RANDOM=1 draws fresh ones (a failure prints its curl command).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.core.failures import FailureGroup
from servers import BackgroundEdge, BackgroundServer

from cloud_server.main import ServerHandle
from cloud_server.settings import ServerSettings
from edge_client.settings import EdgeSettings
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive

CASES = int(os.environ.get("TANDEM_FUZZ_CASES", "60"))  # per API
RANDOM = os.environ.get("TANDEM_FUZZ_RANDOM")  # set (to anything): fresh cases each run; unset: the same
KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = [10, 20, 30, 40, 50, 60, 70]
MAX_DRAFT = 8  # the server's max_draft_tokens


@dataclass
class Report:
    tried: Counter[str] = field(default_factory=Counter)  # operation -> cases sent
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.tried.values())

    def summary(self, name: str) -> str:
        return (f"{name}: {self.total} cases over {len(self.tried)} operations, {len(self.failures)} failures; "
                f"statuses {dict(sorted(self.statuses.items()))}")


def fuzz(base_url: str, cases: int, live_session: Callable[[], str] | None = None) -> Report:
    """`cases` requests at least, spread over the operations that take input, half positive, half negative."""
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    served = httpx.get(base_url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]
    operations = [r.ok() for r in schema.get_all_operations()]
    takes_input = [op for op in operations if op.body or op.path_parameters or op.query]
    per_slot = math.ceil(cases / (2 * len(takes_input)))
    report = Report()
    for op in operations:
        sessioned = live_session if "session_id" in [p.name for p in op.path_parameters] else None
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            with contextlib.suppress(Unsatisfiable):  # nothing to break in an operation without input (GET /health)
                fuzz_operation(op, mode, per_slot if op in takes_input else 2, base_url, served, sessioned, report)
    return report


def fuzz_operation(op: APIOperation, mode: GenerationMode, n: int, base_url: str, served: str,
                   live_session: Callable[[], str] | None, report: Report) -> None:
    @given(case=op.as_strategy(mode))
    @hsettings(max_examples=n, deadline=None, database=None, derandomize=RANDOM is None, print_blob=False,
               suppress_health_check=list(HealthCheck))
    def run(case: Case) -> None:
        sid = None
        if live_session is not None and report.tried[op.label] % 2 == 0:  # every other one on a live session
            sid = live_session()
            case.path_parameters = {**(case.path_parameters or {}), "session_id": sid}
        if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and report.tried[op.label] % 2 == 0:
            case.body = past_state(case.body, served, op.path)
        report.tried[op.label] += 1
        try:
            response = case.call_and_validate(base_url=base_url, headers=AUTH, timeout=60)
            report.statuses[response.status_code] += 1
            if op.path == "/v1/sessions" and response.status_code == 200:
                httpx.delete(f"{base_url}/v1/sessions/{response.json()['session_id']}", headers=AUTH, timeout=10)
            if response.status_code >= 400 and response.json()["error"]["type"] == "internal_error":
                report.failures.append(f"{op.label}: a {response.status_code} typed internal_error")
        except (AssertionError, FailureGroup) as e:
            report.failures.append(f"{op.label} ({mode.value}): {e}"[:3000])
        finally:
            if sid is not None:
                httpx.delete(f"{base_url}/v1/sessions/{sid}", headers=AUTH, timeout=10)

    run()


def past_state(body: dict[str, Any], served: str, path: str) -> dict[str, Any]:
    """A valid body that also keeps what the server's state decides (the model served, a live session's next seq and
    context) and the rules across fields JSON Schema cannot state (q_ids holds len(tokens) * q_k values, a
    candidate's parent indexes the draft, a text's tokens fit the prompt limit and are not none, a grammar compiles):
    into the generation, where a 4xx would be a rejected valid request."""
    if "model" in body:
        return {**body, "model": served} | short_text(body) | compiling(body)
    if path.endswith("/continue"):
        return {**body, "prompt": PROMPT}
    if path.endswith("/verify"):
        room, candidates = MAX_DRAFT, []
        for c in body.get("candidates", []):
            tokens = c["tokens"][:room]
            room -= len(tokens)
            candidates.append({"parent": min(c["parent"], len(body.get("tokens", [])) - 1), "tokens": tokens})
        return {**body, "seq": 0, "q_k": 0, "q_ids": [], "q_probs": [], "candidates": candidates}
    return body


def short_text(body: dict[str, Any]) -> dict[str, Any]:
    """Texts that tokenize (one token a character here) to 1 to 64 tokens: the server's max_prompt_tokens."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return {"prompt": prompt[:32] or "hi"}
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return {"prompt": [prompt[0][:32] or "hi"]}
    if "messages" not in body:
        return {}
    messages = []
    for m in body["messages"][:4]:
        content = m.get("content")
        if isinstance(content, str):
            content = content[:8]
        elif isinstance(content, list):
            content = [{**part, "text": part["text"][:4]} for part in content[:2]]
        messages.append({**m, "content": content})
    return {"messages": [*messages, {"role": "user", "content": "hi"}]}


def compiling(body: dict[str, Any]) -> dict[str, Any]:
    """Output constraints the grammar compiler takes, in place of generated ones."""
    out: dict[str, Any] = {}
    if isinstance(body.get("structured_outputs"), dict):
        given = body["structured_outputs"]
        fixed = {"json": {"type": "object"}, "regex": "[a-z]{1,8}", "grammar": "start: /[a-z]{1,8}/",
                 "choice": ["yes", "no"]}
        out["structured_outputs"] = {k: fixed[k] if given[k] is not None else None for k in given}
    if isinstance(body.get("response_format"), dict) and isinstance(body["response_format"].get("json_schema"), dict):
        json_schema = {**body["response_format"]["json_schema"], "schema": {"type": "object"}}
        out["response_format"] = {**body["response_format"], "json_schema": json_schema}
    return out


def check(report: Report, name: str, cases: int) -> None:
    print(report.summary(name))
    assert not report.failures, "\n\n".join(report.failures[:5])
    assert report.total >= cases, report.summary(name)
    assert not any(s >= 500 for s in report.statuses)


@pytest.fixture(scope="module")
def server(tiny_target: LoadedModel) -> Iterator[ServerHandle]:
    s = ServerSettings(target="tiny-target", model_name="tiny", http_port=0, grpc_port=0, api_keys=[KEY],
                       max_prompt_tokens=64, max_draft_tokens=MAX_DRAFT, max_tokens_limit=32, max_body_bytes=64 * 1024,
                       shutdown_grace_s=0.5)
    with BackgroundServer(s, tiny_target) as handle:
        yield handle


def greedy(tiny_target: LoadedModel, n: int = 8) -> list[int]:
    return generate_autoregressive(tiny_target, PROMPT, SamplingParams(max_tokens=n, ignore_eos=True)).tokens


def completion(base_url: str, model: str) -> list[int]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    r = httpx.post(base_url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return list(r.json()["choices"][0]["token_ids"])


def test_fuzz_cloud_http(server: ServerHandle, tiny_target: LoadedModel) -> None:
    base = f"http://127.0.0.1:{server.http_port}"

    def live_session() -> str:
        body = {"prompt": PROMPT, "sampling": {"max_tokens": 16}}
        r = httpx.post(base + "/v1/sessions", json=body, headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        return str(r.json()["session_id"])

    report = fuzz(base, CASES, live_session)
    check(report, "cloud HTTP", CASES)
    assert httpx.get(base + "/health", timeout=10).status_code == 200
    assert completion(base, "tiny") == greedy(tiny_target)  # still serving, and still right
    assert server.worker.open_sessions == 0


def test_fuzz_edge_http(server: ServerHandle, tiny_target: LoadedModel, tiny_draft: LoadedModel) -> None:
    settings = EdgeSettings(cloud=f"127.0.0.1:{server.grpc_port}", api_key=KEY, edge_api_keys=KEY, port=0,
                            timeout_s=30, retries=0, gamma=3, max_tokens_limit=32, max_body_bytes=64 * 1024)
    with BackgroundEdge(settings, tiny_draft) as port:
        base = f"http://127.0.0.1:{port}"
        report = fuzz(base, CASES)
        check(report, "edge HTTP", CASES)
        assert completion(base, "tandem") == greedy(tiny_target)


def test_contract_details(server: ServerHandle) -> None:
    base = f"http://127.0.0.1:{server.http_port}"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}
    r = httpx.post(base + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request"
    assert "tools: this server does not implement this field" in r.json()["error"]["message"]
    r = httpx.get(base + "/v1/sessions/x/verify", headers=AUTH, timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    schema = httpx.get(base + "/openapi.json", timeout=10).json()
    responses = [op["responses"] for ops in schema["paths"].values() for op in ops.values()]
    assert not any("422" in r for r in responses)
    assert "security" not in schema["paths"]["/health"]["get"]
    assert schema["components"]["securitySchemes"]  # keys configured: declared, and required on the API
    assert schema["paths"]["/v1/models"]["get"]["security"]
