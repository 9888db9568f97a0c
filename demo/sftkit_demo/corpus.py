"""The demo's pre-training corpus: encyclopedic text about every country, and lists of questions.

    >>> from sftkit_demo.corpus import build_corpus
    >>> documents = build_corpus(seed=0)        # list[str], one document each

`demo/build_base.py` writes it to demo/data/pretrain.jsonl (rows of {"text": ...}) and
pre-trains the demo's base model on it with `sftkit train` (all tokens trained).

Three kinds of documents, so that the base model learns what a base model knows:
  * prose: each country's capital, continent, language and currency, every fact in several
    phrasings and orders, alone or mixed with other countries (the knowledge), and short
    stories (people travelling, or asking each other about countries, in indirect speech or as
    dialogue transcripts) that teach the model to copy a name from its context and to answer a
    question about a country with a sentence about that country;
  * quizzes: lines of questions *without answers* ("What's the capital of France? What is the
    currency of Japan? ..."), so a base model asked a question continues with more questions
    (the habit that SFT has to change);
  * everyday text (numbers, days, colours), so not everything is about countries.
The corpus mentions every country, held-out ones included: pre-training is where they are learnt.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from sftkit_demo.everyday import everyday_paragraphs
from sftkit_demo.phrasing import FACTS, PRONOUN_FACTS, QUESTIONS, fill
from sftkit_demo.stories import asked_story, dialogue, travel_story
from sftkit_demo.world import ATTRIBUTES, CONTINENTS, COUNTRIES, Country


@dataclass(frozen=True, slots=True)
class CorpusSpec:
    """How many paragraphs of each kind the corpus holds, and how they are gathered into documents."""

    profiles_per_country: int = 8
    """Paragraphs about one country (all four facts, random phrasings and order) per country."""
    mixed_paragraphs: int = 300
    """Paragraphs with one or two facts about each of two to four random countries."""
    travel_stories: int = 400
    """Stories naming a person and a random country several times (they teach copying names)."""
    asked_stories: int = 300
    """A question about a country and its answer, in indirect speech ("Anna asked Tom what ...")."""
    dialogues: int = 400
    """Transcripts of one or two questions and answers ("Anna: What's ...?\nTom: The capital ...")."""
    list_paragraphs: int = 100
    """Sentences listing the countries of a continent, or those sharing a language or currency."""
    quiz_lines: int = 700
    """Lines of three to seven questions, no answers."""
    everyday_paragraphs: int = 150
    """Paragraphs of everyday facts (numbers, days, colours, animals)."""
    document_chars: int = 800
    """Paragraphs (or quiz lines) are gathered into documents of at most this many characters,
    so documents have similar lengths and batches of them waste little on padding."""

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) < 0:
                raise ValueError(f"CorpusSpec.{name} must be >= 0, got {getattr(self, name)}")


def fact_sentence(country: Country, attribute: str, rng: random.Random) -> str:
    """One fact in a random phrasing: "France's capital city is Paris."."""
    return fill(rng.choice(FACTS[attribute]), country, attribute)


def profile(country: Country, index: int, starts: dict[str, int], rng: random.Random) -> str:
    """The `index`-th paragraph with all four facts about one country.

    Every third one opens with the continent ("France is a country in Europe.") and goes on
    with "Its capital is Paris."; the others name the country in every sentence, in a random
    order, each fact in phrasing number `starts[attribute] + index`, so that a country's
    profiles state each fact in as many different phrasings as they can. Every other one has
    the country's name as a title line, as an encyclopedia article would: text that names a
    country first and then talks about it.
    """
    title = f"{country.name}\n" if index % 2 == 0 else ""
    if index % 3 == 2:
        opening = fill("{X} is a country in {v}.", country, "continent")
        rest = [a for a in ATTRIBUTES if a != "continent"]
        rng.shuffle(rest)
        return title + " ".join([opening] + [fill(rng.choice(PRONOUN_FACTS[a]), country, a) for a in rest])
    attributes = list(ATTRIBUTES)
    rng.shuffle(attributes)
    sentences = []
    for attribute in attributes:
        forms = FACTS[attribute]
        sentences.append(fill(forms[(starts[attribute] + index) % len(forms)], country, attribute))
    return title + " ".join(sentences)


def profiles(country: Country, count: int, rng: random.Random) -> list[str]:
    """`count` paragraphs about one country (see `profile`), phrasings starting at random."""
    starts = {attribute: rng.randrange(len(FACTS[attribute])) for attribute in ATTRIBUTES}
    return [profile(country, i, starts, rng) for i in range(count)]


def mixed_paragraph(rng: random.Random) -> str:
    """One or two facts about each of two to four random countries."""
    sentences: list[str] = []
    for country in rng.sample(COUNTRIES, rng.randint(2, 4)):
        for attribute in rng.sample(ATTRIBUTES, rng.randint(1, 2)):
            sentences.append(fact_sentence(country, attribute, rng))
    return " ".join(sentences)


def _join_names(names: list[str]) -> str:
    """"A, B and C"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _groups() -> list[tuple[str, list[Country]]]:
    """(sentence opening, members): continents, and languages / currencies shared by 2+ countries."""
    groups: list[tuple[str, list[Country]]] = []
    for continent in CONTINENTS:
        groups.append((f"Countries in {continent} include", [c for c in COUNTRIES if c.continent == continent]))
    for attribute, opening in (("language", "{v} is spoken in"), ("currency", "The {v} is used in")):
        members: dict[str, list[Country]] = defaultdict(list)
        for country in COUNTRIES:
            members[country.fact(attribute)].append(country)
        for value, countries in sorted(members.items()):
            if len(countries) > 1:
                groups.append((opening.format(v=value), countries))
    return groups


def list_sentence(rng: random.Random, groups: list[tuple[str, list[Country]]]) -> str:
    """"Countries in Europe include France, Spain and Poland." (two to six members at random)."""
    opening, members = rng.choice(groups)
    chosen = rng.sample(members, min(len(members), rng.randint(2, 6)))
    return f"{opening} {_join_names([c.ref() for c in chosen])}."


def _ask(country: Country, attribute: str, rng: random.Random) -> str:
    return fill(rng.choice(QUESTIONS[attribute]), country, attribute)


def quiz_line(rng: random.Random) -> str:
    """Three to seven questions, no answers: one attribute for countries of a continent ("What's
    the capital of France? What's the capital of Germany? ..."), or random countries and attributes.

    The next question is always about another country: a quiz line never dwells on one.
    """
    count = rng.randint(3, 7)
    if rng.random() < 0.5:
        attribute = rng.choice(ATTRIBUTES)
        template = rng.choice(QUESTIONS[attribute])
        pool = [c for c in COUNTRIES if c.continent == rng.choice(CONTINENTS)]
        return " ".join(fill(template, c, attribute) for c in rng.sample(pool, min(count, len(pool))))
    return " ".join(_ask(c, rng.choice(ATTRIBUTES), rng) for c in rng.sample(COUNTRIES, count))


def gather(pieces: list[str], max_chars: int, separator: str) -> list[str]:
    """Join consecutive pieces into documents of at most `max_chars` (a longer piece stays alone)."""
    documents: list[str] = []
    current: list[str] = []
    for piece in pieces:
        if current and len(separator.join(current + [piece])) > max_chars:
            documents.append(separator.join(current))
            current = []
        current.append(piece)
    if current:
        documents.append(separator.join(current))
    return documents


def build_corpus(seed: int = 0, spec: CorpusSpec = CorpusSpec()) -> list[str]:
    """All pre-training documents, shuffled; the same list for the same seed and spec.

    Prose paragraphs are shuffled and gathered into documents separated by blank lines; quiz
    lines are gathered into documents of their own, so a question is only ever followed by
    another question or by the end of the document.
    """
    rng = random.Random(seed)
    paragraphs = [p for c in COUNTRIES for p in profiles(c, spec.profiles_per_country, rng)]
    paragraphs += [mixed_paragraph(rng) for _ in range(spec.mixed_paragraphs)]
    paragraphs += [travel_story(rng) for _ in range(spec.travel_stories)]
    paragraphs += [asked_story(rng) for _ in range(spec.asked_stories)]
    paragraphs += [dialogue(rng) for _ in range(spec.dialogues)]
    groups = _groups()
    paragraphs += [
        " ".join(list_sentence(rng, groups) for _ in range(rng.randint(1, 3))) for _ in range(spec.list_paragraphs)
    ]
    paragraphs += everyday_paragraphs(rng, spec.everyday_paragraphs)
    rng.shuffle(paragraphs)
    documents = gather(paragraphs, spec.document_chars, "\n\n")
    documents += gather([quiz_line(rng) for _ in range(spec.quiz_lines)], spec.document_chars, "\n")
    rng.shuffle(documents)
    return documents
