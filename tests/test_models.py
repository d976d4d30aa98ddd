"""One loader for any causal LM: a local folder, the test pair by name, a hub id (offline: a clear error)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from tandem.drafting import ModelDrafter
from tandem.errors import ModelLoadError
from tandem.local import LocalVerifier
from tandem.models import check_pair, load_model
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import generate_speculative


@pytest.fixture(scope="module")
def local_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("target", 0), ("draft", 1)):
        tiny_model(seed).save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return root / "target", root / "draft"


def test_local_folders_load_and_decode(local_pair: tuple[Path, Path]) -> None:
    target, draft = load_model(str(local_pair[0])), load_model(str(local_pair[1]))
    check_pair(draft, target)
    assert target.model.dtype == torch.float32 and not target.model.training
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ar = generate_autoregressive(target, [5, 6, 7], params)
    spec = generate_speculative(ModelDrafter(draft), LocalVerifier(target), [5, 6, 7], params, 3)
    assert spec.tokens == ar.tokens


def test_missing_folder_or_offline_hub_id_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model")


def test_the_test_pair_loads_by_name() -> None:
    target, draft = load_model("test-target"), load_model("test-draft")
    check_pair(draft, target)
    assert target.tokenizer.decode(target.tokenizer.encode("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"


def test_an_unknown_short_name_lists_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"the short names are qwen2\.5-coder-1\.5b-instruct, .*, test-target, "
                                             "test-draft"):
        load_model("no-such-target")


def test_the_test_pair_outside_a_checkout_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TANDEM_TEST_PAIR", str(tmp_path))  # as an installed package sees it: no test pair there
    with pytest.raises(ModelLoadError, match="exists only in a source checkout"):
        load_model("test-draft")
