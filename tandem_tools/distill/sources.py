"""Real documentation text that ships on this machine, used for summarisation/explanation prompts.

Two sources: docstrings of Python standard-library modules and their public functions/classes
(`inspect.getdoc`), and plain-text files under /usr/share/doc (README, NEWS, FAQ, *.txt, *.md, gzipped or not).
Paragraphs are re-flowed (line wraps joined) and kept when they are 200-1200 characters of mostly prose.
Everything is listed in sorted order, so the result is deterministic for a given machine.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

# Modules that are safe and cheap to import (no side effects, no GUI) and have prose docstrings.
_MODULE_NAMES = """
abc argparse array ast asyncio base64 bisect bz2 calendar cmath codecs collections colorsys concurrent.futures
configparser contextlib copy csv ctypes dataclasses datetime decimal difflib dis email enum filecmp fnmatch
fractions ftplib functools gc getopt gettext glob graphlib gzip hashlib heapq hmac html html.parser http.client
http.cookies http.server imaplib importlib inspect io ipaddress itertools json keyword linecache locale logging lzma
mailbox math mimetypes mmap multiprocessing netrc numbers operator optparse os os.path pathlib pickle pickletools
pkgutil platform plistlib poplib pprint profile pstats queue quopri random re reprlib sched secrets selectors shelve
shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess symtable sys
sysconfig tabnanny tarfile tempfile textwrap threading timeit tokenize trace traceback tracemalloc types typing
unicodedata unittest urllib.parse urllib.request uuid warnings weakref wave xml.dom xml.etree.ElementTree xml.sax
zipfile zipimport zlib zoneinfo
"""
STDLIB_MODULES = tuple(_MODULE_NAMES.split())

DOC_ROOT = Path("/usr/share/doc")
DOC_NAME = re.compile(r"^(README|NEWS|FAQ|TODO|HACKING|USAGE|INSTALL|AUTHORS|THANKS)|\.(txt|md|markdown|rst)$", re.I)
SKIP_WORDS = re.compile(r"copyright|warranty|licen[cs]e|all rights reserved|permission is hereby|\bGPL\b", re.I)
MIN_CHARS, MAX_CHARS = 200, 1200


def stdlib_modules() -> Iterator[object]:
    """Import the allow-listed standard-library modules, skipping any that are missing on this build."""
    for name in STDLIB_MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                yield importlib.import_module(name)
            except Exception:
                continue


def reflow(block: str) -> str:
    """Join hard-wrapped lines of one paragraph into a single line with single spaces."""
    return re.sub(r"\s+", " ", block).strip()


def is_prose(text: str) -> bool:
    """Plain prose: right length, mostly letters, sentence punctuation, not code, tables or licence boilerplate."""
    if not MIN_CHARS <= len(text) <= MAX_CHARS or SKIP_WORDS.search(text):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    if letters / len(text) < 0.85 or text.count(". ") + text.endswith(".") < 2:
        return False
    return not re.search(r">>>|\$ |[{}|]{2}|^[-*#=+]|https?://\S{40,}|\t", text)


def paragraphs(text: str, prose_only: bool = True) -> list[str]:
    """Blank-line separated paragraphs of `text`, re-flowed, filtered to prose."""
    blocks = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    out = []
    for block in blocks:
        lines = block.strip("\n").splitlines()
        if any(line.startswith(("    ", ">>>", "|", "```")) for line in lines):
            continue  # code blocks, doctests, tables
        para = reflow(block)
        if not prose_only or is_prose(para):
            out.append(para)
    return out


def docstring_paragraphs() -> list[tuple[str, str]]:
    """(source, paragraph) from stdlib module, class and function docstrings."""
    found: list[tuple[str, str]] = []
    for module in stdlib_modules():
        mname = getattr(module, "__name__", "?")
        objects: list[tuple[str, object]] = [(mname, module)]
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == mname:
                objects.append((f"{mname}.{attr}", obj))
        for source, obj in objects:
            doc = inspect.getdoc(obj) or ""
            found.extend((f"python:{source}", p) for p in paragraphs(doc))
    return found


def read_doc_file(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as handle:
            raw = handle.read(400_000)
    else:
        raw = path.read_bytes()
    return raw[:200_000].decode("utf-8", errors="replace")


def usr_share_doc_paragraphs(root: Path = DOC_ROOT, max_files: int = 2000) -> list[tuple[str, str]]:
    """(source, paragraph) from prose files under /usr/share/doc."""
    found: list[tuple[str, str]] = []
    if not root.is_dir():
        return found
    files = sorted(p for p in root.rglob("*") if p.is_file() and DOC_NAME.search(p.name.removesuffix(".gz")))
    for path in files[:max_files]:
        try:
            text = read_doc_file(path)
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        if "\ufffd" in text or "\x00" in text:
            continue
        rel = path.relative_to(root)
        found.extend((f"doc:{rel}", p) for p in paragraphs(text))
    return found


def documentation_paragraphs() -> list[tuple[str, str]]:
    """All distinct prose paragraphs from both sources, in a deterministic order."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for source, para in docstring_paragraphs() + usr_share_doc_paragraphs():
        if para not in seen:
            seen.add(para)
            out.append((source, para))
    return out


def stdlib_signatures(limit_per_module: int = 12) -> list[tuple[str, str]]:
    """(qualified name, signature) of public stdlib functions that have an inspectable signature and a docstring."""
    out: list[tuple[str, str]] = []
    for module in stdlib_modules():
        mname = getattr(module, "__name__", "?")
        count = 0
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not callable(obj) or inspect.isclass(obj) or not inspect.getdoc(obj):
                continue
            sig = _signature(obj)
            if sig is None:
                continue
            out.append((f"{mname}.{attr}", sig))
            count += 1
            if count >= limit_per_module:
                break
    return out


def _signature(obj: Callable[..., object]) -> str | None:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return None
    return sig if len(sig) <= 120 else None
