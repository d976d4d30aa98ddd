"""Generated bad input over gRPC (hypothesis): out-of-vocabulary ids, empty and oversized blocks, wrong and repeated
sequence numbers, unknown, closed and expired sessions, bad sampling parameters, malformed q, messages out of order
on a stream, two streams on one session, Close in the middle of a Verify.

Every message gets the status (or stream Error) a small model of the protocol predicts, and a healthy session
verified in between, block by block, still produces exactly the target's greedy output.

CI runs TANDEM_FUZZ_GRPC_CASES (default 25) scripts per test; the full count: TANDEM_FUZZ_GRPC_CASES=250. The
scripts are the same each run; TANDEM_FUZZ_RANDOM=1 draws fresh ones (a failure prints its script).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from conftest import TINY_VOCAB
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from servers import BackgroundServer

from cloud_server.main import ServerHandle
from cloud_server.settings import ServerSettings
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem_protocol.proto import verifier_pb2 as pb
from tandem_protocol.proto import verifier_pb2_grpc as pb_grpc

CASES = int(os.environ.get("TANDEM_FUZZ_GRPC_CASES", "25"))
RANDOM = os.environ.get("TANDEM_FUZZ_RANDOM")  # set (to anything): fresh cases each run; unset: the same
KEY = "grpc-fuzz-key"
MD = (("authorization", f"Bearer {KEY}"),)
PROMPT = [10, 20, 30, 40, 50, 60, 70]
HEALTHY_TOKENS = 24
MAX_DRAFT = 8
MAX_PROMPT = 64
MAX_TOKENS = 32
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
CONFLICT = grpc.StatusCode.ABORTED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
# no shrinking: a failing script is printed as found (shrinking one can take minutes of real server calls)
HSETTINGS = hsettings(max_examples=CASES, deadline=None, database=None, derandomize=RANDOM is None, print_blob=True,
                      report_multiple_bugs=False, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))


def server_settings(**kw: Any) -> ServerSettings:
    base: dict[str, Any] = dict(target="tiny-target", model_name="tiny", http_port=0, grpc_port=0, api_keys=[KEY],
                                max_prompt_tokens=MAX_PROMPT, max_draft_tokens=MAX_DRAFT, max_tokens_limit=MAX_TOKENS,
                                max_body_bytes=64 * 1024, shutdown_grace_s=0.5)
    return ServerSettings(**(base | kw))


@pytest.fixture(scope="module")
def server(tiny_target: LoadedModel) -> Iterator[ServerHandle]:
    with BackgroundServer(server_settings(), tiny_target) as handle:
        yield handle


@pytest.fixture(scope="module")
def stub(server: ServerHandle) -> Iterator[pb_grpc.VerifierStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        yield pb_grpc.VerifierStub(ch)


@pytest.fixture(scope="module")
def expected(tiny_target: LoadedModel) -> list[int]:
    return generate_autoregressive(tiny_target, PROMPT, SamplingParams(max_tokens=HEALTHY_TOKENS,
                                                                        ignore_eos=True)).tokens


SENT: Counter[str] = Counter()  # fuzz messages sent, by status or stream reply


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    print(f"\ngRPC fuzz: {sum(SENT.values())} messages; {dict(sorted(SENT.items()))}")


def call(fn: Any, request: Any, timeout: float = 30) -> tuple[grpc.StatusCode, Any]:
    try:
        reply = fn(request, timeout=timeout, metadata=MD)
        SENT["OK"] += 1
        return OK, reply
    except grpc.RpcError as e:
        SENT[e.code().name] += 1
        assert e.code() != grpc.StatusCode.INTERNAL and e.code() != grpc.StatusCode.UNKNOWN, e.details()
        assert e.details(), "a status without a message"
        return e.code(), e.details()


class Healthy:
    """A greedy session advanced between the fuzz messages with blocks that are partly right, partly wrong."""

    def __init__(self, stub: pb_grpc.VerifierStub, expected: list[int]) -> None:
        self.stub = stub
        self.expected = expected
        params = pb.SamplingParams(max_tokens=HEALTHY_TOKENS, ignore_eos=True)
        self.sid = stub.OpenSession(pb.Open(prompt=PROMPT, sampling=params), timeout=30, metadata=MD).session_id
        self.out: list[int] = []
        self.seq = 0
        self.done = False

    def step(self) -> None:
        if self.done:
            return
        k = 1 + self.seq % 4
        block = list(self.expected[len(self.out):len(self.out) + k])
        if block and self.seq % 3 == 0:
            block[-1] = (block[-1] + 1) % TINY_VOCAB  # a rejection in this round
        v = self.stub.Verify(pb.VerifyRequest(session_id=self.sid, draft=pb.Draft(seq=self.seq, tokens=block)),
                             timeout=30, metadata=MD)
        self.seq += 1
        self.out += list(v.tokens)
        self.done = v.finish_reason != pb.FINISH_REASON_UNSPECIFIED

    def finish(self) -> None:
        while not self.done:
            self.step()
        assert self.out == self.expected, "the healthy session's output changed"
        self.stub.CloseSession(pb.Close(session_id=self.sid), timeout=30, metadata=MD)


# --- strategies

in_vocab = st.integers(0, TINY_VOCAB - 1)
token = st.one_of(in_vocab, st.integers(TINY_VOCAB, 2**32 - 1))  # in and out of vocabulary
# mostly well-formed, so that sessions open and blocks reach the model; the rest anything
tokens = st.one_of(st.lists(in_vocab, max_size=MAX_DRAFT), st.lists(in_vocab, max_size=MAX_DRAFT),
                   st.lists(token, max_size=MAX_DRAFT + 4))
prompts = st.one_of(st.lists(in_vocab, min_size=1, max_size=16), st.lists(in_vocab, min_size=1, max_size=16),
                    st.lists(token, max_size=12), st.lists(in_vocab, min_size=MAX_PROMPT - 2, max_size=MAX_PROMPT + 4))


@st.composite
def sampling(draw: st.DrawFn) -> tuple[pb.SamplingParams, str]:
    """(params, fault): fault "" (valid), "params" (refused as the message is read) or "max_tokens" (over the
    server's limit, checked after the prompt's length)."""
    fuzz = draw(st.integers(0, 2)) == 0
    max_tokens = draw(st.sampled_from([0, MAX_TOKENS + 1, 2**32 - 1]) if fuzz else st.integers(1, MAX_TOKENS))
    temperature = draw(st.one_of(st.just(0.0), st.floats(0.1, 2.0), *(
        [st.sampled_from([-1.0, 1e-40, math.inf, math.nan])] if fuzz else [])))
    top_p = draw(st.one_of(st.none(), st.floats(0.05, 1.0), *(
        [st.sampled_from([0.0, 1.5, -0.5, math.nan])] if fuzz else [])))
    msg = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=draw(st.integers(0, 200)),
                            ignore_eos=draw(st.booleans()))
    if top_p is not None:
        msg.top_p = top_p
    if draw(st.booleans()):
        msg.seed = draw(st.integers(0, 2**64 - 1))
    if (max_tokens < 1 or not (temperature == 0.0 or 1e-5 <= temperature < math.inf)
            or not (top_p is None or 0 < top_p <= 1)):
        return msg, "params"
    return msg, "max_tokens" if max_tokens > MAX_TOKENS else ""


def prompt_valid(prompt: list[int], resumed: bool = False) -> bool:
    limit = MAX_PROMPT + (MAX_TOKENS if resumed else 0)
    return 0 < len(prompt) <= limit and all(t < TINY_VOCAB for t in prompt)


@dataclass
class Victim:
    sid: str
    next_seq: int = 0
    last: pb.Verdict | None = None
    finished: bool = False
    closed: bool = False


@dataclass
class Model:
    """What the server should hold: the sessions the fuzzer opened."""

    victims: list[Victim] = field(default_factory=list)


open_action = st.tuples(st.just("open"), prompts, sampling())
verify_action = st.tuples(
    st.just("verify"),
    st.sampled_from(["victim", "victim", "victim", "unknown"]),
    st.sampled_from(["next", "next", "repeat", "behind", "far"]),  # never next + 1: that one waits for its turn
    tokens,
    st.sampled_from(["none", "none", "none", "bad"]),  # q: none, or lengths that do not match
)
close_action = st.tuples(st.just("close"), st.sampled_from(["victim", "unknown"]))
actions = st.lists(st.one_of(open_action, verify_action, verify_action, close_action), min_size=1, max_size=8)


def do_open(stub: pb_grpc.VerifierStub, model: Model, prompt: list[int], params: tuple[pb.SamplingParams, bool]
            ) -> None:
    msg, fault = params
    valid = not fault
    status, reply = call(stub.OpenSession, pb.Open(prompt=prompt, sampling=msg))
    want = OK if valid and prompt_valid(prompt) else INVALID
    assert status == want, (prompt, msg, reply)
    if status == OK:
        model.victims.append(Victim(reply.session_id))


def do_verify(stub: pb_grpc.VerifierStub, model: Model, target: str, seq_kind: str, block: list[int], q: str
              ) -> None:
    live = [v for v in model.victims if not v.closed]
    victim = live[-1] if target == "victim" and live else None
    if victim is None and target == "victim" and model.victims:
        victim = model.victims[-1]  # a closed one
    sid = victim.sid if victim is not None else "no-such-session"
    nxt = victim.next_seq if victim is not None else 0
    seq = {"next": nxt, "repeat": nxt - 1, "behind": nxt - 2, "far": nxt + 2 + len(block)}[seq_kind]
    if seq < 0:
        seq, seq_kind = nxt, "next"
    draft = pb.Draft(seq=seq, tokens=block)
    if q == "bad":
        draft.q_k, draft.q_ids[:], draft.q_probs[:] = 2, [1], [0.5, 0.5, 0.5]
    status, reply = call(stub.Verify, pb.VerifyRequest(session_id=sid, draft=draft))

    if q == "bad":
        want = INVALID  # checked as the message is read, before the session is looked up
    elif victim is None:
        want = NOT_FOUND
    elif victim.closed:
        want = CONFLICT  # its client closed it: the session has ended
    elif seq_kind == "repeat" and victim.last is not None:
        assert status == OK and reply == victim.last, "a repeated seq must get the same verdict again"
        return
    elif seq_kind != "next":
        want = CONFLICT  # the session's state refuses it: checked first
    elif len(block) > MAX_DRAFT:
        want = INVALID
    elif victim.finished:
        want = CONFLICT
    elif any(t >= TINY_VOCAB for t in block):
        want = INVALID
    else:
        want = OK
    assert status == want, (seq_kind, block, q, reply)
    if status == OK and victim is not None:
        victim.next_seq += 1
        victim.last = reply
        victim.finished = reply.finish_reason != pb.FINISH_REASON_UNSPECIFIED


def do_close(stub: pb_grpc.VerifierStub, model: Model, target: str) -> None:
    victim = model.victims[-1] if target == "victim" and model.victims else None
    sid = victim.sid if victim is not None else "no-such-session"
    status, reply = call(stub.CloseSession, pb.Close(session_id=sid))
    assert status == (NOT_FOUND if victim is None else OK), reply  # closing twice does nothing
    if victim is not None:
        assert reply.existed == (not victim.closed)
    if victim is not None:
        victim.closed = True


@given(script=actions)
@HSETTINGS
def test_unary_messages_get_their_status_and_spare_other_sessions(
    stub: pb_grpc.VerifierStub, expected: list[int], script: list[tuple[Any, ...]]
) -> None:
    healthy = Healthy(stub, expected)
    model = Model()
    do_open(stub, model, PROMPT, (pb.SamplingParams(max_tokens=MAX_TOKENS), ""))  # one victim to start with
    for action in script:
        if action[0] == "open":
            do_open(stub, model, action[1], action[2])
        elif action[0] == "verify":
            do_verify(stub, model, *action[1:])
        else:
            do_close(stub, model, action[1])
        healthy.step()
    healthy.finish()
    for v in model.victims:
        if not v.closed:
            stub.CloseSession(pb.Close(session_id=v.sid), timeout=30, metadata=MD)


# --- the bidirectional stream: every message answered in order; an Error while no session is open ends it

stream_message = st.one_of(
    st.tuples(st.just("open"), prompts, sampling()),
    *[st.tuples(st.just("draft"), st.sampled_from(["next", "next", "repeat", "far"]), tokens)] * 3,
    st.tuples(st.just("empty")),
    st.tuples(st.just("close")),
)


def expect_stream(script: list[tuple[Any, ...]]) -> tuple[list[pb.ClientMessage], list[tuple[str, str]]]:
    """The messages to send and the replies predicted: ("opened" | "verdict" | "error", error code)."""
    sent: list[pb.ClientMessage] = []
    replies: list[tuple[str, str]] = []
    has_session = finished = False
    next_seq = 0
    last_seq: int | None = None
    for item in script:
        kind = item[0]
        if kind == "open":
            msg, fault = item[2]
            valid = not fault
            sent.append(pb.ClientMessage(open=pb.Open(prompt=item[1], sampling=msg)))
            if has_session:
                replies.append(("error", "invalid_request"))  # this stream already has a session
                continue
            ok = valid and prompt_valid(item[1])
            replies.append(("opened", "") if ok else ("error", _open_error(item[1], fault)))
            if not ok:
                return sent, replies
            has_session = True
        elif kind == "draft":
            seq_kind, block = item[1], item[2]
            seq = {"next": next_seq, "repeat": next_seq - 1, "far": next_seq + 2 + len(block)}[seq_kind]
            if seq < 0:
                seq, seq_kind = next_seq, "next"
            sent.append(pb.ClientMessage(draft=pb.Draft(seq=seq, tokens=block)))
            if not has_session:
                replies.append(("error", "invalid_request"))
                return sent, replies
            if seq_kind == "repeat" and last_seq is not None:
                replies.append(("verdict", ""))
            elif seq_kind != "next":
                replies.append(("error", "session_conflict"))
            elif len(block) > MAX_DRAFT:
                replies.append(("error", "invalid_request"))
            elif finished:
                replies.append(("error", "session_conflict"))
            elif any(t >= TINY_VOCAB for t in block):
                replies.append(("error", "invalid_request"))
            else:
                replies.append(("verdict", "?"))  # "?": the verdict may finish the session (unknown here)
                last_seq, next_seq = next_seq, next_seq + 1
        elif kind == "empty":
            sent.append(pb.ClientMessage())
            replies.append(("error", "invalid_request"))
            if not has_session:
                return sent, replies
        else:
            sent.append(pb.ClientMessage(close=pb.Close()))
            return sent, replies
    return sent, replies


def _open_error(prompt: list[int], fault: str) -> str:
    # the order the server checks in: sampling parameters (as the message is read), length, max_tokens, the ids
    return "context_length_exceeded" if fault != "params" and len(prompt) > MAX_PROMPT else "invalid_request"


# mostly an Open first (else the stream ends at once), then anything
good_open = st.tuples(st.just("open"), st.lists(in_vocab, min_size=1, max_size=16), sampling())
opened_script = st.builds(lambda first, rest: [first, *rest], good_open,
                          st.lists(stream_message, min_size=2, max_size=7))
stream_script = st.one_of(opened_script, opened_script, opened_script, st.lists(stream_message, min_size=1,
                                                                                 max_size=8))


@given(script=stream_script)
@HSETTINGS
def test_stream_messages_get_their_replies_and_spare_other_sessions(
    server: ServerHandle, stub: pb_grpc.VerifierStub, expected: list[int], script: list[tuple[Any, ...]]
) -> None:
    healthy = Healthy(stub, expected)
    sent, predicted = expect_stream(script)
    healthy.step()
    replies = list(stub.Session(iter(sent), timeout=60, metadata=MD))
    got = [(r.WhichOneof("msg"), r.error.code if r.WhichOneof("msg") == "error" else "") for r in replies]
    SENT.update(f"stream {kind}:{code}" if code else f"stream {kind}" for kind, code in got)
    SENT["stream close/unanswered"] += len(sent) - len(got)
    # a verdict that finishes the session turns later valid drafts into errors ("the session has finished")
    finished_at = next((i for i, r in enumerate(replies) if r.WhichOneof("msg") == "verdict"
                        and r.verdict.finish_reason != pb.FINISH_REASON_UNSPECIFIED), None)
    for i, (want, have) in enumerate(zip(predicted, got, strict=True)):
        if finished_at is not None and i > finished_at and want == ("verdict", "?"):
            assert have == ("error", "session_conflict"), (i, predicted, got)
        else:
            assert have[0] == want[0] and (want[0] != "error" or have[1] == want[1]), (i, predicted, got)
    for r in replies:
        if r.WhichOneof("msg") == "error":
            assert r.error.message and r.error.grpc_status in ("INVALID_ARGUMENT", "NOT_FOUND", "ABORTED")
    healthy.finish()
    deadline = time.monotonic() + 10
    while server.worker.open_sessions and time.monotonic() < deadline:  # the stream's session went with it
        time.sleep(0.02)
    assert server.worker.open_sessions == 0


# --- sessions taken over, closed mid-verify, expired


def test_two_streams_on_one_session(stub: pb_grpc.VerifierStub, expected: list[int]) -> None:
    """A resume under a live session's id takes it over: the old stream is told so, the new one is unharmed."""
    import queue

    params = pb.SamplingParams(max_tokens=HEALTHY_TOKENS, ignore_eos=True)
    a_out: queue.Queue[pb.ClientMessage | None] = queue.Queue()
    a_out.put(pb.ClientMessage(open=pb.Open(prompt=PROMPT, sampling=params)))
    a = stub.Session(iter(a_out.get, None), timeout=60, metadata=MD)
    sid = next(a).opened.session_id
    a_out.put(pb.ClientMessage(draft=pb.Draft(seq=0, tokens=expected[:3])))
    first = next(a).verdict
    assert list(first.tokens) == expected[:4]

    # B resumes the same session from the context A reached
    context, done = PROMPT + list(first.tokens), list(first.tokens)
    b_out: queue.Queue[pb.ClientMessage | None] = queue.Queue()
    resume = pb.Open(prompt=context, sampling=pb.SamplingParams(max_tokens=HEALTHY_TOKENS - len(done),
                                                                ignore_eos=True), session_id=sid)
    b_out.put(pb.ClientMessage(open=resume))
    b = stub.Session(iter(b_out.get, None), timeout=60, metadata=MD)
    assert next(b).opened.resumed

    a_out.put(pb.ClientMessage(draft=pb.Draft(seq=1, tokens=expected[4:6])))
    stale = next(a)
    assert stale.WhichOneof("msg") == "error" and stale.error.code == "session_not_found", stale
    a_out.put(None)  # A ends: B's session must survive it
    assert list(a) == []

    seq = 0
    while len(done) < HEALTHY_TOKENS:
        b_out.put(pb.ClientMessage(draft=pb.Draft(seq=seq, tokens=expected[len(done):len(done) + 3])))
        reply = next(b)
        assert reply.WhichOneof("msg") == "verdict", reply
        done += list(reply.verdict.tokens)
        seq += 1
    assert done == expected
    b_out.put(None)
    assert list(b) == []


def test_close_in_the_middle_of_a_verify(server: ServerHandle, stub: pb_grpc.VerifierStub,
                                         expected: list[int]) -> None:
    """Close racing a Verify: the Verify ends OK or ABORTED (the session has ended), never INTERNAL; later calls get
    ABORTED too."""
    healthy = Healthy(stub, expected)
    params = pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    for delay in (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01):
        sid = stub.OpenSession(pb.Open(prompt=PROMPT * 8, sampling=params), timeout=30, metadata=MD).session_id
        statuses: list[grpc.StatusCode] = []

        def verify(sid: str = sid, out: list[grpc.StatusCode] = statuses) -> None:
            request = pb.VerifyRequest(session_id=sid, draft=pb.Draft(seq=0, tokens=expected[:MAX_DRAFT]))
            out.append(call(stub.Verify, request)[0])

        t = threading.Thread(target=verify)
        t.start()
        time.sleep(delay)
        closed = call(stub.CloseSession, pb.Close(session_id=sid))[0]
        t.join(30)
        assert closed == OK and statuses and statuses[0] in (OK, CONFLICT), (delay, statuses)
        assert call(stub.Verify, pb.VerifyRequest(session_id=sid, draft=pb.Draft(seq=1)))[0] == CONFLICT
        healthy.step()
    healthy.finish()


def test_expired_sessions(tiny_target: LoadedModel) -> None:
    with BackgroundServer(server_settings(session_ttl_s=0.3), tiny_target) as h, \
            grpc.insecure_channel(f"127.0.0.1:{h.grpc_port}") as ch:
        stub = pb_grpc.VerifierStub(ch)
        params = pb.SamplingParams(max_tokens=8)
        sid = stub.OpenSession(pb.Open(prompt=PROMPT, sampling=params), timeout=30, metadata=MD).session_id
        messages = iter([pb.ClientMessage(open=pb.Open(prompt=PROMPT, sampling=params)), "sleep",
                         pb.ClientMessage(draft=pb.Draft(seq=0, tokens=[1]))])

        def slow() -> Iterator[pb.ClientMessage]:
            for m in messages:
                if m == "sleep":
                    time.sleep(0.8)
                else:
                    yield m  # type: ignore[misc]

        replies = list(stub.Session(slow(), timeout=30, metadata=MD))
        time.sleep(0.1)
        status, details = call(stub.Verify, pb.VerifyRequest(session_id=sid, draft=pb.Draft(seq=0, tokens=[1])))
        assert status == NOT_FOUND and "expired" in details
        assert call(stub.CloseSession, pb.Close(session_id=sid))[0] == NOT_FOUND
        assert [r.WhichOneof("msg") for r in replies] == ["opened", "error"]
        assert replies[1].error.code == "session_not_found" and replies[1].error.grpc_status == "NOT_FOUND"
        # the server still serves
        assert call(stub.OpenSession, pb.Open(prompt=PROMPT, sampling=params))[0] == OK
