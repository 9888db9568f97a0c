"""The lean loss (`sftkit.loss`) gives the loss and gradients of the plain full-logits cross-entropy.

The reference everywhere is the textbook computation: every logit of the model's own forward,
then `F.cross_entropy(..., reduction="sum")` over the trained positions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from sftkit.data.batches import collate
from sftkit.data.messages import Conversation, Message
from sftkit.data.render import Renderer
from sftkit.data.templates import prepare_tokenizer
from sftkit.loss import head_kind, linear_cross_entropy, token_loss_sum
from sftkit.model import build_tiny_model
from tests.conftest import config_path, tokenizer_dir


def reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    return F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")


def grads_of(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("chunk", [1, 3, 10, 64])
def test_linear_cross_entropy_matches_reference(chunk: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    ours = linear_cross_entropy(hidden, weight, bias, targets, chunk)
    theirs = reference(hidden, weight, bias, targets)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_of(ours * 0.5, hidden, weight, bias), grads_of(theirs * 0.5, hidden, weight, bias)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # the upstream gradient (0.5) is applied


def test_frozen_head_and_no_grad() -> None:
    torch.manual_seed(1)
    hidden = torch.randn(7, 8, requires_grad=True)
    weight = torch.randn(20, 8)  # frozen, as under LoRA: no gradient is made for it
    targets = torch.randint(0, 20, (7,))
    ours = linear_cross_entropy(hidden, weight, None, targets, 2)
    (grad,) = grads_of(ours, hidden)
    torch.testing.assert_close(grad, grads_of(reference(hidden, weight, None, targets), hidden)[0])
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, None, targets, 2)
    assert not value.requires_grad
    torch.testing.assert_close(value, ours.detach())


@pytest.fixture(scope="module")
def model_and_batch():
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("gpt2"))  # 50k vocabulary: cheaper than Qwen's 150k
    prepare_tokenizer(tokenizer, "chatml")
    renderer = Renderer(tokenizer)
    replies = ["Paris.", "A much longer reply, with more trained tokens in it than the first."]
    examples = [renderer.render(Conversation([Message("user", f"Question {i}?"), Message("assistant", r)]))
                for i, r in enumerate(replies)]
    model = build_tiny_model(config_path("qwen2"), tokenizer)
    return model, collate(examples, tokenizer.eos_token_id)


def full_logits_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")


def loss_and_grads(model: torch.nn.Module, loss: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("chunk", [None, 5])
def test_lean_loss_equals_full_logits(model_and_batch, chunk: int | None) -> None:
    model, batch = model_and_batch
    assert head_kind(model) == "fused"
    lean, lean_grads = loss_and_grads(model, token_loss_sum(model, batch, chunk=chunk))
    full, full_grads = loss_and_grads(model, full_logits_loss(model, batch))
    assert lean == pytest.approx(full, rel=1e-5)
    for a, b in zip(lean_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class WrappedHead(torch.nn.Linear):
    """A head that is not a plain nn.Linear (as a PEFT wrapper would be): the module path."""


def test_other_head_modules_are_chunked_through_the_module(model_and_batch) -> None:
    model, batch = model_and_batch
    plain = model.lm_head
    wrapped = WrappedHead(plain.in_features, plain.out_features, bias=False)
    wrapped.weight = plain.weight  # still tied to the embeddings
    model.lm_head = wrapped
    try:
        assert head_kind(model) == "module"
        lean, lean_grads = loss_and_grads(model, token_loss_sum(model, batch, chunk=4))
        full, full_grads = loss_and_grads(model, full_logits_loss(model, batch))
    finally:
        model.lm_head = plain
    assert lean == pytest.approx(full, rel=1e-5)
    for a, b in zip(lean_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_models_that_transform_logits_use_their_own_forward(model_and_batch) -> None:
    model, batch = model_and_batch
    model.config.final_logit_softcapping = 30.0  # Gemma 2 style: the head's output is not the logits
    try:
        assert head_kind(model) == "model"
        with torch.no_grad():
            lean = token_loss_sum(model, batch)
    finally:
        del model.config.final_logit_softcapping
    with torch.no_grad():  # Qwen2's forward ignores the setting, so the figures still agree
        assert lean.item() == pytest.approx(full_logits_loss(model, batch).item(), rel=1e-5)
