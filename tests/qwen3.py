"""The Qwen3 tokenizer: ../shared/data/tokenizers/qwen3 when present, else rebuilt from the committed
Qwen2.5 tokenizer, which has the same vocabulary and merges: Qwen3 adds four non-special tokens
after it (`<tool_response>`, `</tool_response>`, `<think>`, `</think>`, ids 151665-151668) and has its own chat
template (tests/assets/tokenizers/qwen3/chat_template.jinja, copied verbatim; Apache-2.0).
`test_turns.py` checks that the rebuilt one gives Qwen3's ids where both are present."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tests.conftest import ASSETS, SHARED_DATA

QWEN3_ADDED = ("<tool_response>", "</tool_response>", "<think>", "</think>")


def rebuilt_qwen3() -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "qwen2.5")
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED])
    tokenizer.chat_template = (ASSETS / "tokenizers" / "qwen3" / "chat_template.jinja").read_text(encoding="utf-8")
    return tokenizer


@lru_cache(maxsize=1)
def _qwen3() -> PreTrainedTokenizerBase:
    shared = SHARED_DATA / "tokenizers" / "qwen3"
    return AutoTokenizer.from_pretrained(shared) if shared.is_dir() else rebuilt_qwen3()


def qwen3() -> PreTrainedTokenizerBase:
    """A Qwen3 tokenizer (loaded once per test session; callers must not change it)."""
    return _qwen3()
