"""The test pair's corpus: the running interpreter's standard library `.py` sources, tests excluded.

The split is by file and fixed by a hash of the file's path relative to the stdlib root, so it is the same on
every machine; `tests/fixtures/test_pair/files.json` records the exact list the test pair was trained on.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELDOUT_MODULUS = 20  # about 5% of files held out
_EXCLUDED_TOP = {"site-packages", "test", "idlelib", "turtledemo", "lib2to3"}
_EXCLUDED_PARTS = {"test", "tests", "idle_test"}


@dataclass(frozen=True)
class CorpusFile:
    path: str  # relative to the stdlib root, POSIX separators
    sha256: str
    n_bytes: int
    split: str  # "train" | "heldout"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(rel_path: str) -> str:
    digest = hashlib.sha1(rel_path.encode()).digest()
    return "heldout" if int.from_bytes(digest[:4], "big") % HELDOUT_MODULUS == 0 else "train"


def list_corpus(root: Path | None = None) -> list[CorpusFile]:
    root = root or stdlib_root()
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if rel.parts[0] in _EXCLUDED_TOP or _EXCLUDED_PARTS.intersection(rel.parts) or rel.name.startswith("test_"):
            continue
        data = p.read_bytes()
        rel_s = rel.as_posix()
        files.append(CorpusFile(rel_s, hashlib.sha256(data).hexdigest(), len(data), split_of(rel_s)))
    return files


def read_texts(files: list[CorpusFile], split: str, root: Path | None = None) -> list[str]:
    root = root or stdlib_root()
    return [
        (root / f.path).read_text(encoding="utf-8", errors="replace") for f in files if f.split == split
    ]


def heldout_prompts(
    n: int, prompt_tokens: int, tokenizer, files: list[CorpusFile] | None = None, root: Path | None = None
) -> list[list[int]]:
    """Deterministic prompts cut from held-out files: `n` windows of `prompt_tokens` tokens, spread over the files."""
    files = files if files is not None else list_corpus(root)
    texts = read_texts(files, "heldout", root)
    ids = [tokenizer.encode(t) for t in texts]
    ids = [x for x in ids if len(x) > prompt_tokens + 64]
    prompts: list[list[int]] = []
    i = 0
    while len(prompts) < n and ids:
        doc = ids[i % len(ids)]
        # walk through each document on successive passes
        k = i // len(ids)
        start = min(len(doc) - prompt_tokens - 1, (k * 997 + 31) % max(1, len(doc) - prompt_tokens))
        prompts.append(doc[start : start + prompt_tokens])
        i += 1
    return prompts
