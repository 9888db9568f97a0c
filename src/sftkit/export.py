"""Export a run: a LoRA adapter merged into a plain Hugging Face model or as a clean adapter; any run as GGUF.

    sftkit export runs/tiny-lora/final --out runs/tiny-lora/merged --merge        # plain HF model, no PEFT needed
    sftkit export runs/tiny-lora/checkpoints/step-50 --out adapters/step-50       # adapter only, no training state
    sftkit export runs/tiny-lora/final --out merged --merge --base models/qwen2.5 # the base moved since training
    sftkit export runs/tiny/final --gguf --out tiny.gguf                          # llama.cpp / Ollama / LM Studio

`--merge` loads the base named in adapter_config.json (`base_model_name_or_path`, or `--base`),
grows its vocabulary to the adapter's tokenizer exactly as training did, loads the adapter, folds
every update into its layer (`merge_and_unload`: W + B @ A * alpha / r, DoRA's magnitudes, and the
embeddings and head of `modules_to_save`) and writes config.json, model.safetensors,
generation_config.json (stopping at the end of the turn) and the tokenizer with its chat template.
Merging happens in float32 on the CPU; the weights are written in the base's own dtype unless
`--dtype` says otherwise. A QLoRA adapter is merged into the full-precision base, not the 4-bit one.

Without `--merge` the adapter is loaded the same way and saved again by PEFT: adapter_config.json,
adapter_model.safetensors, tokenizer, generation config, and no optimizer or trainer state.

With `--gguf` the model directory (a full run's final/, best/ or step-N/; an adapter is merged in
memory first) becomes one GGUF file through llama.cpp's `gguf` writer (`sftkit.gguf_export`), with the
run's chat template and end-of-turn token in its metadata.

Either way the directory is written to `OUT.tmp` and renamed, so a failed export leaves nothing
half-written; an existing non-empty OUT is refused rather than overwritten.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel

from sftkit.config import CONFIG_FILE
from sftkit.durable import atomic_dir
from sftkit.lora import adapter_base, is_adapter_dir, load_adapter, save_options
from sftkit.model import TORCH_DTYPES, ModelError
from sftkit.portable import save_tokenizer


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a model directory's config.json says its weights are in (float32 when it says nothing)."""
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return TORCH_DTYPES.get(str(name), torch.float32)


def retie(model: PreTrainedModel, base_dir: Path) -> PreTrainedModel:
    """Tie the head to the embeddings again where the base tied them and the merge left two equal copies.

    PEFT unties them when it unloads `modules_to_save`; a trained tied pair is still one matrix.
    """
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied_in_base = json.loads((base_dir / "config.json").read_text()).get("tie_word_embeddings", True)
    if head is None or not tied_in_base or head.weight is embed.weight or not torch.equal(head.weight, embed.weight):
        return model
    model.config.tie_word_embeddings = True
    model.tie_weights()
    return model


def check_paths(adapter_dir: Path, out: Path) -> None:
    """An adapter directory in, a new (or empty) directory out."""
    if not is_adapter_dir(adapter_dir):
        raise ModelError(f"{adapter_dir}: no adapter_config.json — `sftkit export` takes the final/ or "
                         "checkpoints/step-N/ directory of a run trained with lora.enabled=true")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"--out {out}: already exists and is not empty — choose a new directory")


def export(
    adapter_dir: str | Path,
    out: str | Path,
    *,
    merge: bool = False,
    base: str | Path | None = None,
    dtype: str = "auto",
) -> Path:
    """`sftkit export`: write `out` (merged HF model with `merge`, else a clean adapter); return it."""
    adapter, out = Path(adapter_dir).expanduser(), Path(out).expanduser()
    check_paths(adapter, out)
    base_dir = adapter_base(adapter, base)
    model, tokenizer = load_adapter(adapter, base=base_dir)
    if out.is_dir():
        out.rmdir()  # empty: replaced by the renamed OUT.tmp
    with atomic_dir(out) as tmp:
        if merge:
            merged = retie(model.merge_and_unload(), base_dir)
            merged.to(stored_dtype(base_dir) if dtype == "auto" else TORCH_DTYPES[dtype])
            merged.save_pretrained(tmp, safe_serialization=True)
        else:
            model.peft_config[model.active_adapter].base_model_name_or_path = str(base_dir.resolve())
            model.save_pretrained(tmp, safe_serialization=True, **save_options(model))
            model.generation_config.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)  # loads under transformers 4.5x as well as 5.x
        if (adapter / CONFIG_FILE).is_file():
            shutil.copyfile(adapter / CONFIG_FILE, tmp / CONFIG_FILE)
    kind = "merged Hugging Face model (loads without PEFT)" if merge else "PEFT adapter"
    print(f"exported {kind} to {out} (base {base_dir})")
    return out


def export_gguf(model_dir: str | Path, out: str | Path, *, base: str | Path | None = None, dtype: str = "auto") -> Path:
    """`sftkit export --gguf`: write `out` (a .gguf file) from a model or adapter directory; return it."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from sftkit.data.templates import end_of_turn_token_ids
    from sftkit.generate import training_template_kwargs
    from sftkit.gguf_export import check_supported, write_gguf
    from sftkit.model import check_local_dir, load_tokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelError("--gguf needs llama.cpp's gguf package, which is not installed here: pip install 'sftkit[gguf]'")
    source, out = check_local_dir(model_dir, "MODEL_DIR"), Path(out).expanduser()
    if out.suffix != ".gguf":
        raise ModelError(f"--out {out}: with --gguf, name the file to write, ending in .gguf")
    if out.exists():
        raise ModelError(f"--out {out}: already exists — choose a new file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    adapter = is_adapter_dir(source)
    config_dir = adapter_base(source, base) if adapter else source
    check_supported(config_dir, source)  # refused by name before any weight is read
    if adapter:
        model, tokenizer = load_adapter(source, base=config_dir)
        model = retie(model.merge_and_unload(), config_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, local_files_only=True)
        tokenizer = load_tokenizer(source)
    stored = str(stored_dtype(config_dir)).removeprefix("torch.")
    eos_ids = end_of_turn_token_ids(tokenizer, training_template_kwargs(source))
    write_gguf(model.eval(), tokenizer, config_dir, source, out, stored if dtype == "auto" else dtype, eos_ids)
    print(f"exported GGUF to {out} ({out.stat().st_size / 2**20:.1f} MiB, {model.config.model_type}, "
          f"{stored if dtype == 'auto' else dtype}; chat template and end of turn "
          f"{tokenizer.convert_ids_to_tokens(eos_ids[0]) if eos_ids else 'none'} in its metadata)")
    return out
