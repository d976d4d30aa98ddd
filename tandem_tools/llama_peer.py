"""llama.cpp's own server, in process, from the prebuilt `xllamacpp` wheel: the peer that `bench local` and `bench
replay` run as modes `llama-server` and `llama-server-spec` (`tandem_tools.llama_server`). Nothing is built.

    python -m tandem_tools.llama_peer -m target.gguf --port 8080 -t 2 -c 1024 [-md draft.gguf --spec-draft-n-max 16]

The flags are llama-server's own (`--help`), each set on the wheel's `CommonParams` field as llama.cpp's argument
parser sets it; it serves until SIGTERM or SIGINT, then exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tandem import llama_lib
from tandem.llama_lib import VERSION, WHEEL

MODULE = "tandem_tools.llama_peer"


def problem() -> str:
    """Why the wheel cannot serve here, in one sentence; '' where it can. Checked without loading it."""
    try:
        llama_lib.check_machine()
        llama_lib.shared_object()
    except llama_lib.LlamaLibError as e:
        return str(e).removeprefix("llama.cpp runtime: ")
    return ""


def program() -> tuple[list[str] | None, str]:
    """How the peer starts, or why it cannot: `$TANDEM_LLAMA_SERVER` (one's own llama-server binary) when set, else
    this Python running this module where the wheel can serve; `(None, reason)` otherwise."""
    if explicit := os.environ.get("TANDEM_LLAMA_SERVER"):
        if Path(explicit).is_file() and os.access(explicit, os.X_OK):
            return [explicit], ""
        return None, f"TANDEM_LLAMA_SERVER={explicit} is not an executable file"
    if why := problem():
        return None, f"the llama-server peer cannot run: {why}; or set TANDEM_LLAMA_SERVER to a llama-server binary"
    return [sys.executable, "-m", MODULE], ""


def describe(prog: Sequence[str] | None = None) -> str:
    """What serves: the wheel and its llama.cpp build, or one's own binary."""
    if prog is not None and list(prog[1:]) != ["-m", MODULE]:
        return "one's own llama-server binary (TANDEM_LLAMA_SERVER)"
    version = llama_lib.installed_version()
    return f"{WHEEL} {version}" + (f" (llama.cpp {llama_lib.BUILD})" if version == VERSION else "")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tandem_tools.llama_peer", allow_abbrev=False,
                                 description="llama.cpp's server from the xllamacpp wheel, with llama-server's flags")
    add = ap.add_argument
    add("-m", "--model", required=True, help="the GGUF file")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8080, help="0: any free port")
    add("-t", "--threads", type=int, default=None, help="generation threads (default: the math cores)")
    add("-tb", "--threads-batch", type=int, default=None, help="prompt threads (default: --threads)")
    add("-c", "--ctx-size", "--ctx", type=int, default=0, help="context size (0: the model's)")
    add("-b", "--batch-size", type=int, default=None)
    add("-ub", "--ubatch-size", type=int, default=None)
    add("-np", "--parallel", type=int, default=1, help="slots (llama-server's default is auto)")
    add("-cram", "--cache-ram", type=int, default=None, help="prompt cache MiB (0: off, -1: no limit)")
    add("--cache-prompt", action=argparse.BooleanOptionalAction, default=None)
    add("--webui", "--ui", action=argparse.BooleanOptionalAction, default=False)
    add("-md", "--model-draft", "--spec-draft-model", "--draft", default=None, help="the draft GGUF file")
    add("-td", "--threads-draft", "--spec-draft-threads", "--draft-threads", type=int, default=None)
    add("-tbd", "--threads-batch-draft", "--spec-draft-threads-batch", type=int, default=None)
    add("--spec-type", default=None, help="comma-separated (default with a draft: draft-simple)")
    add("--spec-draft-n-max", "--spec-n-max", type=int, default=None)
    add("--spec-draft-n-min", "--spec-n-min", type=int, default=None)
    add("--spec-draft-p-min", "--draft-p-min", "--spec-p-min", type=float, default=None)
    add("--spec-draft-p-split", "--draft-p-split", type=float, default=None)
    add("-lv", "--verbosity", type=int, default=None)
    return ap


def _threads(n: int | None) -> int | None:
    return None if n is None else (n if n > 0 else os.cpu_count() or 1)  # as llama.cpp's parser does for <= 0


def common_params(args: argparse.Namespace) -> Any:
    """`xllamacpp.CommonParams` set from the flags as llama.cpp's `common/arg.cpp` sets `common_params`."""
    import xllamacpp as xl

    p = xl.CommonParams()
    p.model.path = args.model
    p.hostnames = [h.strip() for h in args.host.split(",") if h.strip()]
    p.port = args.port
    p.n_ctx = args.ctx_size
    if args.ctx_size == 0:
        p.fit_params_min_ctx = -1  # -c 0: the model's full context, not reduced to fit (UINT32_MAX in an int32)
    p.n_parallel = args.parallel
    p.ui = args.webui
    fields = {"batch_size": "n_batch", "ubatch_size": "n_ubatch", "cache_ram": "cache_ram_mib",
              "cache_prompt": "cache_prompt", "verbosity": "verbosity"}
    for name, field in fields.items():
        if getattr(args, name) is not None:
            setattr(p, field, getattr(args, name))
    spec = p.speculative
    if args.spec_type is not None or args.model_draft:
        names = (args.spec_type or "draft-simple").split(",")
        try:
            types = [xl.common_speculative_type["COMMON_SPECULATIVE_TYPE_" + n.strip().upper().replace("-", "_")]
                     for n in names]
        except KeyError as e:
            raise SystemExit(f"unknown speculative type in --spec-type {args.spec_type}") from e
        none = xl.common_speculative_type.COMMON_SPECULATIVE_TYPE_NONE
        spec.types = [none] if none in types else types
    draft = spec.draft
    if args.model_draft:
        draft.mparams.path = args.model_draft
    for cpu, n in ((p.cpuparams, args.threads), (p.cpuparams_batch, args.threads_batch),
                   (draft.cpuparams, args.threads_draft), (draft.cpuparams_batch, args.threads_batch_draft)):
        if (t := _threads(n)) is not None:
            cpu.n_threads = t
    for name in ("n_max", "n_min", "p_min", "p_split"):
        if (value := getattr(args, "spec_draft_" + name)) is not None:
            setattr(draft, name, value)
    return p


def serve(args: argparse.Namespace) -> int:
    """Start the server, serve until SIGTERM or SIGINT, stop it."""
    import xllamacpp as xl

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = xl.Server(common_params(args))  # returns once the model is loaded and the server listens
    except (RuntimeError, ValueError) as e:
        sys.stderr.write(f"llama_peer: the server did not start: {e}\n")
        return 1
    sys.stderr.write(f"llama_peer: {describe()} serving {args.model} at {server.listening_address}\n")
    sys.stderr.flush()
    while not stop.wait(0.5):  # a timed wait: the handler runs on this thread between waits
        pass
    del server  # its destructor ends the server's loop and joins its thread
    sys.stderr.write("llama_peer: stopped\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if why := problem():
        sys.stderr.write(f"llama_peer: {why}\n")
        return 1
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
