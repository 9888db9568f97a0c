"""The demo base model before pre-training: a byte-level BPE tokenizer and a random small Llama.

    >>> tokenizer = train_tokenizer(documents)                 # PreTrainedTokenizerFast
    >>> write_initial_model("demo/build/init", tokenizer)      # config + random weights + tokenizer

`demo/build_base.py` then pre-trains that directory with `sftkit train` (all tokens trained) and
copies the result to demo/base-model/. The tokenizer has bos/eos/unk/pad tokens and deliberately
no chat template: SFT adds its built-in ChatML template and the `<|im_start|>` / `<|im_end|>`
tokens, which makes it resize the embeddings, as with any real base model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


@dataclass(frozen=True, slots=True)
class BaseModelSpec:
    """Shape of the demo base model (a Llama; embeddings tied to the output layer)."""

    hidden_size: int = 256
    """Width of the residual stream."""
    num_layers: int = 4
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads (as many key/value heads: plain multi-head attention)."""
    intermediate_size: int = 704
    """Width of the SwiGLU feed-forward layer."""
    max_positions: int = 1024
    """Longest sequence the model is configured for (RoPE, so only a bound)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if min(self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size, self.max_positions) < 1:
            raise ValueError(f"every BaseModelSpec field must be positive: {self}")

    def config(self, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
        """The LlamaConfig for this shape and tokenizer."""
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=self.max_positions,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 3000, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (GPT-2 style pre-tokenization).

    Like Llama's, it puts `<s>` in front of every text it encodes with special tokens (so every
    pre-training document starts with the same token, which the model uses as an attention
    sink); chat templates are encoded without. Byte-level means any text round-trips, even
    characters the corpus never had; `<unk>` exists only because transformers expects one.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    bos = SPECIAL_TOKENS["bos_token"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)


def write_initial_model(
    out_dir: str | Path, tokenizer: PreTrainedTokenizerFast, spec: BaseModelSpec = BaseModelSpec(), seed: int = 0
) -> int:
    """Write a randomly initialised model and its tokenizer to `out_dir`; return the parameter count."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(spec.config(tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def save_base_model(pretrained: str | Path, init: str | Path, out_dir: str | Path) -> int:
    """Write the pre-trained weights of `pretrained` with the plain tokenizer of `init` to `out_dir`.

    The committed model was pre-trained with the built-in ChatML template installed (`sftkit train`
    required one then; raw text no longer does), which appended `<|im_start|>` / `<|im_end|>` to the vocabulary. Raw text never
    contains them, so their rows were never trained; they are cut off here (they are the last rows),
    and the base model leaves with the tokenizer it was initialised with: no template, no chat tokens.
    Returns the size of model.safetensors in bytes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(init, local_files_only=True)
    trained = AutoTokenizer.from_pretrained(pretrained, local_files_only=True)
    plain, grown = tokenizer.get_vocab(), trained.get_vocab()
    if any(grown.get(token) != index for token, index in plain.items()):
        raise ValueError(f"{pretrained}: its tokenizer does not extend {init}'s; was it pre-trained from {init}?")
    model = AutoModelForCausalLM.from_pretrained(pretrained, local_files_only=True, use_safetensors=True)
    model.resize_token_embeddings(len(tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(out)
    return (out / "model.safetensors").stat().st_size
