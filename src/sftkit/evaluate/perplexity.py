"""The one eval loss: token-weighted mean next-token loss (and perplexity) over the trained tokens of examples.

    sftkit train RECIPE train.eval_every=50      # eval_loss / eval_ppl in metrics.jsonl at each evaluation

Used for the held-out split (`sftkit.train`), for the forgetting monitor's reference text
(`sftkit.evaluate.monitor`) and by the benchmarks, so every figure called "eval loss" is the same sum
of per-token cross-entropies divided by the same count of trained tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from sftkit.data.batches import collate, trained_token_count
from sftkit.data.render import Tokenized
from sftkit.loss import token_loss_sum


@torch.no_grad()
def eval_loss(model: PreTrainedModel, examples: Sequence[Tokenized], batch_size: int, pad_id: int,
              max_batches: int | None = None) -> tuple[float, float]:
    """(token-weighted mean loss, perplexity) over the trained tokens of `examples`, `batch_size` at a time."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in list(range(0, len(examples), batch_size))[:max_batches]:
        batch = collate(examples[start : start + batch_size], pad_id)
        total += token_loss_sum(model, {k: v.to(model.device) for k, v in batch.items()}).item()
        tokens += trained_token_count(batch)
    model.train(was_training)
    loss = total / max(tokens, 1)
    return loss, math.exp(min(loss, 50.0))
