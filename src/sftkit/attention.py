"""Every input that keeps packed documents apart, attention one document at a time, and which models cannot.

    sftkit train configs/tiny-cpu.yaml data.batching=packed     # on CPU with model.attn_implementation=sdpa

`model_inputs` turns a batch into the decoder's keyword arguments: padded batches as they are;
packed and padding-free rows (`document_ids` from `sftkit.data.batches.collate_documents`) with
position_ids that restart per document and one of: a `document_mask` for `document_sdpa` /
`document_eager` below (CPU), document boundaries (`cu_seq_lens`) for flash-attention, or an
explicit block-diagonal mask (`block_causal_mask`, for sdpa and eager elsewhere). transformers
detects packed rows from `position_ids` only when no attention mask is passed AND no cache exists;
the model's default `use_cache=True` makes a cache and silently turns the detection off, so sftkit
never relies on the detection.

A block-diagonal mask over a packed row keeps documents apart, but sdpa still scores every
query-key pair of the row and masks most of them: a padding-free row of eight 200-token documents
costs 1,600^2 pairs where the documents need 8 x 200^2 / 2, about 16 times fewer. `document_sdpa`
calls sdpa once per document instead, which is what flash-attention's varlen kernel does on GPU:

    row      [ A A A B B C C C C ]          document_mask = [0 0 0 1 1 2 2 2 2]  (cu_seq_lens [0, 3, 5, 9])
    sdpa     A-block, B-block, C-block      each causal, nothing across, nothing wasted

Sliding-window layers (Mistral, Gemma 2/3/4, gpt-oss, Phi-3, ...) keep their window inside each
document, per layer: `document_sdpa` takes the window its layer passes, the explicit mask is one
mask per layer type, and flash-attention gets each layer's window from transformers. Models that
need their own eager attention (gpt-oss's attention sinks, Gemma 2's soft-capping) run it per
document (`document_eager`). Given no document boundaries both are exactly transformers' sdpa and
eager (generation, evaluation, padded batches). They are registered with transformers'
`AttentionInterface` (the library's extension point; nothing is patched); `use_document_attention`
switches a CPU model to them.

Some architectures cannot keep documents apart at all: layers with a state (Mamba, linear
attention, short convolutions) carry it from one document into the next, and a few models number
positions their own way. `check_batching` refuses packed and padding-free batches for them from the
config alone, before any data is read; docs/architectures.md is the sweep over every architecture
(`python bench/architectures.py`).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AttentionInterface,
    AutoConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from torch.utils.weak import WeakTensorKeyDictionary

from sftkit.config import ConfigError
from sftkit.data.batches import host

NAME = "sftkit_documents"  # per-document attention for a model that uses sdpa
EAGER = "sftkit_documents_eager"  # the same for a model that needs its own eager attention (sinks, soft-capping)
MASK_IN_ATTENTION = ("doge",)  # attention layers that combine the mask with their own (Doge's dynamic mask)
ATTENTION_LAYERS = ("full_attention", "sliding_attention", "attention", "global", "local", "sliding")
_BOUNDS = WeakTensorKeyDictionary()  # document_mask -> its boundaries, known on the host when it was made


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
    flattened row; the output is (1, tokens, heads, head_dim) like transformers' sdpa. A layer's
    sliding window (the `sliding_window` its model passes, else the module's own) is kept within
    each document: a token sees at most `window` tokens of its own document, itself included.
    """
    bounds = document_bounds(attention_mask)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    window = layer_window(module, kwargs)
    return _per_document(query, key, value, bounds, dropout, scaling, window), None


def document_eager(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """The model's own eager attention (attention sinks, logit soft-capping, ... all kept), per document.

    Each document gets its own additive causal mask (with the layer's sliding window); without
    document boundaries this is exactly the model's eager attention.
    """
    eager = _eager_function(module)
    bounds = document_bounds(attention_mask)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if bounds is None:
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    window = layer_window(module, kwargs)
    outputs = []
    for start, end in itertools.pairwise(bounds):
        allowed = _causal(end - start, window, query.device)
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill_(~allowed, torch.finfo(query.dtype).min)[None, None]
        out, _ = eager(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], mask,
                       scaling=scaling, dropout=dropout, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def document_mask(document_ids: torch.Tensor, device: torch.device | None = None,
                  lengths: list[int] | None = None) -> torch.Tensor:
    """The "mask" that carries a packed batch's documents to `document_sdpa` / `document_eager`: (1, 1, 1, tokens)
    integers, one number per document of the rows flattened into one (padding included). transformers passes
    a 4-D mask to every attention layer untouched, whatever else the model forwards or drops.

    Made on the host (`lengths`: `sequence_lengths(document_ids)`) and moved to `device` (default: that of
    `document_ids`); its boundaries are remembered, so no attention layer reads them back from the mask."""
    lengths = sequence_lengths(document_ids) if lengths is None else lengths
    ids = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    mask = torch.from_numpy(ids)[None, None, None].to(device or document_ids.device, non_blocking=True)
    _BOUNDS[mask] = [0, *itertools.accumulate(lengths)]
    return mask


def document_bounds(attention_mask: torch.Tensor | None) -> list[int] | None:
    """[0, end of document 1, ...] from a `document_mask`; None for any real mask (boolean or float)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.long or attention_mask.ndim != 4:
        return None
    return _mask_bounds(attention_mask)


@torch.compiler.disable  # a dictionary look-up or a read of the mask's values: outside any compiled graph
def _mask_bounds(attention_mask: torch.Tensor) -> list[int]:
    known = _BOUNDS.get(attention_mask)
    if known is not None:  # made by `document_mask`: nothing to read back
        return known
    ids = host(attention_mask).reshape(-1)
    starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]])).tolist()
    return [*starts, len(ids)]


def layer_window(module: torch.nn.Module, kwargs: dict[str, Any]) -> int | None:
    """The sliding window of this attention layer (None: full causal attention)."""
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    return int(window) if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


def _causal(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(length, length) boolean: key j visible from query i when j <= i and, with a window, j > i - window."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return allowed.triu(-(window - 1)) if window else allowed


@functools.cache
def _eager_module_function(module_name: str) -> Any:
    return getattr(sys.modules[module_name], "eager_attention_forward", None)


def _eager_function(module: torch.nn.Module) -> Any:
    """The eager attention function of the module's own modeling file."""
    eager = _eager_module_function(type(module).__module__)
    if eager is None:
        raise ConfigError(f"{type(module).__name__} has no eager attention function that sftkit can run per "
                          "document; use data.batching=padded")
    return eager


@torch.compiler.disable  # under train.compile: one graph break here, not a recompile per set of boundaries
def _per_document(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int], dropout: float,
                  scaling: float | None, window: int | None) -> torch.Tensor:
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    lengths = [end - start for start, end in itertools.pairwise([0, *bounds[1:-1], query.shape[2]])]
    # split, not slices: a slice's backward zero-fills a whole-row gradient per document and adds them all up
    for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value))):
        n = q.shape[2]
        mask = _causal(n, window, query.device) if window and window < n else None
        outputs.append(F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None, enable_gqa=gqa))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def use_document_attention(model: PreTrainedModel) -> bool:
    """Switch a CPU model that uses sdpa (or eager) to per-document attention; True when it now does.

    Models whose attention layers rewrite the mask they are given (`MASK_IN_ATTENTION`) keep their
    attention and get the explicit block mask instead.
    """
    current = getattr(model.config, "_attn_implementation", None)
    target = {"sdpa": NAME, "eager": EAGER}.get(current or "")
    if model.device.type != "cpu" or target is None or model.config.get_text_config().model_type in MASK_IN_ATTENTION:
        return False
    model.set_attn_implementation(target)
    return model.config._attn_implementation == target


AttentionInterface.register(NAME, document_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # padded and generation masks: the same as sdpa's
AttentionInterface.register(EAGER, document_eager)
AttentionMaskInterface.register(EAGER, eager_mask)


def model_inputs(model: PreTrainedModel, batch: dict[str, torch.Tensor],
                 device: torch.device | None = None) -> dict[str, Any]:
    """Keyword arguments for the decoder: padded batches as they are, packed ones kept apart.

    Right-padded batches (sftkit's `collate`) need no padding mask: under causal attention no real
    token sees a later pad, so sdpa runs its cheaper `is_causal` kernel. A batch with
    `document_ids` (packed or padding-free, `sftkit.data.pack`) gets `position_ids` that restart
    per document and one of: document boundaries for `document_sdpa` and flash-attention (the rows
    flattened into one), or an explicit block-diagonal mask (boolean for sdpa, additive for eager).
    The cache is always off: a cache disables transformers' own packed-sequence handling.

    The batch's structure (right-padded or not, document lengths and boundaries) is read on the host
    (`sftkit.data.batches.host`): from a batch still on the CPU that reads no device, and only finished
    tensors move to `device` (default: the batch's own), without blocking. The block masks are made
    where the model runs, from the moved `document_ids`: computing them reads nothing back.
    """
    device = device or batch["input_ids"].device

    def moved(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, non_blocking=True)

    inputs: dict[str, Any] = {"input_ids": moved(batch["input_ids"]), "use_cache": False}
    if "document_ids" not in batch:
        mask = host(batch["attention_mask"])
        if not (mask[:, :-1] >= mask[:, 1:]).all():  # not right-padded: the mask is needed
            inputs["attention_mask"] = moved(batch["attention_mask"])
        return inputs
    attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if attention in (NAME, EAGER) or "flash" in attention:
        lengths = sequence_lengths(batch["document_ids"])
        bounds = [0, *itertools.accumulate(lengths)]
        inputs.update(input_ids=inputs["input_ids"].reshape(1, -1),
                      position_ids=moved(batch["position_ids"]).reshape(1, -1))
        if attention in (NAME, EAGER):
            inputs["attention_mask"] = document_mask(batch["document_ids"], device, lengths)
        else:  # flash-attention: its varlen kernel, with each layer's sliding window passed by transformers
            cumulative = moved(torch.tensor(bounds, dtype=torch.int32))
            longest = max(b - a for a, b in itertools.pairwise(bounds))
            inputs.update(cu_seq_lens_q=cumulative, cu_seq_lens_k=cumulative, max_length_q=longest,
                          max_length_k=longest)
        return inputs
    if attention not in ("sdpa", "eager"):
        raise ConfigError(f"model.attn_implementation: {attention!r} cannot keep packed documents apart; use sdpa, "
                          "eager or flash_attention_2 with data.packing / data.padding_free")
    dtype = model.dtype if attention == "eager" else None
    document_ids = moved(batch["document_ids"])
    masks = {kind: block_causal_mask(document_ids, dtype, window) for kind, window in layer_windows(model).items()}
    inputs.update(position_ids=moved(batch["position_ids"]), attention_mask=masks.get(None, masks))
    return inputs


def layer_windows(model: PreTrainedModel) -> dict[str | None, int | None]:
    """Sliding window per layer type ({type: window or None}), or {None: window} when every layer is alike.

    The keys are those of the decoder's `layer_types` (Gemma 2/3, gpt-oss, Qwen 2/3, ... take one
    mask per layer type). Without `layer_types`, the config's `sliding_window` applies to every layer
    when the model's own code makes sliding-window masks (Mistral, Phi-3, Starcoder2; Moshi keeps a
    `sliding_window` it never uses).
    """
    text = model.config.get_text_config()
    window = getattr(text, "sliding_window", None)
    window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
    kinds = getattr(text, "layer_types", None)
    if not isinstance(kinds, (list, tuple)) or not kinds:
        code = sys.modules.get(type(model.get_base_model() if hasattr(model, "get_base_model") else model).__module__)
        return {None: window if hasattr(code, "create_sliding_window_causal_mask") else None}
    return {kind: window if kind == "sliding_attention" else None for kind in dict.fromkeys(kinds)}


def block_causal_mask(document_ids: torch.Tensor, dtype: torch.dtype | None = None,
                      window: int | None = None) -> torch.Tensor:
    """(batch, 1, length, length) mask: query i may attend to key j <= i of the same document.

    With `window`, only the last `window` keys of the document (the query's own included), as
    transformers' sliding-window layers. Boolean (True = attend) for sdpa; with `dtype`, additive
    (0 or the dtype's minimum) for eager attention, which adds the mask to the scores. Padding (-1)
    forms a document of its own, so every row of the mask has at least one True and no softmax is
    empty (no NaN).
    """
    length = document_ids.shape[1]
    mask = (document_ids[:, :, None] == document_ids[:, None, :]) & _causal(length, window, document_ids.device)
    mask = mask[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def sequence_lengths(document_ids: torch.Tensor) -> list[int]:
    """Lengths of the runs of equal document ids along the flattened rows (documents and padding), read on the
    host (`sftkit.data.batches.host`: no device sync for a CPU batch)."""
    ids = host(document_ids)
    flat = ids.reshape(-1)
    starts = np.zeros(flat.size, dtype=bool)
    starts[:: ids.shape[1]] = True  # every row starts a run
    starts[1:] |= flat[1:] != flat[:-1]
    return np.diff(np.append(np.flatnonzero(starts), flat.size)).tolist()



STATE_KEYS = ("mamba_", "ssm_", "linear_num_", "linear_key_", "linear_conv_", "conv_L_cache", "conv1d_width",
              "lru_width", "time_step_")  # config keys of layers that carry a state from token to token
# Families that number positions from padding_idx + 1 (RoBERTa's embeddings), not from 0 as sftkit's position_ids
OFFSET_POSITIONS = ("roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                    "xmod")
STATE_LAYERS = ("linear_attention", "mamba", "mamba2", "conv", "hybrid", "recurrent", "rwkv", "xlstm", "ssm")
RECURRENT_TYPES = ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma")


def check_batching(model_config: PretrainedConfig | str | Path, batching: str,
                   attn_implementation: str | None = None) -> None:
    """Raise ConfigError when `batching` (packed / padding_free) cannot keep documents apart on this model.

    Decided from the model's config alone, before any data is read (`sftkit train` calls it first):
    `model_config` is a config or a model directory (one without a config.json is left to the model
    loader to report). Padded batches are right on every architecture and are never refused.
    """
    if batching not in ("packed", "padding_free"):
        return
    if not isinstance(model_config, PretrainedConfig):
        directory = Path(model_config).expanduser()
        if not (directory / "config.json").is_file():
            return
        model_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    reason = refusal(model_config, attn_implementation)
    if reason:
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_config.model_type, model_config.model_type)
        raise ConfigError(f"data.batching={batching}: {name} ({model_config.model_type}) {reason}; use "
                          "data.batching=padded or grouped (the same examples per step, each in its own row)")


def refusal(model_config: PretrainedConfig, attn_implementation: str | None = None) -> str | None:
    """Why packed and padding-free rows would mix documents on this architecture (None: they do not)."""
    text = model_config.get_text_config()
    kinds = [k for key in ("layer_types", "layers_block_type", "block_types") for k in (getattr(text, key, None) or [])
             if isinstance(k, str)]
    other = sorted({k for k in kinds if k not in ATTENTION_LAYERS and k not in ("chunked_attention", "mlp", "moe")})
    # without a list of layer kinds, the config's keys say whether some layers carry a state
    state = [] if kinds else sorted({key for key in text.to_dict() for prefix in STATE_KEYS if key.startswith(prefix)})
    unknown = [k for k in other if k not in STATE_LAYERS]
    if unknown:
        return (f"has attention layers of a kind sftkit does not keep within each document ({', '.join(unknown)}: "
                "sparse, indexed or compressed attention that picks its keys across the whole row)")
    if text.model_type in RECURRENT_TYPES or other or state:
        what = ", ".join(other) or ", ".join(state[:3]) or text.model_type
        return (f"has layers that carry a state from one token to the next ({what}): in a packed row that state "
                "flows from one document into the next, and transformers resets it per document only inside "
                "CUDA kernels (mamba-ssm, causal-conv1d, flash-linear-attention) that sftkit cannot check here")
    if "chunked_attention" in kinds:
        return ("has chunked-attention layers (attention_chunk_size), which sftkit does not keep within each document "
                "yet")
    if text.model_type in OFFSET_POSITIONS:
        return ("numbers its positions from padding_idx + 1 (RoBERTa's embeddings), not from 0 as the position_ids "
                "sftkit restarts per document")
    model_class = _model_class(model_config)
    if model_class is not None and not getattr(model_class, "_supports_attention_backend", False):
        return ("computes attention its own way, outside transformers' attention interface, so sftkit cannot "
                "keep documents apart")
    if model_class is not None and "position_ids" not in inspect.signature(model_class.forward).parameters:
        return "takes no position_ids, so positions cannot restart at every document"
    if attn_implementation and attn_implementation not in ("sdpa", "eager", NAME, EAGER) and \
            "flash" not in attn_implementation:
        return (f"with model.attn_implementation={attn_implementation!r} cannot keep packed documents apart (use "
                "sdpa, eager or flash_attention_2)")
    return None


def _model_class(model_config: PretrainedConfig) -> type | None:
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_config.model_type)
    return getattr(transformers, name, None) if name else None
