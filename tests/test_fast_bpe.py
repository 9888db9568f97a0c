"""tiktoken in place of the tokenizer (sftkit.data.fast_bpe): only where it qualifies, and always the
tokenizer's own ids and labels. The sweeps compare both engines on every shared instruction file and
on every Unicode code point."""

from __future__ import annotations

import copy
import gc
import json
import unicodedata
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sftkit.data import encode, fast_bpe, render_all
from sftkit.data.encode import TextEncoder
from sftkit.data.fast_bpe import FastBPEMismatch, fast_bpe_for, why_not_fast
from sftkit.data.formats import load_records
from sftkit.data.messages import Conversation, Message
from sftkit.data.render import Renderer
from sftkit.data.render_all import RenderReport, render_records
from tests.conftest import ASSETS, SHARED_DATA, requires_shared, tokenizer_dir

QUALIFY = ("qwen2.5", "qwen3", "llama3.2")  # byte-level BPE with a split regex
DO_NOT = {  # the first condition each fails
    "gpt2": "the pre-tokenizer is not one regex Split followed by ByteLevel",  # ByteLevel's own regex
    "phi3": "the BPE model uses byte fallback, dropout or subword affixes",
    "llama2": "the BPE model uses byte fallback, dropout or subword affixes",
    "mistral_v0.1": "the BPE model uses byte fallback, dropout or subword affixes",
    "mistral_v0.3": "the BPE model uses byte fallback, dropout or subword affixes",
    "tinyllama": "the BPE model uses byte fallback, dropout or subword affixes",
    "gemma_toy_cropped": "the BPE model uses byte fallback, dropout or subword affixes",
}


def load(family: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tokenizer_dir(family))


def spec_of(tokenizer: PreTrainedTokenizerBase) -> dict:
    return json.loads(tokenizer._tokenizer.to_str())


@pytest.fixture(autouse=True)
def fast_on_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken even for the few dozen fixtures (by default only from 5,000 texts)."""
    monkeypatch.setattr(encode, "FAST_MIN_TEXTS", 1)


@pytest.fixture(scope="module")
def qwen() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "qwen2.5")


@pytest.mark.parametrize("family", QUALIFY)
def test_byte_level_bpe_tokenizers_qualify(family: str) -> None:
    tokenizer = load(family)
    assert why_not_fast(spec_of(tokenizer)) is None
    assert fast_bpe_for(tokenizer) is not None


@pytest.mark.parametrize("family", sorted(DO_NOT))
def test_other_tokenizers_do_not_and_say_why(family: str) -> None:
    tokenizer = load(family)
    assert why_not_fast(spec_of(tokenizer)) == DO_NOT[family]
    assert fast_bpe_for(tokenizer) is None


def test_each_condition_refuses_a_tokenizer_that_breaks_it(qwen: PreTrainedTokenizerBase) -> None:
    spec = spec_of(qwen)

    def broken(change) -> str | None:
        copied = copy.deepcopy(spec)
        change(copied)
        return why_not_fast(copied)

    def swap_ids(s: dict) -> None:  # two merged tokens trade ids: merge order no longer id order
        vocab = s["model"]["vocab"]
        a, b = (vocab[m.replace(" ", "") if isinstance(m, str) else "".join(m)] for m in s["model"]["merges"][:2])
        ta, tb = (t for t, i in vocab.items() if i in (a, b))
        vocab[ta], vocab[tb] = vocab[tb], vocab[ta]

    assert broken(swap_ids) == "the merges are not in the order of the ids they make"
    assert broken(lambda s: s.update(normalizer={"type": "Lowercase"})) == "the normalizer is Lowercase, not NFC"
    assert broken(lambda s: s["added_tokens"][0].update(lstrip=True)) == "added token '<|endoftext|>' is not matched literally"
    assert broken(lambda s: s["added_tokens"].append({**s["added_tokens"][0], "id": 999_999, "content": "<|endoftext|>x"})) \
        == "added token '<|endoftext|>' is a prefix of '<|endoftext|>x'"
    assert broken(lambda s: s["pre_tokenizer"]["pretokenizers"].pop(0)) \
        == "the pre-tokenizer is not one regex Split followed by ByteLevel"
    assert broken(lambda s: s["model"]["vocab"].pop("Ġ")) == "the vocabulary is not byte-level text with all 256 bytes"
    assert broken(lambda s: s["model"].update(byte_fallback=True)) \
        == "the BPE model uses byte fallback, dropout or subword affixes"
    assert why_not_fast(spec) is None


def chats() -> list[Conversation]:
    """Multi-turn, system prompts, non-ASCII replies (offsets in bytes vs characters), special tokens."""
    path = ASSETS / "data" / "chat_messages.jsonl"
    records = list(load_records(path).records)
    extra = [
        Conversation([Message("system", "Réponds en français. 東京"), Message("user", "Où est la tour Eiffel? 😀"),
                      Message("assistant", "À Paris — 🗼 «la dame de fer».")], source="inline:1"),
        Conversation([Message("user", "中文？"), Message("assistant", "是的，我会说中文。"),
                      Message("user", "Tabs\tand   spaces\n\n"), Message("assistant", "  ok\t \n  ")], source="inline:2"),
    ]
    return (records + extra) * 3


def render_both(tokenizer: PreTrainedTokenizerBase, records: list) -> tuple[RenderReport, RenderReport]:
    fast = render_records(records, Renderer(tokenizer, max_length=4096), on_error="skip")
    slow = render_records(records, Renderer(tokenizer, max_length=4096, fast_bpe=False), on_error="skip")
    return fast, slow


def assert_same(fast: RenderReport, slow: RenderReport) -> None:
    assert len(fast.examples) == len(slow.examples) > 0
    for a, b in zip(fast.examples, slow.examples):
        assert (a.input_ids, a.labels, a.source) == (b.input_ids, b.labels, b.source)
    assert (fast.warnings, fast.skipped, fast.dropped) == (slow.warnings, slow.skipped, slow.dropped)


def test_same_ids_and_labels_as_the_tokenizer_on_the_fixtures(qwen: PreTrainedTokenizerBase) -> None:
    records = chats()
    before = fast_bpe_for(qwen).encoded
    fast, slow = render_both(qwen, records)
    assert fast_bpe_for(qwen).encoded - before == len(records)  # every text went through tiktoken
    assert_same(fast, slow)
    inline = next(e for e in fast.examples if e.source == "inline:1")
    trained = qwen.decode([t for t in inline.labels if t != -100])
    assert trained == "À Paris — 🗼 «la dame de fer».<|im_end|>"


def test_text_that_is_not_nfc_goes_to_the_tokenizer(qwen: PreTrainedTokenizerBase) -> None:
    decomposed = "which results in [a\u0303mə] (ama)"  # NFC composes a + U+0303 into ã
    assert fast_bpe_for(qwen).encode(decomposed) is None
    encoder = TextEncoder(qwen)
    encoder.prepare(1)
    assert encoder.fast is not None
    encoded = encoder.encode_batch([decomposed, "ok"], add_special_tokens=False)
    assert encoded[0].ids == qwen._tokenizer.encode(decomposed, add_special_tokens=False).ids
    assert not encoded[0].in_bytes and encoded[1].in_bytes  # the tokenizer's offsets; tiktoken's
    empty = encoder.encode_batch([""], add_special_tokens=False)[0]
    assert (empty.ids, empty.starts, empty.ends) == ([], [], [])


def test_small_sets_are_left_to_the_tokenizer(qwen: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode, "FAST_MIN_TEXTS", 5_000)
    renderer = Renderer(qwen)
    render_records(chats(), renderer)
    assert renderer.encoder.fast is None  # building tiktoken's tables (1 s) would cost more than it saves
    renderer.encoder.prepare(5_000)
    assert renderer.encoder.fast is fast_bpe_for(qwen) is not None
    turned_off = Renderer(qwen, fast_bpe=False)
    turned_off.encoder.prepare(10**6)
    assert turned_off.encoder.fast is None


def test_a_disagreement_stops_the_run_and_says_how_to_turn_it_off(
    qwen: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = fast_bpe_for(qwen)

    class OffByOne:  # stands in for a tiktoken that drifted from the tokenizer
        def encode(self, text: str, allowed_special: str) -> list[int]:
            return [i + 1 for i in fast_encoding.encode(text, allowed_special=allowed_special)]

    fast_encoding = fast.encoding
    monkeypatch.setattr(fast, "encoding", OffByOne())
    monkeypatch.setattr(fast, "encoded", 0)  # the next text is audited
    with pytest.raises(FastBPEMismatch, match=r"disagree at token 0 .*data\.fast_bpe: false"):
        render_records(chats(), Renderer(qwen))


def test_tokens_added_later_get_a_new_engine() -> None:
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "qwen2.5")
    first = fast_bpe_for(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|sftkit_new|>"]})
    second = fast_bpe_for(tokenizer)
    assert second is not first and second is not None
    text = "a <|sftkit_new|> b"
    assert second.encode(text) == tokenizer._tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.convert_tokens_to_ids("<|sftkit_new|>") in second.encode(text)


def every_code_point_texts() -> list[str]:
    """All of Unicode but surrogates, 256 code points a text, in contexts that exercise each branch of
    the split regexes (runs of letters, numbers, spaces, new lines, contractions such as 'S or 'ſ),
    NFC-normalised."""
    points = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    texts = []
    for start in range(0, len(points), 256):
        block = points[start : start + 256]
        for glue in ("", " ", "a'", "1", "\n "):  # runs; after a space; 'Xa contractions; digits; new lines
            texts.append(unicodedata.normalize("NFC", glue.join(block) + glue))
    return texts


def test_qwen3_encodes_text_as_qwen2_5_does() -> None:
    """So the code-point sweep below runs on Qwen2.5 and Llama-3 only."""
    qwen3, qwen25 = spec_of(load("qwen3")), spec_of(load("qwen2.5"))
    for part in ("model", "pre_tokenizer", "normalizer"):
        assert qwen3[part] == qwen25[part]


@pytest.mark.slow  # exhaustive; the shared-file sweep and the fuzz tests check the same engine in the default suite
@pytest.mark.parametrize("family", ["qwen2.5", "llama3.2"])
def test_every_unicode_code_point_gives_the_tokenizers_ids(family: str) -> None:
    tokenizer = load(family)
    fast = fast_bpe_for(tokenizer)
    texts = every_code_point_texts()
    expected = [e.ids for e in tokenizer._tokenizer.encode_batch(texts, add_special_tokens=False)]
    differ = [t[:40] for t, e in zip(texts, expected) if fast.encode(t) != e]
    assert differ == []


SHARED_SFT_FILES = sorted(
    p for p in (SHARED_DATA / "instructions").glob("*") if not p.name.startswith("mt_bench")
) if SHARED_DATA.is_dir() else []


@requires_shared
@pytest.mark.shared
@pytest.mark.slow  # every shared file through three tokenizers; test_fuzz and test_cli_preview's sweep stay default
@pytest.mark.parametrize("family", QUALIFY)
def test_every_shared_instruction_file_gives_the_tokenizers_ids_and_labels(family: str) -> None:
    tokenizer = load(family)
    records = [r for path in SHARED_SFT_FILES for r in load_records(path).records]
    assert len(records) == 14_536  # every SFT file (tests/test_formats.py counts each)
    fast, slow = render_both(tokenizer, records)
    assert_same(fast, slow)
    assert fast_bpe_for(tokenizer).encoded >= len(fast.examples) * 0.99  # all but non-NFC texts


def test_workers_share_the_engine_the_parent_built(
    qwen: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    builds = tmp_path / "builds"  # a file: forked workers append to it too
    real_build = fast_bpe._build

    def counted_build(tokenizer: PreTrainedTokenizerBase):
        with builds.open("a") as f:
            f.write("built\n")
        return real_build(tokenizer)

    monkeypatch.setattr(fast_bpe, "_build", counted_build)
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "qwen2.5")
    records = chats() * 8
    assert len(records) > render_all._CHUNK  # more than one chunk, so the workers do render
    pooled = render_records(records, Renderer(tokenizer), num_proc=2)
    assert builds.read_text().splitlines() == ["built"]  # in the parent, before forking
    assert gc.isenabled() and gc.get_freeze_count() == 0  # the pool's GC pause and freeze are undone
    assert_same(pooled, render_records(records, Renderer(tokenizer, fast_bpe=False)))
