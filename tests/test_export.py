"""`sftkit export`: a LoRA run merged into a plain HF model that loads without PEFT, or a clean adapter.

    sftkit export runs/x/final --out runs/x/merged --merge

The run: a tiny GPT-2 with the GPT-2 tokenizer and the built-in chatml template, so the template
adds <|im_start|> and <|im_end|> and the embeddings and head are trained beside the LoRA adapter
(as two copies: PEFT cannot re-tie GPT-2's `wte` on load, see sftkit.lora.keep_tied).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftkit.checkpoint import save_model, save_tiny_model
from sftkit.cli import main
from sftkit.recipe import load_config
from sftkit.data.batches import collate
from sftkit.data.templates import end_of_turn_token_ids
from sftkit.generate import generate_reply, load_for_generation
from sftkit.lora import load_adapter, setup_lora_model
from sftkit.train import backward_window, setup_data, setup_optimizer
from tests.conftest import config_path, tokenizer_dir

CHAT = [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red"}]
NEW = ["<|im_start|>", "<|im_end|>"]

# Loads the merged directory with plain transformers while `import peft` fails, prints the greedy reply ids.
NO_PEFT = """
import json, sys
sys.modules["peft"] = None  # any `import peft` now raises ImportError
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, messages = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
print(json.dumps({"ids": out[0, prompt["input_ids"].shape[1]:].tolist(), "peft": sys.modules["peft"]}))
"""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and two spin-waiting on each other on a busy machine are 10-80x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    model_dir = save_tiny_model(config_path("gpt2"), tokenizer_dir("gpt2"), root / "tiny-gpt2")
    data = root / "train.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir)},
        "data": {"train": [{"path": str(data), "weight": 4}], "template": "chatml"},
        "lora": {"enabled": True, "r": 8, "dropout": 0.0},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0, "save_every": 2,
                  "device": "cpu", "sample_max_new_tokens": 2},
        "output_dir": str(root / "out"),
    }))
    assert main(["train", str(recipe)]) == 0
    return root / "out"


@pytest.fixture(scope="module")
def merged(run: Path) -> Path:
    assert main(["export", str(run / "final"), "--out", str(run.parent / "merged"), "--merge"]) == 0
    return run.parent / "merged"


def base_dir(run: Path) -> Path:
    return Path(json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"])


def test_new_token_rows_train_and_the_export_carries_them(run: Path, merged: Path) -> None:
    final = run / "final"
    assert json.loads((final / "adapter_config.json").read_text())["modules_to_save"] == ["transformer.wte", "lm_head"]
    adapter = load_file(final / "adapter_model.safetensors")
    trained, head = adapter["base_model.model.transformer.wte.weight"], adapter["base_model.model.lm_head.weight"]
    base = AutoModelForCausalLM.from_pretrained(base_dir(run)).get_input_embeddings().weight
    assert trained.shape == (50259, 64) and base.shape == (50257, 64)
    new_ids = AutoTokenizer.from_pretrained(final).convert_tokens_to_ids(NEW)
    assert new_ids == [50257, 50258]
    mean = base.mean(dim=0)
    for row in new_ids:
        assert (trained[row] - mean).abs().max() > 1e-3 and (head[row] - mean).abs().max() > 1e-3  # trained

    exported = AutoModelForCausalLM.from_pretrained(merged)
    assert torch.equal(exported.get_input_embeddings().weight.detach(), trained)
    assert torch.equal(exported.get_output_embeddings().weight.detach(), head)
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.convert_tokens_to_ids(NEW) == new_ids and "<|im_start|>" in tokenizer.chat_template
    assert new_ids[1] in exported.generation_config.eos_token_id  # stops at <|im_end|>


def test_merged_logits_equal_the_adapter_logits(run: Path, merged: Path) -> None:
    adapter, tokenizer = load_adapter(run / "final")
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.tensor([tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False))["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapter(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_merged_model_loads_without_peft_and_generates_the_same(run: Path, merged: Path) -> None:
    model, tokenizer = load_for_generation(run / "final", device="cpu")
    reply = generate_reply(model, tokenizer, CHAT[:1], max_new_tokens=8)
    assert reply.ids and reply.ids[-1] != tokenizer.eos_token_id
    done = subprocess.run([sys.executable, "-c", NO_PEFT, str(merged), json.dumps(CHAT[:1])],
                          capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    assert plain == {"ids": reply.ids, "peft": None}


def test_generate_command_takes_an_adapter_directory(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, tokenizer = load_for_generation(run / "final", device="cpu")
    reply = generate_reply(model, tokenizer, CHAT[:1], max_new_tokens=6)
    assert main(["generate", "--model", str(run / "final"), "--prompt", "Say red.", "--device", "cpu",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == reply.text


def test_export_without_merge_is_a_clean_adapter(run: Path, tmp_path: Path) -> None:
    moved = shutil.copytree(base_dir(run), tmp_path / "base-moved")
    out = tmp_path / "adapter"
    assert main(["export", str(run / "checkpoints" / "step-2"), "--out", str(out), "--base", str(moved)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not names & {"optimizer.pt", "trainer_state.json", "rng.pt", "model.safetensors"}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(moved.resolve())
    from peft import PeftModel  # PEFT itself loads it

    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(moved)
    base.resize_token_embeddings(len(tokenizer))
    loaded = PeftModel.from_pretrained(base, out).eval()
    reference, _ = load_adapter(run / "checkpoints" / "step-2")
    ids = torch.tensor([tokenizer("<|im_start|>user\nSay red.<|im_end|>\n")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_export_refuses_what_it_cannot_do(run: Path, merged: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(merged), "--out", str(merged.parent / "x"), "--merge"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert main(["export", str(run / "final"), "--out", str(merged), "--merge"]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_dora_merges_to_the_same_logits(tmp_path: Path) -> None:
    """DoRA (a magnitude per output channel as well) on the untied Qwen2 shape: merged == adapter."""
    model_dir = save_tiny_model(config_path("qwen2"), tokenizer_dir("gpt2"), tmp_path / "qwen",
                                overrides={"tie_word_embeddings": False})
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    config = load_config(None, [f"model.path={model_dir}", f"data.train={data}", "data.template=chatml",
                                "lora.enabled=true", "lora.dora=true", "lora.r=4", "train.lr=5e-2",
                                f"output_dir={tmp_path / 'out'}"])
    cpu = torch.device("cpu")
    model, tokenizer, _ = setup_lora_model(config, cpu)
    examples = setup_data(config, tokenizer)[0].examples
    optimizer, _ = setup_optimizer(model, config.train, total_steps=2)
    for _ in range(2):
        backward_window(model, [collate(examples, tokenizer.eos_token_id)])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    final = save_model(tmp_path / "out", "final", model, tokenizer, end_of_turn_token_ids(tokenizer), config)
    assert main(["export", str(final), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    ids = collate(examples, tokenizer.eos_token_id)["input_ids"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model.eval()(input_ids=ids).logits, rtol=0, atol=1e-4)
