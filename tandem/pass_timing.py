"""What one target pass costs on this machine, timed: the cloud's start-up prior for its cost curve, and the
roofline benchmark's pass times."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import torch

from tandem.models import LoadedModel


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_s(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def pass_times(model: LoadedModel, positions: Iterable[int], context: int = 128, repeats: int = 9,
               warmup: int = 2) -> dict[int, float]:
    """Median seconds of one pass over n new positions after `context` cached ones, for each n."""
    vocab = min(model.vocab_size, 30000)
    prompt = [(17 * i + 5) % (vocab - 10) + 5 for i in range(context)]
    state = model.state(prompt)
    state.run(prompt)
    out = {}
    for n in positions:
        feed = [(31 * i + 7) % (vocab - 10) + 5 for i in range(n)]

        def one(feed: list[int] = feed) -> None:
            state.run(feed)
            state.rollback(context)

        out[n] = median_s(one, model.device, repeats, warmup)
    return out
