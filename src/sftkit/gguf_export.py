"""A trained model as one GGUF file for llama.cpp, Ollama and LM Studio, through llama.cpp's own `gguf` writer.

    sftkit export runs/tiny/final --gguf --out tiny.gguf                 # a full run's final/ (or best/, step-N/)
    sftkit export runs/tiny-lora/final --gguf --out tiny.gguf            # a LoRA run: merged first, in memory
    sftkit export runs/tiny/final --gguf --out tiny-f16.gguf --dtype float16

What goes in, the way llama.cpp's convert_hf_to_gguf.py writes it: the hyperparameters of the
architecture, every weight under llama.cpp's tensor name (`gguf.get_tensor_name_map`; Llama's q/k
rows permuted to llama.cpp's rotary layout, Llama 3's `rope_freqs` for its rope scaling), the
tokenizer (`gguf.BpeVocab`: tokens, types, merges, the pre-tokenizer name), the run's chat template,
and its end-of-turn token as both `tokenizer.ggml.eot_token_id` and, when the tokenizer has no eos
of its own, `eos_token_id` — so llama.cpp stops where `sftkit generate` stops. Matrices are written
in `--dtype` (auto: the dtype the weights are stored in), norms and biases in float32.

Architectures mapped: Llama (Llama 2/3.x with byte-level BPE tokenizers, TinyLlama-style configs with
a byte-level vocabulary), Qwen2 / Qwen2.5, Qwen3. Anything else is refused by name before any weight
is read; llama.cpp's convert_hf_to_gguf.py knows more (`sftkit export --merge` first for an adapter).
The file is written to OUT.tmp and renamed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftkit.model import ModelError

# model_type -> (gguf architecture name, tokenizer pre-tokenizer name llama.cpp knows it by)
ARCHITECTURES = {"llama": ("llama", "llama-bpe"), "qwen2": ("qwen2", "qwen2"), "qwen3": ("qwen3", "qwen2")}


def check_supported(model_dir: Path, tokenizer_dir: Path | None = None) -> dict[str, Any]:
    """The directory's config.json, or a ModelError naming what the writer does not map (`tokenizer_dir`: where
    tokenizer.json is, when not beside config.json — an adapter's)."""
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelError(f"{model_dir}: GGUF export maps {', '.join(sorted(ARCHITECTURES))}, not {model_type!r} — "
                         "llama.cpp's convert_hf_to_gguf.py covers more architectures (run it on this directory)")
    tokenizer_json = (tokenizer_dir or model_dir) / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ModelError(f"{tokenizer_json.parent}: no tokenizer.json — GGUF export reads the fast tokenizer's file")
    model = json.loads(tokenizer_json.read_text()).get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = f"{model.get('type')}{' with byte fallback (SentencePiece-style)' if model.get('byte_fallback') else ''}"
        raise ModelError(f"{tokenizer_json.parent}: GGUF export writes byte-level BPE vocabularies (Llama 3, Qwen); "
                         f"this tokenizer is {kind} — llama.cpp's convert_hf_to_gguf.py converts it from tokenizer.model")
    scaling = rope(config)[1]
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
        raise ModelError(f"{model_dir}: rope_scaling {scaling.get('rope_type', scaling.get('type'))!r} is not mapped "
                         "by sftkit's GGUF export (llama3 and none are)")
    return config


def rope(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope theta, rope scaling or {}) of a config.json, as transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`) writes them."""
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else {})
    return float(theta), scaling


def _permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _rope_freqs(config: dict[str, Any]) -> torch.Tensor:
    """Llama 3's rope scaling as llama.cpp reads it: one divisor per rotary frequency (`rope_freqs.weight`)."""
    theta, scaling = rope(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = scaling.get("factor", 8.0), scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _array(tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(numpy array, raw GGML type or None) of one tensor: 1-D ones in float32, matrices in `dtype`."""
    import gguf

    tensor = tensor.detach().to("cpu")
    if tensor.ndim < 2 or dtype == "float32":
        return tensor.to(torch.float32).numpy(), None
    if dtype == "float16":
        return tensor.to(torch.float16).numpy(), None
    return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16


def write_gguf(model: Any, tokenizer: Any, model_dir: Path, tokenizer_dir: Path, out: Path, dtype: str,
               eos_ids: list[int]) -> Path:
    """Write `model` (a plain HF causal LM; `model_dir` holds its config.json, `tokenizer_dir` its tokenizer.json)
    with `tokenizer` as the GGUF file `out`; `eos_ids[0]` is the end-of-turn token."""
    import gguf

    config = check_supported(model_dir, tokenizer_dir)
    arch, pre = ARCHITECTURES[config["model_type"]]
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    state = model.state_dict()
    tied = state.get("lm_head.weight") is None or (
        config.get("tie_word_embeddings", False) and torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]))

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(tokenizer_dir.resolve().parent.name if tokenizer_dir.name in ("final", "best") else tokenizer_dir.name)
    writer.add_file_type({"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                          "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(rope(config)[0])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(state["model.embed_tokens.weight"].shape[0])

    for name, tensor in state.items():
        if name == "lm_head.weight" and tied:
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = _permute(tensor, n_head if "q_proj" in name else n_kv)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ModelError(f"{model_dir}: tensor {name} has no llama.cpp name for {arch}; nothing was written")
        array, raw = _array(tensor, dtype)
        writer.add_tensor(target, array, raw_dtype=raw)
    if arch == "llama" and rope(config)[1].get("rope_type") == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _rope_freqs(config).numpy())

    _add_tokenizer(writer, tokenizer, tokenizer_dir, pre, state["model.embed_tokens.weight"].shape[0], eos_ids)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def _add_tokenizer(writer: Any, tokenizer: Any, model_dir: Path, pre: str, n_vocab: int, eos_ids: list[int]) -> None:
    """llama.cpp's own vocabulary readers over the directory's tokenizer.json, plus the run's template and stops."""
    import gguf

    vocab = gguf.BpeVocab(model_dir)
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i, (text, _, kind) in enumerate(vocab.all_tokens()):
        tokens.append(text if isinstance(text, bytes) else text.encode())
        if i >= vocab.vocab_size_base:  # convert_hf_to_gguf's rule: control only if the tokenizer calls it special
            kind = gguf.TokenType.CONTROL if i in added and added[i].special else gguf.TokenType.USER_DEFINED
        types.append(kind)
    for i in range(len(tokens), n_vocab):  # embedding rows beyond the tokenizer (padded vocabularies)
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special_vocab.chat_template = None  # the run's template, from the tokenizer sftkit generates with
    special_vocab.add_to_gguf(writer, quiet=True)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    if eos_ids:
        writer.add_eot_token_id(eos_ids[0])
        if tokenizer.eos_token_id is None:
            writer.add_eos_token_id(eos_ids[0])

