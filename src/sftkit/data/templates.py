"""Chat templates: the tokenizer's own, or a built-in one for base models that have none.

The tokenizer's Jinja template is the source of truth: the model must see at training exactly the
format it sees at inference, so sftkit never hand-formats prompts per model family. Built-ins exist
only for base models without a template (GPT-2, a freshly pre-trained model):

    sftkit data preview --tokenizer ../shared/data/tokenizers/gpt2 --template chatml --data FILE

Installing a built-in adds its control tokens to the vocabulary as special tokens; the model side
then resizes its embeddings (`sftkit.model`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class BuiltinTemplate:
    """A Jinja chat template and the control tokens it needs in the vocabulary."""

    name: str
    jinja: str
    special_tokens: tuple[str, ...]
    needs_eos: bool = False  # the template writes `eos_token`; add "</s>" if the tokenizer has none


CHATML = BuiltinTemplate(
    name="chatml",
    jinja=(
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    special_tokens=("<|im_start|>", "<|im_end|>"),
)

LLAMA3 = BuiltinTemplate(
    name="llama3",
    jinja=(
        "{{ '<|begin_of_text|>' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)

# Mistral-instruct v0.1 layout: a system prompt is folded into the first user turn, roles must alternate.
MISTRAL = BuiltinTemplate(
    name="mistral",
    jinja=(
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    special_tokens=("[INST]", "[/INST]"),
    needs_eos=True,
)

BUILTIN_TEMPLATES: dict[str, BuiltinTemplate] = {t.name: t for t in (CHATML, LLAMA3, MISTRAL)}


class TemplateError(ValueError):
    """The tokenizer has no usable chat template, or the one asked for does not exist."""


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, template: str | None = None, *,
                      required: bool = True) -> list[str]:
    """Make sure `tokenizer` carries a chat template; return the control tokens newly added to it.

    `template`: None keeps the tokenizer's own template (an error if it has none, unless not
    `required`: pre-training on raw text needs none, and rendering a conversation says so); a built-in name
    (`chatml`, `llama3`, `mistral`) installs that one; a path to a `.jinja` file installs its text.
    The caller must resize the model's embeddings when the returned list is not empty.
    """
    if template is None:
        if not tokenizer.chat_template and required:
            raise TemplateError(missing_template_message(tokenizer))
        return []
    if template in BUILTIN_TEMPLATES:
        return _install_builtin(tokenizer, BUILTIN_TEMPLATES[template])
    path = Path(template)
    if path.suffix == ".jinja" and path.is_file():
        tokenizer.chat_template = path.read_text(encoding="utf-8")
        return []
    raise TemplateError(
        f"unknown chat template {template!r}: use one of {', '.join(BUILTIN_TEMPLATES)} or a path to a .jinja file"
    )


def missing_template_message(tokenizer: PreTrainedTokenizerBase) -> str:
    return (
        f"tokenizer {tokenizer.name_or_path!r} has no chat template — pick a built-in with "
        f"`--template NAME` / `data.template: NAME` (one of {', '.join(BUILTIN_TEMPLATES)}) "
        "or give a path to a .jinja file"
    )


def _install_builtin(tokenizer: PreTrainedTokenizerBase, builtin: BuiltinTemplate) -> list[str]:
    wanted = list(builtin.special_tokens)
    if builtin.needs_eos and tokenizer.eos_token is None:
        wanted.append("</s>")
    vocab = tokenizer.get_vocab()
    new = [t for t in wanted if t not in vocab]
    if new:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True)
    if builtin.needs_eos and tokenizer.eos_token is None:
        tokenizer.eos_token = "</s>"
    if tokenizer.bos_token is None and "{{ bos_token }}" in builtin.jinja:
        tokenizer.bos_token = tokenizer.eos_token
    tokenizer.chat_template = builtin.jinja
    return new


def control_pattern(tokenizer: PreTrainedTokenizerBase) -> re.Pattern[str]:
    """THE control-token rule: the tokenizer's special tokens, plus added tokens that its chat template
    writes itself; longest first. These are the tokens a template controls a conversation with: found
    in a template's output they mark turns (`find_end_of_turn`), and typed inside a message they are
    text, never control (`sftkit.data.control`)."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    tokens = {
        t.content
        for t in tokenizer.added_tokens_decoder.values()
        if t.content and (t.special or (t.content in template and not t.content.isspace()))
    }
    return _compiled(tuple(sorted(tokens, key=len, reverse=True)))


@lru_cache(maxsize=64)
def _compiled(tokens: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(t) for t in tokens) or "(?!)")


def find_end_of_turn(tokenizer: PreTrainedTokenizerBase, template_kwargs: dict | None = None) -> str | None:
    """The control token the template closes an assistant turn with (`<|im_end|>`, `</s>`, ...).

    Found by rendering a probe conversation and taking the first control token after the reply's
    text; None when the template closes turns with plain text only (then the model cannot learn to
    stop, and the renderer says so).
    """
    kwargs = template_kwargs or {}
    probe_reply = "sftkit probe reply"
    convo = [{"role": "user", "content": "sftkit probe question"}, {"role": "assistant", "content": probe_reply}]
    prompt = tokenizer.apply_chat_template(convo[:1], tokenize=False, add_generation_prompt=True, **kwargs)
    full = tokenizer.apply_chat_template(convo, tokenize=False, **kwargs)
    at = full.find(probe_reply, len(prompt) if full.startswith(prompt) else 0)
    if at < 0:
        return None
    match = control_pattern(tokenizer).search(full, at + len(probe_reply))
    return match.group(0) if match else None


def find_generation_prompt(tokenizer: PreTrainedTokenizerBase, template_kwargs: dict | None = None) -> str | None:
    """What `add_generation_prompt=True` appends after a user turn (`<|im_start|>assistant\n`,
    `<|start_header_id|>assistant<|end_header_id|>\n\n`; empty for Mistral): the text after what the
    prompt shares with the bare render (Phi-3 closes a bare chat with <|endoftext|> instead); None
    when the template refuses the probe."""
    kwargs = template_kwargs or {}
    convo = [{"role": "user", "content": "sftkit probe question"}]
    try:
        bare = tokenizer.apply_chat_template(convo, tokenize=False, **kwargs)
        prompt = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception:  # noqa: BLE001 - a template that refuses the probe simply gets no shortcut
        return None
    shared = len(os.path.commonprefix([bare, prompt]))
    for token in control_pattern(tokenizer).finditer(prompt):  # never start inside a token ("<|")
        if token.start() < shared < token.end():
            shared = token.start()
    return prompt[shared:]


def end_of_turn_token_ids(tokenizer: PreTrainedTokenizerBase, template_kwargs: dict | None = None) -> list[int]:
    """Token ids that end an assistant turn: the template's end-of-turn token and the tokenizer's EOS."""
    ids: list[int] = []
    eot = find_end_of_turn(tokenizer, template_kwargs) if tokenizer.chat_template else None
    for token in (eot, tokenizer.eos_token):
        if token is not None:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
    return ids


def pad_token_id(tokenizer: PreTrainedTokenizerBase, end_of_turn: list[int] | None = None) -> int:
    """The id that pads batches and generation: the tokenizer's pad token, else its EOS, else the first
    end-of-turn id given, else 0 (padding is never attended to nor trained: any id does)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, *(end_of_turn or [])):
        if candidate is not None:
            return candidate
    return 0


# -- reasoning and history: what the template does, found by rendering probes (never by model name) --
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # message keys templates read (Qwen3, gpt-oss)
INLINE = "inline"  # the reasoning written into the content as <think>R</think>, for templates that read no field
_PROBE_THOUGHT, _PROBE_ANSWER = "sftkit probe thought", "sftkit probe answer"


def inline_reasoning(reasoning: str, answer: str) -> str:
    """A reply's content with its reasoning in front, as DeepSeek-R1 distills and Qwen3 write it."""
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


def reasoning_style(tokenizer: PreTrainedTokenizerBase, template_kwargs: dict | None = None) -> str | None:
    """How this template shows an assistant turn's reasoning when that turn is the last one (the turn
    being generated): the first message key of `REASONING_FIELDS` it renders, else `INLINE` when it
    keeps `<think>...</think>` written in the content, else None (it cannot show reasoning at all,
    e.g. DeepSeek-R1's template strips it from every turn)."""
    kwargs = template_kwargs or {}
    user = {"role": "user", "content": "sftkit probe question"}
    candidates = [{"role": "assistant", "content": _PROBE_ANSWER, key: _PROBE_THOUGHT} for key in REASONING_FIELDS]
    candidates.append({"role": "assistant", "content": inline_reasoning(_PROBE_THOUGHT, _PROBE_ANSWER)})
    for style, reply in zip((*REASONING_FIELDS, INLINE), candidates):
        try:
            text = tokenizer.apply_chat_template([user, reply], tokenize=False, **kwargs)
        except Exception:  # noqa: BLE001 - a template that refuses the probe shows no reasoning this way
            continue
        if _PROBE_THOUGHT in text and _PROBE_ANSWER in text:
            return style
    return None


def history_rewrite(tokenizer: PreTrainedTokenizerBase, end_of_turn: str | None, template_kwargs: dict | None = None,
                    reasoning: str | None = None) -> str | None:
    """Why the template renders an earlier reply (or the prompt before it) differently once later turns
    follow, or None when history stays exactly as it was generated. Probed on a two-reply chat with a
    system prompt (left out if the template refuses one) and, when `reasoning` names a style, with
    reasoning in both replies: each reply's prompt must be a prefix of the whole chat, and the reply
    must read the same there as when it was the last turn, through `end_of_turn`."""
    kwargs = template_kwargs or {}

    def reply(n: int) -> dict:
        answer, thought = f"{_PROBE_ANSWER} {n}", f"{_PROBE_THOUGHT} {n}"
        if reasoning == INLINE:
            return {"role": "assistant", "content": inline_reasoning(thought, answer)}
        return {"role": "assistant", "content": answer, **({reasoning: thought} if reasoning else {})}

    turns = [{"role": "user", "content": "sftkit probe question 1"}, reply(1),
             {"role": "user", "content": "sftkit probe question 2"}, reply(2)]
    plain = _rewrite(tokenizer, turns, end_of_turn, kwargs)
    if plain is not None:
        return plain
    with_system = _rewrite(tokenizer, [{"role": "system", "content": "sftkit probe system"}, *turns], end_of_turn,
                           kwargs)
    return f"{with_system}, when there is a system prompt" if with_system else None


def _rewrite(tokenizer: PreTrainedTokenizerBase, chat: list[dict], end_of_turn: str | None, kwargs: dict) -> str | None:
    """`history_rewrite` on one probe chat; None also when the template refuses it (e.g. a system role)."""
    try:
        full = tokenizer.apply_chat_template(chat, tokenize=False, **kwargs)
        for i in (len(chat) - 3, len(chat) - 1):
            prompt = tokenizer.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True, **kwargs)
            alone = tokenizer.apply_chat_template(chat[: i + 1], tokenize=False, **kwargs)
            if not full.startswith(prompt):
                return "it rewrites the prompt before an earlier reply once later turns follow"
            if _reply_text(alone, len(prompt), end_of_turn) != _reply_text(full, len(prompt), end_of_turn):
                return "it renders an earlier reply differently from how it was generated"
    except Exception:  # noqa: BLE001 - a template that refuses the probe chat
        return None
    return None


def _reply_text(text: str, start: int, end_of_turn: str | None) -> str:
    at = text.find(end_of_turn, start) if end_of_turn else -1
    return text[start:] if at < 0 else text[start : at + len(end_of_turn)]
