"""Packing is right on every architecture, or refused up front (sftkit.architectures, sftkit.attention).

Each architecture is built tiny and random from transformers' own config class (fp32, CPU, sliding
window 4 tokens, one layer of each kind). Three conversations of tests/assets/data/chat_messages.jsonl,
rendered with the real Phi-3 tokenizer and template, go through the model one at a time (plain
transformers) and as sftkit batches them: two packed rows, one padding-free row, and the explicit
block mask of GPU sdpa / eager. Per-token losses must agree to `TOLERANCE`, or `check_batching`
must have refused the batching before any data was read. The default run covers a handful of
architectures, one per kind of layer; `-m slow` sweeps the whole causal-LM mapping
(docs/architectures.md is the same sweep, written by bench/architectures.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoTokenizer

from sftkit.architectures import (
    BATCHINGS,
    build,
    check_architecture,
    check_lora,
    model_types,
)
from sftkit.attention import block_causal_mask, check_batching
from sftkit.cli import main
from sftkit.config import ConfigError
from sftkit.data.batches import collate, collate_documents, trained_token_count
from sftkit.data.formats import load_records
from sftkit.data.render import IGNORE_INDEX, Renderer
from sftkit.data.render_all import render_records
from sftkit.data.templates import prepare_tokenizer
from sftkit.generate import generate_reply
from sftkit.loss import router_loss_function, token_loss_sum
from tests.conftest import tokenizer_dir

CHATS = Path(__file__).parent / "assets" / "data" / "chat_messages.jsonl"
# one architecture per kind of layer: full attention, sliding window on every layer, alternating
# sliding / full (Gemma 3), attention sinks (gpt-oss), mixture of experts, Mamba-2 hybrid, short
# convolutions (LFM2), gated DeltaNet (Qwen3.5)
SAME = ["llama", "mistral", "gemma3_text", "gpt_oss", "qwen3_moe"]
REFUSED = ["falcon_h1", "lfm2", "qwen3_5_text"]


@pytest.fixture(scope="module")
def phi3():
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("phi3"))
    prepare_tokenizer(tokenizer)
    records = load_records(CHATS, on_error="skip").records
    examples = render_records(records, Renderer(tokenizer, max_length=256), on_error="skip").examples
    return tokenizer, examples[:3]  # 45, 47 and 132 tokens: longer than the window of 4


def sweep(model_type: str, phi3) -> None:
    tokenizer, documents = phi3
    result = check_architecture(model_type, documents, len(tokenizer), tokenizer.pad_token_id)
    assert not result.skipped, result.skipped
    assert set(result.outcomes) == set(BATCHINGS)
    for batching, outcome in result.outcomes.items():
        assert outcome.status in ("same", "refused"), f"{model_type} {batching}: {outcome.status} {outcome.detail}"
    assert result.lora.endswith(" layers"), f"{model_type} LoRA all-linear: {result.lora}"
    return result


@pytest.mark.parametrize("model_type", SAME)
def test_packed_rows_give_each_documents_own_losses(model_type: str, phi3) -> None:
    result = sweep(model_type, phi3)
    assert {o.status for o in result.outcomes.values()} == {"same"}


@pytest.mark.parametrize("model_type", REFUSED)
def test_state_carrying_layers_are_refused(model_type: str, phi3) -> None:
    result = sweep(model_type, phi3)
    assert {o.status for o in result.outcomes.values()} == {"refused"}
    message = result.outcomes["packed"].detail
    assert message.startswith("data.batching=packed: ") and "data.batching=padded" in message
    assert "carry a state" in message


@pytest.mark.slow
@pytest.mark.parametrize("model_type", model_types())
def test_every_architecture_is_right_or_refused(model_type: str, phi3) -> None:
    tokenizer, documents = phi3
    result = check_architecture(model_type, documents, len(tokenizer), tokenizer.pad_token_id)
    if result.skipped:
        pytest.skip(result.skipped)
    for batching, outcome in result.outcomes.items():
        assert outcome.status in ("same", "refused"), f"{model_type} {batching}: {outcome.status} {outcome.detail}"
    assert not result.lora.startswith(("wrong", "error")), result.lora


def test_window_mask_by_hand() -> None:
    """Window 3 over a row of documents [A A A A A | B B]: a token sees itself and the 2 before, in its document."""
    mask = block_causal_mask(torch.tensor([[0, 0, 0, 0, 0, 1, 1]]), window=3)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0, 0],
                    [0, 1, 1, 1, 0, 0, 0],
                    [0, 0, 1, 1, 1, 0, 0],
                    [0, 0, 0, 0, 0, 1, 0],
                    [0, 0, 0, 0, 0, 1, 1]]


def test_the_refusal_names_the_architecture_and_comes_before_the_data(tmp_path: Path, capsys) -> None:
    """`sftkit train` on a Falcon-H1 with data.batching=packed stops on the architecture, although its data
    file is broken: the check ran before any data was read."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("phi3"))
    model = build("falcon_h1", len(tokenizer))
    model.save_pretrained(tmp_path / "falcon")
    tokenizer.save_pretrained(tmp_path / "falcon")
    check_batching(tmp_path / "falcon", "padded")  # padded batches are right everywhere
    with pytest.raises(ConfigError, match="FalconH1ForCausalLM"):
        check_batching(tmp_path / "falcon", "padding_free")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(tmp_path / "falcon")},
        "data": {"train": str(Path(__file__).parent / "assets" / "data" / "broken_mixed.jsonl"),
                 "batching": "packed", "max_length": 256},
        "output_dir": str(tmp_path / "run"),
    }))
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "FalconH1ForCausalLM (falcon_h1) has layers that carry a state" in err, err
    assert "use data.batching=padded or grouped" in err and "Traceback" not in err


def test_router_loss_is_transformers_own_on_trained_tokens(phi3) -> None:
    """Qwen3-MoE: the load-balancing loss of a packed batch is transformers' `load_balancing_loss_func` over the
    trained positions, the same as for the documents padded; the loss sum adds coef x aux per trained token."""
    tokenizer, documents = phi3
    model = build("qwen3_moe", len(tokenizer))
    assert router_loss_function(model) is not None
    batch = collate(list(documents), tokenizer.pad_token_id)
    evaluated = {}
    token_loss_sum(model, batch, parts=evaluated)
    assert "router_loss" not in evaluated  # evaluation (eval mode): plain cross-entropy, as perplexity needs
    model.train()  # training: the router loss is added
    packed, padded = {}, {}
    loss_packed = token_loss_sum(model, collate_documents([documents[:2], documents[2:]], tokenizer.pad_token_id),
                                 parts=packed)
    loss_padded = token_loss_sum(model, batch, parts=padded)
    with torch.no_grad():
        trained = F.pad(batch["labels"][:, 1:] != IGNORE_INDEX, (0, 1))
        outputs = model(input_ids=batch["input_ids"], output_router_logits=True, use_cache=False)
        module = __import__(type(model).__module__, fromlist=["load_balancing_loss_func"])
        expected = module.load_balancing_loss_func(outputs.router_logits, model.num_experts,
                                                   model.num_experts_per_tok, trained)
    n_trained = int(trained.sum())
    assert padded["router_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert packed["router_loss"] == pytest.approx(padded["router_loss"], rel=1e-5)
    assert packed["cross_entropy"] == pytest.approx(padded["cross_entropy"], rel=1e-5)
    coef = model.config.router_aux_loss_coef
    assert float(loss_padded) == pytest.approx(padded["cross_entropy"] + coef * padded["router_loss"] * n_trained,
                                               rel=1e-6)
    assert float(loss_packed) == pytest.approx(float(loss_padded), rel=1e-5)


def test_lora_all_linear_finds_the_text_decoder_and_skips_what_peft_refuses(phi3) -> None:
    """Gemma 3 with its vision tower: LoRA on the language model only; Falcon-H1: PEFT's all-linear would
    stop on the Mamba out_proj, sftkit leaves it out and adapts the rest."""
    tokenizer, documents = phi3
    gemma = build("gemma3", len(tokenizer))
    assert check_lora(gemma, documents[0]) == "14 layers"  # 7 projections x 2 text layers, no vision layer
    assert not any("vision" in name for name, m in gemma.named_modules() if hasattr(m, "lora_A"))
    falcon = build("falcon_h1", len(tokenizer))
    assert check_lora(falcon, documents[0]).endswith(" layers")
    adapted = [name for name, m in falcon.named_modules() if hasattr(m, "lora_A")]
    assert adapted and not any(name.endswith("mamba.out_proj") for name in adapted)


@pytest.mark.parametrize("model_type", ["mistral", "gpt_oss"])
def test_a_packed_trained_model_generates_like_an_unpacked_one(model_type: str, phi3) -> None:
    """Three SGD steps on packed rows and on padded batches of the same conversations: the same weights, so
    `sftkit generate` (generate_reply, greedy) gives the same reply."""
    tokenizer, documents = phi3
    models = []
    for batch in (collate_documents([documents[:2], documents[2:]], tokenizer.pad_token_id),
                  collate(list(documents), tokenizer.pad_token_id)):
        model = build(model_type, len(tokenizer)).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            (token_loss_sum(model, batch) / trained_token_count(batch)).backward()
            optimizer.step()
        models.append(model.eval())
    packed, padded = models
    for (name, a), b in zip(packed.named_parameters(), padded.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    chat = [{"role": "user", "content": "Give me a word that rhymes with 'light'."}]
    replies = [generate_reply(m, tokenizer, chat, max_new_tokens=12).text for m in models]
    assert replies[0] == replies[1]


def test_router_loss_is_logged_apart_from_the_cross_entropy(phi3) -> None:
    """backward_window returns the cross-entropy sum (what metrics.jsonl's `loss` is) and adds the router's
    load-balancing loss x trained tokens to `sums` (metrics.jsonl's `router_loss`, per trained token)."""
    from sftkit.train import TrainState, backward_window

    tokenizer, documents = phi3
    model = build("qwen3_moe", len(tokenizer))
    model.train()
    batch = collate(list(documents), tokenizer.pad_token_id)
    expected: dict[str, float] = {}
    token_loss_sum(model, batch, parts=expected)
    state = TrainState()
    total, n_trained = backward_window(model, [batch], sums=state.sums)
    assert total == pytest.approx(expected["cross_entropy"], rel=1e-5)
    assert state.sums["router_loss"] == pytest.approx(expected["router_loss"] * n_trained, rel=1e-5)
    state.add(total, n_trained, n_trained, 1.0)
    row = state.record(per_epoch=1, lr=0.0)
    assert row["loss"] == pytest.approx(expected["cross_entropy"] / n_trained, rel=1e-5)
    assert row["router_loss"] == pytest.approx(expected["router_loss"], rel=1e-5) and state.sums == {}
