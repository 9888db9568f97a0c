"""Every input that keeps packed documents apart, and attention one document at a time.

    sftkit train configs/tiny-cpu.yaml data.batching=packed     # on CPU with model.attn_implementation=sdpa

`model_inputs` turns a batch into the decoder's keyword arguments: padded batches as they are;
packed and padding-free rows (`document_ids` from `sftkit.data.batches.collate_documents`) with
position_ids that restart per document and either document boundaries (`cu_seq_lens`, for
`document_sdpa` below and flash-attention) or an explicit block-diagonal mask
(`block_causal_mask`, for sdpa and eager). transformers detects packed rows from `position_ids`
only when no attention mask is passed AND no cache exists; the model's default `use_cache=True`
makes a cache and silently turns the detection off, so sftkit never relies on the detection.

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

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sftkit.config import ConfigError

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


def model_inputs(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments for the decoder: padded batches as they are, packed ones kept apart.

    Right-padded batches (sftkit's `collate`) need no padding mask: under causal attention no real
    token sees a later pad, so sdpa runs its cheaper `is_causal` kernel. A batch with
    `document_ids` (packed or padding-free, `sftkit.data.pack`) gets `position_ids` that restart
    per document and one of: document boundaries for `document_sdpa` and flash-attention (the rows
    flattened into one), or an explicit block-diagonal mask (boolean for sdpa, additive for eager).
    The cache is always off: a cache disables transformers' own packed-sequence handling.
    """
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "document_ids" not in batch:
        mask = batch["attention_mask"]
        if not bool((mask[:, :-1] >= mask[:, 1:]).all()):  # not right-padded: the mask is needed
            inputs["attention_mask"] = mask
        return inputs
    attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if attention == NAME or "flash" in attention:
        bounds = [0, *itertools.accumulate(sequence_lengths(batch["document_ids"]))]
        inputs.update(input_ids=batch["input_ids"].reshape(1, -1), position_ids=batch["position_ids"].reshape(1, -1))
        if attention == NAME:  # a 4-D mask passes through transformers untouched; document_sdpa ignores it
            placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=batch["input_ids"].device)
            inputs.update(cu_seq_lens_q=bounds, attention_mask=placeholder)
        else:
            cumulative = torch.tensor(bounds, dtype=torch.int32, device=batch["input_ids"].device)
            longest = max(b - a for a, b in zip(bounds, bounds[1:]))
            inputs.update(cu_seq_lens_q=cumulative, cu_seq_lens_k=cumulative, max_length_q=longest,
                          max_length_k=longest)
        return inputs
    if attention not in ("sdpa", "eager"):
        raise ConfigError(f"model.attn_implementation: {attention!r} cannot keep packed documents apart; use sdpa, "
                          "eager or flash_attention_2 with data.packing / data.padding_free")
    dtype = model.dtype if attention == "eager" else None
    inputs.update(position_ids=batch["position_ids"], attention_mask=block_causal_mask(batch["document_ids"], dtype))
    return inputs


def block_causal_mask(document_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(batch, 1, length, length) mask: query i may attend to key j <= i of the same document.

    Boolean (True = attend) for sdpa; with `dtype`, additive (0 or the dtype's minimum) for eager
    attention, which adds the mask to the scores. Padding (-1) forms a document of its own, so
    every row of the mask has at least one True and no softmax is empty (no NaN).
    """
    length = document_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    mask = (document_ids[:, :, None] == document_ids[:, None, :]) & causal
    mask = mask[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def sequence_lengths(document_ids: torch.Tensor) -> list[int]:
    """Lengths of the runs of equal document ids along the flattened rows (documents and padding)."""
    flat = document_ids.flatten()
    row_starts = torch.zeros_like(flat, dtype=torch.bool)
    row_starts[:: document_ids.shape[1]] = True
    starts = row_starts | torch.cat([flat.new_ones(1, dtype=torch.bool), flat[1:] != flat[:-1]])
    bounds = torch.cat([starts.nonzero().flatten(), flat.new_tensor([flat.numel()])])
    return bounds.diff().tolist()
