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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, modeling_utils

from sftkit.attention import model_inputs
from sftkit.data.batches import host
from sftkit.data.render import IGNORE_INDEX

CHUNK_ELEMENTS = 2**25  # fp32 logits per chunk: 128 MB (4,096 rows of an 8k vocabulary, 220 of Qwen's 152k)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


@dataclass
class LossBatch:
    """One micro-batch as the loss needs it: its structure read on the host, its tensors on the model's device.

    `index` lists the flattened positions (row x length + column) whose prediction is trained, in row
    order, and `targets` the tokens they predict: gathering those rows of the hidden states is an
    `index_select` whose length the host knows (`n_trained`), where a boolean mask would make the device
    count its True elements and the host wait for that count (a sync, at every micro-batch).
    """

    inputs: dict[str, Any]  # the decoder's keyword arguments (`sftkit.attention.model_inputs`)
    trained: torch.Tensor  # (rows, length) bool: positions whose prediction is trained
    index: torch.Tensor  # (n_trained,) int64: those positions, flattened
    targets: torch.Tensor  # (n_trained,) the tokens they predict
    n_trained: int
    on_host: np.ndarray  # `trained` as the host made it


def loss_batch(model: PreTrainedModel, batch: dict[str, torch.Tensor], device: torch.device | None = None
               ) -> LossBatch:
    """`batch` (collate's tensors, best still on the CPU) ready for `token_loss_sum` on `device` (default: the
    model's). Everything is computed on the host first; finished tensors move without blocking."""
    device = device or _base(model).device
    labels = host(batch["labels"])
    trained = np.zeros(labels.shape, dtype=bool)
    trained[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts the token at t + 1
    index = np.flatnonzero(trained)
    moved = [_to(a, device) for a in (trained, index, labels.reshape(-1)[index + 1])]
    return LossBatch(model_inputs(model, batch, device), *moved, n_trained=len(index), on_host=trained)


def _to(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`, without waiting (integers as int64, the type indices and targets take)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64 if array.dtype.kind in "iu" else None))
    return tensor.to(device, non_blocking=True)


def token_loss_sum(model: PreTrainedModel, batch: dict[str, torch.Tensor] | LossBatch, chunk: int | None = None,
                   parts: dict[str, Any] | None = None, read_back: bool = True) -> torch.Tensor:
    """Sum of next-token cross-entropies over the trained positions (labels != -100 after the shift).

    A mixture-of-experts model that defines a router load-balancing loss (`router_loss`) adds it the way
    transformers does (`loss += router_aux_loss_coef * aux_loss`), per trained token so that it survives the
    division by the window's trained tokens: the sum gets `coef * aux * n_trained`. Only in training (train
    mode, gradients on): evaluation and perplexity stay plain cross-entropy. `parts`, when given, receives
    "cross_entropy" (the sum without it) and, when the router loss was added, "router_loss" (aux, unscaled):
    floats, or with `read_back=False` detached 0-d tensors that the caller reads when it likes (the
    training step reads everything once per optimizer step: a float here would wait for the forward).
    `batch`: collate's tensors, or a `LossBatch` made from them before they moved (`loss_batch`).
    """
    prepared = batch if isinstance(batch, LossBatch) else loss_batch(model, batch)
    inputs = dict(prepared.inputs)
    if not prepared.n_trained:  # an idle batch (torchrun: a rank's empty share of a short last micro-batch)
        return idle_loss(model, inputs)
    router = router_loss_function(model) if model.training and torch.is_grad_enabled() else None  # eval: plain CE
    if router is not None:
        inputs["output_router_logits"] = True
    kind = head_kind(model)
    if kind == "model":
        outputs = _model_outputs(model, inputs, prepared)
        loss = F.cross_entropy(outputs.logits.float(), prepared.targets, reduction="sum")
    else:
        base = _base(model)
        outputs = base.base_model(**inputs)
        hidden = outputs.last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, prepared.index)  # flattened rows: the same
        loss = _head_loss(base, hidden, prepared.targets, kind, chunk)
    if parts is not None:
        parts["cross_entropy"] = float(loss.detach()) if read_back else loss.detach()
    if router is not None and getattr(outputs, "router_logits", None) is not None:
        aux, coef = router(outputs.router_logits, prepared.trained.reshape(inputs["input_ids"].shape))
        loss = loss + coef * aux * prepared.n_trained
        if parts is not None:
            parts["router_loss"] = float(aux.detach()) if read_back else aux.detach()
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


def _model_outputs(model: PreTrainedModel, inputs: dict[str, Any], batch: LossBatch) -> Any:
    """The model's own forward (its own logit transform applies), `.logits` those of the trained positions."""
    keeps = _logits_to_keep_kind(model)
    device = batch.index.device
    if keeps == "none":
        outputs = model(**inputs)
        outputs.logits = _rows(outputs.logits).index_select(0, batch.index)
        return outputs
    if inputs["input_ids"].shape[0] == 1:  # padding-free, or rows flattened for document attention: the trained
        outputs = model(**inputs, logits_to_keep=batch.index)  # positions as indices, as every version takes them
        outputs.logits = _rows(outputs.logits)
        return outputs
    if keeps == "mask":  # transformers 5, padded rows: logits of the True positions only, flattened in row order
        return model(**inputs, logits_to_keep=batch.trained)  # (transformers indexes with the mask: a sync)
    columns = np.flatnonzero(batch.on_host.any(axis=0))  # older: the same positions for every row
    outputs = model(**inputs, logits_to_keep=_to(columns, device))
    outputs.logits = _rows(outputs.logits).index_select(0, _to(np.flatnonzero(batch.on_host[:, columns]), device))
    return outputs


def _rows(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1])


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
