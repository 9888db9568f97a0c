"""Artefacts that load anywhere: tokenizers for transformers 4.5x and 5.x, adapters that stop, file modes.

The slow test builds a second environment with transformers 4.57 (pip, from the package registry,
into a cache folder put first on PYTHONPATH; torch and the rest come from this venv) and loads a
sftkit-written final/ there.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
)

from sftkit.checkpoint import save_model, save_tiny_model
from sftkit.cli import main
from sftkit.data.templates import end_of_turn_token_ids, prepare_tokenizer
from sftkit.model import load_tokenizer
from sftkit.portable import save_tokenizer
from sftkit.recipe import load_config
from tests.conftest import ASSETS, SHARED_DATA, config_path, tokenizer_dir

CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour <|im_end|>."}]


def chat_ids(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def saved_tokenizers() -> list[str]:
    """Every shared tokenizer that has a chat template (or the committed ones), and GPT-2 with ChatML added."""
    root = SHARED_DATA / "tokenizers" if (SHARED_DATA / "tokenizers").is_dir() else ASSETS / "tokenizers"
    return sorted(p.name for p in root.iterdir()) + ["gpt2+chatml"]


def load_source(name: str):
    if name == "gpt2+chatml":
        tokenizer = load_tokenizer(tokenizer_dir("gpt2"))
        prepare_tokenizer(tokenizer, "chatml")
        return tokenizer
    return load_tokenizer(tokenizer_dir(name))


@pytest.mark.parametrize("name", saved_tokenizers())
def test_saved_tokenizer_config_is_portable_and_reloads_the_same(name: str, tmp_path: Path) -> None:
    source = load_source(name)
    save_tokenizer(source, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] != "TokenizersBackend"  # a name transformers 4.x does not know
    assert not isinstance(config.get("extra_special_tokens"), list)  # 4.x wants a mapping there
    assert "local_files_only" not in config and "is_local" not in config
    plain, full = source("a", add_special_tokens=False)["input_ids"], source("a")["input_ids"]
    assert config["add_bos_token"] == (full[:1] == [source.bos_token_id] and len(full) > len(plain))

    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again.chat_template == source.chat_template
    assert again.all_special_tokens == source.all_special_tokens and len(again) == len(source)
    assert again.get_added_vocab() == source.get_added_vocab()
    assert again("Hello world <|im_end|>")["input_ids"] == source("Hello world <|im_end|>")["input_ids"]
    if source.chat_template:
        assert chat_ids(again) == chat_ids(source)


def test_llama3_tokenizer_class_is_one_transformers_4_knows(tmp_path: Path) -> None:
    """Llama-3's tokenizer loads in 5.x as TokenizersBackend; 4.x knows it as PreTrainedTokenizerFast."""
    source = load_tokenizer(tokenizer_dir("llama3.2"))
    save_tokenizer(source, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


# -- final/ under transformers 4.57 (slow: a second environment) --------------------------------
LOAD_IN_4X = r"""
import json, sys
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)
ids = tokenizer.apply_chat_template(json.loads(sys.argv[2]), tokenize=True, add_generation_prompt=True)
ids = list(ids if isinstance(ids, list) else ids["input_ids"])
print(json.dumps({"version": transformers.__version__, "ids": ids, "class": type(tokenizer).__name__,
                  "eos": GenerationConfig.from_pretrained(sys.argv[1]).eos_token_id,
                  "vocab": model.get_input_embeddings().weight.shape[0]}))
"""


@pytest.fixture(scope="module")
def transformers_457(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """transformers 4.57 (+ the tokenizers and huggingface_hub it accepts) in a folder for PYTHONPATH."""
    cache = Path(os.environ.get("SFTKIT_TF4_DIR", Path.home() / ".cache" / "sftkit-tests" / "transformers-4.57"))
    if not (cache / "transformers").is_dir():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(cache),
             "transformers==4.57.*", "tokenizers>=0.22,<=0.23.0", "huggingface_hub>=0.34,<1.0"],
            check=False, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"could not install transformers 4.57 from the package registry: {done.stderr[-500:]}")
    return cache


@pytest.mark.slow
@pytest.mark.parametrize("family,template", [("qwen2.5", None), ("llama3.2", None), ("gpt2", "chatml")])
def test_final_dir_loads_under_transformers_4(family: str, template: str | None, transformers_457: Path,
                                              tmp_path: Path) -> None:
    model_dir = save_tiny_model(config_path("qwen2"), tokenizer_dir(family), tmp_path / "base",
                                layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)
    overrides = [f"model.path={model_dir}", "data.train=x.jsonl", f"output_dir={tmp_path / 'run'}"]
    config = load_config(None, overrides + ([f"data.template={template}"] if template else []))
    tokenizer = load_tokenizer(model_dir)
    prepare_tokenizer(tokenizer, template)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(len(tokenizer))
    final = save_model(config.output_dir, "final", model, tokenizer, end_of_turn_token_ids(tokenizer), config)

    env = {**os.environ, "PYTHONPATH": str(transformers_457), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD_IN_4X, str(final), json.dumps(CHAT)],
                          check=False, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    old = json.loads(done.stdout.strip().splitlines()[-1])
    assert old["version"].startswith("4.57.")
    again = AutoTokenizer.from_pretrained(final)
    assert old["ids"] == chat_ids(again) == chat_ids(tokenizer)
    assert old["vocab"] == len(tokenizer)
    assert end_of_turn_token_ids(tokenizer)[0] in old["eos"]


# -- LoRA adapter directories stop at the end of the turn ---------------------------------------
class ForceTokens(LogitsProcessor):
    """Make the model emit `tokens` in order, whatever its weights say."""

    def __init__(self, tokens: list[int], prompt_length: int) -> None:
        self.tokens, self.prompt_length = tokens, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[min(step, len(self.tokens) - 1)]] = 0.0
        return forced


def test_lora_adapter_dir_stops_at_end_of_turn_under_plain_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = save_tiny_model(config_path("gpt2"), tokenizer_dir("gpt2"), tmp_path / "base",
                           layers=1, hidden=32, heads=2, intermediate=64)
    config = load_config(None, [f"model.path={base}", "data.train=x.jsonl", "data.template=chatml",
                                "lora.enabled=true", f"output_dir={tmp_path / 'run'}"])
    tokenizer = load_tokenizer(base)
    added = prepare_tokenizer(tokenizer, "chatml")
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer))
    from sftkit.lora import peft_config

    model = peft.get_peft_model(model, peft_config(config.lora, model, added))
    model.peft_config["default"].base_model_name_or_path = str(base)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    adapter = save_model(config.output_dir, "final", model, tokenizer, end_of_turn_token_ids(tokenizer), config)

    generation = GenerationConfig.from_pretrained(adapter)
    assert im_end in generation.eos_token_id and tokenizer.eos_token_id in generation.eos_token_id
    assert "GenerationConfig.from_pretrained(ADAPTER_DIR)" in (adapter / "README.md").read_text()

    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    prompt = torch.tensor([chat_ids(tokenizer)])
    words = tokenizer.encode(" blue green")
    force = ForceTokens(words + [im_end] + words, prompt.shape[1])
    out = loaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                          do_sample=False, logits_processor=[force], generation_config=generation)
    assert out[0, prompt.shape[1]:].tolist() == words + [im_end]  # stopped at the end of the turn


# -- file modes follow the umask ----------------------------------------------------------------
@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600)])
def test_clean_outputs_follow_the_umask(mask: int, expected: int, tmp_path: Path) -> None:
    for name in ("chat_messages.jsonl", "identity_alpaca.json", "chat_messages.parquet"):
        out = tmp_path / "clean" / name
        with umask(mask):
            assert main(["data", "clean", str(ASSETS / "data" / name), "--out", str(out)]) == 0
        written = [out, out.with_name(out.name + ".report.md"), out.with_name(out.name + ".report.json")]
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {
            p.name: oct(expected) for p in written}


def test_clean_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    out = tmp_path / "train.clean.jsonl"
    out.write_text("old\n")
    out.chmod(0o640)
    with umask(0o022):
        assert main(["data", "clean", str(ASSETS / "data" / "chat_messages.jsonl"), "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and out.read_text() != "old\n"


def test_model_directories_follow_the_umask(tmp_path: Path) -> None:
    """Every file of final/ and of a tiny model (safetensors writes through a 0600 temporary file)."""
    with umask(0o027):
        base = save_tiny_model(config_path("gpt2"), tokenizer_dir("gpt2"), tmp_path / "base",
                               layers=1, hidden=32, heads=2, intermediate=64)
        config = load_config(None, [f"model.path={base}", "data.train=x.jsonl", f"output_dir={tmp_path / 'run'}"])
        tokenizer = load_tokenizer(base)
        model = AutoModelForCausalLM.from_pretrained(base)
        final = save_model(config.output_dir, "final", model, tokenizer, [tokenizer.eos_token_id], config)
    for root in (base, final):
        found = modes(root)
        assert "model.safetensors" in found
        assert found == {name: 0o750 if (root / name).is_dir() else 0o640 for name in found}, root
