"""Ask the demo's questions to a base model (plain text) or a fine-tuned one (its chat template) and score them.

    >>> base = ask_base(model, tokenizer, ["What's the capital of Mali?"])      # continuations
    >>> sft = ask_chat(model, tokenizer, ["What's the capital of Mali?"])       # replies
    >>> judge(sft[0], expected="Bamako", country="Mali")                       # Verdict(answered=True, correct=True)

Generation is greedy, so every run prints the same text. A base model is given the bare question,
as text, after `<s>` (as every pre-training document starts) and may write a few sentences;
a fine-tuned model gets the question as a user turn and stops at its end-of-turn token.

A reply *answers* when its first sentence is a statement (a base model that continues the list
writes another question instead); it is *correct* when it names the expected fact. The country's
own name is taken out before looking for the fact (unless the fact contains it, as "Mexico City"
does), so the capital "Sao Tome" is not found in "Sao Tome and Principe is in Africa.".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftkit.data.templates import pad_token_id
from sftkit.evaluate.task_eval import generate_batch
from sftkit.generate import encode_prompt, stop_ids

_SENTENCE_END = re.compile(r"(?<=[.?!])\s|\n")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a reply did with a question."""

    answered: bool
    """The first sentence is a statement, not another question."""
    correct: bool
    """It answered and named the expected fact."""


def first_sentence(text: str) -> str:
    """Text up to the first sentence end or line break ("Paris. What is ..." -> "Paris.")."""
    text = text.strip()
    return _SENTENCE_END.split(text, maxsplit=1)[0].strip() if text else ""


def judge(reply: str, expected: str, country: str) -> Verdict:
    """Did `reply` answer, and did it name `expected` (outside `country`'s own name)?"""
    sentence = first_sentence(reply)
    answered = bool(sentence) and not sentence.endswith("?")
    if country.lower() in expected.lower():  # "Mexico City", "Brunei dollar": the name alone cannot match
        found = expected.lower() in sentence.lower()
    else:  # "Bissau" (Guinea-Bissau), "Sao Tome" (Sao Tome and Principe): look outside the name
        found = expected.lower() in sentence.replace(country, "").lower()
    return Verdict(answered, answered and found)


def generate_batched(
    model: PreTrainedModel, prompts: list[list[int]], stops: list[int], pad_id: int, max_new_tokens: int,
    batch_size: int = 32,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts, batched and left-padded (`sftkit eval`'s own generation),
    each cut before its first stop id. Batching keeps the demo's few hundred questions within seconds."""
    model.eval()
    return [ids for ids, _ in generate_batch(model, prompts, stops, pad_id, max_new_tokens, batch_size)]


def ask_base(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: list[str], max_new_tokens: int = 24
) -> list[str]:
    """Greedy plain-text continuations of each question (what a base model does with it), after `<s>`."""
    prompts = [tokenizer(q).input_ids for q in questions]
    outs = generate_batched(model, prompts, [tokenizer.eos_token_id], tokenizer.pad_token_id, max_new_tokens)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outs]


def ask_chat(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: list[str], max_new_tokens: int = 32
) -> list[str]:
    """Greedy replies of a fine-tuned model, each question a fresh one-turn conversation in its chat
    template (`sftkit.generate.encode_prompt`, as `sftkit generate` does), ending at the end of the turn."""
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    stops = stop_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, stops)
    outs = generate_batched(model, prompts, stops, pad, max_new_tokens)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outs]
