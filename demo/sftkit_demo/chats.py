"""The demo's SFT conversations (trained countries only) and the held-out evaluation questions.

    >>> from sftkit_demo.chats import build_sft, heldout_questions
    >>> train, evaluation = build_sft(trained_countries, seed=0)   # rows of {"messages": [...]}

Rows are in the `messages` format that `sftkit train` reads. Questions come in several
phrasings; answers are short exact sentences taken from the pre-training corpus
("The capital of France is Paris."). Some conversations carry a system prompt, some have
several turns (including "What about Spain?" follow-ups), and a few are everyday instructions.

Held-out countries never appear here: `heldout_questions` turns them into evaluation rows
{"country", "attribute", "question", "answer", "reference"} instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from sftkit_demo.everyday import everyday_instructions
from sftkit_demo.phrasing import QUESTIONS, answer, question
from sftkit_demo.world import ATTRIBUTES, Country

Row = dict[str, Any]

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a geography tutor. Answer in one short sentence.",
    "Answer the user's question.",
)


@dataclass(frozen=True, slots=True)
class SftSpec:
    """How the SFT set is drawn."""

    phrasings_per_fact: int = 2
    """Single-turn questions per (trained country, attribute), each in a different phrasing."""
    multi_turn: int = 250
    """Conversations of two or three questions."""
    everyday: int = 80
    """Everyday instructions ("What is two plus three?")."""
    system_prompt_rate: float = 0.2
    """Share of single-turn conversations that open with a system prompt."""
    eval_size: int = 120
    """Conversations in the evaluation split (trained countries, fresh phrasings and draws)."""

    def __post_init__(self) -> None:
        if not 1 <= self.phrasings_per_fact <= min(len(q) for q in QUESTIONS.values()):
            raise ValueError(f"phrasings_per_fact must be in 1..4, got {self.phrasings_per_fact}")
        if not 0.0 <= self.system_prompt_rate <= 1.0:
            raise ValueError(f"system_prompt_rate must be in [0, 1], got {self.system_prompt_rate}")


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def single_turn(country: Country, attribute: str, phrasing: int, rng: random.Random, spec: SftSpec) -> Row:
    """One question and its answer, sometimes under a system prompt."""
    messages: list[dict[str, str]] = []
    if rng.random() < spec.system_prompt_rate:
        messages.append(_message("system", rng.choice(SYSTEM_PROMPTS)))
    messages += [_message("user", question(country, attribute, phrasing)), _message("assistant", answer(country, attribute))]
    return {"messages": messages}


FOLLOW_UPS = {
    "capital": "And its capital?",
    "continent": "And which continent is it in?",
    "language": "And what language do people speak there?",
    "currency": "And its currency?",
}


def multi_turn(countries: list[Country], rng: random.Random) -> Row:
    """Two or three questions in a row. A follow-up may keep the country and change the attribute
    ("And its currency?") or keep the attribute and change the country ("What about Spain?"), so
    the answer has to take the country or the attribute from an earlier turn."""
    messages: list[dict[str, str]] = []
    country, attribute = rng.choice(countries), rng.choice(ATTRIBUTES)
    for turn in range(rng.randint(2, 3)):
        draw = rng.random()
        if turn > 0 and draw < 0.35:
            attribute = rng.choice([a for a in ATTRIBUTES if a != attribute])
            asked = FOLLOW_UPS[attribute]
        elif turn > 0 and draw < 0.7:
            country = rng.choice([c for c in countries if c != country])
            asked = f"What about {country.ref()}?"
        else:
            country, attribute = rng.choice(countries), rng.choice(ATTRIBUTES)
            asked = question(country, attribute, rng.randrange(len(QUESTIONS[attribute])))
        messages += [_message("user", asked), _message("assistant", answer(country, attribute))]
    return {"messages": messages}


def everyday_rows(rng: random.Random, count: int) -> list[Row]:
    """`count` everyday instructions with their answers."""
    pairs = everyday_instructions(rng)[:count]
    return [{"messages": [_message("user", q), _message("assistant", a)]} for q, a in pairs]


def build_sft(trained: list[Country], seed: int = 0, spec: SftSpec = SftSpec()) -> tuple[list[Row], list[Row]]:
    """(train, eval) SFT rows about `trained` countries only; shuffled, deterministic per seed."""
    rng = random.Random(seed)
    train: list[Row] = []
    for country in trained:
        for attribute in ATTRIBUTES:
            phrasings = rng.sample(range(len(QUESTIONS[attribute])), spec.phrasings_per_fact)
            train += [single_turn(country, attribute, p, rng, spec) for p in phrasings]
    train += [multi_turn(trained, rng) for _ in range(spec.multi_turn)]
    train += everyday_rows(rng, spec.everyday)
    rng.shuffle(train)
    evaluation = [
        single_turn(country, attribute, rng.randrange(len(QUESTIONS[attribute])), rng, spec)
        for country, attribute in (
            (rng.choice(trained), rng.choice(ATTRIBUTES)) for _ in range(spec.eval_size)
        )
    ]
    return train, evaluation


def heldout_questions(heldout: list[Country], seed: int = 0) -> list[Row]:
    """One question per (held-out country, attribute), in a seeded phrasing, with the expected answer.

    `answer` is the fact a reply must contain ("Paris"); `reference` the full-sentence answer.
    """
    rng = random.Random(seed)
    rows: list[Row] = []
    for country in heldout:
        for attribute in ATTRIBUTES:
            rows.append({
                "country": country.name,
                "attribute": attribute,
                "question": question(country, attribute, rng.randrange(len(QUESTIONS[attribute]))),
                "answer": country.fact(attribute),
                "reference": answer(country, attribute),
            })
    return rows
