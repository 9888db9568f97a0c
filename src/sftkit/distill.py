"""`sftkit data distill`: training data from a teacher model, a local directory or any OpenAI-compatible endpoint.

    sftkit data distill --teacher runs/demo/final --prompts questions.txt --out distilled.jsonl
    sftkit data distill --teacher http://127.0.0.1:8000/v1 --model final --prompts q.jsonl --out d.jsonl \\
                        --n 2 --temperature 0.7 --concurrency 8 --drop-refusals
    sftkit train recipe.yaml data.train=distilled.jsonl          # the output is a `messages` JSONL

Prompts are a .txt (one per line) or a .jsonl of {"prompt"} / {"messages"} rows. Each output row is
the prompt's messages plus the teacher's reply, with `teacher`, `params`, `finish_reason` and `key`
(prompt index and sample number). A reply cut by the length limit (or that never ends its turn) is
dropped and counted; so are refusals (`--drop-refusals`, `data clean`'s list) and exact duplicate
replies to the same prompt (`--dedupe`). Dropped rows go to OUT.dropped.jsonl with their reason.

Resumable: rows are appended and flushed one by one; a new run reads OUT and OUT.dropped.jsonl,
cuts a torn last line left by a kill, and asks only for the keys not there yet — no duplicate, no
lost row. An endpoint is asked through the `openai` client (`serve` extra), which retries 429 and
5xx answers with exponential backoff; `--concurrency` requests are in flight at once.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sftkit.data.messages import DataError
from sftkit.data.tools.clean import compile_patterns
from sftkit.evaluate.compare import read_prompts


@dataclass
class Teacher:
    """Where replies come from, and how they are asked for."""

    source: str  # a model directory or an http(s) URL of an OpenAI-compatible API (…/v1)
    model: str | None = None  # the endpoint's model name (default: the first of /v1/models)
    api_key: str | None = None
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float | None = None
    concurrency: int = 8  # requests in flight (an endpoint) or conversations per batch (a local model)
    max_retries: int = 5

    @property
    def remote(self) -> bool:
        return self.source.startswith(("http://", "https://"))

    def params(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class DistillReport:
    written: int = 0
    already: int = 0  # rows a previous (interrupted) run had written
    dropped: Counter[str] = field(default_factory=Counter)

    def summary(self, out: str | Path) -> str:
        text = f"{out}: {self.written} new rows" + (f" (+{self.already} from before)" if self.already else "")
        if self.dropped:
            text += "; dropped: " + ", ".join(f"{n} {why}" for why, n in self.dropped.most_common())
        return text


def distill(teacher: Teacher, prompts_file: str | Path, out: str | Path, *, n: int = 1,
            drop_refusals: bool = False, dedupe: bool = False, progress: bool = True) -> DistillReport:
    """Ask `teacher` for `n` replies to every prompt of `prompts_file`; append the usable ones to `out`."""
    out = Path(out)
    dropped_file = out.with_name(out.name + ".dropped.jsonl")
    prompts = read_prompts(prompts_file)
    kept_before = _rows(out)  # each file read once: what an interrupted run wrote
    done = {str(row.get("key")) for row in [*kept_before, *_rows(dropped_file)]}
    report = DistillReport(already=len(kept_before))
    todo = [(i, j) for i in range(len(prompts)) for j in range(n) if f"{i}:{j}" not in done]
    refusals = compile_patterns(refusals=True) if drop_refusals else []
    seen: dict[int, set[str]] = {}
    for row in kept_before if dedupe else []:
        seen.setdefault(int(str(row["key"]).split(":")[0]), set()).add(row["messages"][-1]["content"])
    ask = _remote(teacher) if teacher.remote else _local(teacher)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as kept, dropped_file.open("a", encoding="utf-8") as gone, \
            tqdm(total=len(todo), desc="distill", unit="reply", disable=not progress) as bar:
        for (i, j), (text, finish) in ask([(key, prompts[key[0]]) for key in todo]):
            row = {"messages": [*prompts[i], {"role": "assistant", "content": text}], "teacher": teacher.source,
                   "params": teacher.params(), "finish_reason": finish, "key": f"{i}:{j}"}
            why = _problem(text, finish, refusals, seen.setdefault(i, set()) if dedupe else None)
            if why:
                report.dropped[why] += 1
                _append(gone, {**row, "dropped": why})
            else:
                report.written += 1
                _append(kept, row)
            bar.update(1)
    return report


def _problem(text: str, finish: str, refusals: list, seen: set[str] | None) -> str | None:
    if finish != "stop":
        return "cut by the length limit" if finish == "length" else f"finish_reason {finish}"
    if not text.strip():
        return "empty reply"
    if any(p.search(text) for p in refusals):
        return "refusal"
    if seen is not None:
        if text in seen:
            return "duplicate reply"
        seen.add(text)
    return None


def _append(file: Any, row: dict[str, Any]) -> None:
    """One whole line, flushed and synced: a kill leaves at most a torn last line, which resume cuts."""
    file.write(json.dumps(row, ensure_ascii=False) + "\n")
    file.flush()
    os.fsync(file.fileno())


def _rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a previous run's file; a torn last line (a kill mid-write) is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        with path.open("r+b") as f:
            f.truncate(cut)
    rows = []
    for number, line in enumerate(data[:cut].decode("utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise DataError(f"{path}:{number}", "not JSON: this file was not written by sftkit data distill",
                            hint="give --out a new file") from None
    return rows


Work = list[tuple[tuple[int, int], list[dict[str, Any]]]]


def _local(teacher: Teacher) -> Any:
    """Batched generation with a local model directory, in prompt order."""
    from sftkit.generate import generate_replies, load_for_generation, training_template_kwargs

    model, tokenizer = load_for_generation(teacher.source)
    template_kwargs = training_template_kwargs(teacher.source)

    def ask(work: Work) -> Iterator[tuple[tuple[int, int], tuple[str, str]]]:
        for start in range(0, len(work), teacher.concurrency):
            chunk = work[start : start + teacher.concurrency]
            replies = generate_replies(model, tokenizer, [messages for _, messages in chunk],
                                       max_new_tokens=teacher.max_new_tokens, temperature=teacher.temperature,
                                       top_p=teacher.top_p, template_kwargs=template_kwargs,
                                       batch_size=teacher.concurrency)
            for (key, _), reply in zip(chunk, replies):
                yield key, (reply.text, "stop" if reply.stopped else "length")

    return ask


def _remote(teacher: Teacher) -> Any:
    """`concurrency` requests in flight to an OpenAI-compatible endpoint; the client retries 429 and 5xx."""
    try:
        from openai import OpenAI
    except ImportError:
        raise DataError("--teacher", "asking an endpoint needs the `serve` extra: pip install 'sftkit[serve]'") \
            from None
    client = OpenAI(base_url=teacher.source, api_key=teacher.api_key or "unused", max_retries=teacher.max_retries)
    model = teacher.model or client.models.list().data[0].id

    def one(messages: list[dict[str, Any]]) -> tuple[str, str]:
        extra = {"top_p": teacher.top_p} if teacher.top_p is not None else {}
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=teacher.max_new_tokens,
                                                temperature=teacher.temperature, **extra)
        choice = answer.choices[0]
        return choice.message.content or "", choice.finish_reason or "stop"

    def ask(work: Work) -> Iterator[tuple[tuple[int, int], tuple[str, str]]]:
        with ThreadPoolExecutor(max_workers=teacher.concurrency) as pool:
            for start in range(0, len(work), teacher.concurrency * 4):  # bounded: a kill loses little work
                chunk = work[start : start + teacher.concurrency * 4]
                for key, result in zip([k for k, _ in chunk], pool.map(one, [m for _, m in chunk])):
                    yield key, result

    return ask
