"""`tandem demo`: the demo pair end to end, in this process, with the target alone measured in the same run."""

from __future__ import annotations

import torch
from rich.console import Console

from tandem.config import CoreSettings
from tandem.engine import LocalVerifier, ModelDrafter, generate_autoregressive, generate_speculative
from tandem.models import check_pair, load_model
from tandem.sampling import SamplingParams
from tandem.train.data import heldout_prompts


def run_demo(settings: CoreSettings, prompt: str | None, max_tokens: int, console: Console | None = None) -> None:
    console = console or Console()
    torch.set_num_threads(settings.threads)
    target, draft = load_model(settings.target), load_model(settings.draft)
    check_pair(draft, target)
    tok = target.tokenizer
    ids = tok.encode(prompt) if prompt else heldout_prompts(1, 96, tok)[0]
    params = SamplingParams(max_tokens=max_tokens)
    console.print(
        f"[bold]tandem demo[/bold]: target {target.name} ({target.n_params / 1e6:.1f}M params), draft {draft.name} "
        f"({draft.n_params / 1e6:.1f}M), gamma {settings.gamma}, greedy, torch threads {torch.get_num_threads()}"
    )
    console.rule("prompt")
    console.print(tok.decode(ids), markup=False, highlight=False)
    console.rule("completion (speculative: draft proposes, target verifies)")

    def show(new: list[int]) -> None:
        console.print(tok.decode(new), end="", markup=False, highlight=False, soft_wrap=True)

    generate_autoregressive(target, ids[:8], SamplingParams(max_tokens=2))  # warm-up, not timed
    spec = generate_speculative(ModelDrafter(draft), LocalVerifier(target), ids, params, settings.gamma, on_tokens=show)
    console.print()
    ar = generate_autoregressive(target, ids, params)
    s = spec.stats
    console.rule("figures (measured in this run)")
    console.print(f"tokens generated        {s.tokens} ({spec.finish_reason})")
    console.print(f"acceptance rate         {s.acceptance_rate:.3f} ({s.accepted}/{s.drafted} drafted tokens)")
    console.print(f"tokens per target pass  {s.tokens_per_target_pass:.2f} (target alone: 1.00)")
    console.print(f"speculative             {s.tokens_per_s:.1f} tok/s")
    console.print(f"target alone            {ar.stats.tokens_per_s:.1f} tok/s")
    console.print(f"speedup                 {s.tokens_per_s / ar.stats.tokens_per_s:.2f}x")
    same = "identical" if spec.tokens == ar.tokens else "DIFFERENT (a bug: please report it)"
    console.print(f"output vs target alone  {same}")
