"""Load a local Hugging Face model + tokenizer for fine-tuning; build tiny random models for tests.

    sftkit train configs/tiny-cpu.yaml              # model.path -> load_model()
    sftkit model tiny --config ../shared/data/configs/qwen2.json \\
        --tokenizer ../shared/data/tokenizers/qwen2.5 --out runs/tiny-qwen2   # build_tiny_model()

sftkit reads local directories only (`local_files_only=True`, safetensors weights unless
`model.allow_pickle: true`, no remote code unless `model.trust_remote_code: true`). When the chat
template brings new control tokens, the embedding matrix (and an untied output head) grows and the
new rows start at the mean of the existing rows, so the new tokens begin as an "average" token
instead of noise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sftkit.config import DTYPES, ModelConfig
from sftkit.data.templates import prepare_tokenizer

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES if name != "auto"}


class ModelError(ValueError):
    """The model directory cannot be used (missing, a hub id, no safetensors weights, ...)."""


def resolve_device(name: str = "auto", what: str = "train.device") -> torch.device:
    """`auto` -> cuda when available, else cpu; a named device must exist here, else a `ModelError` naming
    `what` (the key or flag it came from), raised before anything is loaded."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelError(f"{what}: {name!r} is not a device — use auto, cpu, cuda, cuda:N or mps") from None
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if device.type == "mps":
        backend = torch.backends.mps
    available = device.type == "cpu" or (backend is not None and backend.is_available())
    if not available:
        why = {"cuda": f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
               else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)",
               "mps": "MPS needs an Apple-silicon Mac and a torch built for it"}.get(device.type, "torch cannot use it")
        raise ModelError(f"{what}: {name!r} is not available on this machine: {why} — use {what}=cpu, or auto "
                         "(a GPU when there is one, else the CPU)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelError(f"{what}: {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                         f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on CUDA, float32 elsewhere; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[name]


def check_local_dir(path: str | Path, what: str = "model.path") -> Path:
    """The directory itself, or a clear error naming `what` was given: sftkit never downloads from the hub."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ModelError(f"{what}: {path} is not a directory — sftkit loads local directories only"
                         f"{_download_hint(str(path))}")
    if not (directory / "config.json").is_file():
        raise ModelError(f"{what}: {directory} has no config.json — not a Hugging Face model directory")
    return directory


LOCAL_DIR_NAMES = ("models", "model", "runs", "checkpoints", "outputs", "output", "data", "weights")


def _download_hint(path: str) -> str:
    """How to get the model: a hub id (`owner/name`, its owner not a local folder) is downloaded by
    id; any other path is where the user meant a downloaded model to be."""
    owner, _, name = path.partition("/")
    hub_like = (path.count("/") == 1 and name and not path.startswith((".", "/", "~"))
                and not Path(owner).is_dir() and owner.lower() not in LOCAL_DIR_NAMES)
    if hub_like:
        return (f" ({path!r} looks like a hub id: download it first, e.g. "
                f"`hf download {path} --local-dir models/{name}`, then model.path=models/{name})")
    return (f" (no such directory from {Path.cwd()}: download the model there first, e.g. "
            f"`hf download OWNER/NAME --local-dir {path}`, or fix the path)")


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a local directory (with its chat template, if it has one)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ModelError(f"{path} is not a directory — sftkit loads local directories only")
    return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)


def load_prepared_tokenizer(config: ModelConfig, template: str | None = None, path: str | Path | None = None
                            ) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """The model directory's tokenizer with the chat template installed, and the tokens that added; checks
    that the directory has loadable weights first, so a wrong model.path fails before any data is read."""
    directory = check_local_dir(path or config.path)
    if not any(directory.glob("*.safetensors")) and not config.allow_pickle:
        raise ModelError(f"model.path: {directory} has no *.safetensors weights (sftkit loads safetensors only; "
                         "model.allow_pickle=true also loads pickled .bin weights, which can run code)")
    tokenizer = load_tokenizer(directory, trust_remote_code=config.trust_remote_code)
    # No template is needed to pre-train on raw text; rendering a conversation without one says what to do.
    return tokenizer, prepare_tokenizer(tokenizer, template, required=False)


def load_model(
    config: ModelConfig,
    *,
    template: str | None = None,
    device: torch.device | None = None,
    path: str | Path | None = None,
    quantization: Any = None,
    prepared: tuple[PreTrainedTokenizerBase, list[str]] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[str]]:
    """Tokenizer (with its chat template installed) + model on `device`; returns the newly added tokens.

    `path` overrides `config.path` (resuming from a checkpoint directory). `quantization` is a transformers
    quantization config (QLoRA's 4-bit base, see `sftkit.lora`): the weights are quantized as they load
    straight onto `device`. `prepared` is `load_prepared_tokenizer`'s result when the caller already has it
    (training renders its data with it before the weights load).
    """
    directory = check_local_dir(path or config.path)
    device = device or resolve_device()
    tokenizer, added = prepared or load_prepared_tokenizer(config, template, path)
    placement = {"quantization_config": quantization, "device_map": str(device)} if quantization else {}
    model = read_weights(directory, resolve_dtype(config.dtype, device), trust_remote_code=config.trust_remote_code,
                         allow_pickle=config.allow_pickle, attn_implementation=config.attn_implementation,
                         **placement)
    if added:
        init_new_token_rows(model, tokenizer, added)
    return (model if quantization else model.to(device)), tokenizer, added


def read_weights(directory: str | Path, dtype: torch.dtype | str | None, *, trust_remote_code: bool = False,
                 allow_pickle: bool = False, **kwargs: Any) -> PreTrainedModel:
    """A local model directory's causal LM: every model sftkit loads (training, LoRA base, generation)
    is read here, offline and from safetensors unless `allow_pickle`. `kwargs` go to transformers."""
    return AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, use_safetensors=None if allow_pickle else True,
        trust_remote_code=trust_remote_code, dtype=dtype, **kwargs)


def init_new_token_rows(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, added: list[str]) -> list[int]:
    """Grow the embeddings to `len(tokenizer)` if needed; set the rows of `added` to the mean old row.

    The mean is taken over the rows that existed before and are not new tokens. An untied output
    head gets the same treatment (its own mean); a tied head shares the input rows.
    """
    old_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new_ids = sorted(set(tokenizer.convert_tokens_to_ids(added)))
    keep = torch.ones(old_rows, dtype=torch.bool)
    keep[[i for i in new_ids if i < old_rows]] = False
    with torch.no_grad():
        matrices = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != matrices[0].data_ptr():
            matrices.append(head.weight)
            if getattr(head, "bias", None) is not None:
                head.bias[new_ids] = head.bias[:old_rows][keep].mean()
        for weight in matrices:
            weight[new_ids] = weight[:old_rows][keep].float().mean(dim=0).to(weight.dtype)
    return new_ids


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once, 4-bit weights as unpacked."""
    unique = {p.data_ptr(): p for p in model.parameters()}.values()

    def numel(p: torch.nn.Parameter) -> int:
        return p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()  # two 4-bit values per byte

    return sum(numel(p) for p in unique if p.requires_grad), sum(numel(p) for p in unique)


def tiny_config(
    config_json: str | Path,
    vocab_size: int,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """A real architecture config (qwen2, llama, gpt2, ...) shrunk to a few thousand parameters per layer."""
    raw = json.loads(Path(config_json).read_text())
    model_type = raw.pop("model_type")
    shrink = {
        # llama / qwen / mistral naming
        "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "head_dim": hidden // heads,
        "max_window_layers": layers,
        # gpt2 naming
        "n_layer": layers, "n_embd": hidden, "n_head": heads, "n_inner": intermediate,
    }
    for key, value in shrink.items():
        if key in raw:
            raw[key] = value
    if isinstance(raw.get("layer_types"), list):
        raw["layer_types"] = raw["layer_types"][:layers]
    raw["vocab_size"] = vocab_size
    for key in ("_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype"):
        raw.pop(key, None)
    raw.update(overrides or {})
    return AutoConfig.for_model(model_type, **raw)


def build_tiny_model(
    config_json: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A random float32 model of a real architecture, shrunk, with `vocab_size = len(tokenizer)`."""
    config = tiny_config(
        config_json, len(tokenizer), layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
        intermediate=intermediate, overrides=overrides,
    )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            setattr(config, name, token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, getattr(config, name, None))
    return model
