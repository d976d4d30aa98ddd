"""Scale-out: real nginx, configured from deploy/nginx, in front of two real `tandem serve` replicas on loopback.

(a) Sessions stick: every call of a session (HTTP, unary gRPC, or the gRPC Session stream) reaches one replica,
    chosen by hashing the edge's `x-tandem-session` header, and both replicas get sessions.
(b) A replica killed (SIGKILL) mid-generation costs no token: the edge resumes through nginx on the other replica
    and its greedy output equals the undisturbed one.

nginx runs in the foreground as a child process with its own prefix, config and logs in a temporary folder. Which
replica served what is read from nginx's access log (the shipped `tandem_lb` format: upstream and session per
request) and cross-checked with each replica's /metrics.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from edge_client.client import edge_decoder
from edge_client.settings import EdgeSettings
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem_tools.bench_load import parse_metrics
from tandem_tools.procs import CloudProcess, free_port, stop_process

ROOT = Path(__file__).resolve().parents[1]
RENDER = ROOT / "deploy" / "nginx" / "render.sh"
PROMPTS = ["import os\nimport sys\n\n\ndef main(", "class Stack:\n    def __init__(self", "def parse_args(argv",
           "for i in range(", "    return self.", "with open(path) as f:\n    "]
_LOG_LINE = re.compile(r'"(?P<request>[^"]*)" (?P<status>\d+) .* upstream=(?P<upstream>\S.*?) upstream_status=\S.* '
                       r'session=(?P<session>\S*)$')


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"):  # not on a normal user's PATH
        if os.access(os.path.join(d, "nginx"), os.X_OK):
            return os.path.join(d, "nginx")
    return None


class Nginx:
    """nginx in the foreground, one process (no master/worker split), with the rendered deploy/nginx config."""

    def __init__(self, workdir: Path, replicas: list[CloudProcess]) -> None:
        self.dir = workdir
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.access_log = workdir / "access.log"
        self.access_log.touch()
        self.proc: subprocess.Popen[bytes] | None = None
        env = os.environ | {
            "TANDEM_LB_HTTP_REPLICAS": ",".join(f"127.0.0.1:{r.http_port}" for r in replicas),
            "TANDEM_LB_GRPC_REPLICAS": ",".join(f"127.0.0.1:{r.grpc_port}" for r in replicas),
            "TANDEM_LB_LISTEN_HOST": "127.0.0.1", "TANDEM_LB_HTTP_PORT": str(self.http_port),
            "TANDEM_LB_GRPC_PORT": str(self.grpc_port), "TANDEM_LB_ACCESS_LOG": str(self.access_log),
        }
        rendered = subprocess.run(["sh", str(RENDER)], env=env, capture_output=True, text=True, timeout=30, check=True)
        (workdir / "tandem.conf").write_text(rendered.stdout)
        temp = " ".join(f"{k}_temp_path {workdir / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (workdir / "nginx.conf").write_text(
            f"daemon off;\nmaster_process off;\npid {workdir / 'nginx.pid'};\nerror_log {workdir / 'error.log'} info;\n"
            "events { worker_connections 512; }\n"
            f"http {{\n  {temp}\n  include {workdir / 'tandem.conf'};\n}}\n"
        )

    def _argv(self, binary: str) -> list[str]:
        return [binary, "-e", str(self.dir / "error.log"), "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")]

    def start(self, binary: str) -> Nginx:
        check = subprocess.run([*self._argv(binary), "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(self._argv(binary), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.errors()
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/nginx-health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"nginx did not answer within 15 s:\n{self.errors()}")

    def stop(self) -> None:
        stop_process(self.proc)

    def errors(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def log_size(self) -> int:
        return self.access_log.stat().st_size

    def requests(self, since: int = 0) -> list[Logged]:
        """Session calls (those carrying the header) logged after byte offset `since`."""
        out = []
        with self.access_log.open("rb") as f:
            f.seek(since)
            for line in f.read().decode(errors="replace").splitlines():
                m = _LOG_LINE.search(line)
                if m and m["session"] not in ("", "-"):
                    # "a, b" when nginx passed the call on; "a : b" for an internal redirect: the last one answered
                    upstreams = [u.strip() for u in re.split(r"[,:]\s", m["upstream"])]
                    out.append(Logged(m["session"], m["request"], int(m["status"]), upstreams))
        return out


@dataclass(frozen=True)
class Logged:
    session: str
    request: str
    status: int
    upstreams: list[str]  # the replicas tried, in order; the last one answered


@dataclass
class Cluster:
    replicas: list[CloudProcess]
    nginx: Nginx

    def replica_of(self, upstream: str) -> int:
        port = int(upstream.rsplit(":", 1)[1])
        return next(i for i, r in enumerate(self.replicas) if port in (r.http_port, r.grpc_port))

    def metric(self, i: int, name: str) -> float:
        return parse_metrics(self.replicas[i].metrics_text()).get(name, 0.0)

    def edge(self, transport: str) -> EdgeSettings:
        port = self.nginx.http_port if transport == "http" else self.nginx.grpc_port
        return EdgeSettings(cloud=f"127.0.0.1:{port}", transport=transport, gamma=3, timeout_s=10, retries=8,
                            backoff_s=0.2, backoff_max_s=1.0)

    def wait_logged(self, since: int, sessions: int, timeout_s: float = 10) -> list[Logged]:
        """nginx logs a call when it ends; a stream's line may come just after the edge returned."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.nginx.requests(since)
            if len({r.session for r in got}) >= sessions or time.monotonic() > deadline:
                return got
            time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    binary = nginx_binary()
    if binary is None:
        pytest.skip("no nginx binary on this machine (Debian: apt-get install nginx)")
    workdir = tmp_path_factory.mktemp("scale")
    env = {"TANDEM_SHUTDOWN_GRACE_S": "1", "TANDEM_TARGET": "test-target"}
    replicas = [CloudProcess(threads=1, env=env, log_path=workdir / f"cloud-{i}.log")
                for i in range(2)]
    errors: list[BaseException] = []

    def start(r: CloudProcess) -> None:
        try:
            r.start()
        except BaseException as e:  # reported below, on the test's thread
            errors.append(e)

    starters = [threading.Thread(target=start, args=(r,)) for r in replicas]  # both load their model at once
    for t in starters:
        t.start()
    for t in starters:
        t.join(180)
    nginx = Nginx(workdir, replicas)
    try:
        assert not errors, errors
        nginx.start(binary)
        yield Cluster(replicas, nginx)
    finally:
        nginx.stop()
        for r in replicas:
            r.stop()


@pytest.fixture(scope="module")
def draft() -> LoadedModel:
    from tandem.models import load_model

    return load_model("test-draft")


def encode(draft: LoadedModel, text: str) -> list[int]:
    return list(draft.tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sessions_stick_to_one_replica_and_both_replicas_serve(cluster: Cluster, draft: LoadedModel) -> None:
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    start = cluster.nginx.log_size()
    closed0 = [cluster.metric(i, 'tandem_sessions_closed_total{reason="closed"}') for i in range(2)]
    served: list[set[int]] = []  # per transport, the replicas that served its sessions
    total = 0
    opens = ("POST /v1/sessions ", "POST /tandem.v1.Verifier/Session ", "POST /tandem.v1.Verifier/OpenSession ")
    for transport in ("grpc", "grpc-unary", "http"):
        since = cluster.nginx.log_size()
        client = edge_decoder(cluster.edge(transport), draft)
        seen: set[int] = set()
        n = 0
        # consistent hashing of random ids: go on until both replicas have had sessions (2^-11 to fail by chance)
        while n < 12 and (n < 4 or len(seen) < 2):
            result = client.generate(encode(draft, PROMPTS[n % len(PROMPTS)]), params)
            assert len(result.tokens) == 8 and result.stats.resumes == 0, result.stats
            n += 1
            logged = cluster.wait_logged(since, n)
            seen = {cluster.replica_of(r.upstreams[-1]) for r in logged}
        logged = cluster.wait_logged(since, n)
        # a previous transport's last close may be logged just after `since`: only the sessions opened since count
        opened = {r.session for r in logged if r.request.startswith(opens)}
        by_session: dict[str, list[Logged]] = {}
        for r in (r for r in logged if r.session in opened):
            by_session.setdefault(r.session, []).append(r)
        assert len(by_session) == n, (transport, by_session.keys())
        for sid, calls in by_session.items():
            # every call of the session, answered by one replica, with no call passed on
            assert {tuple(c.upstreams) for c in calls} == {(calls[0].upstreams[0],)}, (transport, sid, calls)
            assert all(c.status == 200 for c in calls), calls
            if transport != "grpc":  # one call per block: open, verify..., close
                assert len(calls) >= 3, calls
        served.append({cluster.replica_of(c[0].upstreams[0]) for c in by_session.values()})
        total += n
    assert all(s == {0, 1} for s in served), served
    # the replicas agree with nginx: each closed as many sessions as nginx sent it
    per_replica = [0, 0]
    for r in cluster.nginx.requests(start):
        if r.request.startswith(opens):
            per_replica[cluster.replica_of(r.upstreams[-1])] += 1
    closed = [cluster.metric(i, 'tandem_sessions_closed_total{reason="closed"}') - closed0[i] for i in range(2)]
    assert sum(per_replica) == total and closed == per_replica, (closed, per_replica)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_replica_killed_mid_generation_costs_no_token(cluster: Cluster, draft: LoadedModel) -> None:
    for n, transport in enumerate(("grpc", "http")):
        if n:  # back to two replicas (the same ports): the next failover needs somewhere to go
            for r in cluster.replicas:
                if r.proc is not None and r.proc.poll() is not None:
                    r.start()
        _kill_mid_generation(cluster, draft, transport, encode(draft, PROMPTS[n]))


def _kill_mid_generation(cluster: Cluster, draft: LoadedModel, transport: str, prompt: list[int]) -> None:
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    settings = cluster.edge(transport)
    before = cluster.nginx.log_size()
    undisturbed = edge_decoder(settings, draft).generate(prompt, params).tokens
    streamed: list[int] = []
    killed: list[int] = []

    def on_tokens(new: list[int]) -> None:
        streamed.extend(new)
        if len(streamed) >= 6 and not killed:
            # the replica holding the session: the one with a session open
            holding = [i for i in range(2) if cluster.metric(i, "tandem_open_sessions") >= 1]
            assert len(holding) == 1, holding
            cluster.replicas[holding[0]].kill()
            killed.append(holding[0])

    result = edge_decoder(settings, draft).generate(prompt, params, on_tokens=on_tokens)
    assert killed, f"{transport}: the generation ended before a replica was killed"
    assert result.tokens == undisturbed and streamed == undisturbed, transport
    assert result.stats.resumes >= 1, result.stats
    dead, alive = killed[0], 1 - killed[0]

    def disturbed() -> list[Logged]:
        logged = cluster.nginx.requests(before)
        return [c for c in logged if c.session != logged[0].session]  # the undisturbed run's call came first

    def both_logged() -> bool:  # nginx logs a stream when it ends: the cut one may come after the resumed one
        replicas = {cluster.replica_of(u) for c in disturbed() for u in c.upstreams}
        return replicas == {dead, alive}

    deadline = time.monotonic() + 10
    while not both_logged() and time.monotonic() < deadline:
        time.sleep(0.05)
    calls = disturbed()
    assert both_logged(), calls
    assert len({c.session for c in calls}) == 1, calls  # one affinity key, kept by the resume
    # the resumed session's calls answered by the live replica
    assert any(cluster.replica_of(c.upstreams[-1]) == alive and c.status == 200 for c in calls), calls
    assert cluster.metric(alive, "tandem_open_sessions") == 0  # the resumed session was closed there
