"""The training step waits for the device once per optimizer step, and computes what it computed before.

    .venv/bin/python -m pytest tests/test_step_syncs.py

On a GPU the host queues kernels ahead of the device; every read of a tensor's value (`.item()`,
`float()`, `.tolist()`, boolean-mask indexing) stops the queueing until the device has caught up,
and a small model's step is then launch-bound (issue 23). sftkit reads a batch's structure on the
host before the batch moves (`sftkit.loss.loss_batch`) and reads its sums back once, with the
gradient norm (`sftkit.train.finish_window`). Here, on CPU, the same reads are counted: each
`aten::_local_scalar_dense` and `aten::nonzero` the profiler records, and each `Tensor.tolist` (which
records no operator on CPU). The numbers are then checked against a plain reference: each document
through the model's own forward alone, `F.cross_entropy` over all its logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import AutoTokenizer

from sftkit.attention import use_document_attention
from sftkit.data.batches import collate, collate_documents, input_token_count
from sftkit.data.formats import load_records
from sftkit.data.pack import pack
from sftkit.data.render import IGNORE_INDEX, Renderer, Tokenized
from sftkit.data.render_all import render_records
from sftkit.data.templates import prepare_tokenizer
from sftkit.faults import gradient_norm_tensor
from sftkit.model import build_tiny_model
from sftkit.train import backward_pass, backward_window, finish_window
from tests.conftest import config_path, tokenizer_dir

CHATS = Path(__file__).parent / "assets" / "data" / "chat_messages.jsonl"
MAX_LENGTH = 256
BATCHINGS = ["padded", "padding_free", "packed", "padding_free_block_mask"]  # the last: sdpa's mask, as on a GPU


@pytest.fixture(scope="module")
def qwen() -> tuple[AutoTokenizer, list[Tokenized]]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))
    prepare_tokenizer(tokenizer)
    records = load_records(CHATS, on_error="skip").records
    examples = render_records(records, Renderer(tokenizer, max_length=MAX_LENGTH), on_error="skip").examples
    return tokenizer, examples[:9]


def model_for(batching: str, tokenizer: AutoTokenizer) -> torch.nn.Module:
    model = build_tiny_model(config_path("qwen2"), tokenizer)  # no dropout: every pass sees the same model
    if batching in ("padding_free", "packed"):
        assert use_document_attention(model)  # as setup_model does on CPU
    return model.train()


def micro_batches(batching: str, examples: list[Tokenized], pad_id: int, grad_accum: int
                  ) -> list[dict[str, torch.Tensor]]:
    """The window's examples in `grad_accum` micro-batches, collated as `data.batching` does."""
    size = -(-len(examples) // grad_accum)
    parts = [examples[i : i + size] for i in range(0, len(examples), size)]
    if batching == "padded":
        return [collate(part, pad_id) for part in parts]
    if batching == "packed":
        return [collate_documents([[part[i] for i in row] for row in pack(part, MAX_LENGTH)], pad_id) for part in parts]
    return [collate_documents([part], pad_id) for part in parts]


def count_syncs(step: callable) -> int:
    """Reads of tensor values by the host while `step()` runs: `_local_scalar_dense` (item, float, int, bool),
    `nonzero` (boolean-mask indexing) and `Tensor.tolist` (no operator on CPU, so counted by a wrapper)."""
    calls = [0]
    tolist = torch.Tensor.tolist

    def counted(self: torch.Tensor) -> object:
        calls[0] += 1
        return tolist(self)

    torch.Tensor.tolist = counted  # type: ignore[method-assign]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    names = [e.name for e in prof.events()]
    return names.count("aten::_local_scalar_dense") + names.count("aten::nonzero") + calls[0]


@pytest.mark.parametrize("grad_accum", [1, 3])
@pytest.mark.parametrize("batching", BATCHINGS)
def test_one_host_sync_per_optimizer_step(qwen, batching: str, grad_accum: int) -> None:
    """The loop's step (backward over the window, clipping, the read-back of loss, router sum and gradient norm)
    reads the device once, whatever grad_accum (the optimizer is left out: CPU fused AdamW reads each step count
    with `.item()`, its CUDA kernel does not)."""
    tokenizer, examples = qwen
    model = model_for(batching, tokenizer)
    batches = micro_batches(batching, examples, tokenizer.pad_token_id, grad_accum)
    if batching == "padding_free_block_mask":
        assert model.config._attn_implementation == "sdpa"  # the explicit block-diagonal mask, made on the device
    read: list[object] = []

    def step() -> None:  # as sftkit.train.loop
        window = backward_pass(model, batches)
        grad_norm = gradient_norm_tensor(model.parameters(), 1.0)
        read.append(finish_window(window, grad_norm=grad_norm, n_inputs=sum(input_token_count(b) for b in batches)))

    # padded rows reach transformers 5 without a mask or position_ids: its forward then checks whether the rows are
    # packed (`find_packed_sequence_indices`: `.all()` of the positions it makes), one read per micro-batch that
    # only a 4-D mask would skip, and that would cost sdpa its `is_causal` kernel
    model_reads = len(batches) if batching == "padded" else 0
    assert count_syncs(step) == 1 + model_reads
    loss_sum, grad_norm, n_inputs = read[0]
    assert loss_sum > 0 and grad_norm > 0 and n_inputs == sum(len(ex.input_ids) for ex in examples)


def reference(model: torch.nn.Module, examples: list[Tokenized]) -> tuple[float, list[torch.Tensor]]:
    """Cross-entropy sum of the window and the gradient of its mean over trained tokens, one document at a time
    through the model's own forward (plain sdpa, no padding), all logits, `F.cross_entropy`."""
    model.zero_grad(set_to_none=True)
    sums = []
    for ex in examples:
        logits = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0, :-1].float()
        sums.append(F.cross_entropy(logits, torch.tensor(ex.labels[1:]), ignore_index=IGNORE_INDEX, reduction="sum"))
    n_trained = sum(sum(label != IGNORE_INDEX for label in ex.labels[1:]) for ex in examples)
    total = torch.stack(sums).sum()
    (total / n_trained).backward()
    return float(total.detach()), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("grad_accum", [1, 3])
@pytest.mark.parametrize("batching", ["padded", "padding_free", "padding_free_block_mask"])
def test_the_window_loss_and_gradient_are_the_reference(qwen, batching: str, grad_accum: int) -> None:
    tokenizer, examples = qwen
    model = model_for(batching, tokenizer)
    model.zero_grad(set_to_none=True)
    loss_sum, n_trained = backward_window(model, micro_batches(batching, examples, tokenizer.pad_token_id, grad_accum))
    grads = [p.grad.clone() for p in model.parameters()]
    model.set_attn_implementation("sdpa")
    expected_sum, expected = reference(model, examples)
    assert n_trained == sum(sum(label != IGNORE_INDEX for label in ex.labels[1:]) for ex in examples)
    assert loss_sum == pytest.approx(expected_sum, rel=1e-6)  # measured: 1.4e-7
    for (name, _), got, want in zip(model.named_parameters(), grads, expected, strict=True):
        # fp32 rounding of two different computations (the lean loss makes the head's gradient in its forward):
        # measured within 1.3e-6 of each tensor's largest element, in every mode
        torch.testing.assert_close(got, want, rtol=0, atol=3e-6 * want.abs().max().item(), msg=name)
