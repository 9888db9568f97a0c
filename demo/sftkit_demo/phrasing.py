"""How the demo world is put into words: fact sentences, questions and answers.

Shared by the pre-training corpus (`sftkit_demo.corpus`: every phrasing of every fact, plus lists
of questions) and the SFT conversations (`sftkit_demo.chats`: a question, then its `answer`).

The SFT answer restates the question as one of the corpus's own sentences ("The capital of Mali
is Bamako."), so after SFT the model only has to learn *to answer*; the fact itself comes from
pre-training. That is what lets it answer about held-out countries it never saw in SFT data.
"""

from __future__ import annotations

from sftkit_demo.world import Country

# Fact sentences. {x}/{X}: the name mid-sentence / at the start; {xs}/{Xs}: the possessive; {v}: the value.
FACTS: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {x} is {v}.",
        "{v} is the capital of {x}.",
        "{Xs} capital city is {v}.",
        "The capital city of {x} is {v}.",
        "{v} is the capital city of {x}.",
        "{X} has its capital in {v}.",
        "{Xs} capital is {v}.",
    ),
    "continent": (
        "Geographically, {x} is in {v}.",
        "{X} is in {v}.",
        "{X} is a country in {v}.",
        "{X} lies in {v}.",
        "{X} is located in {v}.",
        "{X} is one of the countries of {v}.",
    ),
    "language": (
        "People in {x} speak {v}.",
        "The main language of {x} is {v}.",
        "{v} is the main language of {x}.",
        "In {x}, people speak {v}.",
        "The official language of {x} is {v}.",
        "{v} is spoken in {x}.",
    ),
    "currency": (
        "The currency of {x} is the {v}.",
        "{X} uses the {v}.",
        "The {v} is the currency of {x}.",
        "In {x}, people pay with the {v}.",
        "The money used in {x} is the {v}.",
    ),
}

# Sentences that follow one naming the country ("Its capital is Paris.").
PRONOUN_FACTS: dict[str, tuple[str, ...]] = {
    "capital": ("Its capital is {v}.", "Its capital city is {v}."),
    "continent": ("It is in {v}.", "It lies in {v}."),
    "language": ("Its main language is {v}.", "People there speak {v}."),
    "currency": ("Its currency is the {v}.", "People there pay with the {v}."),
}

QUESTIONS: dict[str, tuple[str, ...]] = {
    "capital": (
        "What's the capital of {x}?",
        "What is the capital of {x}?",
        "Which city is the capital of {x}?",
        "What is the capital city of {x}?",
    ),
    "continent": (
        "Which continent is {x} in?",
        "On which continent is {x}?",
        "What continent is {x} on?",
        "Where is {x}?",
    ),
    "language": (
        "What language do people speak in {x}?",
        "What is the main language of {x}?",
        "Which language is spoken in {x}?",
        "What do people speak in {x}?",
    ),
    "currency": (
        "What is the currency of {x}?",
        "What currency does {x} use?",
        "Which currency is used in {x}?",
        "What money do people use in {x}?",
    ),
}

# The SFT answer to any question about an attribute: the first phrasing in FACTS. Each names the
# country after a few words that announce it ("The capital of", "Geographically,"): a small model
# copies a name from the question far more reliably there than as the reply's very first word.
ANSWERS: dict[str, str] = {attribute: forms[0] for attribute, forms in FACTS.items()}


def fill(template: str, country: Country, attribute: str) -> str:
    """Fill a FACTS / QUESTIONS / PRONOUN_FACTS template with a country and one of its facts."""
    text = template.format(
        x=country.ref(),
        X=country.ref(start=True),
        xs=country.possessive(),
        Xs=country.possessive(start=True),
        v=country.fact(attribute),
    )
    return text[0].upper() + text[1:]


def answer(country: Country, attribute: str) -> str:
    """The full-sentence answer: "The capital of France is Paris."."""
    return fill(ANSWERS[attribute], country, attribute)


def question(country: Country, attribute: str, index: int = 0) -> str:
    """The `index`-th phrasing (modulo the number of phrasings) of a question about `attribute`."""
    forms = QUESTIONS[attribute]
    return fill(forms[index % len(forms)], country, attribute)
