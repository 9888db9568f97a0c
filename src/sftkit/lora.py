"""LoRA, DoRA and QLoRA with PEFT: the model-setup switch of `sftkit train`, and adapters loaded back.

    sftkit train configs/tiny-cpu.yaml lora.enabled=true lora.r=16 lora.alpha=32        # LoRA
    sftkit train configs/tiny-cpu.yaml lora.enabled=true lora.dora=true                 # DoRA
    sftkit train RECIPE.yaml lora.enabled=true lora.quantize=nf4                        # QLoRA (CUDA + bitsandbytes)
    sftkit generate --model runs/tiny-cpu/final --prompt "Who are you?"                 # final/ is an adapter

The base model is frozen; PEFT adds a low-rank update to every linear layer of the transformer
blocks (`all-linear`: the output head is left out) and only those adapter weights train. When the
chat template added new tokens (a built-in template on a base tokenizer), their embedding rows are
new too, and an adapter on the linear layers never touches them: by default the embeddings and the
output head are then trained in full and saved with the adapter (`modules_to_save`), tied when the
model ties them. QLoRA loads the frozen base in 4-bit NormalFloat (bitsandbytes, CUDA only) and
trains the same adapters on top in the compute dtype.

Checkpoints and `final/` are PEFT adapter directories: adapter_config.json (whose
`base_model_name_or_path` is the absolute base directory) and adapter_model.safetensors, beside the
tokenizer with its chat template and a generation config that stops at the end of the turn.
`load_adapter` rebuilds base + adapter from one (for `sftkit generate`, `chat` and `export`).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from sftkit.config import Config, ConfigError, LoraConfig
from sftkit.model import (
    ModelError,
    check_local_dir,
    init_new_token_rows,
    load_model,
    load_tokenizer,
    read_weights,
    resolve_dtype,
)

if TYPE_CHECKING:
    import peft

ADAPTER_CONFIG = "adapter_config.json"
QLORA_HELP = "QLoRA needs a CUDA GPU and bitsandbytes: pip install bitsandbytes; on CPU use lora.quantize=null"


def require_peft() -> Any:
    """The `peft` module, or a clear error saying how to install it."""
    try:
        import peft
    except ImportError as err:
        raise ModelError("LoRA needs PEFT: pip install 'sftkit[lora]' (or pip install peft)") from err
    return peft


def check_quantization(lora: LoraConfig, device: torch.device) -> None:
    """Fail before loading anything when QLoRA is asked for where it cannot run."""
    if not lora.quantize:
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"lora.quantize={lora.quantize}: no CUDA GPU on this machine — {QLORA_HELP}")
    if device.type != "cuda":
        raise ConfigError(f"lora.quantize={lora.quantize}: train.device is {device} — {QLORA_HELP}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"lora.quantize={lora.quantize}: bitsandbytes is not installed — {QLORA_HELP}")


def quantization_config(lora: LoraConfig, compute_dtype: torch.dtype) -> Any:
    """BitsAndBytesConfig for a 4-bit NF4 base (double quantization), or None without `lora.quantize`."""
    if not lora.quantize:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=lora.quantize,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def embedding_modules(model: PreTrainedModel) -> tuple[str, str | None, bool]:
    """(input embedding name, output head name or None, whether the two share one weight)."""
    names = {id(module): name for name, module in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    return names[id(embed)], (names[id(head)] if head is not None else None), tied


def modules_to_save(lora: LoraConfig, model: PreTrainedModel, added: list[str]) -> list[str]:
    """`lora.modules_to_save`, or by default the embeddings and head when the template added tokens."""
    embed, head, _ = embedding_modules(model)
    if lora.modules_to_save is not None:
        if added and not lora.modules_to_save:
            print(f"warning     lora.modules_to_save=[]: the new tokens {' '.join(added)} keep their initial rows "
                  "(the mean of the old ones): they are never trained")
        return list(lora.modules_to_save)
    if not added:
        return []
    save = [name for name in (embed, head) if name is not None]
    print(f"notice      the chat template added {len(added)} new tokens ({' '.join(added)}): their embedding rows "
          f"start untrained and LoRA adapters never reach them, so the embeddings and output head are trained in "
          f"full and saved with the adapter (lora.modules_to_save={save}; lora.modules_to_save=[] turns this off)")
    return save


def peft_config(lora: LoraConfig, model: PreTrainedModel, added: list[str]) -> peft.LoraConfig:
    """The PEFT LoraConfig for `lora` on `model` (DoRA, modules_to_save, tied embeddings, GPT-2's Conv1D)."""
    peft = require_peft()
    save = modules_to_save(lora, model, added)
    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules(lora, model),
        use_dora=lora.dora,
        modules_to_save=save or None,
        ensure_weight_tying=keep_tied(model, save),
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),  # GPT-2 stores weights as (in, out)
        bias="none",
    )


MAMBA_TYPES = ("falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h")  # PEFT refuses LoRA on their
MAMBA_SKIPPED = ("out_proj", "conv1d")  # Mamba out_proj and conv1d (its kernels read those weights directly)


def target_modules(lora: LoraConfig, model: PreTrainedModel) -> str | list[str]:
    """`lora.target_modules` for PEFT. "all-linear" stays PEFT's own choice (every linear layer, fused MoE
    experts included, never the output head) except where that choice is wrong: a model with vision or audio
    towers gets the linear layers of its text decoder only, and a Mamba-based model leaves out the Mamba
    layers' `out_proj` and `conv1d`, which PEFT refuses (an error at set-up otherwise), and a model's own
    linear subclasses with their own forward (DeepSeek-V4's grouped `o_a_proj`), to which PEFT would add
    a LoRA of the wrong shape. Then the list of layer names is given instead."""
    if not isinstance(lora.target_modules, str) or lora.target_modules.lower() != "all-linear":
        return lora.target_modules
    head = model.get_output_embeddings()
    linear = [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))
              and module is not head]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(decoder, (torch.nn.Linear, Conv1D)):  # BERT-like heads call their output layer `decoder`
        decoder = None
    prefix = next((name for name, module in model.named_modules() if module is decoder), "")
    modules = dict(model.named_modules())
    chosen = [name for name in linear if (not prefix or name.startswith(prefix + "."))
              and _plain_linear(modules[name])]
    if getattr(model.config, "model_type", None) in MAMBA_TYPES:
        chosen = [name for name in chosen if name.rsplit(".", 1)[-1] not in MAMBA_SKIPPED]
    return "all-linear" if chosen == linear else chosen


def _plain_linear(module: torch.nn.Module) -> bool:
    """Whether a model's own linear subclass computes x @ W.T + b like nn.Linear (Falcon's does; DeepSeek-V4's
    grouped projection does not), tried once on a small input; nn.Linear, Conv1D and others' layers pass."""
    kind = type(module)
    if not kind.__module__.startswith("transformers.models.") or isinstance(module, Conv1D):
        return True
    if kind not in _PLAIN:
        x = torch.randn(3, module.in_features, dtype=module.weight.dtype, device=module.weight.device)
        try:
            with torch.no_grad():
                out = module(x)
                _PLAIN[kind] = isinstance(out, torch.Tensor) and out.shape == (3, module.out_features) and bool(
                    torch.allclose(out, F.linear(x, module.weight, module.bias), atol=1e-4))
        except (RuntimeError, ValueError, TypeError):  # a router returning a tuple, a grouped projection, ...
            _PLAIN[kind] = False
    return _PLAIN[kind]


_PLAIN: dict[type, bool] = {}


def keep_tied(model: PreTrainedModel, save: list[str]) -> bool:
    """Whether a tied embedding and head in `modules_to_save` stay one trained matrix (ensure_weight_tying).

    PEFT ties them again when the adapter is loaded only if the embedding is called `embed_tokens`
    (Llama, Qwen, Mistral, Gemma, ...). Elsewhere (GPT-2's `wte`) a reloaded or resumed adapter would
    pair a trained embedding with a frozen head, so there the two are trained as separate copies,
    which every load reproduces; the merged export is then untied.
    """
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    embed, head, tied = embedding_modules(model)
    ends = {name.rsplit(".", 1)[-1] for name in (embed, head) if name}
    if not (tied and any(name.rsplit(".", 1)[-1] in ends for name in save)):
        return False
    if embed.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES:
        return True
    print(f"note        {model.config.model_type} ties its embeddings and output head, and PEFT can keep them tied "
          f"only for an `embed_tokens` layer (this one is `{embed}`): they are trained as two copies, and the "
          "merged export has an untied head")
    return False


def setup_lora_model(
    config: Config, device: torch.device, resume_from: Path | None = None,
    prepared: tuple[PreTrainedTokenizerBase, list[str]] | None = None,
) -> tuple[peft.PeftModel, PreTrainedTokenizerBase, list[str]]:
    """The base model (4-bit with QLoRA) with trainable adapters; the checkpoint's adapter when resuming.

    Returns (model, tokenizer, newly added tokens) like `sftkit.model.load_model`.
    """
    peft = require_peft()
    check_quantization(config.lora, device)
    quantization = quantization_config(config.lora, resolve_dtype(config.model.dtype, device))
    model, tokenizer, added = load_model(
        config.model, template=config.data.template, device=device, quantization=quantization, prepared=prepared
    )
    if quantization is not None:  # frozen 4-bit base, norms in fp32, gradient checkpointing
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if resume_from is not None:
        model = peft.PeftModel.from_pretrained(model, resume_from, is_trainable=True)
    else:
        with warnings.catch_warnings():  # keep_tied() has said what happens to tied embeddings
            warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`")
            model = peft.get_peft_model(model, peft_config(config.lora, model, added))
        model.peft_config["default"].base_model_name_or_path = str(Path(config.model.path).expanduser().resolve())
    lora = config.lora
    kinds = ["DoRA" if lora.dora else "LoRA"] + ([f"{lora.quantize} base"] if lora.quantize else [])
    print(f"lora        {' + '.join(kinds)}: r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, "
          f"{len(adapted_modules(model))} layers adapted ({_targets(lora)})")
    return model, tokenizer, added


def adapted_modules(model: torch.nn.Module) -> list[str]:
    """Names of the layers that carry a LoRA adapter."""
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A")]


def _targets(lora: LoraConfig) -> str:
    return lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)


def save_options(model: torch.nn.Module) -> dict[str, Any]:
    """Extra `save_pretrained` arguments: none for a plain model; for a PEFT model whose embeddings are
    in modules_to_save, no second and third full copy of them (PEFT adds those when the vocabulary grew)."""
    if not type(model).__module__.startswith("peft."):
        return {}
    saved = model.peft_config[model.active_adapter].modules_to_save or []
    embed, _, _ = embedding_modules(model.get_base_model())
    in_saved = any(name.rsplit(".", 1)[-1] == embed.rsplit(".", 1)[-1] for name in saved)
    return {"save_embedding_layers": False} if in_saved else {}


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a PEFT adapter directory (it holds adapter_config.json)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base(adapter_dir: str | Path, base: str | Path | None = None) -> Path:
    """The base model directory of an adapter: `base` if given, else its `base_model_name_or_path`."""
    adapter = Path(adapter_dir).expanduser()
    if base is None:
        base = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{adapter / ADAPTER_CONFIG}: no base_model_name_or_path — pass the base with --base DIR")
        return check_local_dir(base, f"{adapter / ADAPTER_CONFIG} base_model_name_or_path (override with --base DIR)")
    return check_local_dir(base, "--base")


def load_base_for_adapter(
    adapter_dir: str | Path, *, base: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model grown to the adapter's tokenizer exactly as training grew it, and that tokenizer.

    Tokens the adapter's tokenizer has and the base's has not were added by the chat template: their
    rows start at the mean of the old ones, as in `sftkit.model.load_model` (then `modules_to_save`,
    if the adapter has it, replaces the whole matrices).
    """
    adapter = Path(adapter_dir).expanduser()
    base_dir = adapter_base(adapter, base)
    tokenizer = load_tokenizer(adapter)
    base_vocab = load_tokenizer(base_dir).get_vocab()
    added = [token for token in tokenizer.get_vocab() if token not in base_vocab]
    model = read_weights(base_dir, dtype)
    if added or len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        init_new_token_rows(model, tokenizer, added)
    if (adapter / "generation_config.json").is_file():  # the end-of-turn stop tokens of training
        model.generation_config = GenerationConfig.from_pretrained(adapter)
    return model, tokenizer


def load_adapter(
    adapter_dir: str | Path,
    *,
    base: str | Path | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[peft.PeftModel, PreTrainedTokenizerBase]:
    """Base + adapter from local directories, in eval mode on `device` (CPU by default)."""
    peft = require_peft()
    model, tokenizer = load_base_for_adapter(adapter_dir, base=base, dtype=dtype)
    model = peft.PeftModel.from_pretrained(model, Path(adapter_dir).expanduser(), is_trainable=False)
    return model.to(device or torch.device("cpu")).eval(), tokenizer
