"""`sftkit export --gguf`: the file llama.cpp reads, checked with two independent readers.

gguf's own GGUFReader reads the metadata back (architecture, rope, the run's chat template, the
end-of-turn token); transformers' GGUF loader (`from_pretrained(..., gguf_file=...)`, its own code
path: de-quantising, Llama's q/k permutation undone, its tokenizer converter) rebuilds the model, whose
logits and greedy tokens must equal the directory's. Tiny random models of real configs with real
tokenizers; the ones with 128k-150k vocabularies whose tokenizer conversion takes a minute are slow.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftkit.checkpoint import save_tiny_model
from sftkit.cli import main
from sftkit.data.templates import end_of_turn_token_ids, prepare_tokenizer
from sftkit.generate import generate_reply
from sftkit.model import load_tokenizer
from sftkit.portable import save_tokenizer
from tests.conftest import config_path, tokenizer_dir

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="pip install 'sftkit[gguf]'")
DEMO_BASE = Path(__file__).resolve().parents[1] / "demo" / "base-model"  # a small real Llama, in the repository
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word, ünïcödé."}]


def field(path: Path, key: str):
    import gguf

    reader = gguf.GGUFReader(path)
    value = reader.fields[key]
    part = value.parts[value.data[0]]
    return bytes(part).decode() if value.types[0] == gguf.GGUFValueType.STRING else part[0].item()


def chat_model(model_dir: Path) -> Path:
    """`model_dir` made what a run's final/ is: its tokenizer with a chat template (ChatML added, the embeddings
    grown as training grows them, when it has none) — the directory `sftkit generate` and `sftkit export` read."""
    tok = load_tokenizer(model_dir)
    if prepare_tokenizer(tok, None if tok.chat_template else "chatml"):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        model.resize_token_embeddings(len(tok))
        model.save_pretrained(model_dir)
    save_tokenizer(tok, model_dir)
    return model_dir


def export(model_dir: Path, out: Path, *flags: str) -> Path:
    assert main(["export", str(model_dir), "--gguf", "--out", str(out), *flags]) == 0
    return out


def compare(model_dir: Path, gguf_file: Path, **config) -> tuple[float, list[int], list[int]]:
    """(max |logit difference|, greedy ids from the directory, greedy ids from the GGUF) on the chat prompt."""
    tokenizer = load_tokenizer(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                                  **config).eval()
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        diff = (reference(ids["input_ids"]).logits - loaded(ids["input_ids"]).logits).abs().max().item()
    replies = [generate_reply(m, tokenizer, CHAT, max_new_tokens=12).ids for m in (reference, loaded)]
    return diff, *replies


@pytest.mark.slow  # the three families of test_round_trip_with_tokenizer, and the demo model, cover the same path
def test_llama_round_trip_through_transformers_gguf_loader(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The demo's base model (a real small Llama with a byte-level BPE vocabulary) with ChatML added, as a run's
    final/: logits, greedy reply, tokenizer, template and end of turn all come back from the GGUF."""
    model_dir = tmp_path / "model"
    shutil.copytree(DEMO_BASE, model_dir)
    chat_model(model_dir)
    gguf_file = export(model_dir, tmp_path / "out" / "demo.gguf")
    print(capsys.readouterr().out.strip().splitlines()[-1])
    tokenizer = load_tokenizer(model_dir)
    assert field(gguf_file, "general.architecture") == "llama" and field(gguf_file, "tokenizer.ggml.pre") == "llama-bpe"
    assert field(gguf_file, "tokenizer.chat_template") == tokenizer.chat_template
    assert field(gguf_file, "tokenizer.ggml.eot_token_id") == tokenizer.convert_tokens_to_ids("<|im_end|>") \
        == end_of_turn_token_ids(tokenizer)[0]
    diff, want, got = compare(model_dir, gguf_file)
    print(f"llama float32: {gguf_file.stat().st_size / 2**20:.1f} MiB, max |logit diff| {diff:.2e}, greedy "
          f"{tokenizer.decode(got)!r}")
    assert diff < 1e-4 and got == want and len(set(got)) > 4  # a reply, not one token repeated
    rebuilt = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    text = tokenizer.apply_chat_template(CHAT + [{"role": "assistant", "content": "Paris, naïvely. 123"}],
                                         tokenize=False)
    assert rebuilt(text, add_special_tokens=False).input_ids == tokenizer(text, add_special_tokens=False).input_ids
    assert rebuilt.chat_template == tokenizer.chat_template

    half = export(model_dir, tmp_path / "out" / "demo-f16.gguf", "--dtype", "float16")
    diff16, want16, got16 = compare(model_dir, half)
    print(f"llama float16: {half.stat().st_size / 2**20:.1f} MiB, max |logit diff| {diff16:.2e}, "
          f"greedy tokens equal: {got16 == want16}")
    assert half.stat().st_size < 0.6 * gguf_file.stat().st_size and diff16 < 0.05 and got16 == want16


def test_refuses_what_the_writer_does_not_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpt2 = save_tiny_model(config_path("gpt2"), tokenizer_dir("gpt2"), tmp_path / "gpt2", layers=1, hidden=32,
                           heads=2, intermediate=64)
    assert main(["export", str(gpt2), "--gguf", "--out", str(tmp_path / "gpt2.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"sftkit: error: {gpt2}: GGUF export maps llama, qwen2, qwen3, not 'gpt2' — llama.cpp's "
                   "convert_hf_to_gguf.py covers more architectures (run it on this directory)")
    sentencepiece = save_tiny_model(config_path("tinyllama"), tokenizer_dir("tinyllama"), tmp_path / "tinyllama")
    assert main(["export", str(sentencepiece), "--gguf", "--out", str(tmp_path / "t.gguf")]) == 2
    assert "this tokenizer is BPE with byte fallback (SentencePiece-style)" in capsys.readouterr().err
    assert main(["export", str(gpt2), "--gguf", "--out", str(tmp_path / "x.bin")]) == 2
    assert "name the file to write, ending in .gguf" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.slow
@pytest.mark.parametrize("family,tokenizer", [("qwen2", "qwen2.5"), ("qwen3", "qwen3"), ("llama3.2", "llama3.2")])
def test_round_trip_with_tokenizer(tmp_path: Path, family: str, tokenizer: str) -> None:
    """Tiny random models of the real configs with their 128k-150k vocabularies (a minute each to rebuild the
    tokenizer): logits and greedy ids, the tokenizer rebuilt from the GGUF alone, template and end of turn."""
    model_dir = chat_model(save_tiny_model(config_path(family), tokenizer_dir(tokenizer), tmp_path / "model"))
    gguf_file = export(model_dir, tmp_path / "tiny.gguf")
    original = load_tokenizer(model_dir)
    config = {}
    if family == "llama3.2":  # Llama 3's rope scaling travels as llama.cpp's rope_freqs tensor, which
        from transformers import AutoConfig  # transformers' GGUF reader does not read: give it the config's

        config["rope_parameters"] = AutoConfig.from_pretrained(model_dir).rope_parameters
        import gguf

        factors = next(t for t in gguf.GGUFReader(gguf_file).tensors if t.name == "rope_freqs.weight").data
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        default, _ = ROPE_INIT_FUNCTIONS["default"](AutoConfig.from_pretrained(model_dir), "cpu") \
            if "default" in ROPE_INIT_FUNCTIONS else (None, None)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(model_dir), "cpu")
        if default is not None:  # llama.cpp divides each frequency by its factor: the same scaled frequencies
            assert torch.allclose(default / torch.tensor(factors), scaled, rtol=1e-5)
    if family == "qwen3":  # transformers' reader takes Qwen3's head_dim from its default (128), not from the
        from transformers import AutoConfig  # file's attention.key_length: the tiny model's is 16

        head_dim = AutoConfig.from_pretrained(model_dir).head_dim
        assert field(gguf_file, "qwen3.attention.key_length") == head_dim == 16
        config["head_dim"] = head_dim
    diff, want, got = compare(model_dir, gguf_file, **config)
    print(f"{family}: {gguf_file.stat().st_size / 2**20:.1f} MiB, max |logit diff| {diff:.2e}, greedy equal {got == want}")
    assert diff < 1e-4 and got == want
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    text = original.apply_chat_template(CHAT + [{"role": "assistant", "content": "Paris, naïvely. 123"}], tokenize=False)
    assert rebuilt(text, add_special_tokens=False).input_ids == original(text, add_special_tokens=False).input_ids
    assert rebuilt.chat_template == original.chat_template
    assert field(gguf_file, "tokenizer.ggml.eot_token_id") == end_of_turn_token_ids(original)[0]
