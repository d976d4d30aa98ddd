"""`tandem demo`: the demo pair end to end on the real path — a cloud server on free loopback ports holding the
target, the edge client drafting here and verifying there — with the cloud-only mode and the target alone measured
in the same run."""

from __future__ import annotations

import torch
from rich.console import Console

from tandem.config import CoreSettings
from tandem.models import check_pair, load_model
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem_tools.train.data import heldout_prompts


def run_demo(settings: CoreSettings, prompt: str | None, max_tokens: int, console: Console | None = None) -> None:
    # transports load here, not at import: the core stays transport-free
    from cloud_server.main import BackgroundServer
    from cloud_server.settings import ServerSettings
    from edge_client.client import EdgeClient
    from edge_client.settings import EdgeSettings

    console = console or Console()
    torch.set_num_threads(settings.threads)
    target, draft = load_model(settings.target), load_model(settings.draft)
    check_pair(draft, target)
    tok = target.tokenizer
    ids = tok.encode(prompt) if prompt else heldout_prompts(1, 96, tok)[0]
    params = SamplingParams(max_tokens=max_tokens)
    server = BackgroundServer(ServerSettings(target=settings.target, http_port=0, grpc_port=0,
                                             threads=settings.threads, max_draft_tokens=64), target)
    with server as handle:
        edge = EdgeSettings(cloud=f"127.0.0.1:{handle.grpc_port}", transport="grpc", draft=settings.draft,
                            gamma=settings.gamma, threads=settings.threads, retries=0)
        client = EdgeClient(edge, draft)
        console.print(
            f"[bold]tandem demo[/bold]: target {target.name} ({target.n_params / 1e6:.1f}M params) in a cloud server "
            f"on 127.0.0.1:{handle.grpc_port} (gRPC), draft {draft.name} ({draft.n_params / 1e6:.1f}M) on the edge, "
            f"gamma {settings.gamma}, greedy, torch threads {torch.get_num_threads()}"
        )
        console.rule("prompt")
        console.print(tok.decode(ids), markup=False, highlight=False)
        console.rule("completion (speculative: the edge drafts, the cloud verifies)")

        def show(new: list[int]) -> None:
            console.print(tok.decode(new), end="", markup=False, highlight=False, soft_wrap=True)

        client.generate(ids[:8], SamplingParams(max_tokens=4))  # warm-up, not timed
        client.generate(ids[:8], SamplingParams(max_tokens=4), mode="cloud")
        spec = client.generate(ids, params, on_tokens=show)
        console.print()
        cloud = client.generate(ids, params, mode="cloud")
    ar = generate_autoregressive(target, ids, params)
    s = spec.stats
    rate = s.tokens / s.wall_s
    cloud_rate = cloud.stats.tokens / cloud.stats.wall_s
    console.rule("figures (measured in this run)")
    console.print(f"tokens generated        {s.tokens} ({spec.finish_reason})")
    acceptance = s.accepted / s.drafted if s.drafted else 0.0
    console.print(f"acceptance rate         {acceptance:.3f} ({s.accepted}/{s.drafted} drafted tokens)")
    console.print(f"tokens per target pass  {s.tokens / max(s.target_passes, 1):.2f} (target alone: 1.00)")
    console.print(f"speculative (edge+cloud) {rate:.1f} tok/s, ttft {s.ttft_s * 1e3:.0f} ms")
    console.print(f"cloud-only mode         {cloud_rate:.1f} tok/s, ttft {cloud.stats.ttft_s * 1e3:.0f} ms")
    console.print(f"target alone            {ar.stats.tokens_per_s:.1f} tok/s (in process, no network)")
    console.print(f"speedup                 {rate / ar.stats.tokens_per_s:.2f}x over the target alone")
    console.print(f"speedup vs cloud-only   {rate / cloud_rate:.2f}x")
    same = spec.tokens == ar.tokens == cloud.tokens
    console.print(f"output vs target alone  {'identical' if same else 'DIFFERENT (a bug: please report it)'}")
