"""The device check (`tandem_tools.device_check`) as a CPU smoke run on tiny configs, and the packaged random-model
configs: they load as LlamaConfig with the sizes they state, and a random pair shares one tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tandem import fastlm
from tandem.models import check_pair
from tandem_tools import device_check
from tandem_tools.device_timing import compile_buckets
from tandem_tools.randmodels import RANDOM_MODELS, load_config, param_count, random_model


def _tiny_configs(tmp_path: Path) -> tuple[Path, Path]:
    base = json.loads(RANDOM_MODELS["llama-1b"].read_text())
    target = base | {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                     "max_position_embeddings": 512}
    draft = target | {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    paths = tmp_path / "target.json", tmp_path / "draft.json"
    for path, cfg in zip(paths, (target, draft), strict=True):
        path.write_text(json.dumps(cfg))
    return paths


@pytest.mark.parametrize(("name", "params", "embedding"), [("llama-1b", 1_235_814_400, 262_668_288),
                                                           ("llama-72m", 72_485_376, 65_667_072)])
def test_packaged_configs_state_their_sizes(name: str, params: int, embedding: int) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, LlamaConfig) and cfg.vocab_size == 128256 and cfg.tie_word_embeddings
    assert param_count(cfg) == params and cfg.vocab_size * cfg.hidden_size == embedding
    with torch.device("meta"):  # shapes only: no 1B weights allocated
        model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == params
    assert fastlm.supports(model)
    if name == "llama-1b":
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.head_dim, cfg.intermediate_size) == (2048, 16, 32, 8, 64, 8192)
        assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}


def test_random_pair_shares_a_tokenizer_and_gives_sane_logits(tmp_path: Path) -> None:
    t_path, d_path = _tiny_configs(tmp_path)
    target, draft = random_model(t_path, "bfloat16"), random_model(d_path, seed=1)
    check_pair(draft, target)
    assert target.dtype is torch.bfloat16 and target.n_params == param_count(load_config(t_path))
    logits = target.model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 256) and torch.isfinite(logits).all()


def test_compile_buckets_cover_each_pass() -> None:
    assert compile_buckets([1, 2, 3, 4, 5, 8, 16]) == (1, 2, 3, 4, 5, 8, 16)
    assert compile_buckets([7, 1, 100]) == (1, 8)


@pytest.mark.slow
def test_quick_run_on_cpu_writes_every_section(tmp_path: Path) -> None:
    t_path, d_path = _tiny_configs(tmp_path)
    out = tmp_path / "out"
    device_check.main(["--out", str(out), "--device", "cpu", "--quick", "--target-config", str(t_path),
                       "--draft-config", str(d_path)])
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["device"] == "cpu" and results["environment"]["torch"] == torch.__version__
    secs = results["sections"]
    assert list(secs) == ["bounds", "timing-bfloat16", "capacity-bfloat16", "test-pair-eager", "timing-float32",
                          "capacity-float32"]  # no compiled sections on a CPU unless asked
    assert not [name for name, s in secs.items() if "error" in s or "skipped" in s]
    for d in ("bfloat16", "float32"):
        assert secs["bounds"][d]["bandwidth_gbs"] > 0 and secs["bounds"][d]["matmul_gflops"] > 0
        timing = secs[f"timing-{d}"]
        for path in ("hf-eager", "fast-eager"):
            target, draft = timing[path]["target"], timing[path]["draft"]
            assert set(target["v"]) == {"1", "2", "4"} and target["v"]["1"] == 1.0
            assert target["bandwidth_bound_ms"] > 0 and set(target["compute_bound_ms"]) == {"1", "2", "4"}
            assert timing[path]["c"] == draft["pass_ms"]["1"] / target["pass_ms"]["1"]
        assert set(secs[f"capacity-{d}"]["batches"]) == {"1", "2", "4"}
        assert all(b["tokens_per_s"] > 0 for b in secs[f"capacity-{d}"]["batches"].values())
    pair = secs["test-pair-eager"]
    assert set(pair["modes"]) == {"ar", "spec", "spec-tree"} and pair["prompts_done"] == 2
    assert pair["all_equal_to_target_alone"]  # greedy: both speculative modes reproduce the target alone
    assert pair["modes"]["spec"]["acceptance_rate"] > 0
    summary = (out / "summary.md").read_text()
    assert "| hf-eager |" in summary and "capacity-float32" in summary and "| spec-tree |" in summary
