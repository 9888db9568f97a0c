"""Generate with exactly the format the model was trained on, stopping at the end of the turn.

    sftkit generate --model runs/tiny/final --prompt "What is 2+2?" [--system TEXT] [--max-new-tokens 128]
    sftkit chat --model runs/tiny/final                         # multi-turn, streams tokens; /reset, /exit;
                                                                # Ctrl-C stops a reply, at the prompt it quits
    sftkit generate --model runs/tiny-lora/final --prompt "Hi"  # a LoRA adapter: loaded onto its base

The prompt is the tokenizer's own chat template (`apply_chat_template(add_generation_prompt=True)`)
encoded with `add_special_tokens=False`, as in training; control tokens a user types (`<|im_end|>`)
are encoded as text (`sanitize_control_tokens=True`), as in training. Generation stops at any of the
generation config's EOS ids plus the template's end-of-turn token(s). Greedy unless `--temperature`.
Template variables the run trained with (`data.template_kwargs`, e.g. a date) are read back from
the `sftkit_config.yaml` that `sftkit train` writes into `final/`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import yaml
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TextStreamer,
)

from sftkit.config import CONFIG_FILE
from sftkit.data.templates import end_of_turn_token_ids, pad_token_id
from sftkit.lora import is_adapter_dir, load_adapter
from sftkit.model import (
    ModelError,
    check_local_dir,
    load_tokenizer,
    read_weights,
    resolve_device,
    resolve_dtype,
)


@dataclass
class Reply:
    """A generated reply: its text (special tokens removed), its token ids, whether it ended the turn, and how
    many tokens its prompt had."""

    text: str
    ids: list[int]
    stopped: bool
    prompt_tokens: int = 0


def load_for_generation(
    model_dir: str | Path, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A trained model directory (e.g. `output_dir/final`) and its tokenizer, ready for `generate_reply`.

    A LoRA adapter directory (adapter_config.json) is loaded onto its local base model (sftkit.lora).
    """
    target = resolve_device(device, "--device")
    if is_adapter_dir(model_dir):
        model, tokenizer = load_adapter(model_dir, device=target, dtype=resolve_dtype(dtype, target))
        if not tokenizer.chat_template:
            raise ModelError(f"{model_dir}: the tokenizer has no chat template — was it trained with sftkit?")
        return model, tokenizer
    directory = check_local_dir(model_dir, "--model")
    tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise ModelError(f"{directory}: the tokenizer has no chat template — was it trained with sftkit?")
    model = read_weights(directory, resolve_dtype(dtype, target), trust_remote_code=trust_remote_code)
    return model.to(target).eval(), tokenizer


def training_template_kwargs(model_dir: str | Path) -> dict[str, Any]:
    """`data.template_kwargs` of the run that wrote `model_dir` (its sftkit_config.yaml), else {}."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    return dict((yaml.safe_load(path.read_text()) or {}).get("data", {}).get("template_kwargs") or {})


def stop_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template_kwargs: dict | None = None
) -> list[int]:
    """EOS ids of the generation config plus the template's end-of-turn token ids."""
    return list(dict.fromkeys(eos_ids(model) + end_of_turn_token_ids(tokenizer, template_kwargs)))


def eos_ids(model: PreTrainedModel) -> list[int]:
    """The generation config's EOS ids as a list."""
    return _ids(model.generation_config.eos_token_id)


def _ids(eos: int | list[int] | None) -> list[int]:
    """transformers allows None, one id or several wherever an eos_token_id goes."""
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], template_kwargs: dict | None = None
) -> list[int]:
    """Template with the assistant header appended, tokenized as in training: no extra special tokens, and
    control tokens that users write in their messages encoded as text, never as control tokens
    (`sanitize_control_tokens`, the rule `sftkit.data.control` applies to training data)."""
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True, sanitize_control_tokens=True,
        **(template_kwargs or {}),
    )
    return list(encoded["input_ids"])


@torch.no_grad()
def generate_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    streamer: Any = None,
    template_kwargs: dict | None = None,
) -> Reply:
    """The assistant's next turn after `messages` (greedy when temperature == 0)."""
    stops = stop_ids(model, tokenizer, template_kwargs)
    config = generation_config(model, stops, pad_token_id(tokenizer, stops), max_new_tokens, temperature)
    reply = continue_ids(model, tokenizer, encode_prompt(tokenizer, messages, template_kwargs), config, streamer)
    reply.text = reply.text.strip()
    return reply


@torch.no_grad()
def continue_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[int], config: Any,
                 streamer: Any = None) -> Reply:
    """One prompt's continuation under `config` (its eos_token_id are the stops), in eval mode; the
    model's train/eval mode is restored afterwards, also when Ctrl-C interrupts the reply."""
    input_ids = torch.tensor([prompt], device=model.device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config, streamer=streamer
        )
    finally:
        model.train(was_training)
    ids = out[0, len(prompt) :].tolist()
    stopped = bool(ids) and ids[-1] in _ids(config.eos_token_id)
    return Reply(tokenizer.decode(ids, skip_special_tokens=True), ids, stopped, len(prompt))


def generation_config(model: PreTrainedModel, stops: list[int], pad_id: int, max_new_tokens: int,
                      temperature: float, top_p: float | None = None) -> Any:
    """The model's generation config, stopping at `stops`; greedy when temperature == 0."""
    config = copy.deepcopy(model.generation_config)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
    }
    config.update(max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_id, **sampling)
    return config


@torch.no_grad()
def continue_batch(
    model: PreTrainedModel,
    prompts: Sequence[list[int]],
    stops: list[int],
    pad_id: int,
    max_new_tokens: int | list[int],
    *,
    temperature: float = 0.0,
    top_p: float | None = None,
    batch_size: int = 8,
) -> list[tuple[list[int], bool]]:
    """Continuations of token-id prompts, `batch_size` at a time (left-padded, prompts of similar length
    together): (the new ids through the first stop id, cut at the prompt's limit; whether a stop id came).
    The one batched generation loop: `generate_replies`, `sftkit serve`, `sftkit eval` and the demo use it."""
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[tuple[list[int], bool] | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):
                input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                attention_mask[row, width - len(prompts[i]) :] = 1
            config = generation_config(model, stops, pad_id, max(limits[i] for i in rows), temperature, top_p)
            new = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                                 generation_config=config)[:, width:].tolist()
            for row, i in enumerate(rows):
                end = next((k + 1 for k, token in enumerate(new[row]) if token in stops), None)
                ids = new[row][: min(end or len(new[row]), limits[i])]
                out[i] = (ids, bool(ids) and ids[-1] in stops)
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, Any]]],
    *,
    max_new_tokens: int | list[int] = 256,
    temperature: float = 0.0,
    top_p: float | None = None,
    template_kwargs: dict | None = None,
    batch_size: int = 8,
) -> list[Reply]:
    """The assistant's next turn after each conversation, `batch_size` at a time (`continue_batch`). Greedy
    replies are the ones `generate_reply` gives one by one. A list `max_new_tokens` gives each conversation
    its own limit (`sftkit serve` batches requests)."""
    stops = stop_ids(model, tokenizer, template_kwargs)
    prompts = [encode_prompt(tokenizer, messages, template_kwargs) for messages in conversations]
    done = continue_batch(model, prompts, stops, pad_token_id(tokenizer, stops), max_new_tokens,
                          temperature=temperature, top_p=top_p, batch_size=batch_size)
    return [Reply(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, stopped, len(prompt))
            for (ids, stopped), prompt in zip(done, prompts)]


def generate_command(
    model_dir: str | Path,
    prompt: str,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    device: str = "auto",
) -> Reply:
    """`sftkit generate`: one reply to one prompt, printed."""
    model, tokenizer = load_for_generation(model_dir, device=device)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    reply = generate_reply(model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature,
                           template_kwargs=training_template_kwargs(model_dir))
    print(reply.text)
    if not reply.stopped:
        print(f"[stopped at --max-new-tokens {max_new_tokens} before the end of the turn]", file=sys.stderr)
    return reply


def chat(
    model_dir: str | Path,
    *,
    system: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    device: str = "auto",
    stdin: TextIO | None = None,
) -> list[dict[str, Any]]:
    """`sftkit chat`: a multi-turn REPL on stdin; replies stream to stdout. Returns the conversation.

    Ctrl-C during a reply stops it: the unanswered question leaves the conversation and a new prompt
    is read. Ctrl-C at the prompt, end of input or /exit ends the session.
    """
    stdin = stdin or sys.stdin
    model, tokenizer = load_for_generation(model_dir, device=device)
    template_kwargs = training_template_kwargs(model_dir)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = stdin.isatty()
    try:  # Ctrl-C anywhere but inside a reply (at the prompt, or before it is shown) ends the session cleanly
        print("sftkit chat — /reset clears the conversation, Ctrl-C stops a reply, /exit (or end of input) quits.",
              flush=True)
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = stdin.readline()
            if not line or line.strip() in ("/exit", "/quit"):
                return messages
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                messages = list(start)
                continue
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            try:
                reply = generate_reply(model, tokenizer, [*messages, {"role": "user", "content": text}],
                                       max_new_tokens=max_new_tokens, temperature=temperature, streamer=streamer,
                                       template_kwargs=template_kwargs)
            except KeyboardInterrupt:
                print("\n[reply stopped (Ctrl-C); the question is left out of the conversation — ask again, "
                      "or Ctrl-C at the prompt to quit]", flush=True)
                continue
            messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
    except KeyboardInterrupt:
        print(flush=True)
        return messages
