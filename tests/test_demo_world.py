"""The demo's world, corpus, SFT data and tokenizer (sftkit_demo.*, demo/build_base.py)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from sftkit_demo.base import (
    SPECIAL_TOKENS,
    BaseModelSpec,
    train_tokenizer,
    write_initial_model,
)
from sftkit_demo.chats import build_sft, heldout_questions
from sftkit_demo.corpus import build_corpus
from sftkit_demo.dataset import FILES, read_jsonl, write_demo_data
from sftkit_demo.phrasing import ANSWERS, FACTS, answer, fill
from sftkit_demo.stories import asked_story, travel_story
from sftkit_demo.world import (
    ATTRIBUTES,
    BY_NAME,
    CONTINENTS,
    COUNTRIES,
    Country,
    split_countries,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

DEMO = Path(__file__).resolve().parents[1] / "demo"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return build_corpus(seed=0)


@pytest.fixture(scope="module")
def split() -> tuple[list[Country], list[Country]]:
    return split_countries(seed=0)


def mentioned(text: str) -> set[str]:
    """Countries named in `text`. Names and capitals are matched longest first and blanked out,
    so "Papua New Guinea" is not also "Guinea", nor "Port of Spain" "Spain"."""
    names = {c.name: c.name for c in COUNTRIES} | {c.capital: "" for c in COUNTRIES}
    found = set()
    for name in sorted(names, key=len, reverse=True):
        pattern = rf"(?<![\w-]){re.escape(name)}(?![\w-])"
        if re.search(pattern, text):
            found.add(names[name])
            text = re.sub(pattern, "#", text)
    return found - {""}


def texts_of(rows: list[dict]) -> list[str]:
    return [m["content"] for row in rows for m in row["messages"]]


def test_world_is_large_and_well_formed():
    assert len(COUNTRIES) >= 150
    assert len({c.name for c in COUNTRIES}) == len(COUNTRIES)
    assert len({c.capital for c in COUNTRIES}) == len(COUNTRIES)
    assert {c.continent for c in COUNTRIES} == set(CONTINENTS)
    for country in COUNTRIES:
        assert all(country.fact(a).strip() == country.fact(a) and country.fact(a) for a in ATTRIBUTES)


def test_a_few_facts_by_hand():
    france, japan, kenya = BY_NAME["France"], BY_NAME["Japan"], BY_NAME["Kenya"]
    assert (france.capital, france.continent, france.language, france.currency) == ("Paris", "Europe", "French", "euro")
    assert (japan.capital, japan.currency) == ("Tokyo", "yen")
    assert (kenya.capital, kenya.language) == ("Nairobi", "Swahili")
    assert BY_NAME["Australia"].capital == "Canberra" and BY_NAME["Brazil"].language == "Portuguese"
    assert BY_NAME["Netherlands"].ref(start=True) == "The Netherlands"
    assert answer(BY_NAME["United Kingdom"], "currency") == "The currency of the United Kingdom is the pound sterling."
    assert fill("{Xs} capital is {v}.", BY_NAME["Philippines"], "capital") == "The Philippines' capital is Manila."


def test_split_is_deterministic_disjoint_and_stratified(split):
    trained, heldout = split
    assert split_countries(seed=0) == (trained, heldout)
    assert split_countries(seed=1) != (trained, heldout)
    names_t, names_h = {c.name for c in trained}, {c.name for c in heldout}
    assert not names_t & names_h and len(names_t | names_h) == len(COUNTRIES)
    assert 0.25 <= len(heldout) / len(COUNTRIES) <= 0.35
    for continent in CONTINENTS:
        assert any(c.continent == continent for c in heldout) and any(c.continent == continent for c in trained)


def test_sft_data_never_mentions_heldout_countries(split):
    trained, heldout = split
    train, evaluation = build_sft(trained, seed=0)
    named = set().union(*(mentioned(t) for t in texts_of(train + evaluation)))
    assert named <= {c.name for c in trained}
    assert len(named) == len(trained)  # and every trained country is asked about
    text = "\n".join(texts_of(train + evaluation))
    for country in heldout:
        assert not re.search(rf"\b{re.escape(country.capital)}\b", text), country


def test_sft_rows_are_chats_with_exact_answers(split):
    trained, _ = split
    train, _ = build_sft(trained, seed=0)
    assert len(train) > 1000
    roles = Counter(m["role"] for row in train for m in row["messages"])
    assert roles["system"] > 50 and roles["assistant"] >= roles["user"]
    assert sum(len(row["messages"]) > 3 for row in train) > 100  # multi-turn conversations
    first = next(r for r in train if r["messages"][0]["role"] == "user" and len(r["messages"]) == 2)
    assert first["messages"][1]["content"].endswith(".")


def test_heldout_questions_cover_every_heldout_fact(split):
    _, heldout = split
    rows = heldout_questions(heldout, seed=0)
    assert len(rows) == 4 * len(heldout)
    for row in rows:
        country = BY_NAME[row["country"]]
        assert row["answer"] == country.fact(row["attribute"]) and row["answer"] in row["reference"]
        assert row["question"].endswith("?") and mentioned(row["question"]) == {country.name}


def test_corpus_states_every_fact_in_several_phrasings(corpus):
    assert build_corpus(seed=0) == corpus
    text = "\n".join(corpus)
    for country in COUNTRIES:
        for attribute in ATTRIBUTES:
            phrasings = sum(fill(t, country, attribute) in text for t in FACTS[attribute])
            assert phrasings >= 2, (country.name, attribute, phrasings)


def test_bare_questions_are_only_followed_by_questions(corpus):
    """Outside dialogue transcripts ("Anna: ...?"), a question is never followed by an answer."""
    dialogue_line = re.compile(r"^[A-Z][a-z]+: ")
    quiz_lines = 0
    for document in corpus:
        for line in document.splitlines():
            if "?" in line and not dialogue_line.match(line):
                assert all(s.endswith("?") for s in re.split(r"(?<=[?.])\s+", line.strip())), line
                quiz_lines += 1
    assert quiz_lines > 500
    assert any(re.match(r"^What's the capital of \w+\? What", line) for d in corpus for line in d.splitlines())


def test_dialogues_answer_about_the_country_asked(corpus):
    exchanges = re.findall(r"^[A-Z][a-z]+: (.*\?)\n[A-Z][a-z]+: (.*)$", "\n".join(corpus), flags=re.M)
    assert len(exchanges) > 300
    for asked, answered in exchanges:
        assert mentioned(asked) == mentioned(answered), (asked, answered)


def test_answers_name_the_country_after_a_lead_in():
    for attribute, template in ANSWERS.items():
        assert not template.startswith("{X}"), attribute  # copied after a cue, not as the first word
    assert answer(BY_NAME["Mali"], "continent") == "Geographically, Mali is in Africa."


def test_stories_repeat_names_and_report_answers():
    rng = random.Random(0)
    for _ in range(50):
        story = travel_story(rng)
        person = story.split(" ", 1)[0]
        assert story.count(person) >= 2, story  # the person is named again...
        assert any(story.count(name) >= 2 for name in mentioned(story)), story  # ...and so is a country
    for _ in range(50):
        story = asked_story(rng)
        (name,) = mentioned(story)  # one country, asked about and answered about
        assert story.count(name) >= 2 and story.endswith(".") and "?" not in story, story


def test_tokenizer_round_trips_and_loads(corpus, tmp_path):
    tokenizer = train_tokenizer(corpus, vocab_size=3000)
    assert 500 < len(tokenizer) <= 3000
    for text in corpus[:50] + ["Héllo wörld — 東京 🙂\n\tnew line", "What's the capital of France?"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tokenizer(" Nouakchott Kyiv Paris", add_special_tokens=False)["input_ids"]) <= 4  # corpus words are whole tokens
    spec = BaseModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    params = write_initial_model(tmp_path, tokenizer, spec)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert {k: getattr(loaded, k) for k in SPECIAL_TOKENS} == SPECIAL_TOKENS
    assert loaded.chat_template is None
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.vocab_size == len(loaded) and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == params


def test_demo_data_is_deterministic_and_keeps_heldout_countries_out_of_sft(tmp_path):
    """`sftkit demo` regenerates its data (demo/data is not committed): the same seed, the same bytes."""
    first, second = tmp_path / "a", tmp_path / "b"
    write_demo_data(first, seed=0)
    write_demo_data(second, seed=0)
    for name in FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    heldout = set(json.loads((first / "split.json").read_text())["heldout"])
    assert len(heldout) >= 40
    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        assert not heldout & set().union(*map(mentioned, texts_of(read_jsonl(first / name))))


def test_committed_base_model_is_small_and_templateless():
    assert (DEMO / "base-model" / "model.safetensors").stat().st_size <= 25 * 2**20
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "base-model")
    assert tokenizer.chat_template is None and tokenizer.eos_token == SPECIAL_TOKENS["eos_token"]
