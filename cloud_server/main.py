"""Composition root: one process, one event loop, one model worker, serving HTTP (uvicorn) and gRPC (grpc.aio)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import uvicorn

from cloud_server.grpc_service import create_grpc_server, set_serving
from cloud_server.http_app import create_app
from cloud_server.settings import ServerSettings
from cloud_server.worker import ModelWorker
from tandem.models import LoadedModel, load_target
from tandem_protocol.metrics import Metrics

log = logging.getLogger("cloud_server")


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # signals belong to `run`, which stops HTTP and gRPC together
        yield


@dataclass
class ServerHandle:
    http_port: int
    grpc_port: int
    worker: ModelWorker
    _http: _Uvicorn
    _http_task: asyncio.Task[None]
    _grpc: grpc.aio.Server
    _health: object

    @property
    def metrics(self) -> Metrics:
        return self.worker.metrics

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking work (new requests: 503), let what is in flight finish for up to `grace` seconds (a session's
        next blocks included), cancel what is left, close sessions, stop the worker."""
        grace = self.worker.settings.shutdown_grace_s if grace is None else grace
        worker = self.worker
        worker.gate.close()
        await set_serving(self._health, False)
        # both servers stop accepting now; their own cut-off is a backstop behind the gate's
        grpc_stop = asyncio.create_task(self._grpc.stop(grace + 1.0))
        self._http.config.timeout_graceful_shutdown = grace + 1.0  # type: ignore[assignment]  # float works
        self._http.should_exit = True
        await worker.gate.drain(grace, idle=lambda: worker.open_sessions == 0)
        await asyncio.gather(grpc_stop, self._http_task, return_exceptions=True)
        await worker.shutdown()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: a response written in pieces is not held back ~40 ms by Nagle's algorithm
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _add_port(server: grpc.aio.Server, settings: ServerSettings) -> int:
    address = f"{settings.host}:{settings.grpc_port}"
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return server.add_insecure_port(address)
    pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
    return server.add_secure_port(address, grpc.ssl_server_credentials([pair]))


async def start_servers(settings: ServerSettings, target: LoadedModel | None = None) -> ServerHandle:
    """Load the target (unless given), start the worker, gRPC and HTTP; ports 0 are bound to free ports."""
    if target is None:
        target = await asyncio.to_thread(load_target, settings.target, settings, settings.threads)
    worker = ModelWorker(target, settings, Metrics())
    await worker.start()
    grpc_server, health_servicer = create_grpc_server(settings, worker)
    try:
        grpc_port = _add_port(grpc_server, settings)
        await grpc_server.start()
        await set_serving(health_servicer, True)
        sock = _bind(settings.host, settings.http_port)
        config = uvicorn.Config(
            create_app(settings, worker), lifespan="off", log_level="warning", access_log=False,
            timeout_graceful_shutdown=settings.shutdown_grace_s + 1.0,  # type: ignore[arg-type]  # float works
            ssl_certfile=settings.tls_cert_file, ssl_keyfile=settings.tls_key_file,
        )
        http = _Uvicorn(config)
        task = asyncio.create_task(http.serve(sockets=[sock]))
        while not http.started:
            if task.done():
                task.result()
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
    except BaseException:
        await grpc_server.stop(0)
        await worker.shutdown()
        raise
    return ServerHandle(sock.getsockname()[1], grpc_port, worker, http, task, grpc_server, health_servicer)


async def _serve(settings: ServerSettings) -> None:
    handle = await start_servers(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving %s (%d torch threads): %s on %s:%d, gRPC%s on %s:%d", handle.worker.target.describe(),
             settings.threads,
             "HTTPS" if settings.tls else "HTTP", settings.host, handle.http_port,
             " over TLS" if settings.tls else "", settings.host, handle.grpc_port)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests (up to %.0f s)", settings.shutdown_grace_s)
    await handle.stop()
    log.info("stopped")


def run(settings: ServerSettings) -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cloud_server").setLevel(settings.log_level)
    torch.set_num_threads(settings.threads)
    asyncio.run(_serve(settings))
