"""Attention one document at a time for packed and padding-free rows: the cost of the documents only.

    sftkit train configs/tiny-cpu.yaml data.packing=true       # on CPU with model.attn_implementation=sdpa

A block-diagonal mask over a packed row keeps documents apart, but sdpa still scores every
query-key pair of the row and masks most of them: a padding-free row of eight 200-token documents
costs 1,600^2 pairs where the documents need 8 x 200^2 / 2, about 16 times fewer. `document_sdpa`
calls sdpa once per document with `is_causal=True` instead, which is what flash-attention's varlen
kernel does on GPU:

    row      [ A A A B B C C C C ]          cu_seq_lens = [0, 3, 5, 9]
    sdpa     A-block, B-block, C-block      each causal, nothing across, nothing wasted

Given no document boundaries it is exactly transformers' sdpa (generation, evaluation, padded
batches). It is registered with transformers' `AttentionInterface` under "sftkit_documents" (the
library's extension point; nothing is patched). `use_document_attention` switches a CPU model
that uses sdpa to it, and `sftkit.loss.model_inputs` passes the boundaries as `cu_seq_lens_q`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sftkit_documents"


def document_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa per document when `cu_seq_lens_q` (a list of boundaries) is given, else plain sdpa.

    query (1, heads, tokens, head_dim) and key / value (1, kv_heads, tokens, head_dim) hold one
    flattened row; the output is (1, tokens, heads, head_dim) like transformers' sdpa.
    """
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    return _per_document(query, key, value, list(bounds), dropout, scaling, gqa), None


@torch.compiler.disable  # under train.compile: one graph break here, not a recompile per set of boundaries
def _per_document(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int], dropout: float,
                  scaling: float | None, gqa: bool) -> torch.Tensor:
    outputs = [
        F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                       dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def use_document_attention(model: PreTrainedModel) -> bool:
    """Switch a CPU model that uses sdpa to `document_sdpa`; True when it now does."""
    if model.device.type != "cpu" or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME


AttentionInterface.register(NAME, document_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # padded and generation masks: the same as sdpa's
