"""Model loading: local directories only, dtypes, tiny models from real configs, new-token rows at the mean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftkit.checkpoint import save_tiny_model
from sftkit.config import ModelConfig
from sftkit.data.templates import prepare_tokenizer
from sftkit.model import (
    ModelError,
    build_tiny_model,
    count_parameters,
    init_new_token_rows,
    load_model,
    resolve_dtype,
)
from tests.conftest import config_path, tokenizer_dir

CPU = torch.device("cpu")


@pytest.mark.parametrize(("arch", "family"), [("qwen2", "qwen2.5"), ("llama3.2", "llama3.2"), ("gpt2", "gpt2")])
def test_tiny_model_from_real_config(arch: str, family: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(family))
    model = build_tiny_model(config_path(arch), tokenizer, layers=2, hidden=64, heads=4, kv_heads=2)
    real = json.loads(config_path(arch).read_text())
    assert model.config.model_type == real["model_type"]
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), 64)
    assert model.config.vocab_size == len(tokenizer)
    assert model.dtype == torch.float32
    assert count_parameters(model)[1] < 15_000_000
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(tokenizer))
    if arch == "llama3.2":
        assert model.config.rope_parameters["rope_type"] == "llama3"  # rope scaling kept from the real config


def test_tiny_qwen3_shrinks_layer_types() -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))
    model = build_tiny_model(config_path("qwen3"), tokenizer, layers=2)
    assert model.config.num_hidden_layers == 2 and len(model.config.layer_types) == 2


def test_same_seed_same_weights() -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("gpt2"))
    a = build_tiny_model(config_path("gpt2"), tokenizer, seed=3)
    b = build_tiny_model(config_path("gpt2"), tokenizer, seed=3)
    assert torch.equal(a.get_input_embeddings().weight, b.get_input_embeddings().weight)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(config_path("gpt2"), tokenizer_dir("gpt2"), tmp_path_factory.mktemp("tiny") / "gpt2")


def test_saved_tiny_model_loads_with_plain_transformers(tiny_dir: Path) -> None:
    assert (tiny_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.n_layer == 2 and len(AutoTokenizer.from_pretrained(tiny_dir)) == model.config.vocab_size


def test_load_model_dtype_and_template(tiny_dir: Path) -> None:
    model, tokenizer, added = load_model(ModelConfig(path=str(tiny_dir)), template="chatml", device=CPU)
    assert model.dtype == torch.float32  # auto on CPU
    assert added == ["<|im_start|>", "<|im_end|>"] and tokenizer.chat_template
    bf16, _, _ = load_model(ModelConfig(path=str(tiny_dir), dtype="bfloat16"), template="chatml", device=CPU)
    assert bf16.dtype == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_local_directories_only(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="loads local directories only.*looks like a hub id"):
        load_model(ModelConfig(path="Qwen/Qwen2.5-0.5B-Instruct"), device=CPU)
    with pytest.raises(ModelError, match="is not a directory — sftkit loads local directories only"):
        load_model(ModelConfig(path=str(tmp_path / "nope")), device=CPU)
    with pytest.raises(ModelError, match="no config.json"):
        load_model(ModelConfig(path=str(tmp_path)), device=CPU)


def test_no_safetensors_is_an_error(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(config_path("qwen2").read_text())
    with pytest.raises(ModelError, match="no \\*.safetensors weights"):
        load_model(ModelConfig(path=str(tmp_path)), device=CPU)


@pytest.mark.parametrize("tied", [True, False])
def test_new_tokens_resize_to_the_mean(tied: bool) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("gpt2"))
    model = build_tiny_model(config_path("qwen2"), tokenizer, overrides={"tie_word_embeddings": tied})
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    added = prepare_tokenizer(tokenizer, "chatml")
    assert added == ["<|im_start|>", "<|im_end|>"]
    new_ids = init_new_token_rows(model, tokenizer, added)
    assert new_ids == [len(tokenizer) - 2, len(tokenizer) - 1] == tokenizer.convert_tokens_to_ids(added)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(tokenizer) == old_in.shape[0] + 2
    assert (emb.data_ptr() == head.data_ptr()) is tied
    torch.testing.assert_close(emb[: old_in.shape[0]], old_in, rtol=0, atol=0)  # old rows untouched
    for row in new_ids:
        torch.testing.assert_close(emb[row], old_in.mean(dim=0), rtol=0, atol=1e-7)
        torch.testing.assert_close(head[row], old_out.mean(dim=0), rtol=0, atol=1e-7)


def test_a_local_path_is_not_called_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as err:
        load_model(ModelConfig(path="models/Qwen2.5-0.5B-Instruct"), device=CPU)
    assert "hub id" not in str(err.value) and "`hf download OWNER/NAME --local-dir models/Qwen2.5-0.5B-Instruct`" in str(
        err.value)
    with pytest.raises(ModelError, match="`hf download Qwen/Qwen2.5-0.5B-Instruct --local-dir models/"):
        load_model(ModelConfig(path="Qwen/Qwen2.5-0.5B-Instruct"), device=CPU)
