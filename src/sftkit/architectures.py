"""Every causal-LM architecture of transformers, built tiny, and the check that packing is right on it.

    python bench/architectures.py            # the sweep -> docs/architectures.md
    pytest tests/test_architectures.py       # a few architectures; -m slow: all of them

`tiny_config(model_type, vocab_size)` makes the architecture's own config class with a few layers,
a small hidden size, tiny experts and a short sliding window (4 tokens, so that documents are longer
than the window), one layer of every kind the architecture has (sliding and full attention, Mamba,
linear attention, short convolutions, ...). `check_architecture` then runs documents of real chat
text three ways and compares the per-token losses:

    alone          each document through plain transformers, one at a time (the reference)
    packed         two rows [A B | C .] as sftkit trains them (`sftkit.attention.model_inputs`)
    padding_free   one row  [A B C]

A batching either gives the same per-token losses (fp32, `TOLERANCE`) or is refused by
`sftkit.attention.check_batching` before any data is read; anything else is a silent difference
and the check says so.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from sftkit.attention import check_batching, model_inputs, use_document_attention
from sftkit.config import ConfigError
from sftkit.data.batches import collate_documents
from sftkit.data.render import IGNORE_INDEX, Tokenized

TOLERANCE = 1e-5  # largest per-token loss difference (nats) accepted in fp32
WINDOW = 4  # sliding window of the tiny models, in tokens
BATCHINGS = ("packed", "padding_free", "packed_mask")  # packed_mask: the explicit block mask (GPU sdpa / eager)

# Sizes every architecture is shrunk to (only the keys its config has); consistent with each other:
# hidden 64 = 4 heads x 16, mamba 8 heads x 16 = 2 x 64, ...
SHRINK: dict[str, Any] = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "dim": 64, "embed_dim": 64, "embedding_size": 64,
    "intermediate_size": 128, "ffn_dim": 128, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128, "n_inner": 128,
    "ffn_hidden_size": 128, "d_ff": 128, "dim_ff": 128, "feed_forward_size": 128, "intermediate_size_mlp": 128,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2, "head_dim": 16,
    "attention_head_dim": 16, "kv_channels": 16, "swa_head_dim": 16, "swa_num_attention_heads": 4,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "expert_ffn_hidden_size": 32, "moe_shared_expert_intermediate_size": 32, "first_dense_intermediate_size": 128,
    "dense_intermediate_size": 128, "mlp_only_intermediate_size": 128, "shared_experts_intermediate_size": 32,
    "num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    "mamba_d_state": 16, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_head_dim": 16, "mamba_headdim": 16,
    "mamba_num_heads": 8, "mamba_dt_rank": 8, "ssm_state_size": 16, "state_size": 16, "time_step_rank": 8,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_head_dim": 16, "attention_hidden_size": 64, "lru_width": 64,
    "rotary_dim": 8, "n_positions": 256, "n_ctx": 256, "moe_k": 2, "num_experts_per_token": 2, "n_heads": 4,
    "linear_num_heads": 4, "num_shared_experts": 1, "moe_num_shared_experts": 1, "n_shared_experts": 1,
    "emb_dim": 64, "input_embedding_size": 64, "output_embedding_size": 64, "hidden_size_per_layer_input": 16,
    "router_hidden_size": 32, "n_mamba_heads": 2,
}
NONE_SHRINK = ("head_dim", "num_key_value_heads", "num_experts_per_tok", "n_routed_experts", "n_group", "topk_group",
               "intermediate_size", "n_shared_experts")  # None there means "derive it from a big size"
WINDOW_KEYS = ("sliding_window", "sliding_window_size", "attention_window_size", "local_attention_window_len",
               "window_size")
# Hybrids whose default config has one kind of layer only (or sizes that must agree): a layer of each kind.
OVERRIDES: dict[str, dict[str, Any]] = {
    "lfm2": {"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2, "num_dense_layers": 1},
    "falcon_h1": {"mamba_d_ssm": 128},
    "bamba": {"attn_layer_indices": [1]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "zamba2": {"layers_block_type": ["mamba", "hybrid"], "hybrid_layer_ids": [1], "num_hidden_layers": 2,
               "n_mamba_heads": 8},
    "mamba2": {"num_heads": 8, "n_groups": 1},
    "zamba": {"attention_hidden_size": 128, "attention_head_dim": 32, "attn_layer_period": 2, "attn_layer_offset": 1,
              "num_hidden_layers": 3},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "num_layers": 2},
    "dbrx": {"ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"], "num_hidden_layers": 2},
}
MAX_PARAMETERS = 20_000_000  # a config this recipe cannot shrink below this is reported, not built
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")


def model_types() -> list[str]:
    """Every model type of transformers' causal-LM mapping, in its order."""
    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrunk(values: dict[str, Any]) -> dict[str, Any]:
    out = {key: SHRINK[key] for key in values if key in SHRINK and (
        (isinstance(values[key], int) and not isinstance(values[key], bool)) or (values[key] is None and key in NONE_SHRINK))}
    out.update({key: SHRINK[key] for key in values if key in SHRINK and isinstance(values[key], list)
                and values[key] and all(isinstance(v, int) for v in values[key])})  # per-layer sizes: one for all
    if isinstance(values.get("max_position_embeddings"), int) and values["max_position_embeddings"] < 256:
        out["max_position_embeddings"] = 256  # room for the 132-token document (Blenderbot's default is 128)
    if isinstance(values.get("num_kv_shared_layers"), int):  # layers that reuse another layer's cache: none
        out["num_kv_shared_layers"] = 0
    if isinstance(values.get("qk_rope_head_dim"), int):  # multi-head latent attention: rotary on part of a head
        out["head_dim"] = SHRINK["qk_rope_head_dim"]
        out["num_key_value_heads"] = SHRINK["num_attention_heads"]  # one latent key per head
    for key in ("max_window_layers", "moe_layer_end_index"):
        if isinstance(values.get(key), int):
            out[key] = 2
    for key in WINDOW_KEYS:
        if isinstance(values.get(key), int) and not isinstance(values.get(key), bool) and values[key] > 0:
            out[key] = WINDOW
    return out


def _layer_plan(config: PretrainedConfig) -> dict[str, Any]:
    """Fewest layers that keep one of each kind in `layer_types` (order kept); 2 layers otherwise."""
    kinds = getattr(config, "layer_types", None)
    plan: dict[str, Any] = {}
    stored = "layer_types" in config.to_dict()  # not a property derived from other fields
    if stored and isinstance(kinds, (list, tuple)) and kinds and all(isinstance(k, str) for k in kinds):
        unique = list(dict.fromkeys(kinds))
        plan["layer_types"] = unique if len(unique) > 1 else unique * 2
    layers = len(plan.get("layer_types", ())) or 2
    plan.update({key: layers for key in LAYER_COUNT_KEYS if isinstance(getattr(config, key, None), int)})
    count = getattr(config, "num_hidden_layers", None)
    for key, value in config.to_dict().items():  # other per-layer lists (Gemma 3n's activation sparsity): cut
        if key not in plan and isinstance(value, list) and isinstance(count, int) and len(value) == count > layers:
            plan[key] = value[:layers]
    return plan


def tiny_config(model_type: str, vocab_size: int, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    """`model_type`'s own config class, shrunk (see `SHRINK`), fp32-sized, with `vocab_size` tokens."""
    default = AutoConfig.for_model(model_type)
    values = {**_shrunk(default.to_dict()), **_layer_plan(default), "vocab_size": vocab_size}
    for name in ("text_config", "vision_config", "audio_config", "decoder_config"):
        sub = getattr(default, name, None)
        if isinstance(sub, PretrainedConfig):
            sub_values = {**_shrunk(sub.to_dict()), **_layer_plan(sub)}
            if name in ("text_config", "decoder_config"):
                sub_values.update(vocab_size=vocab_size, **_token_ids(sub, vocab_size))
            values[name] = {**sub.to_dict(), **sub_values}
    values.update(_token_ids(default, vocab_size))
    for key, value in {**OVERRIDES.get(model_type, {}), **(overrides or {})}.items():
        sub = getattr(default, key, None)  # a sub-config given in part: the rest from the default
        values[key] = {**sub.to_dict(), **value} if isinstance(value, dict) and isinstance(sub, PretrainedConfig) \
            else value
    values.setdefault("is_decoder", True)  # BERT-like families are causal only as decoders
    return AutoConfig.for_model(model_type, **values)


def _token_ids(config: PretrainedConfig, vocab_size: int) -> dict[str, int]:
    """Special token ids (and per-layer vocabularies) that would fall outside the tiny vocabulary."""
    out = {name: 0 for name in ("pad_token_id", "bos_token_id", "eos_token_id")
           if isinstance(getattr(config, name, None), int) and getattr(config, name) >= vocab_size}
    if isinstance(getattr(config, "vocab_size_per_layer_input", None), int):
        out["vocab_size_per_layer_input"] = vocab_size
    return out


def build(model_type: str, vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A tiny random fp32 CPU model of `model_type`, with sdpa where it supports it, else eager attention."""
    config = tiny_config(model_type, vocab_size)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"{size / 1e6:.0f}M parameters after shrinking (its config has sizes this sweep does not "
                         "know)")
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    except (ValueError, ImportError) as err:
        if "sdpa" not in str(err).lower() and "scaled_dot_product" not in str(err).lower():
            raise
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of every trained position of one row, in order."""
    targets = labels[1:]
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(logits[:-1][keep].float(), targets[keep], reduction="none")


def alone_losses(model: PreTrainedModel, documents: Sequence[Tokenized]) -> list[torch.Tensor]:
    """Each document on its own through plain transformers: the reference."""
    with torch.no_grad():
        return [token_losses(model(input_ids=torch.tensor([doc.input_ids]), use_cache=False).logits[0],
                             torch.tensor(doc.labels)) for doc in documents]


def batched_losses(model: PreTrainedModel, rows: Sequence[Sequence[Tokenized]], pad_id: int) -> list[torch.Tensor]:
    """The documents of `rows` as sftkit trains them (`model_inputs`), per-token losses per document."""
    batch = collate_documents(rows, pad_id)
    with torch.no_grad():
        logits = model(**model_inputs(model, batch)).logits.reshape(*batch["input_ids"].shape, -1)
    out = []
    for r, row in enumerate(rows):
        start = 0
        for doc in row:
            end = start + len(doc.input_ids)
            out.append(token_losses(logits[r, start:end], batch["labels"][r, start:end]))
            start = end
    return out


@dataclass
class Outcome:
    """What one batching gave on one architecture: "same", "refused", "different" or "error"."""

    status: str
    detail: str = ""
    difference: float | None = None


@dataclass
class Result:
    model_type: str
    class_name: str
    attention: str = ""
    layers: str = ""
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    lora: str = ""
    skipped: str = ""


def compare(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> float:
    """Largest per-token loss difference (inf when the shapes disagree or a loss is not finite)."""
    worst = 0.0
    for a, b in zip(reference, candidate, strict=True):
        if a.shape != b.shape or not bool(torch.isfinite(b).all()):
            return math.inf
        worst = max(worst, float((a - b).abs().max()) if len(a) else 0.0)
    return worst


def layer_summary(config: PretrainedConfig) -> str:
    text = config.get_text_config()
    kinds = getattr(text, "layer_types", None)
    return ", ".join(dict.fromkeys(kinds)) if isinstance(kinds, (list, tuple)) and kinds else ""


def check_architecture(model_type: str, documents: Sequence[Tokenized], vocab_size: int, pad_id: int,
                       batchings: Sequence[str] = BATCHINGS) -> Result:
    """Build `model_type` tiny and compare each batching with the documents alone (see the module doc)."""
    result = Result(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    try:
        model = build(model_type, vocab_size)
    except Exception as err:  # noqa: BLE001 - the sweep reports what could not be built, and goes on
        result.skipped = f"cannot be built on CPU: {type(err).__name__}: {_first_line(err)}"
        return result
    result.attention = model.config._attn_implementation
    result.layers = layer_summary(model.config)
    try:
        reference = alone_losses(model, documents)
    except Exception as err:  # noqa: BLE001
        result.skipped = f"plain transformers fails on CPU: {type(err).__name__}: {_first_line(err)}"
        return result
    plain = model.config._attn_implementation
    rows = {"packed": [documents[:2], documents[2:]], "padding_free": [documents],
            "packed_mask": [documents[:2], documents[2:]]}
    for batching in batchings:
        if batching == "packed_mask":  # the block mask that sdpa and eager get off the CPU (no flash-attention)
            model.set_attn_implementation(plain)
        elif use_document_attention(model):  # what sftkit train does for packed rows on CPU
            result.attention = model.config._attn_implementation
        try:
            check_batching(model.config, batching.removesuffix("_mask"))
        except ConfigError as err:
            result.outcomes[batching] = Outcome("refused", str(err))
            continue
        try:
            difference = compare(reference, batched_losses(model, rows[batching], pad_id))
        except Exception as err:  # noqa: BLE001
            trace = traceback.extract_tb(err.__traceback__)[-1]
            result.outcomes[batching] = Outcome("error", f"{type(err).__name__}: {_first_line(err)} "
                                                         f"({trace.filename.rsplit('/', 1)[-1]}:{trace.lineno})")
            continue
        status = "same" if difference <= TOLERANCE else "different"
        result.outcomes[batching] = Outcome(status, f"max |difference| {difference:.2e}", difference)
    result.lora = check_lora(model, documents[0])
    return result


def check_lora(model: PreTrainedModel, document: Tokenized) -> str:
    """LoRA on `lora.target_modules=all-linear` (`sftkit.lora.target_modules`): "N layers" adapted, all in the
    text decoder and none the output head, and a forward that runs; else what went wrong. Adapts `model`."""
    import peft

    from sftkit.config import LoraConfig
    from sftkit.lora import adapted_modules, target_modules

    base = model
    head = base.get_output_embeddings()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or isinstance(decoder, torch.nn.Linear):  # BERT-like heads call their output layer decoder
        decoder = base
    allowed = {id(m) for m in decoder.modules()}
    try:
        targets = target_modules(LoraConfig(r=2), base)
        model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM"))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([document.input_ids]), use_cache=False).logits
    except Exception as err:  # noqa: BLE001
        return f"error: {type(err).__name__}: {_first_line(err)}"
    adapted = adapted_modules(model)
    modules = dict(model.named_modules())
    wrapped = {name: _wrapped(modules[name]) for name in adapted}
    outside = [name for name in adapted if id(wrapped[name]) not in allowed]
    if not adapted or outside or any(layer is head for layer in wrapped.values()):
        return f"wrong: {len(adapted)} adapted, {len(outside)} outside the decoder (first: {(outside or [''])[0]})"
    if not bool(torch.isfinite(logits).all()):
        return "wrong: non-finite logits"
    return f"{len(adapted)} layers"


def _wrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The model's own layer under PEFT's adapter wrappers (fused experts get one wrapper per weight)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]
