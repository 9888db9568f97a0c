"""`sftkit train` end to end on a tiny Qwen2-shaped model, plus the loss normalisation it relies on.

The end-to-end run goes through the real command (`sftkit.cli.main(["train", ...])`) and checks the
files it leaves: metrics.jsonl, tb/, loss.png, sftkit_config.yaml, and a final/ directory that plain
transformers loads and whose generation stops at `<|im_end|>`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftkit.checkpoint import save_tiny_model
from sftkit.cli import main
from sftkit.config import ModelConfig, TrainConfig
from sftkit.recipe import load_config
from sftkit.data.batches import collate, epoch_order, window
from sftkit.data.messages import Conversation, Message
from sftkit.data.render import Renderer
from sftkit.data.templates import prepare_tokenizer
from sftkit.generate import generate_reply
from sftkit.loss import token_loss_sum
from sftkit.model import build_tiny_model, load_model
from sftkit.train import backward_window, setup_optimizer
from tests.conftest import config_path, tokenizer_dir

CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}]
ASSET_CHATS = Path(__file__).parent / "assets" / "data" / "chat_messages.jsonl"  # 10 varied conversations


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 steps of `sftkit train` on CPU; returns output_dir."""
    root = tmp_path_factory.mktemp("e2e")
    model_dir = save_tiny_model(config_path("qwen2"), tokenizer_dir("qwen2.5"), root / "tiny-qwen2")
    repeated = write_jsonl(root / "repeated.jsonl", [{"messages": CHAT}] * 40)  # memorised: learns to stop
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir)},
        "data": {"train": [str(ASSET_CHATS), str(repeated)], "eval_fraction": 0.1, "max_length": 256},
        "train": {"max_steps": 30, "batch_size": 2, "lr": 1e-2, "warmup_ratio": 0.1, "log_every": 1,
                  "eval_every": 15, "sample_max_new_tokens": 8, "device": "cpu"},
        "output_dir": str(root / "out"),
    }))
    assert main(["train", str(recipe), "train.seed=1"]) == 0
    return root / "out"


def test_loss_falls(run: Path) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"loss first-5 mean {first:.3f} -> last-5 mean {last:.3f}; "
          f"{rows[-1]['input_tokens_per_s']:.0f} input tokens/s, {rows[-1]['tokens_per_s']:.0f} trained tokens/s")
    assert last < first - 3.0
    assert rows[-1]["tokens"] > rows[0]["tokens"] > 0 and rows[-1]["tokens_per_s"] > 0
    assert {"eval_loss", "eval_ppl", "sample"} <= set(rows[14]) and {"eval_loss", "eval_ppl"} <= set(rows[-1])
    assert rows[-1]["eval_ppl"] == pytest.approx(math.exp(rows[-1]["eval_loss"]))
    assert rows[-1]["lr"] < rows[2]["lr"]  # cosine decay after warm-up


def test_run_directory(run: Path) -> None:
    assert (run / "loss.png").stat().st_size > 1000
    assert any((run / "tb").glob("events.out.tfevents.*"))
    config = load_config(run / "sftkit_config.yaml")
    assert config.train.seed == 1 and config.train.max_steps == 30  # overrides are resolved into it
    assert load_config(run / "final" / "sftkit_config.yaml") == config  # and travels with the model
    assert not list(run.glob("*.tmp"))


def test_final_is_a_plain_hf_directory_that_stops_at_end_of_turn(run: Path) -> None:
    final = run / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert tokenizer.chat_template and (final / "model.safetensors").is_file()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id
    reply = generate_reply(model, tokenizer, CHAT[:1], max_new_tokens=20)
    assert reply.stopped and reply.ids[-1] == im_end and len(reply.ids) < 20
    assert reply.text.startswith("Paris")
    # plain transformers generate() with the saved generation_config stops there too
    prompt = tokenizer.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    assert out[0, -1].item() == im_end and out.shape[1] - prompt["input_ids"].shape[1] < 20


def test_accumulation_matches_one_big_batch() -> None:
    """4 micro-batches of 2 give the same gradient as 1 batch of 8 (fp32), though lengths differ."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("gpt2"))  # 50k vocabulary: cheaper than Qwen's 150k
    prepare_tokenizer(tokenizer, "chatml")
    renderer = Renderer(tokenizer)
    texts = ["Hi", "A longer reply with many more trained tokens in it.", "OK", "Two words",
             "x " * 20, "Yes.", "The quick brown fox jumps.", "No"]
    examples = [renderer.render(Conversation([Message("user", f"Q{i}?"), Message("assistant", t)]))
                for i, t in enumerate(texts)]
    model = build_tiny_model(config_path("qwen2"), tokenizer)  # no dropout: the two passes see the same model
    pad = tokenizer.eos_token_id

    def grads(batches: list[list[int]]) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        backward_window(model, [collate([examples[i] for i in b], pad) for b in batches])
        return [p.grad.clone() for p in model.parameters()]

    big = grads([list(range(8))])
    small = grads([[0, 1], [2, 3], [4, 5], [6, 7]])
    for a, b in zip(big, small):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    # the naive alternative (mean per micro-batch, divided by 4) is measurably different
    model.zero_grad(set_to_none=True)
    for b in [[0, 1], [2, 3], [4, 5], [6, 7]]:
        batch = collate([examples[i] for i in b], pad)
        (token_loss_sum(model, batch) / (batch["labels"][:, 1:] != -100).sum() / 4).backward()
    naive = [p.grad for p in model.parameters()]
    assert max((a - n).abs().max().item() for a, n in zip(big, naive)) > 1e-4


def test_new_special_tokens_are_trained(tmp_path: Path) -> None:
    """gpt2 (no template) + built-in chatml: rows added at the mean, and they change when trained."""
    model_dir = save_tiny_model(config_path("gpt2"), tokenizer_dir("gpt2"), tmp_path / "tiny-gpt2")
    cpu = torch.device("cpu")
    model, tokenizer, added = load_model(ModelConfig(path=str(model_dir)), template="chatml", device=cpu)
    new_ids = tokenizer.convert_tokens_to_ids(added)
    rows = model.get_input_embeddings().weight
    assert added == ["<|im_start|>", "<|im_end|>"] and rows.shape[0] == len(tokenizer) == 50259
    old_mean = rows[:50257].mean(dim=0)
    torch.testing.assert_close(rows[new_ids], old_mean.expand(2, -1), rtol=0, atol=1e-7)

    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}] * 4)
    out = tmp_path / "out"
    recipe = tmp_path / "gpt2-chatml.yaml"
    recipe.write_text(f"model: {{path: {model_dir}}}\ndata: {{train: {data}, template: chatml}}\n")
    assert main(["train", str(recipe), "train.max_steps=2", "train.batch_size=4", "train.lr=1e-3",
                 "train.device=cpu", "train.sample_max_new_tokens=4", f"output_dir={out}"]) == 0
    trained = AutoModelForCausalLM.from_pretrained(out / "final").get_input_embeddings().weight
    assert trained.shape[0] == 50259
    assert (trained[new_ids] - old_mean).abs().max() > 1e-4  # the new rows learned something
    final_tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert final_tokenizer.convert_tokens_to_ids("<|im_end|>") == new_ids[1]
    assert "<|im_start|>" in final_tokenizer.chat_template


def test_data_order_is_seeded_and_covers_each_epoch() -> None:
    assert epoch_order(10, seed=0, epoch=0) == epoch_order(10, seed=0, epoch=0)
    assert epoch_order(10, seed=0, epoch=0) != epoch_order(10, seed=0, epoch=1)
    assert epoch_order(10, seed=0, epoch=1) != epoch_order(10, seed=1, epoch=1)
    # 10 examples, batch 2 x accum 2 -> 3 steps per epoch; the last window is short
    seen = [i for step in range(3) for mb in window(10, step, batch_size=2, grad_accum=2, seed=0)[1] for i in mb]
    assert sorted(seen) == list(range(10))
    assert window(10, 2, batch_size=2, grad_accum=2, seed=0)[1] == [epoch_order(10, 0, 0)[8:10]]
    assert window(10, 3, batch_size=2, grad_accum=2, seed=0)[0] == 1


def test_no_weight_decay_on_biases_and_norms() -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("gpt2"))
    model = build_tiny_model(config_path("gpt2"), tokenizer)
    optimizer, _ = setup_optimizer(model, TrainConfig(weight_decay=0.1), total_steps=10)
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"])
    assert {names[id(p)] for p in plain["params"]} >= {"transformer.ln_f.weight", "transformer.ln_f.bias",
                                                       "transformer.h.0.attn.c_attn.bias"}


def test_lr_schedule() -> None:
    """transformers' linear warm-up from 0, then cosine decay to 0: the lr each of 20 optimizer steps uses."""
    _, scheduler = setup_optimizer(torch.nn.Linear(2, 2), TrainConfig(lr=1.0, warmup_ratio=0.2), total_steps=20)
    factors = []
    for _ in range(20):
        factors.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert factors[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[4:], factors[5:])) and 0 < factors[-1] < 0.01


def test_collate_pads_to_longest() -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))
    renderer = Renderer(tokenizer)
    a, b = (renderer.render(Conversation([Message("user", "Hi"), Message("assistant", reply)]))
            for reply in ("Yo", "Hello there"))
    batch = collate([a, b], pad_id=tokenizer.pad_token_id)
    width = max(len(a.input_ids), len(b.input_ids))
    assert batch["input_ids"].shape == (2, width)
    short = len(a.input_ids)
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (width - short)
    assert batch["labels"][0, short:].eq(-100).all() and batch["input_ids"][0, short:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][1].tolist() == b.labels


def test_pretraining_on_raw_text_needs_no_chat_template(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A base tokenizer without a template pre-trains on raw text (every token trained); a conversation
    with the same tokenizer stops with a message that says which template setting to use."""
    model_dir = save_tiny_model(config_path("gpt2"), tokenizer_dir("gpt2"), tmp_path / "tiny-gpt2")
    assert not AutoTokenizer.from_pretrained(model_dir).chat_template
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "The capital of France is Paris."}] * 16)
    recipe = {"model": {"path": str(model_dir)}, "data": {"train": str(text), "strategy": "all", "max_length": 64},
              "train": {"max_steps": 12, "batch_size": 4, "lr": 1e-2, "log_every": 1, "device": "cpu"},
              "output_dir": str(tmp_path / "out")}
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "pretrain.yaml")]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 2.0
    assert not AutoTokenizer.from_pretrained(tmp_path / "out" / "final").chat_template

    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}])
    recipe["data"] = {"train": str(chats)}
    recipe["output_dir"] = str(tmp_path / "chat-out")
    (tmp_path / "chat.yaml").write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "chat.yaml")]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "data.template" in err and "chats.jsonl:1" in err
