"""The compose deployment: the file is valid, every setting is documented, and its services' own commands (with the
same environment, ports and healthchecks) serve an edge whose greedy output is the cloud's — no Docker engine needed.

`docker compose config` (or docker-compose v1) validates the file where a compose client is installed; the rest
reads docker-compose.yml with PyYAML and resolves `${VAR:-default}` as compose does, from a test environment that
chooses free loopback ports.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML reads docker-compose.yml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SMOKE = ROOT / "scripts" / "compose-smoke.sh"

# --- compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}
_VAR = re.compile(r"\$(?:(?P<escaped>\$)|(?P<plain>[A-Za-z_][A-Za-z0-9_]*)|"
                  r"\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["plain"] or m["name"]
        op, arg = m["op"], m["arg"] or ""
        val = env.get(name)
        unset_or_empty = val is None or (op is not None and op.startswith(":") and val == "")
        if op in (":-", "-") and unset_or_empty:
            return arg
        if op in (":?", "?") and unset_or_empty:
            raise KeyError(f"{name}: {arg}")
        return val or ""

    return _VAR.sub(sub, value)


def resolve(obj: Any, env: Mapping[str, str]) -> Any:
    if isinstance(obj, str):
        return interpolate(obj, env)
    if isinstance(obj, list):
        return [resolve(x, env) for x in obj]
    if isinstance(obj, dict):
        return {k: resolve(v, env) for k, v in obj.items()}
    return obj


def compose_variables() -> dict[str, str | None]:
    """Every variable the compose file reads, with its default (None: no default)."""
    found: dict[str, str | None] = {}
    for m in _VAR.finditer(COMPOSE_FILE.read_text()):
        name = m["plain"] or m["name"]
        if name:
            found.setdefault(name, m["arg"] if m["op"] in (":-", "-") else None)
    return found


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())  # anchors and `<<` merge keys as compose reads them
    return resolve(raw, {} if env is None else env)


def default_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services `docker compose up` starts with no profile on."""
    return {name: svc for name, svc in compose["services"].items() if not svc.get("profiles")}


# --- the file, read statically


def test_every_setting_has_a_default_and_is_documented_in_env_example() -> None:
    variables = compose_variables()
    documented = env_example()
    assert variables, "the compose file reads no settings from the environment"
    assert not [n for n, d in variables.items() if d is None], "every setting needs a default"
    missing = sorted(set(variables) - set(documented))
    assert not missing, f".env.example does not document {missing}"
    differ = {n: (d, documented[n]) for n, d in variables.items() if documented[n] != d}
    assert not differ, f"defaults in docker-compose.yml vs .env.example differ: {differ}"


def test_services_are_wired_as_documented() -> None:
    compose = load_compose()
    services = compose["services"]
    assert set(default_services(compose)) == {"cloud", "edge"}
    cloud, edge, netem, bench = (services[n] for n in ("cloud", "edge", "netem", "bench"))
    # one image, the service chooses the command
    assert len({s["image"] for n, s in services.items() if n != "nginx"}) == 1  # nginx: its own (profile scale)
    assert cloud["command"][:2] == ["tandem", "serve"]
    assert {p.rsplit(":", 1)[-1] for p in cloud["ports"]} == {"8000", "50051"}
    assert "/ready" in " ".join(cloud["healthcheck"]["test"])
    assert any(v.split(":")[1] == "/models" for v in cloud["volumes"])
    assert edge["command"][:3] == ["tandem", "edge", "serve"]
    assert edge["command"][edge["command"].index("--cloud") + 1] == "cloud:50051"
    assert edge["command"][edge["command"].index("--port") + 1] == "8001"
    assert edge["depends_on"] == {"cloud": {"condition": "service_healthy"}}
    assert netem["profiles"] == ["netem"] and netem["command"][:2] == ["tandem", "netem"]
    assert netem["command"][netem["command"].index("--upstream") + 1] == "cloud:50051"
    # pointing the edge at the proxy is one setting
    assert netem["command"][netem["command"].index("--listen") + 1] == "0.0.0.0:50052"
    via_netem = load_compose({"EDGE_CLOUD": "netem:50052"})["services"]["edge"]["command"]
    assert via_netem[via_netem.index("--cloud") + 1] == "netem:50052"
    assert bench["profiles"] == ["bench"] and bench["command"][:3] == ["tandem", "bench", "replay"]
    assert bench["command"][bench["command"].index("--out") + 1] == "/results"
    assert any(v.split(":")[1] == "/results" for v in bench["volumes"])
    assert all(s["environment"]["HF_HUB_OFFLINE"] == "1" for s in (cloud, edge, bench))


def test_dockerfile_is_one_offline_non_root_image_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert "import torch" in text  # a base that has torch keeps it
    assert re.search(r"^USER tandem$", text, re.M)
    assert "HF_HUB_OFFLINE=1" in text
    assert re.search(r"^HEALTHCHECK ", text, re.M)
    # what the image needs is not excluded from the build context
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    for needed in ("tandem", "cloud_server", "edge_client", "benchmarks", "benchmarks/traces", "pyproject.toml",
                   "README.md", "tests/fixtures/test_pair"):
        assert needed not in lines, needed
    assert (ROOT / "benchmarks" / "traces" / "code-completion.jsonl").is_file()
    # the test pair, not in the package, is let back in after tests/ (a later line wins) and copied where the image's
    # TANDEM_TEST_PAIR points
    assert lines.index("!tests/fixtures/test_pair") > lines.index("tests")
    assert (ROOT / "tests" / "fixtures" / "test_pair" / "target" / "config.json").is_file()
    copied = re.search(r"^COPY tests/fixtures/test_pair (\S+)$", text, re.M)
    assert copied and re.search(rf"^\s*TANDEM_TEST_PAIR={re.escape(copied[1])}\b", text, re.M), "the image's test pair"


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $SET $$SET ${UNSET}", env) == "x d  d x $SET "


# --- the compose client


def _compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 else None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("profiles", [[], ["netem", "bench"]], ids=["default", "all-profiles"])
def test_compose_config_validates(profiles: list[str], tmp_path: Path) -> None:
    client = _compose_client()
    if client is None:
        pytest.skip("no compose client (`docker compose` or `docker-compose`) on this machine")
    env = {k: v for k, v in os.environ.items() if k not in compose_variables() and k != "COMPOSE_PROFILES"}
    args = [*client, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT)]
    for p in profiles:
        args += ["--profile", p]
    empty = tmp_path / "empty.env"  # not a .env of the checkout: the defaults, then .env.example's values
    empty.write_text("")
    for env_file in (empty, ENV_EXAMPLE):
        done = subprocess.run([*args, "--env-file", str(env_file), "config"], capture_output=True, text=True, env=env,
                              timeout=50)
        assert done.returncode == 0, done.stderr
        config = yaml.safe_load(done.stdout)
        assert {"cloud", "edge", *profiles} <= set(config["services"])
        assert config["services"]["edge"]["depends_on"]["cloud"]["condition"] == "service_healthy"


@pytest.mark.timeout(60)
def test_smoke_script_host_network_override_validates() -> None:
    if _compose_client() is None:
        pytest.skip("no compose client (`docker compose` or `docker-compose`) on this machine")
    done = subprocess.run(["bash", str(SMOKE), "--config-only"], capture_output=True, text=True, timeout=50,
                          env=os.environ | {"TANDEM_SMOKE_NETWORK": "host"}, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(done.stdout[: done.stdout.rindex("[compose-smoke]")])
    for name in ("cloud", "edge"):
        svc = config["services"][name]
        assert svc["network_mode"] == "host" and not svc.get("ports"), svc
    edge_cmd = config["services"]["edge"]["command"]
    assert edge_cmd[edge_cmd.index("--cloud") + 1].startswith("127.0.0.1:")


# --- the default services' commands as local processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_argv(argv: list[str]) -> list[str]:
    """The image's `tandem` and `python` are this checkout's."""
    if argv[0] == "tandem":
        return [sys.executable, "-m", "tandem_tools.cli", *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return argv


def healthcheck_argv(svc: dict[str, Any]) -> list[str]:
    test = svc["healthcheck"]["test"]
    if test[0] == "CMD":
        return local_argv(test[1:])
    assert test[0] == "CMD-SHELL", test
    return ["sh", "-c", test[1]]


def edge_command_available() -> str | None:
    """None when `tandem edge serve` exists in this checkout; otherwise why not."""
    done = subprocess.run([sys.executable, "-m", "tandem_tools.cli", "edge", "serve", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    if done.returncode != 0:
        return f"`tandem edge serve` does not exist yet: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return None


@dataclass
class Running:
    name: str
    svc: dict[str, Any]
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


class LocalCompose:
    """Starts services in depends_on order, each with the environment compose would give it; stops them all."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.compose = load_compose(env)
        self.workdir = workdir
        self.running: dict[str, Running] = {}

    def start(self, name: str, timeout: float = 90) -> Running:
        svc = self.compose["services"][name]
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in self.running, f"{name} depends on {dep}, which is not running"
            if cond.get("condition") == "service_healthy":
                self.wait_healthy(dep, timeout)
        environment = svc.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(e.split("=", 1) for e in environment)
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                local_argv(svc["command"]), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                env=os.environ | {k: str(v) for k, v in environment.items()},
            )
        self.running[name] = Running(name, svc, proc, log)
        return self.running[name]

    def wait_healthy(self, name: str, timeout: float) -> None:
        r = self.running[name]
        argv = healthcheck_argv(r.svc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert r.proc.poll() is None, f"{name} exited ({r.proc.returncode}):\n{r.output()}"
            if subprocess.run(argv, capture_output=True, timeout=30).returncode == 0:
                return
            time.sleep(0.5)
        pytest.fail(f"{name} did not become healthy within {timeout:.0f}s ({shlex.join(argv)}):\n{r.output()}")

    def stop(self) -> dict[str, int | None]:
        codes = {}
        for r in reversed(list(self.running.values())):
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
                try:
                    r.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    r.proc.kill()
                    r.proc.wait(timeout=10)
            codes[r.name] = r.proc.returncode
        return codes


@pytest.fixture(scope="module")
def local_stack() -> Iterator[LocalCompose]:
    http, grpc_port, edge = free_port(), free_port(), free_port()
    env = {
        "CLOUD_HTTP_PORT": str(http), "CLOUD_GRPC_PORT": str(grpc_port), "EDGE_PORT": str(edge),
        "TANDEM_BIND_HOST": "127.0.0.1",  # what the host-network override uses too: no service names without Docker
        "EDGE_CLOUD": f"127.0.0.1:{grpc_port}", "TANDEM_THREADS": "1",
        # the test pair, not the default real one: service wiring is under test here (test_qwen_pair covers
        # the default pair)
        "TANDEM_TARGET": "test-target", "TANDEM_DRAFT": "test-draft",
    }
    with tempfile.TemporaryDirectory() as tmp:
        stack = LocalCompose(env, Path(tmp))
        try:
            stack.start("cloud")
            stack.wait_healthy("cloud", 90)
            yield stack
        finally:
            stack.stop()


def _completion(base: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _complete(base: str, model: str, prompt: str, max_tokens: int) -> str:
    return _completion(base, model, prompt, max_tokens)["choices"][0]["text"]


PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef main():\n"]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_cloud_service_command_serves_and_passes_its_healthcheck(local_stack: LocalCompose) -> None:
    svc = local_stack.compose["services"]["cloud"]
    base = f"http://127.0.0.1:{local_stack.env['CLOUD_HTTP_PORT']}"
    assert subprocess.run(healthcheck_argv(svc), capture_output=True, timeout=30).returncode == 0
    model = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
    assert model == "test-target"
    assert _complete(base, model, PROMPTS[0], 8)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_edge_service_gives_the_clouds_greedy_text(local_stack: LocalCompose) -> None:
    reason = edge_command_available()
    if reason:
        pytest.skip(reason)
    local_stack.start("edge")  # waits for the cloud's healthcheck first, as depends_on says
    local_stack.wait_healthy("edge", 90)
    edge = f"http://127.0.0.1:{local_stack.env['EDGE_PORT']}"
    cloud = f"http://127.0.0.1:{local_stack.env['CLOUD_HTTP_PORT']}"
    edge_model = httpx.get(edge + "/v1/models", timeout=10).json()["data"][0]["id"]
    for prompt in PROMPTS:
        want = _complete(cloud, "test-target", prompt, 24)
        assert want
        got = _completion(edge, edge_model, prompt, 24)
        assert got["choices"][0]["text"] == want, prompt
        stats = got.get("tandem")  # the edge's own figures: speculation against the cloud, not a fallback
        if stats is not None:
            assert stats["mode"] == "spec" and not stats["lossy"] and stats["target_passes"] >= 1, stats


# --- profile scale: a second replica and nginx (deploy/nginx); tests/test_scale.py runs the real thing


def _arg(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hosts", [None, "127.0.0.1"], ids=["service-names", "host-network"])
def test_scale_profile_puts_two_replicas_behind_nginx(hosts: str | None, tmp_path: Path) -> None:
    env = {} if hosts is None else {"LB_REPLICA_1_HOST": hosts, "LB_REPLICA_2_HOST": hosts}
    services = load_compose(env)["services"]
    cloud, cloud2, nginx = services["cloud"], services["cloud-2"], services["nginx"]
    assert cloud2["profiles"] == nginx["profiles"] == ["scale"]
    assert cloud2["command"][:2] == ["tandem", "serve"] and cloud2["image"] == cloud["image"]
    assert _arg(cloud2["command"], "--target") == _arg(cloud["command"], "--target")
    ports = {p: (_arg(c["command"], "--http-port"), _arg(c["command"], "--grpc-port")) for p, c in
             (("cloud", cloud), ("cloud-2", cloud2))}
    assert len({q for pair in ports.values() for q in pair}) == 4, ports  # distinct: host networking works too
    assert {k: v for k, v in cloud2["environment"].items()} == cloud["environment"]
    # nginx reaches each replica on its own ports, and waits for both
    e = nginx["environment"]
    names = {"cloud": hosts or "cloud", "cloud-2": hosts or "cloud-2"}
    assert e["TANDEM_LB_HTTP_REPLICAS"].split(",") == [f"{names[n]}:{ports[n][0]}" for n in ("cloud", "cloud-2")]
    assert e["TANDEM_LB_GRPC_REPLICAS"].split(",") == [f"{names[n]}:{ports[n][1]}" for n in ("cloud", "cloud-2")]
    assert nginx["depends_on"] == {n: {"condition": "service_healthy"} for n in ("cloud", "cloud-2")}
    assert {p.rsplit(":", 1)[-1] for p in nginx["ports"]} == {e["TANDEM_LB_HTTP_PORT"], e["TANDEM_LB_GRPC_PORT"]}
    assert e["TANDEM_LB_HTTP_PORT"] in " ".join(nginx["healthcheck"]["test"])
    context = ROOT / nginx["build"]["context"]
    assert (context / "Dockerfile").is_file() and (context / "tandem.conf.template").is_file()
    # the image's start command renders the template from this environment: the same, here
    rendered = subprocess.run(["sh", str(context / "render.sh")], env=os.environ | e, capture_output=True,
                              text=True, timeout=30)
    assert rendered.returncode == 0, rendered.stderr
    conf = rendered.stdout
    directives = "\n".join(line for line in conf.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"@[A-Z_]+@", directives), directives  # every placeholder filled
    assert conf.count("hash $http_x_tandem_session consistent;") == 2  # HTTP and gRPC upstreams alike
    assert "grpc_pass grpc://tandem_grpc;" in conf and "proxy_pass http://tandem_http;" in conf
    for addr in e["TANDEM_LB_HTTP_REPLICAS"].split(",") + e["TANDEM_LB_GRPC_REPLICAS"].split(","):
        assert f"server {addr} " in conf, addr
    assert f"listen 0.0.0.0:{e['TANDEM_LB_GRPC_PORT']} http2;" in conf
    nginx_bin = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if nginx_bin is not None and hosts is not None:  # service names do not resolve outside compose's network
        (tmp_path / "tandem.conf").write_text(conf.replace("/dev/stdout", str(tmp_path / "access.log")))
        (tmp_path / "nginx.conf").write_text(
            f"pid {tmp_path / 'nginx.pid'};\nevents {{}}\nhttp {{ include {tmp_path / 'tandem.conf'}; }}\n")
        check = subprocess.run([nginx_bin, "-t", "-e", str(tmp_path / "error.log"), "-p", str(tmp_path), "-c",
                                str(tmp_path / "nginx.conf")], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr


@pytest.mark.timeout(60)
def test_compose_config_validates_with_the_scale_profile(tmp_path: Path) -> None:
    client = _compose_client()
    if client is None:
        pytest.skip("no compose client (`docker compose` or `docker-compose`) on this machine")
    env = {k: v for k, v in os.environ.items() if k not in compose_variables() and k != "COMPOSE_PROFILES"}
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = subprocess.run([*client, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), "--env-file",
                           str(empty), "--profile", "scale", "config"], capture_output=True, text=True, env=env,
                          timeout=50)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert {"cloud", "cloud-2", "nginx", "edge"} <= set(services)
    assert services["nginx"]["depends_on"]["cloud-2"]["condition"] == "service_healthy"
