"""The servers on their own threads, for synchronous tests: the cloud's (gRPC and HTTP) on an event loop of its
own, the edge's endpoint on a uvicorn thread."""

from __future__ import annotations

import asyncio
import threading
import time

from cloud_server.main import ServerHandle, start_servers
from cloud_server.settings import ServerSettings
from edge_client.http_app import EdgeServer
from edge_client.settings import EdgeSettings
from tandem.models import LoadedModel


class BackgroundServer:
    """The servers on their own event loop in a thread: `with BackgroundServer(settings, target) as handle: ...`."""

    def __init__(self, settings: ServerSettings, target: LoadedModel | None = None) -> None:
        self.settings = settings
        self.target = target
        self.loop = asyncio.new_event_loop()
        self.handle: ServerHandle | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="tandem-server", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.handle = self.loop.run_until_complete(start_servers(self.settings, self.target))
        except BaseException as e:
            self._error = e
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        self.loop.close()

    def start(self, timeout: float = 60.0) -> ServerHandle:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the server did not start in time")
        if self._error is not None:
            raise self._error
        assert self.handle is not None
        return self.handle

    def stop(self, grace: float = 1.0, timeout: float = 30.0) -> None:
        if self.handle is not None and self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.handle.stop(grace), self.loop).result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> ServerHandle:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BackgroundEdge:
    """The endpoint on its own thread: `with BackgroundEdge(settings, draft) as port: ...`."""

    def __init__(self, settings: EdgeSettings, draft: LoadedModel) -> None:
        self.server = EdgeServer(settings, draft)
        self.thread = threading.Thread(target=self.server.run, name="tandem-edge-http", daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the edge endpoint did not start")
            time.sleep(0.02)
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    def stop(self, timeout: float = 30.0) -> None:
        """As SIGTERM does: the graceful stop, then the thread ends."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __exit__(self, *exc: object) -> None:
        self.stop()
