"""LoRA: the `lora:` config, only adapter weights train, resume is exact, QLoRA fails clearly on CPU.

    sftkit train RECIPE.yaml lora.enabled=true [lora.dora=true] [lora.quantize=nf4]

Tiny Qwen2-shaped models (2 layers, hidden 64) with real tokenizers: the Qwen2.5 one with its own
template (no new tokens: pure LoRA), and GPT-2's with the built-in chatml template (new tokens: the
tied embeddings and head are trained in full beside the adapter, as one matrix).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftkit.checkpoint import save_tiny_model
from sftkit.cli import main
from sftkit.config import ConfigError
from sftkit.recipe import load_config
from sftkit.data.batches import collate
from sftkit.lora import (
    QLORA_HELP,
    adapted_modules,
    check_quantization,
    setup_lora_model,
)
from sftkit.model import count_parameters
from sftkit.runlog import summary
from sftkit.train import backward_window, setup_data, setup_optimizer
from tests.conftest import config_path, tokenizer_dir

CPU = torch.device("cpu")
ROWS = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
        for w in ("red", "green", "blue", "yellow", "black", "white")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and two spin-waiting on each other on a busy machine are 10-80x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_rows(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(config_path("qwen2"), tokenizer_dir("qwen2.5"), tmp_path_factory.mktemp("lora") / "qwen")


def test_lora_config_keys() -> None:
    base = ["model.path=m", "data.train=a.jsonl"]
    config = load_config(None, base + ["lora.enabled=true", "lora.target_modules=q_proj"])
    assert config.lora.r == 16 and config.lora.target_modules == ["q_proj"] and config.lora.modules_to_save is None
    assert load_config(None, base).lora.target_modules == "all-linear"
    with pytest.raises(ConfigError, match="lora.lora_alpha: unknown key — did you mean 'lora.alpha'"):
        load_config(None, base + ["lora.lora_alpha=16"])
    with pytest.raises(ConfigError, match="lora.quantize: 'int8' is not one of null, nf4"):
        load_config(None, base + ["lora.enabled=true", "lora.quantize=int8"])
    with pytest.raises(ConfigError, match="lora.quantize: .*set lora.enabled=true"):
        load_config(None, base + ["lora.quantize=nf4"])
    with pytest.raises(ConfigError, match="lora.r: 0 must be at least 1"):
        load_config(None, base + ["lora.r=0"])


def test_only_adapter_weights_train(qwen_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three optimizer steps: every base weight bit-identical, every adapter weight moved."""
    config = load_config(None, [f"model.path={qwen_dir}", f"data.train={write_rows(tmp_path / 'd.jsonl')}",
                                "lora.enabled=true", "lora.r=4", "train.lr=1e-2", "train.batch_size=3"])
    model, tokenizer, added = setup_lora_model(config, CPU)
    assert added == [] and "LoRA: r 4, alpha 32, dropout 0.05, 14 layers adapted (all-linear)" in capsys.readouterr().out
    # all-linear = q, k, v, o, gate, up, down of both blocks; never the output head
    assert len(adapted_modules(model)) == 14 and not any("lm_head" in n for n in adapted_modules(model))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_A" in n or "lora_B" in n for n in trained)
    n_trainable, n_total = count_parameters(model)
    assert n_trainable == sum(p.numel() for p in trained.values()) and n_trainable < n_total / 50

    train_split, eval_split = setup_data(config, tokenizer)
    assert f"parameters  {n_trainable:,} trainable / {n_total:,} total" in summary(
        config, train_split, eval_split, model, added, 2, 3)
    optimizer, _ = setup_optimizer(model, config.train, total_steps=3)
    model.train()
    for start in (0, 3, 0):
        backward_window(model, [collate(train_split.examples[start:start + 3], tokenizer.pad_token_id)])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = dict(model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(after[name], before), name
    for name, before in trained.items():
        assert not torch.equal(after[name], before), name  # B starts at 0, A is random: both move


def test_qlora_on_cpu_is_a_clear_error(qwen_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(None, [f"model.path={qwen_dir}", "data.train=a.jsonl", "lora.enabled=true",
                                "lora.quantize=nf4", "train.device=cpu"])
    with pytest.raises(ConfigError, match="lora.quantize=nf4: .*pip install bitsandbytes; on CPU use lora.quantize=null"):
        setup_lora_model(config, CPU)
    with pytest.raises(ConfigError, match="QLoRA needs a CUDA GPU"):
        check_quantization(config.lora, torch.device("cuda"))
    recipe = tmp_path / "qlora.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(qwen_dir)}, "data": {"train": "a.jsonl"}}))
    args = ["train", str(recipe), "lora.enabled=true", "lora.quantize=nf4", "train.device=cpu", f"output_dir={tmp_path}"]
    assert main(args) == 2  # before any data is read or model loaded
    assert QLORA_HELP in capsys.readouterr().err


@pytest.fixture(scope="module")
def chatml_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 (tied head) + the GPT-2 tokenizer + chatml: LoRA with dropout, embeddings in modules_to_save."""
    root = tmp_path_factory.mktemp("lora-resume")
    model_dir = save_tiny_model(config_path("qwen2"), tokenizer_dir("gpt2"), root / "qwen-gpt2")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir)},
        "data": {"train": str(write_rows(root / "train.jsonl")), "template": "chatml"},
        "lora": {"enabled": True, "r": 4, "dropout": 0.1},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-2, "log_every": 1, "save_every": 2, "device": "cpu",
                  "sample_max_new_tokens": 2},
    }))
    return path


def test_lora_checkpoints_hold_the_adapter_and_resume_exactly(
    chatml_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["train", str(chatml_recipe), f"output_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "the chat template added 2 new tokens" in out and "lora.modules_to_save=['model.embed_tokens', 'lm_head']" in out
    step2 = run / "checkpoints" / "step-2"
    for directory in (step2, run / "final"):
        names = {p.name for p in directory.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "generation_config.json", "tokenizer.json",
                "chat_template.jinja"} <= names, directory
        assert not any(name.startswith("model") and name.endswith(".safetensors") for name in names)
    adapter_config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(Path(load_config(chatml_recipe).model.path).resolve())
    assert adapter_config["modules_to_save"] == ["model.embed_tokens"] and adapter_config["ensure_weight_tying"]
    full = load_file(run / "final" / "adapter_model.safetensors")
    embed = full["base_model.model.model.embed_tokens.weight"]
    assert embed.shape == (50259, 64) and len(full) == 2 + 2 * 14  # embeddings, head, A and B of 14 layers
    assert torch.equal(full["base_model.model.lm_head.weight"], embed)  # trained as one tied matrix
    full_metrics = metrics(run)

    # interrupted after the step-2 checkpoint; resumed from it in a fresh output_dir
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    step2.rename(resumed / "checkpoints" / "step-2")
    assert main(["train", str(chatml_recipe), f"output_dir={resumed}", "train.resume=true"]) == 0
    rows = metrics(resumed)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[:2] == full_metrics[:2]
    for r, f in zip(rows[2:], full_metrics[2:]):
        assert r["loss"] == pytest.approx(f["loss"], rel=1e-5) and r["lr"] == f["lr"]
    again = load_file(resumed / "final" / "adapter_model.safetensors")
    assert again.keys() == full.keys()
    for name, tensor in full.items():
        assert torch.equal(again[name], tensor), name  # bit-exact: adapter, optimizer, RNG (dropout) restored
