"""What makes a model directory load anywhere, not only with the transformers that wrote it.

    save_tokenizer(tokenizer, Path("runs/x/final"))     # tokenizer files transformers 4.5x and 5.x both read
    add_adapter_usage(Path("runs/x/final"))             # a LoRA adapter's card says how to stop at end of turn

Used by `sftkit.checkpoint` for every directory it writes (step-N, final/, best/, tiny models) and by
`sftkit.export`. pyproject allows transformers>=4.56, and a model is often served by another
version than the one that trained it (vLLM, TGI, an older notebook).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

TOKENIZER_CONFIG = "tokenizer_config.json"
_V4_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}  # transformers 5 class names 4.x lacks
_ADAPTER_USE = """
## Generating with this adapter (written by sftkit)

PEFT builds the base model with the base's own generation config, whose end-of-sequence token may not
be the chat template's end-of-turn token; this directory's `generation_config.json` has both. Pass it:

    model = AutoPeftModelForCausalLM.from_pretrained(ADAPTER_DIR)
    model.generate(**inputs, generation_config=GenerationConfig.from_pretrained(ADAPTER_DIR))

`sftkit generate` / `sftkit chat --model ADAPTER_DIR` and `sftkit export` (a merged, plain model) use it.
"""


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """The tokenizer with its chat template, in a form transformers 4.5x and 5.x both load to the same ids.

    transformers 5 writes what 4.x cannot read or reads differently, so tokenizer_config.json is then
    rewritten (tokenizer.json, the template and the added tokens stay as written): the class
    `TokenizersBackend` becomes `PreTrainedTokenizerFast`; `extra_special_tokens` as a list becomes
    `additional_special_tokens` (4.x wants a mapping there; 5.x reads either); whether a BOS or EOS is
    added is written out, as measured on this tokenizer (4.x's Llama-style tokenizers otherwise add a
    BOS); and the load-time options 5.x stores (`is_local`, `local_files_only`) are dropped."""
    tokenizer.save_pretrained(directory)
    path = Path(directory) / TOKENIZER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") in _V4_CLASS:
        config["tokenizer_class"] = _V4_CLASS[config["tokenizer_class"]]
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config["add_bos_token"], config["add_eos_token"] = _adds_bos_eos(tokenizer)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _adds_bos_eos(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """Whether encoding a text puts the BOS token before it and the EOS token after it."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    extra = len(full) > len(plain)
    bos = extra and tokenizer.bos_token_id is not None and full[0] == tokenizer.bos_token_id
    eos = extra and tokenizer.eos_token_id is not None and full[-1] == tokenizer.eos_token_id
    return bool(bos), bool(eos)


def add_adapter_usage(directory: Path) -> None:
    """Append to a PEFT adapter's README.md (its model card) how to generate so that replies stop."""
    card = Path(directory) / "README.md"
    if (Path(directory) / "adapter_config.json").is_file() and card.is_file():
        card.write_text(card.read_text(encoding="utf-8") + _ADAPTER_USE, encoding="utf-8")
