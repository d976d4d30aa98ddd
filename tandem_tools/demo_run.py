"""`tandem demo`: a pair end to end on the real path (`tandem serve` in its own process, the edge client here over
gRPC), streaming the answer as it is accepted, then each mode against cloud-only in this run. `run_web`: the same
cloud and edge behind the chat page.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from tandem.config import CoreSettings
from tandem.models import LoadedModel, load_draft
from tandem.sampling import SamplingParams
from tandem.speculate import SpeculativeDecoder
from tandem.stats import GenerationResult
from tandem_tools.procs import CloudProcess, free_port

QUESTION = "Why is the sky blue? Answer in a few sentences."
MODES = ("spec", "auto", "cloud")  # any can be streamed first


@contextlib.contextmanager
def cloud_loading(settings: CoreSettings, console: Console,
                  draft_line: Callable[[LoadedModel], str]) -> Iterator[tuple[CloudProcess, LoadedModel]]:
    """`tandem serve` started, loading on its own core while the draft loads here (a first run converts both models:
    in parallel, not one after the other), `draft_line(draft)` printed, then ready; stopped on the way out."""
    cloud = CloudProcess(threads=settings.threads, env=cloud_env(settings), ready_timeout_s=600).spawn()
    try:
        draft = load_draft(settings.draft, settings, settings.threads)
        console.print(draft_line(draft) + "; waiting for the cloud")
        yield cloud.wait(), draft
    finally:
        cloud.stop()


@dataclass(frozen=True)
class DemoRun:
    mode: str
    result: GenerationResult

    @property
    def rate(self) -> float:
        return self.result.stats.tokens / self.result.stats.wall_s if self.result.stats.wall_s else 0.0


def demo_prompt(draft: LoadedModel, prompt: str | None) -> list[int]:
    from tandem_protocol.openai_api.text import chat_prompt, encode
    from tandem_tools.train.data import heldout_prompts

    if getattr(draft.tokenizer, "chat_template", None):
        return chat_prompt(draft.tokenizer, [{"role": "user", "content": prompt or QUESTION}])
    return encode(draft.tokenizer, prompt) if prompt else heldout_prompts(1, 96, draft.tokenizer)[0]


def cloud_env(settings: CoreSettings) -> dict[str, str]:
    """`tandem serve`'s settings for the demo's cloud process."""
    return {"TANDEM_TARGET": settings.target, "TANDEM_MAX_DRAFT_TOKENS": "64", "TANDEM_DEVICE": settings.device,
            "TANDEM_DTYPE": settings.dtype, "TANDEM_EXACT_PASSES": settings.exact_passes,
            "TANDEM_COMPILE": str(settings.compile).lower(),
            "TANDEM_COMPILE_SIZES": ",".join(map(str, settings.compile_sizes))}


def run_demo(settings: CoreSettings, prompt: str | None, max_tokens: int, mode: str = MODES[0],
             console: Console | None = None) -> list[DemoRun]:
    # transports load here, not at import: `tandem --help` loads no server
    from edge_client.client import edge_decoder
    from edge_client.settings import EdgeSettings

    console = console or Console()
    torch.set_num_threads(settings.threads)
    console.print(f"[bold]tandem demo[/bold]: starting `tandem serve` with {settings.target} in its own process "
                  f"({settings.threads} torch thread)")
    runs: list[DemoRun] = []
    with cloud_loading(settings, console, lambda d: f"the draft {d.name} ({d.n_params / 1e6:.1f}M params) runs here "
                       f"on {d.backend} ({settings.threads} thread)") as (cloud, draft):
        ids = demo_prompt(draft, prompt)
        params = SamplingParams(max_tokens=max_tokens)

        def client(m: str) -> SpeculativeDecoder:
            edge = EdgeSettings(cloud=cloud.grpc_target, transport="grpc", draft=settings.draft, gamma=settings.gamma,
                                threads=settings.threads, retries=0)
            return edge_decoder(edge, draft)

        order = [mode, *(m for m in MODES if m != mode)]
        clients = {m: client(m) for m in order}
        for m, c in clients.items():  # warm-up, not timed: connections, first-call allocations
            c.generate(ids[:16], SamplingParams(max_tokens=4), mode="cloud" if m == "cloud" else "spec")
        console.rule("prompt")
        console.print(draft.tokenizer.decode(ids), markup=False, highlight=False)
        console.rule(f"answer ({mode}: streamed as the cloud accepts it)")

        def show(new: list[int]) -> None:
            console.print(draft.tokenizer.decode(new), end="", markup=False, highlight=False, soft_wrap=True)

        for m in order:
            spec_mode = {"cloud": "cloud", "auto": "auto"}.get(m, "spec")
            result = clients[m].generate(ids, params, on_tokens=show if m == mode else None, mode=spec_mode)
            runs.append(DemoRun(m, result))
            if m == mode:
                console.print()
    report(console, runs)
    return runs


def report(console: Console, runs: list[DemoRun]) -> None:
    """Every mode against cloud-only: the target alone, one pass a token, in the same cloud and run."""
    alone = next(r for r in runs if r.mode == "cloud")
    table = Table("mode", "tok/s", "vs cloud-only", "acceptance", "tokens / target pass", "== cloud-only",
                  title="this run, greedy (ratios side by side, same prompt)")
    for r in runs:
        s = r.result.stats
        acc = f"{s.acceptance_rate:.3f}" if s.drafted else "-"
        same = "yes" if r.result.tokens == alone.result.tokens else "NO (a bug)"
        table.add_row(r.mode, f"{r.rate:.1f}", f"{r.rate / alone.rate:.2f}x" if alone.rate else "-", acc,
                      f"{s.tokens_per_target_pass:.2f}", same)
    console.print(table)
    best = max(runs, key=lambda r: r.rate)
    console.print(f"fastest here: {best.mode}, {best.rate / alone.rate:.2f}x cloud-only (the target alone)"
                  if alone.rate else f"fastest here: {best.mode}")


def run_web(settings: CoreSettings, port: int = 8001, console: Console | None = None) -> None:
    """`tandem demo --web`: `tandem serve` in its own process, the edge's endpoint here serving the chat page at `/`
    (each token marked by where it came from, a cloud-only rerun beside it); both run until Ctrl-C."""
    import socket

    from edge_client.http_app import EdgeServer
    from edge_client.settings import EdgeSettings

    console = console or Console()
    port = port or free_port()
    with socket.socket() as s:  # a clear error now, not after the models load
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise SystemExit(f"port {port} is taken ({e}); choose another with --port (0: a free one)") from None
    torch.set_num_threads(settings.threads)
    console.print(f"[bold]tandem demo --web[/bold]: starting `tandem serve` with {settings.target} in its own process")
    with cloud_loading(settings, console, lambda d: f"the draft {d.name} runs here") as (cloud, draft):
        edge = EdgeSettings(cloud=cloud.grpc_target, transport="grpc", draft=settings.draft, gamma=settings.gamma,
                            threads=settings.threads, port=port)
        server = EdgeServer(edge, draft)

        def announce() -> None:  # the address once the edge accepts connections, not before
            while not server.started and not server.should_exit:
                time.sleep(0.05)
            if server.started:
                console.print(f"open [bold]http://127.0.0.1:{port}/[/bold] (the edge: speculative). The cloud's own "
                              f"page, cloud-only: {cloud.http_url}/. Ctrl-C stops both.", highlight=False)

        threading.Thread(target=announce, name="announce", daemon=True).start()
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn stops gracefully, then raises the signal again
            server.run()
    console.print("stopped")
