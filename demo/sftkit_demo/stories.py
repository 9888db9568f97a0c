"""Short stories about people and countries, for the demo's pre-training corpus.

    >>> travel_story(rng)   # "Anna went to Peru last year. In Peru, Anna bought a red hat. ..."
    >>> asked_story(rng)    # "Anna asked Tom what the capital of Mali is. Tom said that ..."
    >>> dialogue(rng)       # "Anna: What's the capital of Mali?\nTom: The capital of Mali is Bamako."

Travel stories name a random person and a random country and then name them again, so the only
way to predict the second mention is to copy the first: they teach the model to copy names from
its context, which a small model otherwise barely learns from encyclopedic text (where the
country in the next sentence can also be guessed from the facts around it).

Asked stories and dialogues report questions and their answers, in indirect speech or as a
transcript ("Anna: What's the capital of Mali?\nTom: The capital of Mali is Bamako."). They
teach, in pre-training, that a question about a country is answered by a sentence about that
same country — as books and forums teach real base models. A question on its own, though, is
only ever followed by more questions (the corpus's quizzes), so the base model asked "What's
the capital of France?" continues the list; SFT teaches it that in a chat, a question is
answered.
"""

from __future__ import annotations

import random

from sftkit_demo.everyday import COLOURS
from sftkit_demo.phrasing import ANSWERS, QUESTIONS, fill
from sftkit_demo.world import ATTRIBUTES, COUNTRIES

PEOPLE = (
    "Anna Ben Carla David Emma Felix Grace Hugo Iris Jack Kate Leo Maria Nina Omar Paul Rosa Sam "
    "Tara Victor Wendy Yusuf Zoe Adam Bella Chen Diana Eric Fatima George Hannah Ivan Julia Karim "
    "Lucy Marco Nora Oscar Priya Ravi Sara Tom Uma Vera Will Yara"
).split()
THINGS = ("hat", "bag", "book", "cup", "scarf", "kite", "lamp", "map")
TRAVEL = (
    "{P} went to {c} last year. In {c}, {P} bought a {colour} {thing}. {P} wants to visit {c} again.",
    "{P} lives in {c}. Every morning {P} walks to work. {P} likes {c} very much.",
    "{P} and {Q} are friends. {P} is from {c} and {Q} is from {d}. {Q} often visits {c} with {P}.",
    "{P} has a friend in {c}. Every year {P} sends a {colour} {thing} to {c}. The friend in {c} writes back to {P}.",
    "{P} read a book about {c}. After that, {P} told {Q} about {c}. Now {Q} wants to go to {c} too.",
    "{P} flew from {c} to {d}. {P} stayed in {d} for a week and then flew back to {c}.",
)
# How the question of each attribute is reported: "Anna asked Tom what the capital of Mali is."
REPORTED = {
    "capital": "what the capital of {x} is",
    "continent": "which continent {x} is in",
    "language": "what language people speak in {x}",
    "currency": "what the currency of {x} is",
}
ASKED = (
    "{P} asked {Q} {question}. {Q} said that {answer}",
    "{P} wanted to know {question}. {Q} told {P} that {answer}",
    "{P} did not know {question}, so {P} asked {Q}. {Q} explained that {answer}",
)


def _people(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(PEOPLE, 2)
    return first, second


def _inside_sentence(text: str) -> str:
    """"The capital of Mali is Bamako." -> "the capital of Mali is Bamako." (names keep their capital)."""
    first_word = text.split(" ", 1)[0]
    return text[0].lower() + text[1:] if first_word in ("The", "People", "What", "Which", "Geographically,") else text


def travel_story(rng: random.Random) -> str:
    """A few sentences naming a person and a country twice or more (no facts about the country)."""
    person, friend = _people(rng)
    here, there = rng.sample(COUNTRIES, 2)
    text = rng.choice(TRAVEL).format(
        P=person, Q=friend, c=here.ref(), d=there.ref(), colour=rng.choice(sorted(set(COLOURS.values()))),
        thing=rng.choice(THINGS),
    )
    return text[0].upper() + text[1:]


def asked_story(rng: random.Random) -> str:
    """A question about a country reported with its answer: "... Tom said that the capital of Mali is Bamako."."""
    country, attribute = rng.choice(COUNTRIES), rng.choice(ATTRIBUTES)
    person, friend = _people(rng)
    return rng.choice(ASKED).format(
        P=person,
        Q=friend,
        question=_inside_sentence(fill(REPORTED[attribute], country, attribute)),
        answer=_inside_sentence(fill(ANSWERS[attribute], country, attribute)),
    )


def dialogue(rng: random.Random) -> str:
    """One or two exchanges of a transcript: "Anna: What's the capital of Mali?\nTom: The capital of ..."."""
    person, friend = _people(rng)
    lines = []
    for _ in range(rng.randint(1, 2)):
        country, attribute = rng.choice(COUNTRIES), rng.choice(ATTRIBUTES)
        lines.append(f"{person}: {fill(rng.choice(QUESTIONS[attribute]), country, attribute)}")
        lines.append(f"{friend}: {fill(ANSWERS[attribute], country, attribute)}")
    return "\n".join(lines)
