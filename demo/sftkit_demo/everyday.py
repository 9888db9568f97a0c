"""Everyday facts for the demo: numbers, days, months, colours, animals.

They give the pre-training corpus some text that is not about countries, and SFT a few simple
instructions that are not geography questions. As with countries, every instruction's answer is
a sentence the corpus already contains ("Two plus three is five.").
"""

from __future__ import annotations

import random

NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
ORDINALS = (
    "first", "second", "third", "fourth", "fifth", "sixth",
    "seventh", "eighth", "ninth", "tenth", "eleventh", "twelfth",
)
COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "blood": "red", "an orange": "orange", "a lemon": "yellow", "milk": "white", "a tomato": "red",
}
SOUNDS = {"a dog": "woof", "a cat": "meow", "a cow": "moo", "a duck": "quack", "a sheep": "baa", "an owl": "hoot"}
LEGS = {"a spider": "eight", "a dog": "four", "a bird": "two", "an ant": "six", "a horse": "four", "a fish": "no"}


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def sum_fact(a: int, b: int) -> str:
    """"Two plus three is five." (a + b must be at most twenty)."""
    return f"{_cap(NUMBERS[a])} plus {NUMBERS[b]} is {NUMBERS[a + b]}."


def next_day_fact(i: int) -> str:
    """"The day after Monday is Tuesday."."""
    return f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}."


def month_fact(i: int) -> str:
    """"March is the third month of the year."."""
    return f"{MONTHS[i]} is the {ORDINALS[i]} month of the year."


def colour_fact(thing: str) -> str:
    """"The sky is blue."."""
    return f"{_cap(thing)} is {COLOURS[thing]}."


def sound_fact(animal: str) -> str:
    """"A cow says moo."."""
    return f"{_cap(animal)} says {SOUNDS[animal]}."


def legs_fact(animal: str) -> str:
    """"A spider has eight legs."."""
    return f"{_cap(animal)} has {LEGS[animal]} legs."


def counting(n: int) -> str:
    """"One, two, three." (counting from one to n)."""
    return _cap(", ".join(NUMBERS[1 : n + 1])) + "."


def everyday_sentences() -> list[str]:
    """Every everyday fact sentence, in a fixed order."""
    sentences = [sum_fact(a, b) for a in range(11) for b in range(11)]
    sentences += [next_day_fact(i) for i in range(7)]
    sentences += [month_fact(i) for i in range(12)]
    sentences += [colour_fact(t) for t in COLOURS]
    sentences += [sound_fact(a) for a in SOUNDS]
    sentences += [legs_fact(a) for a in LEGS]
    sentences += [counting(n) for n in range(3, 11)]
    sentences += ["There are seven days in a week.", "There are twelve months in a year."]
    return sentences


def everyday_paragraphs(rng: random.Random, count: int) -> list[str]:
    """`count` short paragraphs of three to six random everyday sentences."""
    pool = everyday_sentences()
    return [" ".join(rng.sample(pool, rng.randint(3, 6))) for _ in range(count)]


def everyday_instructions(rng: random.Random) -> list[tuple[str, str]]:
    """(instruction, answer) pairs; every answer is a sentence of `everyday_sentences`."""
    pairs: list[tuple[str, str]] = []
    for a in range(11):
        for b in range(11):
            pairs.append((f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", sum_fact(a, b)))
    pairs += [(f"What day comes after {DAYS[i]}?", next_day_fact(i)) for i in range(7)]
    pairs += [(f"Which month of the year is {MONTHS[i]}?", month_fact(i)) for i in range(12)]
    pairs += [(f"What colour is {t}?", colour_fact(t)) for t in COLOURS]
    pairs += [(f"What does {a} say?", sound_fact(a)) for a in SOUNDS]
    pairs += [(f"How many legs does {a} have?", legs_fact(a)) for a in LEGS]
    pairs += [(f"Count from one to {NUMBERS[n]}.", counting(n)) for n in range(3, 11)]
    rng.shuffle(pairs)
    return pairs
