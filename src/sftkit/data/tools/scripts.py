"""The writing systems of a text's letters (Latin, Han, Cyrillic, ...), from Unicode character names:
no language model. `sftkit data inspect` counts them per example and names off-script replies.

    letters_by_script("Hello мир 你好")   # Counter({'Latin': 5, 'Cyrillic': 3, 'Han': 2})
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from functools import lru_cache

SCRIPTS = {name: name.title() for name in (
    "LATIN", "GREEK", "CYRILLIC", "ARMENIAN", "HEBREW", "ARABIC", "SYRIAC", "THAANA", "DEVANAGARI",
    "BENGALI", "GURMUKHI", "GUJARATI", "ORIYA", "TAMIL", "TELUGU", "KANNADA", "MALAYALAM", "SINHALA",
    "THAI", "LAO", "TIBETAN", "MYANMAR", "GEORGIAN", "ETHIOPIC", "KHMER", "MONGOLIAN", "HIRAGANA",
    "KATAKANA", "HANGUL", "BOPOMOFO", "YI")}
SCRIPTS |= {"CJK": "Han", "KATAKANA-HIRAGANA": "Katakana"}
_ASCII_LETTERS = re.compile(r"[A-Za-z]+")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


@lru_cache(maxsize=None)
def script_of(char: str) -> str | None:
    """The writing system of a letter ("Latin", "Han", "Cyrillic", ...), None for a non-letter."""
    if not char.isalpha():
        return None
    words = unicodedata.name(char, "").split()
    if words[:1] in (["FULLWIDTH"], ["HALFWIDTH"]):
        words = words[1:]
    return SCRIPTS.get(words[0], "Other") if words else "Other"


def letters_by_script(text: str) -> Counter[str]:
    """How many letters of `text` belong to each writing system."""
    counts: Counter[str] = Counter()
    ascii_letters = sum(map(len, _ASCII_LETTERS.findall(text)))
    if ascii_letters:
        counts["Latin"] = ascii_letters
    if not text.isascii():
        for char, n in Counter(_NON_ASCII.findall(text)).items():
            if script := script_of(char):
                counts[script] += n
    return counts
