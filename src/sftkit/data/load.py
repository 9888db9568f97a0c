"""Files -> records -> hold-out -> mix -> render: the one data entry of `sftkit train` and `sftkit data preview`.

    sftkit train RECIPE.yaml                      # sftkit.train.setup_data -> load_data(config.data, ...)
    sftkit data preview RECIPE.yaml --json        # the same call, printed: exactly what training trains
    sftkit data preview --tokenizer DIR --data FILE   # a DataConfig made from the flags, the same call

Reading is `sftkit.data.formats`, masking is `sftkit.data.render`; this module strings them
together in one order: every file is read (invalid records raise or are counted), the eval
fraction is held out BEFORE mixing (an upsampled copy never lands on both sides), the
`{path, weight|samples}` entries of `data.train` are applied, and both splits are rendered with one
`Renderer` (template, template_kwargs, strategy, max_length of the config).

With the token cache on (`data.cache`, the default) a hit maps the stored splits; a miss follows the
same order record by record, straight into the store (`stream_data`, `sftkit.data.stream`), so that
memory does not grow with the data. `render_data` holds everything in memory (`data.cache=false`).
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sftkit.config import ConfigError, DataConfig
from sftkit.data import store, stream
from sftkit.data.formats import LoadReport, load_records
from sftkit.data.messages import Conversation, DataError, Problems, Record
from sftkit.data.mixing import mix_with_report
from sftkit.data.render import Renderer, Tokenized
from sftkit.data.render_all import RenderReport, render_records
from sftkit.data.sources import expand_paths
from sftkit.data.templates import TemplateError, missing_template_message

PROGRESS_ABOVE = 5000  # records: a progress bar while rendering more than this
TRUNCATION_WARNING = 0.05  # warn when more than this share of the examples is cut or dropped by max_length


@dataclass
class Split:
    """Rendered examples of one split, the records they came from, and what was left out and why."""

    records: list[Record]
    report: RenderReport
    loads: list[LoadReport] = field(default_factory=list)
    mixing: str = ""  # how many records each `{path, weight|samples}` source gave, when data.train mixes
    stored: dict[str, Any] | None = None  # the token cache's record of this split (`sftkit.data.store`)

    @property
    def examples(self) -> list[Tokenized]:
        return self.report.examples

    def left_out(self) -> Counter[str]:
        """Reason -> count for records skipped while reading or rendering, and examples dropped."""
        reasons = Counter(self.stored["read_left_out"]) if self.stored else read_left_out(self.loads)
        reasons.update({f"invalid ({kind})": n for kind, n in self.report.skipped.items()})
        reasons.update({f"dropped ({kind})": n for kind, n in self.report.dropped.items()})
        return reasons

    def summary(self) -> str:
        """What each file gave, then what rendering kept, dropped and noticed, then the warnings."""
        lines = [load.summary() for load in self.loads] + ([self.mixing] if self.mixing else [])
        if self.stored:
            lines = [*self.stored["read_lines"], f"token cache: {self.stored['dir']}"]
        return "\n".join(lines + [self.report.summary()] + [f"warning: {w}" for w in self.warnings])

    @property
    def prompts(self) -> list[list[dict]]:
        """The first few prompts of the split (the sample generated at each eval is the first)."""
        if self.stored:
            return self.stored["prompts"]
        return [p for p in (prompt_of(r) for r in self.records[:64]) if p][:4]

    @property
    def warnings(self) -> list[str]:
        """What a person should act on: many examples cut or dropped by max_length."""
        cut = self.report.warnings.get("truncated", 0)
        dropped = sum(n for kind, n in self.report.dropped.items() if kind.startswith("truncated"))
        rendered = len(self.examples) + dropped
        if not rendered or (cut + dropped) / rendered <= TRUNCATION_WARNING:
            return []
        return [f"max_length cuts {cut} of {rendered} examples ({cut / rendered:.0%}) and drops {dropped} "
                f"({dropped / rendered:.0%}) whose trained tokens all lie beyond it: raise data.max_length, or "
                "look at the lengths with `sftkit data inspect FILE --tokenizer DIR --max-length N`"]


def read_left_out(loads: Sequence[LoadReport]) -> Counter[str]:
    """Reason -> count for the records reading skipped (invalid) or dropped (on purpose)."""
    reasons: Counter[str] = Counter()
    for load in loads:
        reasons.update({f"invalid ({kind})": n for kind, n in load.skipped.items()})
        reasons.update({f"dropped ({kind})": n for kind, n in load.dropped.items()})
    return reasons


def read_files(paths: Sequence[str | Path], config: DataConfig) -> tuple[list[Record], list[LoadReport]]:
    """Every file in order, read with `data.format`, `data.columns` and `data.skip_invalid`."""
    records: list[Record] = []
    loads: list[LoadReport] = []
    for path in paths:
        load = load_records(path, format=config.format, columns=config.columns,
                            on_error="skip" if config.skip_invalid else "raise")
        records.extend(load.records)
        loads.append(load)
    return records, loads


def held_out(count: int, fraction: float, seed: int) -> np.ndarray:
    """Which of `count` records (bool each) the eval split holds out: a seeded random `fraction`, at
    least one; the rule of both the in-memory and the streamed render."""
    held = np.zeros(count, dtype=bool)
    if not fraction:
        return held
    n_eval = max(1, round(fraction * count))
    if n_eval >= count:
        raise ConfigError(f"data.eval_fraction: {fraction} of {count} records leaves nothing to train on")
    held[np.random.default_rng([seed, 1]).permutation(count)[:n_eval]] = True
    return held


def hold_out(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, eval): a seeded random `fraction` of the records (at least one) becomes eval."""
    if not fraction:
        return records, []
    held = held_out(len(records), fraction, seed)
    return [r for r, h in zip(records, held) if not h], [r for r, h in zip(records, held) if h]


def mix_sources(train_records: list[Record], eval_records: list[Record], loads: list[LoadReport],
                config: DataConfig, seed: int) -> tuple[list[Record], str]:
    """Apply the `{path, weight|samples}` entries of `data.train` (plain paths are taken as they are);
    returns the records and what each source gave ("" when nothing is mixed)."""
    sources = config.sources()
    if not any(source.mixed for source in sources):
        return train_records, ""
    held = {id(r) for r in eval_records}
    parts = [([r for r in load.records if id(r) not in held], source) for source, load in zip(sources, loads)]
    mixed, report = mix_with_report(parts, seed=seed)
    return mixed, report.summary()


def renderer_for(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Renderer:
    """The renderer of `config` (its tokenizer carries the chat template: `templates.prepare_tokenizer`)."""
    return Renderer(tokenizer, config.strategy, config.max_length, config.template_kwargs, fast_bpe=config.fast_bpe,
                    turns=config.turns, reasoning=config.reasoning)


def load_data(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
              progress: bool | None = None) -> tuple[Split, Split]:
    """(train, eval) from `data.train` plus `data.eval` or `data.eval_fraction`, rendered — or mapped from
    the token cache when the same inputs were rendered before (`data.cache`, sftkit.data.store)."""
    if not config.cache:
        return render_data(config, tokenizer, seed, progress)
    files = [f for path in [*(s.path for s in config.sources()), *([config.eval] if config.eval else [])]
             for f in expand_paths(path)]
    root = store.cache_root(config.cache_dir)
    where = {name: root / f"{name}-{store.split_key(config, tokenizer, seed, name, files)}" for name in ("train", "eval")}
    found = {name: store.read(directory) for name, directory in where.items()}
    if all(found.values()):
        return tuple(_stored_split(*found[name]) for name in ("train", "eval"))  # type: ignore[return-value,misc]
    return stream_data(config, tokenizer, seed, where, progress)


def stream_data(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, where: dict[str, Path],
                progress: bool | None = None) -> tuple[Split, Split]:
    """`render_data` written straight into the token cache stores `where` names, one chunk of records at a
    time (`sftkit.data.stream`): the same splits and counters, in memory that does not grow with the data.
    Nothing is stored unless both splits render whole."""
    paths = [source.path for source in config.sources()]
    loads, chat = stream.count_records(paths, config)
    count = sum(load.read for load in loads)
    plan = stream.Plan.make([load.read for load in loads], held_out(count, config.eval_fraction, seed),
                            config.sources(), seed)
    eval_loads: list[LoadReport] = stream.count_records([config.eval], config)[0] if config.eval else []
    _check_template(chat, tokenizer)
    renderer = renderer_for(config, tokenizer)
    render = _render_options(config, count, progress)
    first_kept: list[str | None] = [None] * len(paths)
    with store.Writer(where["train"]) as train_out, store.Writer(where["eval"]) as eval_out:
        train, train_head = stream.render_into(
            train_out, stream.planned_records(paths, config, plan.copies, first_kept, plan.held),
            int(plan.copies.sum()), renderer, where="data.train", **render)
        if config.eval:
            eval_count = eval_loads[0].read
            eval_records = stream.planned_records([config.eval], config, np.ones(eval_count, dtype=np.int32))
        else:
            eval_count = int(plan.held.sum())
            eval_records = stream.planned_records(paths, config, plan.held.astype(np.int32))
        evaluation, eval_head = stream.render_into(eval_out, eval_records, eval_count, renderer, where="data.eval",
                                                   **render)
        if not len(train_out):
            raise _nothing_to_train(Split([], train, loads), paths)
        return (_store_split(Split(train_head, train, loads, plan.mixing(first_kept)), train_out),
                _store_split(Split(eval_head, evaluation, eval_loads), eval_out))


def _store_split(split: Split, out: store.Writer) -> Split:
    """`split`'s record (its counters, first prompts, what reading said) committed with its examples, and
    the store mapped back."""
    report = split.report
    meta = {"dropped": dict(report.dropped), "warnings": dict(report.warnings), "skipped": dict(report.skipped),
            "turns": report.turns, "repeated_tokens": report.repeated_tokens,
            "read_left_out": dict(read_left_out(split.loads)), "prompts": split.prompts,
            "dir": str(out.directory),
            "read_lines": [load.summary() for load in split.loads] + ([split.mixing] if split.mixing else [])}
    return _stored_split(out.commit(meta), meta)


def _stored_split(examples: store.StoredExamples, meta: dict[str, Any]) -> Split:
    report = RenderReport(examples, store.counters(meta, "dropped"), store.counters(meta, "warnings"),  # type: ignore
                          Problems(skip=True, skipped=store.counters(meta, "skipped")),
                          turns=meta.get("turns", ""), repeated_tokens=meta.get("repeated_tokens", 0))
    return Split([], report, stored=meta)


def render_data(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                progress: bool | None = None) -> tuple[Split, Split]:
    """`load_data` without the cache: every file read and every record rendered, in memory."""
    paths = [source.path for source in config.sources()]
    records, loads = read_files(paths, config)
    train_records, eval_records = hold_out(records, config.eval_fraction, seed)  # before mixing: no leaks
    train_records, mixing = mix_sources(train_records, eval_records, loads, config, seed)
    eval_loads: list[LoadReport] = []
    if config.eval:
        eval_records, eval_loads = read_files([config.eval], config)
    _check_template(next((r for r in records if isinstance(r, Conversation)), None), tokenizer)
    renderer = renderer_for(config, tokenizer)
    render = _render_options(config, len(records), progress)
    train = Split(train_records, render_records(train_records, renderer, where="data.train", **render), loads,
                  mixing)
    evaluation = Split(eval_records, render_records(eval_records, renderer, where="data.eval", **render), eval_loads)
    if not train.examples:
        raise _nothing_to_train(train, paths)
    return train, evaluation


def _check_template(chat: Conversation | None, tokenizer: PreTrainedTokenizerBase) -> None:
    """A conversation (the first met) needs a chat template: said once, not once per record."""
    if chat is not None and not tokenizer.chat_template:
        raise TemplateError(f"{chat.source} is a conversation, and the {missing_template_message(tokenizer)}")


def _render_options(config: DataConfig, records: int, progress: bool | None) -> dict[str, Any]:
    return {"on_error": "skip" if config.skip_invalid else "raise", "num_proc": config.num_proc,
            "progress": records > PROGRESS_ABOVE if progress is None else progress}


def _nothing_to_train(train: Split, paths: Sequence[str]) -> DataError:
    reasons = dict(train.left_out()) or "no records"
    return DataError(", ".join(paths), f"no usable training examples ({reasons})", "data.train")


def dated_template_note(tokenizer: PreTrainedTokenizerBase, config: DataConfig) -> str | None:
    """A note when the chat template writes today's date into every example (Llama 3.x does, unless
    `date_string` is given): the same data would give other tokens tomorrow."""
    if not tokenizer.chat_template:
        return None
    today = datetime.date.today()
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             **config.template_kwargs)
    except Exception:  # a template that needs more than one user turn: the renderer reports it per record
        return None
    for shown in {today.strftime(f) for f in ("%d %b %Y", "%Y-%m-%d", "%B %d, %Y", "%d %B %Y", "%b %d, %Y")}:
        if shown in str(text):
            return (f"the chat template writes today's date ({shown}) into every example: set "
                    f"data.template_kwargs.date_string (e.g. '{shown}') to fix it, and give generation the same")
    return None


def prompt_of(record: Record) -> list[dict] | None:
    """The messages before the record's last assistant reply (the sample prompt), if it has one."""
    if not isinstance(record, Conversation):
        return None
    roles = [m.role for m in record.messages]
    if "assistant" not in roles:
        return None
    last = len(roles) - 1 - roles[::-1].index("assistant")
    return record.as_template_dicts()[:last] or None
