"""Packing and padding-free rows keep documents apart: same per-document loss as unpacked, no leaks.

The model is a tiny random Qwen2 with the real Qwen2.5 tokenizer and template; conversations are
the varied fixtures in tests/assets/data/chat_messages.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from sftkit.attention import NAME as DOCUMENTS
from sftkit.attention import block_causal_mask, model_inputs
from sftkit.cli import main
from sftkit.data.batches import (
    Batcher,
    collate,
    collate_documents,
    length_grouped,
    window,
)
from sftkit.data.formats import load_records
from sftkit.data.pack import best_fit_decreasing, pack
from sftkit.data.render import IGNORE_INDEX, Renderer, Tokenized
from sftkit.data.render_all import render_records
from sftkit.data.templates import prepare_tokenizer
from sftkit.loss import token_loss_sum
from sftkit.model import build_tiny_model
from tests.conftest import config_path, tokenizer_dir

CHATS = Path(__file__).parent / "assets" / "data" / "chat_messages.jsonl"
MAX_LENGTH = 256


@pytest.fixture(scope="module")
def qwen():
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))
    prepare_tokenizer(tokenizer)
    records = load_records(CHATS, on_error="skip").records
    examples = render_records(records, Renderer(tokenizer, max_length=MAX_LENGTH), on_error="skip").examples
    model = build_tiny_model(config_path("qwen2"), tokenizer)
    return model, tokenizer, examples


def per_document_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
    """Summed token losses of each document, in row order (logits of the trained positions only)."""
    labels = batch["labels"][:, 1:]
    trained = F.pad(labels != IGNORE_INDEX, (0, 1))
    with torch.no_grad():
        hidden = model.model(**model_inputs(model, batch)).last_hidden_state
        hidden = hidden.reshape(trained.shape + hidden.shape[-1:])  # document attention flattens the rows
        losses = F.cross_entropy(model.lm_head(hidden[trained]), labels[labels != IGNORE_INDEX], reduction="none")
    documents = batch["document_ids"] if "document_ids" in batch else torch.zeros_like(trained, dtype=torch.long)
    rows = torch.arange(trained.shape[0])[:, None].expand_as(trained)
    keys = (rows[trained] * 10_000 + documents[trained]).tolist()
    return [losses[torch.tensor(keys) == key].sum().item() for key in sorted(set(keys))]


@pytest.mark.parametrize("attention", ["sdpa", "eager", DOCUMENTS])
def test_packed_loss_equals_unpacked_per_document(qwen, attention: str) -> None:
    model, tokenizer, examples = qwen
    model.set_attn_implementation(attention)
    try:
        alone = [per_document_losses(model, collate([ex], tokenizer.pad_token_id))[0] for ex in examples]
        bins = pack(examples, MAX_LENGTH)
        assert max(len(row) for row in bins) >= 3 and len(bins) < len(examples)
        packed = collate_documents([[examples[i] for i in row] for row in bins], tokenizer.pad_token_id)
        assert per_document_losses(model, packed) == pytest.approx([alone[i] for row in bins for i in row],
                                                                   rel=1e-4, abs=1e-4)
        one_row = collate_documents([examples], tokenizer.pad_token_id)  # padding-free: everything in one row
        assert per_document_losses(model, one_row) == pytest.approx(alone, rel=1e-4, abs=1e-4)
        with torch.no_grad():  # the training loss path (lean, chunked) agrees too
            total = token_loss_sum(model, packed).item()
        assert total == pytest.approx(sum(alone), rel=1e-4)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("attention", ["sdpa", DOCUMENTS])
def test_document_b_cannot_change_document_a(qwen, attention: str) -> None:
    """Row = [B, A]: rewriting B's tokens leaves A's logits as they were; a plain causal mask would not."""
    model, tokenizer, examples = qwen
    a, b = examples[0], examples[1]
    noisy = Tokenized(torch.randint(0, 1000, (len(b.input_ids),)).tolist(), b.labels, "noise")

    def logits_of_a(first: Tokenized, packed: bool) -> torch.Tensor:
        batch = collate_documents([[first, a]], tokenizer.pad_token_id)
        inputs = model_inputs(model, batch) if packed else {
            "input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": batch["attention_mask"], "use_cache": False}  # 2-D mask: documents see each other
        with torch.no_grad():
            return model(**inputs).logits.reshape(-1, model.config.vocab_size)[len(first.input_ids):]

    model.set_attn_implementation(attention)
    try:
        torch.testing.assert_close(logits_of_a(b, packed=True), logits_of_a(noisy, packed=True), rtol=0, atol=1e-5)
        with torch.no_grad():
            own = model(input_ids=torch.tensor([a.input_ids]), use_cache=False).logits[0]
        torch.testing.assert_close(logits_of_a(b, packed=True), own, rtol=1e-4, atol=1e-4)  # positions restart
        assert (logits_of_a(b, packed=False) - logits_of_a(noisy, packed=False)).abs().max() > 1e-3
    finally:
        model.set_attn_implementation("sdpa")


def test_best_fit_decreasing_by_hand() -> None:
    #  longest first: 6 -> row 0 (2 left); 5 -> row 1 (3 left); 4 -> row 2 (4 left);
    #  3 -> row 1 (the tightest fit, full); 2 -> row 0 (full); 1 -> row 2 (3 left)
    assert best_fit_decreasing([5, 3, 4, 2, 6, 1], 8) == [[4, 3], [0, 1], [2, 5]]
    assert best_fit_decreasing([4, 4, 4], 4) == [[0], [1], [2]]
    assert best_fit_decreasing([], 8) == []
    with pytest.raises(ValueError, match="longer than 8 tokens"):
        best_fit_decreasing([3, 9], 8)


def test_collate_documents_by_hand() -> None:
    a = Tokenized([11, 12, 13], [IGNORE_INDEX, 12, 13], "a")
    b = Tokenized([21, 22], [IGNORE_INDEX, 22], "b")  # strategy "all", as rendered: the first token never trains
    c = Tokenized([31, 32, 33, 34], [IGNORE_INDEX, IGNORE_INDEX, 33, 34], "c")
    with pytest.raises(ValueError, match="b: its first token is trained"):  # packing never relabels: it refuses
        collate_documents([[a, Tokenized([21, 22], [21, 22], "b")]], pad_id=0)
    batch = collate_documents([[a, b], [c]], pad_id=0)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 33, 34, 0]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22], [-100, -100, 33, 34, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert block_causal_mask(batch["document_ids"])[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    additive = block_causal_mask(batch["document_ids"], torch.float32)[1, 0]
    assert additive[4].tolist() == [torch.finfo(torch.float32).min] * 4 + [0.0]  # padding sees only itself


def test_packed_epochs_cover_every_example_once_and_resume_exactly(qwen) -> None:
    _, tokenizer, examples = qwen
    batcher = Batcher(examples, tokenizer.pad_token_id, batch_size=2, grad_accum=1, seed=3, mode="packed",
                      max_length=MAX_LENGTH)
    per_epoch = batcher.steps_per_epoch()
    assert per_epoch == -(-len(batcher.units) // 2) and per_epoch < -(-len(examples) // 2)
    for epoch in range(2):
        seen = [i for step in range(epoch * per_epoch, (epoch + 1) * per_epoch) for ids in batcher.window(step)[1]
                for i in ids]
        assert sorted(seen) == list(range(len(examples)))
    again = Batcher(examples, tokenizer.pad_token_id, batch_size=2, grad_accum=1, seed=3, mode="packed",
                    max_length=MAX_LENGTH)
    assert again.window(per_epoch + 1) == batcher.window(per_epoch + 1)  # a pure function of (seed, step)
    batch = batcher.collate(batcher.window(0)[1][0])
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= MAX_LENGTH


def test_length_grouping_is_seeded_aligned_and_pads_less() -> None:
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    order = list(range(1000))
    grouped = length_grouped(order, lengths, batch_size=8, seed=0, epoch=0, mega_batches=5)
    assert grouped == length_grouped(order, lengths, batch_size=8, seed=0, epoch=0, mega_batches=5)
    assert grouped != length_grouped(order, lengths, batch_size=8, seed=0, epoch=1, mega_batches=5)
    assert sorted(grouped) == order

    def padding(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    plain = [window(1000, s, batch_size=8, grad_accum=1, seed=0)[1][0] for s in range(125)]
    by_length = [window(1000, s, batch_size=8, grad_accum=1, seed=0, lengths=lengths)[1][0] for s in range(125)]
    assert sorted(i for b in by_length for i in b) == order
    assert padding(by_length) < padding(plain) / 5


def test_preview_pack_json(qwen, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, examples = qwen
    assert main(["data", "preview", "--tokenizer", str(tokenizer_dir("qwen2.5")), "--data", str(CHATS),
                 "--max-length", str(MAX_LENGTH), "--skip-invalid", "--pack", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == len(pack(examples, MAX_LENGTH)) < len(examples)
    documents = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= MAX_LENGTH
        starts = [j for j, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        assert all(row["position_ids"][s:e] == list(range(e - s)) for s, e in zip(starts, starts[1:]))
        documents += [tuple(row["input_ids"][s:e]) for s, e in zip(starts, starts[1:])]
    assert sorted(documents) == sorted(tuple(ex.input_ids) for ex in examples)  # whole, none cut or lost
