"""Lean causal-LM loss: logits only for trained positions, a chunk at a time, never all of them.

    sftkit train configs/tiny-cpu.yaml     # sftkit.train.backward_window -> token_loss_sum

    decoder(input_ids) -> hidden (batch, length, d)
      keep the positions whose next token is trained     -> h (n_trained, d)
      for each chunk of C rows of h:  logits = h_c @ W.T (C, vocab, fp32) -> cross-entropy sum
                                      and, while the chunk's logits exist, its gradients
      loss = sum over chunks; backward only scales the gradients kept from the forward

With a 150k vocabulary the output projection is most of a small model's compute and, as fp32
logits for every position, its peak memory: 8 x 2048 positions x 151,936 x 4 bytes = 10 GB. Here
prompt and padding positions never reach the head, and at most `chunk` rows of logits exist at
a time. The gradients of a chunk are computed in the forward (softmax minus one-hot is all the
backward needs), so nothing is recomputed and no chunk's logits are kept for the backward.

Three paths, chosen per model (`head_kind`):
  fused    a plain `nn.Linear` head without logit scaling: `_LinearCrossEntropy` below, or Liger's
           fused kernel on CUDA when `liger-kernel` is installed (untested here: no GPU).
  module   any other head (a PEFT wrapper, ...): the same chunks through the module, each under
           `torch.utils.checkpoint` so its logits are recomputed instead of kept.
  model    configs that scale or soft-cap logits (Gemma 2, Cohere, Granite, ...): the model's own
           forward with `logits_to_keep` = the trained positions, so its own logit transform applies.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, modeling_utils

from sftkit.attention import model_inputs
from sftkit.data.render import IGNORE_INDEX

CHUNK_ELEMENTS = 2**25  # fp32 logits per chunk: 128 MB (4,096 rows of an 8k vocabulary, 220 of Qwen's 152k)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


def token_loss_sum(model: PreTrainedModel, batch: dict[str, torch.Tensor], chunk: int | None = None,
                   parts: dict[str, float] | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropies over the trained positions (labels != -100 after the shift).

    A mixture-of-experts model that defines a router load-balancing loss (`router_loss`) adds it the way
    transformers does (`loss += router_aux_loss_coef * aux_loss`), per trained token so that it survives the
    division by the window's trained tokens: the sum gets `coef * aux * n_trained`. Only in training (train
    mode, gradients on): evaluation and perplexity stay plain cross-entropy. `parts`, when given, receives
    "cross_entropy" (the sum without it) and, when the router loss was added, "router_loss" (aux, unscaled).
    """
    labels = batch["labels"][:, 1:]  # position t predicts the token at t + 1
    trained = F.pad(labels != IGNORE_INDEX, (0, 1))  # (batch, length): positions whose prediction is trained
    targets = labels[labels != IGNORE_INDEX]
    inputs = model_inputs(model, batch)
    if not len(targets):  # an idle batch (torchrun: a rank's empty share of a short last micro-batch)
        return idle_loss(model, inputs)
    router = router_loss_function(model) if model.training and torch.is_grad_enabled() else None  # eval: plain CE
    if router is not None:
        inputs["output_router_logits"] = True
    kind = head_kind(model)
    if kind == "model":
        outputs = _model_outputs(model, inputs, trained)
        loss = F.cross_entropy(outputs.logits.float(), targets, reduction="sum")
    else:
        base = _base(model)
        outputs = base.base_model(**inputs)
        hidden = outputs.last_hidden_state
        hidden = hidden.reshape(trained.shape + hidden.shape[-1:])[trained]  # flattened rows come back as one
        loss = _head_loss(base, hidden, targets, kind, chunk)
    if parts is not None:
        parts["cross_entropy"] = float(loss.detach())
    if router is not None and getattr(outputs, "router_logits", None) is not None:
        aux, coef = router(outputs.router_logits, trained.reshape(inputs["input_ids"].shape))
        loss = loss + coef * aux * len(targets)
        if parts is not None:
            parts["router_loss"] = float(aux.detach())
    return loss


def _head_loss(base: Any, hidden: torch.Tensor, targets: torch.Tensor, kind: str, chunk: int | None) -> torch.Tensor:
    head = base.get_output_embeddings()
    chunk = chunk or max(1, CHUNK_ELEMENTS // base.config.get_text_config().vocab_size)
    if kind == "module":
        return _module_cross_entropy(head, hidden, targets, chunk)
    if hidden.is_cuda and _liger_loss() is not None:
        loss = _liger_loss()(head.weight, hidden, targets, head.bias)
        return loss[0] if isinstance(loss, tuple) else loss  # newer versions may return (loss, z_loss)
    return linear_cross_entropy(hidden, head.weight, head.bias, targets, chunk)


def router_loss_function(model: PreTrainedModel) -> Any:
    """For a mixture-of-experts model with a load-balancing loss: f(router_logits, tokens mask) -> (aux, coef),
    with transformers' own `load_balancing_loss_func` of that model on the masked tokens; else None."""
    base = _base(model)
    function = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    coef = getattr(base, "router_aux_loss_coef", getattr(base.config, "router_aux_loss_coef", None))
    experts, top_k = getattr(base, "num_experts", None), getattr(base, "num_experts_per_tok", None)
    if function is None or not coef or not isinstance(experts, int) or not isinstance(top_k, int):
        return None

    def aux_loss(router_logits: Any, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        return function(tuple(router_logits), experts, top_k, mask), float(coef)

    return aux_loss


def idle_loss(model: PreTrainedModel, inputs: dict[str, Any]) -> torch.Tensor:
    """0, reached through every parameter: with nothing to train, the forward and backward still run (their
    gradients all zero), so the gradient reductions of DDP and FSDP on every rank stay in step."""
    keep = {"logits_to_keep": 1} if _logits_to_keep_kind(model) != "none" else {}
    return model(**inputs, **keep).logits[:, -1].float().sum() * 0.0


def head_kind(model: PreTrainedModel) -> str:
    """"fused" (plain linear head), "module" (another head module) or "model" (logits are transformed)."""
    base = _base(model)
    config = base.config.get_text_config()
    if any(getattr(config, name, None) not in (None, 1.0) for name in LOGIT_TRANSFORMS):
        return "model"
    head = base.get_output_embeddings()
    if head is None or base.base_model is base:
        return "model"
    return "fused" if type(head) is torch.nn.Linear else "module"


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """sum_i cross_entropy(hidden_i @ weight.T + bias, targets_i), `chunk` rows of logits at a time."""
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not wants_grad:
        return _chunked_sum(hidden, weight, bias, targets, chunk, None)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked linear + cross-entropy whose gradients are made in the forward (loss is a scalar sum)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = {
            "hidden": torch.empty_like(hidden) if need_hidden else None,
            "weight": torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None,
            "bias": torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None,
        }
        loss = _chunked_sum(hidden, weight, bias, targets, chunk, grads)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads.values()))
        ctx.present = tuple(g is not None for g in grads.values())
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # scaled in place: `g * grad_loss` would hold a second weight-sized gradient (1 GB at 262k x 1024 fp32)
        out = [
            g.mul_(grad_loss).to(dtype) if present else None
            for g, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes)
        ]
        return out[0], out[1], out[2], None, None


def _chunked_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 chunk: int, grads: dict[str, torch.Tensor | None] | None) -> torch.Tensor:
    """The loss sum; with `grads`, also fill d(loss)/d(hidden, weight, bias) chunk by chunk."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = exps = d_logits = None  # the last chunk's logits go before this chunk's exist: one at a time
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        logits = F.linear(h, weight, bias).float()
        target_logits = logits.gather(1, t[:, None])
        top = logits.amax(dim=1, keepdim=True)
        exps = logits.sub_(top).exp_()  # in place: one exp pass serves the loss and the softmax
        sums = exps.sum(dim=1, keepdim=True)
        total += (top + sums.log() - target_logits).sum()  # logsumexp - target logit
        if grads is None:
            continue
        d_logits = exps.div_(sums)  # softmax
        d_logits[torch.arange(len(t), device=t.device), t] -= 1.0  # minus the one-hot target
        if grads["bias"] is not None:
            grads["bias"] += d_logits.sum(0)
        d_logits = d_logits.to(h.dtype)
        if grads["hidden"] is not None:
            grads["hidden"][start : start + chunk] = d_logits @ weight
        if grads["weight"] is not None and h.dtype == torch.float32:
            grads["weight"].addmm_(d_logits.T, h)
        elif grads["weight"] is not None:  # bf16 / fp16 products, summed over chunks in fp32
            grads["weight"] += (d_logits.T @ h).float()
    return total


def _module_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Chunks through an arbitrary head module, each recomputed in the backward instead of kept."""
    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        total = total + (checkpoint(chunk_loss, h, t, use_reentrant=False) if torch.is_grad_enabled()
                         else chunk_loss(h, t))
    return total


def _model_outputs(model: PreTrainedModel, inputs: dict[str, Any], trained: torch.Tensor) -> Any:
    """The model's own forward (its own logit transform applies), `.logits` those of the trained positions."""
    trained = trained.reshape(inputs["input_ids"].shape)  # document attention: the rows flattened into one
    keeps = _logits_to_keep_kind(model)
    if keeps == "mask":  # transformers 5: logits of the True positions only, flattened in row order
        return model(**inputs, logits_to_keep=trained)
    if keeps == "positions":  # older: the same positions for every row
        columns = trained.any(dim=0).nonzero().squeeze(1)
        outputs = model(**inputs, logits_to_keep=columns)
        outputs.logits = outputs.logits[trained[:, columns]]
        return outputs
    outputs = model(**inputs)
    outputs.logits = outputs.logits[trained]
    return outputs


def _logits_to_keep_kind(model: torch.nn.Module) -> str:
    """How `model` can skip logits: "mask" (per-row boolean), "positions" (shared columns) or "none"."""
    base = _base(model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return "none"
    return "mask" if hasattr(modeling_utils, "slice_logits_to_keep") else "positions"


def _base(model: torch.nn.Module) -> Any:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def _liger_loss() -> Any:
    """Liger's fused linear cross-entropy (sum over tokens) when `liger-kernel` is installed, else None."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")
