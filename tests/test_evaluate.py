"""What SFT changed, measured on tiny models: `sftkit diff`, the forgetting monitor, best/ + early stop, compare.

The base is a tiny random Qwen2-shaped model with the GPT-2 tokenizer (50k vocabulary, no chat
template); training uses the built-in chatml template, so the tuned models have 2 new token rows.
Known perturbations give exact figures for `diff`; two real `sftkit train` runs (a gentle and a
huge learning rate) exercise the monitor, the guard and `compare`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sftkit.checkpoint import save_tiny_model
from sftkit.cli import main
from sftkit.recipe import load_config
from sftkit.evaluate.compare import read_prompts
from sftkit.evaluate.diff import group_of, weight_diff
from sftkit.evaluate.monitor import read_reference
from sftkit.evaluate.perplexity import eval_loss
from sftkit.model import load_tokenizer
from sftkit.train import setup_data
from tests.conftest import config_path, tokenizer_dir

PAIRS = [("Name a colour of the sky.", "Blue."), ("What do bees make?", "Honey."), ("What is two plus two?", "Four."),
         ("Which animal barks?", "A dog."), ("What is frozen water called?", "Ice."),
         ("Which planet do we live on?", "Earth."), ("How many legs has a spider?", "Eight."),
         ("What colour is grass?", "Green."), ("What do cows drink?", "Water."), ("Which month follows May?", "June."),
         ("What is the opposite of hot?", "Cold."), ("What shape is a ball?", "Round.")]
REFERENCE = ("The river rose after three days of rain. By morning the low fields were under water.\n\n"
             "Bread needs flour, water, salt and time. Yeast does the rest.\n\nA short third document about the sea.\n")


def write_chats(path: Path, pairs: list[tuple[str, str]]) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny base model, 8 training and 4 eval conversations, a reference text, and two trained runs."""
    root = tmp_path_factory.mktemp("evidence")
    paths = {"root": root, "base": save_tiny_model(config_path("qwen2"), tokenizer_dir("gpt2"), root / "base")}
    paths["reference"] = root / "reference.txt"
    paths["reference"].write_text(REFERENCE)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(paths["base"])},
        "data": {"train": str(write_chats(root / "train.jsonl", PAIRS[:8])),
                 "eval": str(write_chats(root / "eval.jsonl", PAIRS[8:])), "template": "chatml", "max_length": 128},
        "train": {"batch_size": 2, "warmup_ratio": 0.0, "eval_every_epoch": True, "log_every": 100,
                  "sample_max_new_tokens": 4, "device": "cpu"},
        "eval": {"reference_data": str(paths["reference"]), "forgetting_tolerance": 0.2},
    }))
    for name, overrides in {
        "gentle": ["train.lr=1e-5", "train.epochs=2"],
        "huge": ["train.lr=0.1", "train.epochs=12", "train.keep_best=true", "train.early_stopping_patience=2"],
    }.items():
        paths[name] = root / name
        assert main(["train", str(recipe), *overrides, f"output_dir={paths[name]}"]) == 0
    return paths


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- sftkit diff ---------------------------------------------------------------------------------
def perturbed_copy(base: Path, out: Path) -> dict[str, torch.Tensor]:
    """base with known changes: layer 0 q_proj scaled by 1.1, half of layer 1 down_proj + 1.0, 2 new embedding rows."""
    weights = load_file(base / "model.safetensors")
    tuned = dict(weights)
    tuned["model.layers.0.self_attn.q_proj.weight"] = weights["model.layers.0.self_attn.q_proj.weight"] * 1.1
    down = weights["model.layers.1.mlp.down_proj.weight"].clone()
    down[: down.shape[0] // 2] += 1.0
    tuned["model.layers.1.mlp.down_proj.weight"] = down
    embed = weights["model.embed_tokens.weight"]
    tuned["model.embed_tokens.weight"] = torch.cat([embed, torch.randn(2, embed.shape[1])])
    out.mkdir()
    save_file(tuned, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base / "config.json", out / "config.json")
    return weights


def test_diff_gives_exact_relative_change(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    weights = perturbed_copy(world["base"], tmp_path / "tuned")
    report = weight_diff(world["base"], tmp_path / "tuned", threshold=0.01)
    by_name = {t.name: t for t in report.tensors}

    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert q.relative == pytest.approx(0.1, rel=1e-6)  # ||0.1 W|| / ||W||
    down = weights["model.layers.1.mlp.down_proj.weight"]
    half = down[: down.shape[0] // 2].numel()
    d = by_name["model.layers.1.mlp.down_proj.weight"]
    assert d.relative == pytest.approx(math.sqrt(half) / down.norm().item(), rel=1e-5)  # ||dW|| = sqrt(#changed)
    assert d.moved == half  # +1.0 is far above 0.01 x rms(W); the other half did not move at all
    embed = by_name["model.embed_tokens.weight"]
    assert embed.added_rows == 2 and embed.relative == 0.0 and embed.moved == 0  # shared rows unchanged
    assert all(t.relative == 0.0 for t in report.tensors if t.name not in (q.name, d.name))

    groups = {g.name: g for g in report.groups()}
    layer0 = [w for n, w in weights.items() if group_of(n) == "layer 0"]
    assert groups["layer 0"].relative == pytest.approx(
        0.1 * q.base_sq ** 0.5 / math.sqrt(sum(float(w.double().norm() ** 2) for w in layer0)), rel=1e-5)
    summary = report.summary()
    assert summary["layers"] == 2 and summary["max_layer"] in ("layer 0", "layer 1") and summary["added_rows"] == 2

    png = tmp_path / "diff.png"
    assert main(["diff", str(world["base"]), str(tmp_path / "tuned"), "--png", str(png),
                 "--json", str(tmp_path / "diff.json")]) == 0
    out = capsys.readouterr().out
    assert "layer 0" in out and "2 rows added" in out and "moved = |dW| > 0.01 x rms(W)" in out
    assert png.stat().st_size > 1000 and json.loads((tmp_path / "diff.json").read_text())["summary"]["layers"] == 2


def test_diff_of_a_lora_adapter_is_its_merged_update(world: dict[str, Path], tmp_path: Path) -> None:
    """relative change of an adapted layer = ||(alpha / r) B A|| / ||W||; untouched layers: 0."""
    import peft

    model = AutoModelForCausalLM.from_pretrained(world["base"])
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    update = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    expected = (update.norm() / layer.base_layer.weight.norm()).item()
    model.save_pretrained(tmp_path / "adapter")
    load_tokenizer(world["base"]).save_pretrained(tmp_path / "adapter")

    report = weight_diff(world["base"], tmp_path / "adapter")
    by_name = {t.name: t for t in report.tensors}
    assert by_name["model.layers.1.self_attn.q_proj.weight"].relative == pytest.approx(expected, rel=1e-4)
    assert by_name["model.layers.1.self_attn.k_proj.weight"].relative == 0.0
    assert not report.only_tuned and not report.only_base


def test_diff_of_a_real_run_reports_the_new_token_rows(world: dict[str, Path]) -> None:
    report = weight_diff(world["base"], world["huge"] / "final")
    summary = report.summary()
    assert summary["added_rows"] == 2  # <|im_start|> <|im_end|> of the chatml template
    assert 0 < summary["median_relative"] <= summary["max_relative"] and summary["overall_moved"] > 0.5


# -- forgetting monitor -------------------------------------------------------------------------
def test_reference_perplexity_rises_with_a_huge_learning_rate(world: dict[str, Path]) -> None:
    gentle, huge = metrics(world["gentle"]), metrics(world["huge"])
    for rows in (gentle, huge):
        assert rows[0]["step"] == 0 and rows[0]["reference_ppl"] > 1  # the base model, before step 1
        evals = [r for r in rows if "eval_loss" in r]
        assert evals and all("reference_ppl" in r for r in evals)
        for r in evals:
            assert r["reference_rise"] == pytest.approx(r["reference_ppl"] / rows[0]["reference_ppl"] - 1)
    assert gentle[0]["reference_ppl"] == pytest.approx(huge[0]["reference_ppl"])  # same base, same text
    gentle_rise = max(r["reference_rise"] for r in gentle if "reference_rise" in r)
    huge_rise = max(r["reference_rise"] for r in huge if "reference_rise" in r)
    print(f"reference perplexity rise: lr 1e-5 {gentle_rise:+.2%}, lr 0.1 {huge_rise:+.0%}")
    assert abs(gentle_rise) < 0.2 < huge_rise  # eval.forgetting_tolerance 0.2: only the huge lr trips it
    assert huge_rise > 10


def test_read_reference(tmp_path: Path) -> None:
    """Reference text is read as training text is (`---` between .txt documents, {"text"} rows), and every
    token of each document after the first is scored, in windows of data.max_length."""
    tokenizer = load_tokenizer(tokenizer_dir("qwen2.5"))
    (tmp_path / "r.txt").write_text("one two\n\n---\n\nthree four\n\n")
    (tmp_path / "r.jsonl").write_text('{"text": "a b c d e"}\n\n{"text": "f g"}\n')
    one, two = read_reference(tmp_path / "r.txt", tokenizer, max_length=8)
    assert tokenizer.decode(one.input_ids) == "one two" and tokenizer.decode(two.input_ids) == "three four"
    assert one.source == f"{tmp_path / 'r.txt'}:1 tokens 0-2"
    windows = read_reference(tmp_path / "r.jsonl", tokenizer, max_length=3)
    assert [tokenizer.decode(w.input_ids) for w in windows] == ["a b c", " d e", "f g"]
    assert all(w.labels == [-100, *w.input_ids[1:]] for w in windows)


# -- overfitting guard --------------------------------------------------------------------------
def test_best_checkpoint_is_kept_and_training_stops_early(world: dict[str, Path]) -> None:
    run = world["huge"]
    evals = [r for r in metrics(run) if "eval_loss" in r]
    config = load_config(run / "sftkit_config.yaml")
    steps_per_epoch = 4  # 8 examples, batch 2
    assert [r["step"] for r in evals] == [steps_per_epoch * (i + 1) for i in range(len(evals))]  # one per epoch
    best = min(evals, key=lambda r: r["eval_loss"])
    assert json.loads((run / "best" / "best.json").read_text())["step"] == best["step"]
    assert evals[-1]["step"] < 12 * steps_per_epoch  # stopped before the 12 epochs
    assert len([r for r in evals if r["step"] > best["step"]]) == config.train.early_stopping_patience
    assert not list(run.glob("*.tmp")) and not list(run.glob("*.old"))

    # best/ really holds the model of that eval loss
    model = AutoModelForCausalLM.from_pretrained(run / "best")
    tokenizer = load_tokenizer(run / "best")
    _, eval_split = setup_data(config, tokenizer)
    loss, _ = eval_loss(model, eval_split.examples, 2, tokenizer.eos_token_id)
    assert loss == pytest.approx(best["eval_loss"], rel=1e-4)


def test_guard_needs_an_eval_split(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    data = write_chats(tmp_path / "t.jsonl", PAIRS[:4])
    code = main(["train", str(world["root"] / "recipe.yaml"), f"data.train={data}", "data.eval=null",
                 "train.keep_best=true", f"output_dir={tmp_path / 'out'}"])
    assert code == 2 and "train.keep_best: needs an eval split" in capsys.readouterr().err


# -- sftkit compare -----------------------------------------------------------------------------
def test_compare_writes_markdown(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What colour is grass?\nWhat do bees make?\n")
    out = tmp_path / "compare.md"
    assert main(["compare", str(world["base"]), str(world["huge"] / "final"), "--prompts", str(prompts),
                 "--out", str(out), "--max-new-tokens", "6", "--device", "cpu"]) == 0
    text = out.read_text()
    assert "| 1 | What colour is grass? |" in text and "| 2 | What do bees make? |" in text
    assert "Ended their turn: base" in text
    assert "What colour is grass?" in capsys.readouterr().out
    (tmp_path / "p.jsonl").write_text('{"prompt": "Hi"}\n{"messages": [{"role": "user", "content": "Q"}, '
                                      '{"role": "assistant", "content": "A"}]}\n')
    assert read_prompts(tmp_path / "p.jsonl") == [[{"role": "user", "content": "Hi"}],
                                                   [{"role": "user", "content": "Q"}]]
