"""The cloud over HTTP: the session API (POST /v1/sessions, .../verify, DELETE) and /v1/completions (cloud-only)."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from edge_client.remote.common import AFFINITY_HEADER, TLS_HINT, Pipelined, cancelled_error, is_tls_failure
from tandem.blocks import DraftBlock, EdgeReport, VerifyResult
from tandem.errors import RemoteError
from tandem.messages import OpenRequest, Step
from tandem.sampling import SamplingParams
from tandem_protocol import bodies


def _from_transport_error(e: httpx.TransportError) -> RemoteError:
    if isinstance(e, httpx.TimeoutException):
        return RemoteError("deadline_exceeded", str(e) or "no answer in time", 504)
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None or is_tls_failure(str(e)):
        return RemoteError("tls_error", f"{TLS_HINT}: {cause or e}", 503)
    return RemoteError("unavailable", str(e) or type(e).__name__, 503)


def http_verify(ca_file: str | None) -> ssl.SSLContext | bool:
    """httpx's `verify`: the system's trusted CAs, or a context trusting `ca_file` (hostnames are still checked)."""
    return True if ca_file is None else ssl.create_default_context(cafile=ca_file)


class HttpVerifier:
    """The session API over HTTP: POST /v1/sessions, POST /v1/sessions/{id}/verify, DELETE /v1/sessions/{id}."""

    def __init__(
        self, base_url: str, *, timeout_s: float = 30.0, api_key: str | None = None, draft_fingerprint: str = "",
        draft_name: str = "", client_id: str = "", tls_ca_file: str | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s,
                                   verify=http_verify(tls_ca_file))
        self.timeout_s = timeout_s
        self.draft_fingerprint = draft_fingerprint
        self.draft_name = draft_name
        self.client_id = client_id
        self.bytes_sent = self.bytes_received = 0  # of `generate` calls
        self.aborted = False

    def abort(self) -> None:
        """From any thread: later calls fail at once with `cancelled` (closing a session still goes through) and a
        stream stops at its next event; a call in flight ends with its answer (a target pass) or its deadline."""
        self.aborted = True

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                count: Callable[[int, int], None] | None = None, affinity_key: str | None = None) -> dict[str, Any]:
        if self.aborted and method != "DELETE":
            raise cancelled_error()
        content = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        if affinity_key is not None:
            headers[AFFINITY_HEADER] = affinity_key
        try:
            r = self.client.request(method, path, content=content, headers=headers, timeout=self.timeout_s)
        except httpx.TransportError as e:
            raise _from_transport_error(e) from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                code, message = str(err["code"]), str(err["message"])
            except (ValueError, KeyError, TypeError):
                code, message = "internal_error", r.text[:200]
            raise RemoteError(code, message, r.status_code)
        if count is not None:
            count(len(content or b""), len(r.content))
        return r.json()

    def sse_steps(self, path: str, body: dict[str, Any], affinity_key: str | None = None) -> Iterator[Step]:
        """A stream of the target's steps: SSE events with `token_ids` and `finish_reason`, up to `[DONE]`."""
        if self.aborted:
            raise cancelled_error()
        self.bytes_sent += len(json.dumps(body))
        headers = {} if affinity_key is None else {AFFINITY_HEADER: affinity_key}
        try:
            with self.client.stream("POST", path, json=body, timeout=self.timeout_s, headers=headers) as r:
                if r.status_code >= 400:
                    r.read()
                    err = r.json().get("error", {})
                    raise RemoteError(str(err.get("code", "internal_error")), str(err.get("message", "")),
                                      r.status_code)
                for line in r.iter_lines():
                    if self.aborted:
                        raise cancelled_error()
                    self.bytes_received += len(line) + 1
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        err = event["error"]
                        raise RemoteError(str(err.get("code")), str(err.get("message")), 200)
                    if "choices" not in event:  # a session's stream: StepBody events
                        step = bodies.StepBody.model_validate(event)
                        yield Step(step.token_ids, step.finish_reason, bodies.logprobs_from_body(step.logprobs))
                        continue
                    choice = event["choices"][0]
                    yield Step(list(choice.get("token_ids") or []), choice.get("finish_reason"))
        except httpx.TransportError as e:
            raise _from_transport_error(e) from None

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[Step]:
        """The target alone: the cloud's /v1/completions SSE stream, token ids included (`return_token_ids`); with
        settings beyond the OpenAI request's (shaping, logprobs, a resumed output), a session continued as a stream."""
        if params.shaped or params.logprobs is not None or params.emitted:
            return self._session_stream(prompt, params)
        model = self.request("GET", "/v1/models")["data"][0]["id"]
        body = {"model": model, "prompt": list(prompt), "max_tokens": params.max_tokens, "stream": True,
                "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed,
                "ignore_eos": params.ignore_eos, "return_token_ids": True}
        if params.stop_token_ids:
            raise RemoteError("invalid_request", "stop_token_ids are not supported in cloud mode over HTTP", 400)
        return self.sse_steps("/v1/completions", body)

    def _session_stream(self, prompt: list[int], params: SamplingParams) -> Iterator[Step]:
        session = self.open(prompt, params)
        try:
            yield from session.continue_alone(list(prompt))
        finally:
            self.bytes_sent += session.bytes_sent
            self.bytes_received += session.bytes_received
            session.close()

    def open(self, prompt: list[int], params: SamplingParams, session_id: str | None = None,
             affinity_key: str | None = None, report: EdgeReport | None = None) -> HttpSession:
        body = bodies.open_to_json(OpenRequest(list(prompt), params, self.draft_fingerprint, self.draft_name,
                                               self.client_id, session_id, report))
        sizes: list[int] = []
        opened = self.request("POST", "/v1/sessions", body, lambda sent, received: sizes.extend((sent, received)),
                              affinity_key)
        session = HttpSession(self, opened, affinity_key)
        session.bytes_sent, session.bytes_received = sizes
        return session

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> HttpVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HttpSession(Pipelined):
    def __init__(self, verifier: HttpVerifier, opened: dict[str, Any], affinity_key: str | None = None) -> None:
        self.verifier = verifier
        self.opened = bodies.opened_from_json(opened)
        self.session_id = self.opened.session_id
        self.affinity_key = affinity_key
        self._setup()
        self._lock = threading.Lock()

    def _count(self, sent: int, received: int) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received

    def _call(self, block: DraftBlock, seq: int, base_len: int | None) -> VerifyResult:
        body = bodies.draft_to_json(block, seq, base_len)
        v = self.verifier.request("POST", f"/v1/sessions/{self.session_id}/verify", body, self._count,
                                  self.affinity_key)
        return bodies.verdict_from_json(v)

    def continue_alone(self, context: list[int]) -> Iterator[Step]:
        return self.verifier.sse_steps(f"/v1/sessions/{self.session_id}/continue", {"prompt": list(context)},
                                       self.affinity_key)

    def close(self) -> None:
        self._shutdown()
        try:
            self.verifier.request("DELETE", f"/v1/sessions/{self.session_id}", affinity_key=self.affinity_key)
        except RemoteError as e:
            if e.code not in ("session_not_found", "unavailable"):
                raise


