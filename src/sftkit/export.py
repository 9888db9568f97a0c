"""Export a LoRA run: merged into a plain Hugging Face model, or as a clean PEFT adapter directory.

    sftkit export runs/tiny-lora/final --out runs/tiny-lora/merged --merge        # plain HF model, no PEFT needed
    sftkit export runs/tiny-lora/checkpoints/step-50 --out adapters/step-50       # adapter only, no training state
    sftkit export runs/tiny-lora/final --out merged --merge --base models/qwen2.5 # the base moved since training

`--merge` loads the base named in adapter_config.json (`base_model_name_or_path`, or `--base`),
grows its vocabulary to the adapter's tokenizer exactly as training did, loads the adapter, folds
every update into its layer (`merge_and_unload`: W + B @ A * alpha / r, DoRA's magnitudes, and the
embeddings and head of `modules_to_save`) and writes config.json, model.safetensors,
generation_config.json (stopping at the end of the turn) and the tokenizer with its chat template.
Merging happens in float32 on the CPU; the weights are written in the base's own dtype unless
`--dtype` says otherwise. A QLoRA adapter is merged into the full-precision base, not the 4-bit one.

Without `--merge` the adapter is loaded the same way and saved again by PEFT: adapter_config.json,
adapter_model.safetensors, tokenizer, generation config, and no optimizer or trainer state.

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
