"""Did it work? Score a model on a task file: greedy replies (batched) or log-likelihood choices.

    sftkit eval --model runs/sft/final --tasks tasks.jsonl [--out DIR] [--max-new-tokens 128]
    sftkit eval --model runs/sft/final --base models/base --tasks tasks.jsonl --few-shot 3
    sftkit eval --model models/base --tasks tasks.jsonl --few-shot 3        # the "prompt first" baseline
    sftkit train RECIPE eval.tasks=tasks.jsonl eval.best_metric=task_accuracy train.keep_best=true

A model with a chat template is asked through it, exactly as `sftkit generate` asks it (the template
kwargs of its run, its end-of-turn stop tokens), in batches of left-padded prompts. `--few-shot K`
puts K solved items of the file (the first K other than the item itself) before each question: as
earlier user/assistant turns for a model with a template, as `Question:` / `Answer:` plain text for a
base model without one (its answer ends at a blank line or a next `Question:`). A model without a
template and without --few-shot is refused: nothing says how to ask it. With `--base DIR`, --few-shot
applies to the base; a base without a template and without --few-shot is asked through the tuned
model's template, grown to its tokenizer as training grew it (as `sftkit compare` does).

Items with `choices` are scored without generating: the choice with the highest summed log-probability
after the prompt is the model's answer (lm-evaluation-harness's `acc`). The matching rules are in
`sftkit.evaluate.tasks`. `score_tasks` is the one scoring path: `sftkit eval` and the evaluations
during training (`sftkit.evaluate.monitor`) both call it, so a checkpoint gets the same figure from both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftkit.data.templates import pad_token_id
from sftkit.durable import atomic_file
from sftkit.evaluate.tasks import (
    Task,
    answered,
    cut_plain,
    few_shot_messages,
    judge,
    plain_text,
    read_tasks,
    shots_for,
    wilson,
)
from sftkit.generate import continue_batch, encode_prompt, eos_ids, stop_ids

MAX_NEW_TOKENS = 128
BATCH_SIZE = 32


@dataclass
class Scored:
    """Every item's outcome for one model, and the figures of the table."""

    label: str
    """"model" or "base"."""
    how: str = ""
    """How it was asked ("chat template", "plain text, 3-shot")."""
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def correct(self) -> int:
        return sum(r["correct"] for r in self.rows)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)

    def _share(self, key: str) -> float | None:
        values = [r[key] for r in self.rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    def figures(self) -> dict[str, Any]:
        """accuracy, its 95% interval, answered / ended-turn shares, mean reply tokens (generated items)."""
        low, high = wilson(self.correct, self.n)
        tokens = [r["tokens"] for r in self.rows if r.get("tokens") is not None]
        return {"n": self.n, "correct": self.correct, "accuracy": self.accuracy, "ci_low": low, "ci_high": high,
                "answered": self._share("answered"), "ended_turn": self._share("stopped"),
                "mean_tokens": sum(tokens) / len(tokens) if tokens else None}


@dataclass
class Asker:
    """How one model is asked: chat (its template) or plain text, and with how many solved examples."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    chat: bool = True
    few_shot: int = 0
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        how = "chat template" if self.chat else "plain text"
        return f"{how}, {self.few_shot}-shot" if self.few_shot or not self.chat else how

    def messages(self, tasks: list[Task], i: int) -> list[dict[str, str]]:
        return few_shot_messages(tasks[i], shots_for(tasks, i, self.few_shot)) if self.few_shot else tasks[i].prompt

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.chat:
            return encode_prompt(self.tokenizer, messages, self.template_kwargs)
        return list(self.tokenizer(plain_text(messages))["input_ids"])

    def stops(self) -> list[int]:
        if self.chat:
            return stop_ids(self.model, self.tokenizer, self.template_kwargs)
        own = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return list(dict.fromkeys(eos_ids(self.model) + own))


def generate_batch(model: PreTrainedModel, prompts: Sequence[list[int]], stops: list[int], pad_id: int,
                   max_new_tokens: int, batch_size: int = BATCH_SIZE) -> list[tuple[list[int], bool]]:
    """Greedy continuations of token-id prompts (`generate.continue_batch`): (new ids up to, not
    including, the first stop id; whether a stop id came)."""
    done = continue_batch(model, prompts, stops, pad_id, max_new_tokens, batch_size=batch_size)
    return [(ids[:-1] if stopped else ids, stopped) for ids, stopped in done]


@torch.no_grad()
def choice_logliks(model: PreTrainedModel, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                   batch_size: int = BATCH_SIZE) -> list[float]:
    """Summed log-probability of each continuation after its context, `batch_size` pairs at a time (right-padded)."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [ctx + cont for ctx, cont in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=model.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, (ctx, cont) in enumerate(chunk):  # log-softmax only where a choice token is predicted
            picked = torch.log_softmax(logits[row, len(ctx) - 1 : len(ctx) + len(cont) - 1].float(), dim=-1)
            targets = torch.tensor(cont, device=model.device)
            out.append(picked[torch.arange(len(cont), device=model.device), targets].sum().item())
    return out


def _continuation(asker: Asker, messages: list[dict[str, str]], context: list[int], choice: str) -> list[int]:
    """The choice's tokens after the context: as a reply after the template's generation prompt, or, in
    plain text, " choice" after "Answer:" (the whole text encoded and the context's tokens cut off, as
    lm-evaluation-harness does, so the boundary is tokenized as in running text)."""
    if asker.chat:
        return list(asker.tokenizer(choice, add_special_tokens=False)["input_ids"])
    cont = list(asker.tokenizer(plain_text(messages) + " " + choice)["input_ids"])[len(context):]
    return cont or list(asker.tokenizer(" " + choice, add_special_tokens=False)["input_ids"])


def score_tasks(asker: Asker, tasks: list[Task], label: str = "model", *, max_new_tokens: int = MAX_NEW_TOKENS,
                batch_size: int = BATCH_SIZE) -> Scored:
    """Ask `asker` every item of `tasks` and judge it; a row per item (in file order) with the reply."""
    model = asker.model
    was_training = model.training
    model.eval()
    try:
        messages = [asker.messages(tasks, i) for i in range(len(tasks))]
        prompts = [asker.prompt_ids(m) for m in messages]
        stops = asker.stops()
        pad_id = pad_token_id(asker.tokenizer, stops)
        generated = [i for i, t in enumerate(tasks) if t.choices is None]
        replies = dict(zip(generated, generate_batch(model, [prompts[i] for i in generated], stops, pad_id,
                                                     max_new_tokens, batch_size)))
        pairs = [(i, c, prompts[i], _continuation(asker, messages[i], prompts[i], choice))
                 for i, t in enumerate(tasks) if t.choices is not None for c, choice in enumerate(t.choices)]
        logliks = choice_logliks(model, [(ctx, cont) for _, _, ctx, cont in pairs], pad_id, batch_size)
    finally:
        model.train(was_training)
    per_item: dict[int, list[float]] = {}
    for (i, _, _, _), value in zip(pairs, logliks):
        per_item.setdefault(i, []).append(value)
    scored = Scored(label, asker.describe())
    for i, task in enumerate(tasks):
        row: dict[str, Any] = {"index": i, "source": task.source, "id": task.id,
                               "prompt": messages[i] if asker.chat else plain_text(messages[i])}
        if task.choices is not None:
            values = per_item[i]
            chosen = max(range(len(values)), key=values.__getitem__)
            row.update(choices=task.choices, answer=task.answer, logliks=values, reply=task.choices[chosen],
                       chosen=chosen, correct=chosen == task.answer, answered=True, stopped=None, tokens=None)
        else:
            ids, stopped = replies[i]
            text = asker.tokenizer.decode(ids, skip_special_tokens=True)
            if asker.chat:
                text, tokens = text.strip(), len(ids)
            else:  # the answer ends at a blank line or a next "Question:", not where generation stopped
                text, cut = cut_plain(text)
                stopped = stopped or cut
                tokens = len(asker.tokenizer(text, add_special_tokens=False)["input_ids"]) if cut else len(ids)
            row.update(expected=task.expected, match=task.match, reply=text, correct=judge(task, text),
                       answered=answered(text), stopped=stopped, tokens=tokens)
        scored.rows.append(row)
    return scored


# -- presenting ---------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(results: list[Scored], heading: list[str]) -> str:
    """The terminal table, ending with `accuracy: X% (n=N)` (and `base accuracy: ...`) lines."""
    names = [f"{s.label} ({s.how})" if s.how else s.label for s in results]
    width = max(map(len, names))
    lines = [*heading, f"{'':<{width}}  {'accuracy':>8}  {'95% interval':>14}  {'answered':>8}  "
                       f"{'ended turn':>10}  {'mean tokens':>11}"]
    for name, s in zip(names, results):
        f = s.figures()
        interval = f"{100 * f['ci_low']:.1f}-{100 * f['ci_high']:.1f}%"
        tokens = "-" if f["mean_tokens"] is None else f"{f['mean_tokens']:.1f}"
        lines.append(f"{name:<{width}}  {_pct(f['accuracy']):>8}  {interval:>14}  {_pct(f['answered']):>8}  "
                     f"{_pct(f['ended_turn']):>10}  {tokens:>11}")
    lines.append("")
    for s in results:
        lines.append(f"{'' if s.label == 'model' else s.label + ' '}accuracy: {100 * s.accuracy:.1f}% (n={s.n})")
    return "\n".join(lines)


def write_results(out: str | Path, results: list[Scored], meta: dict[str, Any]) -> Path:
    """`out/results.jsonl` (every item's prompt, reply and verdict, per model) and `out/summary.json`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"model": s.label, **row}, ensure_ascii=False) + "\n" for s in results for row in s.rows]
    with atomic_file(out / "results.jsonl") as temp:
        temp.write_text("".join(lines), encoding="utf-8")
    summary = {**meta, "results": {s.label: {"asked": s.how, **s.figures()} for s in results}}
    with atomic_file(out / "summary.json") as temp:
        temp.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return out / "results.jsonl"



# -- sftkit eval --------------------------------------------------------------------------------
def _has_template(directory: str | Path) -> bool:
    from sftkit.lora import is_adapter_dir
    from sftkit.model import check_local_dir, load_tokenizer

    return is_adapter_dir(directory) or bool(load_tokenizer(check_local_dir(directory, "--model")).chat_template)


def _plain_asker(directory: str | Path, few_shot: int, device: str) -> Asker:
    """A model without a template, prompted with plain-text solved examples."""
    from sftkit.model import check_local_dir, load_tokenizer, read_weights, resolve_device, resolve_dtype

    directory = check_local_dir(directory, "--model")
    target = resolve_device(device, "--device")
    model = read_weights(directory, resolve_dtype("auto", target)).to(target).eval()
    return Asker(model, load_tokenizer(directory), chat=False, few_shot=few_shot)


def refuse_without_template(directory: str | Path) -> None:
    from sftkit.model import ModelError

    raise ModelError(f"{directory}: the tokenizer has no chat template, so nothing says how to ask this model a "
                     "question. Evaluate a fine-tuned directory (sftkit train writes the template into it), or "
                     "prompt this base model with solved examples of the task file: --few-shot K (plain text "
                     "Question:/Answer: lines), or compare it with a tuned model: --model TUNED --base DIR")


def eval_command(model_dir: str | Path, tasks_file: str | Path, *, base: str | Path | None = None,
                 few_shot: int | None = None, out: str | Path | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
                 batch_size: int = BATCH_SIZE, device: str = "auto") -> list[Scored]:
    """`sftkit eval`: score the model (and the base) on the task file; print the table; write results.jsonl."""
    from sftkit.generate import load_for_generation, training_template_kwargs
    from sftkit.lora import load_base_for_adapter
    from sftkit.model import check_local_dir, resolve_device

    tasks = read_tasks(tasks_file)
    if few_shot is not None and few_shot >= len(tasks):
        from sftkit.config import ConfigError

        raise ConfigError(f"--few-shot {few_shot}: {tasks_file} has {len(tasks)} items; the examples are other "
                          f"items of the file, so at most {len(tasks) - 1}")
    if few_shot:
        for task in tasks[: few_shot + 1]:
            task.solved()  # a regex item without a solution cannot be shown: say so before any model loads
    model_template = _has_template(model_dir)
    if not model_template and (base is not None or few_shot is None):
        refuse_without_template(model_dir)
    if model_template:
        model, tokenizer = load_for_generation(model_dir, device=device)
        kwargs = training_template_kwargs(model_dir)
        asker = Asker(model, tokenizer, few_shot=0 if base is not None else few_shot or 0, template_kwargs=kwargs)
    else:
        asker = _plain_asker(model_dir, few_shot or 0, device)
    askers = [("model", model_dir, asker)]
    if base is not None:
        base_dir = check_local_dir(base, "--base")
        if _has_template(base_dir):
            base_model, base_tok = load_for_generation(base_dir, device=device)
            askers.append(("base", base_dir, Asker(base_model, base_tok, few_shot=few_shot or 0,
                                                   template_kwargs=training_template_kwargs(base_dir))))
        elif few_shot is not None:
            askers.append(("base", base_dir, _plain_asker(base_dir, few_shot, device)))
        else:  # asked through the tuned model's template, grown to its tokenizer (as sftkit compare does)
            base_model, _ = load_base_for_adapter(model_dir, base=base_dir)
            base_model = base_model.to(resolve_device(device, "--device")).eval()
            askers.append(("base", base_dir, Asker(base_model, asker.tokenizer, template_kwargs=asker.template_kwargs)))
    results = []
    for name, directory, who in askers:
        results.append(score_tasks(who, tasks, name, max_new_tokens=max_new_tokens, batch_size=batch_size))
    counts = sum(t.choices is None for t in tasks)
    heading = [f"tasks   {tasks_file}  ({len(tasks)} items: {counts} generated, {len(tasks) - counts} multiple choice; "
               f"greedy, up to {max_new_tokens} new tokens)"]
    heading += [f"{name:<7} {directory}" for name, directory, _ in askers] + [""]
    print(table(results, heading))
    out = Path(out) if out is not None else Path("runs") / "eval" / Path(tasks_file).stem
    meta = {"tasks": str(tasks_file), "models": {name: str(d) for name, d, _ in askers}, "few_shot": few_shot,
            "max_new_tokens": max_new_tokens}
    print(f"replies {write_results(out, results, meta)}")
    return results
