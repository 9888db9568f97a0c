"""sftkit vs TRL SFTTrainer: dataset preparation (tokenize + assistant-only loss mask), side by side.

    .venv/bin/python bench/preprocess.py                  # 50,000 examples, num_proc 1 and 2 (or `make bench`)
    .venv/bin/python bench/preprocess.py --quick          # 2,000 examples, a smoke run
    .venv/bin/python bench/preprocess.py --examples 100000 --num-proc 1 2 4 --repeat 2   # fastest of 2

What is measured, on the same `messages` JSONL and the same Qwen2.5 tokenizer:

  sftkit  `sftkit.data.load.load_data(DataConfig(train=[jsonl], strategy="assistant", max_length=2048,
          num_proc=N)`: sftkit's own loader reads the file, the renderer masks by prefix difference
          with the tokenizer's own template (what `sftkit data preview` and training run). Qwen2.5
          qualifies for tiktoken (`sftkit.data.fast_bpe`: the tokenizer's own ids, audited).
  sftkit-tok  the same with `fast_bpe=False`: tokenized by the tokenizer alone, for comparison.
  TRL     `load_dataset("json", jsonl)` then `SFTTrainer._prepare_dataset(...)`, the exact call
          `SFTTrainer.__init__` makes, with `assistant_only_loss=True` (TRL swaps in its
          `qwen2_5_training.jinja` with `{% generation %}` markers), `max_length=2048`,
          `dataset_num_proc` None (TRL's default: `datasets.map` in this process) and N (datasets 5
          runs even num_proc=1 in a worker pool). The trainer is built beforehand on a 1-row dataset
          and a 1-layer, hidden-32 Qwen2 built from `shared/data/configs/qwen2.json`, so model
          creation is not timed.

Both timings include reading the JSONL (shown apart as `load s`). `datasets` caching is off and each
TRL load gets a fresh cache directory, so repeated runs re-do the work. TOKENIZERS_PARALLELISM
defaults to false (as `make bench` sets it), so `num_proc` is the number of cores each tool uses.

The data: the conversational instruction sets in `shared/data/instructions` (FastChat dummy
conversations with and without a system prompt, LIMA and OASST-zh alpaca+history, OASST-en trees,
glaive tool calls), read by sftkit's format adapters into one `messages` JSONL, shuffled and
repeated to `--examples` rows. A cross-check then compares sftkit's labels with TRL's
assistant_masks-derived labels token by token on `--check` distinct conversations.

The last line is `sftkit/TRL preprocess ratio: X.XX` (best examples/s over best examples/s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TOKENIZER_DIRS = (SHARED / "tokenizers" / "qwen2.5", REPO / "tests" / "assets" / "tokenizers" / "qwen2.5")
INSTRUCTIONS = SHARED / "instructions"
QWEN2_CONFIG = SHARED / "configs" / "qwen2.json"
TOOLS = ("sftkit", "sftkit-tok", "TRL")  # sftkit-tok: sftkit with fast_bpe=False
SOURCES = (  # conversational sets both tools render identically; multi-turn, system prompts, tools
    "fastchat_dummy_conversation.json",  # sharegpt, 1-3 assistant turns
    "fastchat_dummy_conversation_with_system.json",  # the same with a system prompt
    "lima_llamafactory.json",  # alpaca + history, long replies
    "oasst1_sft_zh_llamafactory.json",  # alpaca + history, Chinese
    "oasst_en_100_trees.jsonl",  # OpenAssistant trees, best path
    "llamafactory_glaive_toolcall_en_demo.json",  # tools, tool calls, tool responses
)
IGNORE = -100


# -- data ---------------------------------------------------------------------------------------
def tokenizer_dir() -> Path:
    for path in TOKENIZER_DIRS:
        if (path / "tokenizer.json").is_file():
            return path
    sys.exit(f"no Qwen2.5 tokenizer in {' or '.join(map(str, TOKENIZER_DIRS))}")


def conversations() -> dict[str, list[dict]]:
    """Each source read by sftkit's adapters, as `messages` rows (tools as a JSON string), shuffled."""
    from sftkit.data.formats import load_records

    by_source = {}
    for name in SOURCES:
        rows = []
        for record in load_records(INSTRUCTIONS / name).records:
            row = {"messages": record.as_template_dicts()}
            if record.tools:
                row["tools"] = json.dumps(record.tools, ensure_ascii=False)
            rows.append(row)
        random.Random(name).shuffle(rows)
        by_source[name] = rows
    return by_source


def mixed(by_source: dict[str, list[dict]]) -> list[dict]:
    rows = [row for group in by_source.values() for row in group]
    random.Random(0).shuffle(rows)
    return rows


def spread(by_source: dict[str, list[dict]], n: int) -> list[dict]:
    """`n` distinct rows taken from each source in turn, so the cross-check covers every format."""
    pools = [list(rows) for rows in by_source.values()]
    out: list[dict] = []
    while len(out) < n and any(pools):
        for pool in pools:
            if pool and len(out) < n:
                out.append(pool.pop(0))
    return out


def write_jsonl(rows: list[dict], n: int, path: Path) -> Path:
    """The first `n` rows of `rows` repeated in order: the first len(rows) lines are all distinct."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps(rows[i % len(rows)], ensure_ascii=False) + "\n")
    return path


# -- timing -------------------------------------------------------------------------------------
@dataclass
class Result:
    tool: str
    num_proc: int | None  # None: TRL's default, `datasets.map` in the calling process
    examples: int  # rows read
    kept: int  # examples produced (rows minus those with no trained token within max_length)
    tokens: int  # tokens in the produced examples
    load_s: float  # reading the JSONL, included in `seconds` (sftkit's loader is timed again on its own)
    seconds: float
    cpu_s: float  # user+system CPU of this process and its (joined) workers

    @property
    def per_s(self) -> float:
        return self.examples / self.seconds


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def sftkit_pool_problem() -> str | None:
    """Why sftkit's worker pool would hang on this data, or None.

    Workers send each dropped record's DataError (e.g. no trained token within max_length) back by
    pickle; one that cannot be unpickled kills the pool's result thread and `render_records` waits
    forever."""
    import pickle

    from sftkit.data.render import DroppedExample

    try:
        pickle.loads(pickle.dumps(DroppedExample("probe.jsonl:1", "truncated: probe")))
    except Exception as err:  # noqa: BLE001 - any failure means the pool would hang
        return f"{type(err).__name__}: {err}"
    return None


def run_sftkit(path: Path, tok_dir: Path, num_proc: int, max_length: int, rows: int, fast_bpe: bool = True) -> Result:
    from sftkit.config import DataConfig
    from sftkit.data.load import load_data, read_files
    from sftkit.data.templates import prepare_tokenizer
    from sftkit.model import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    prepare_tokenizer(tokenizer)
    data = DataConfig(train=[str(path)], cache=False, strategy="assistant", max_length=max_length, num_proc=num_proc,
                      fast_bpe=fast_bpe)
    start, cpu = time.perf_counter(), cpu_seconds()
    examples = load_data(data, tokenizer, seed=0, progress=False)[0].examples
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    load_start = time.perf_counter()  # the loader alone, measured again for the breakdown
    read_files([path], data)
    load_s = time.perf_counter() - load_start
    tokens = sum(len(e.input_ids) for e in examples)
    return Result("sftkit" if fast_bpe else "sftkit-tok", num_proc, rows, len(examples), tokens, load_s, seconds, cpu)


def trl_trainer(tok_dir: Path, num_proc: int | None, max_length: int | None, first_row: dict, out: Path):
    """An SFTTrainer on a 1-row dataset and a tiny random Qwen2: cheap to build, TRL's real settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    from trl import SFTConfig, SFTTrainer

    config = Qwen2Config.from_dict(json.loads(QWEN2_CONFIG.read_text()))
    config.update({"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                   "num_attention_heads": 2, "num_key_value_heads": 1, "max_window_layers": 1})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    args = SFTConfig(output_dir=str(out), assistant_only_loss=True, max_length=max_length,
                     dataset_num_proc=num_proc, report_to=[], use_cpu=True, bf16=False, logging_strategy="no",
                     save_strategy="no")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([first_row]),
                      processing_class=tokenizer)


def trl_prepare(trainer, path: Path):
    """What SFTTrainer does with a JSONL a user loads: load_dataset + _prepare_dataset; (dataset, load s)."""
    from datasets import load_dataset

    with tempfile.TemporaryDirectory(prefix="trl-cache-") as cache:
        start = time.perf_counter()
        dataset = load_dataset("json", data_files=str(path), split="train", cache_dir=cache)
        load_s = time.perf_counter() - start
        prepared = trainer._prepare_dataset(dataset, trainer.processing_class, trainer.args, False, None, "train")
        return prepared, load_s


def run_trl(path: Path, tok_dir: Path, num_proc: int | None, max_length: int, rows: int, first: dict,
            out: Path) -> Result:
    trainer = trl_trainer(tok_dir, num_proc, max_length, first, out)
    start, cpu = time.perf_counter(), cpu_seconds()
    prepared, load_s = trl_prepare(trainer, path)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    tokens = sum(len(ids) for ids in prepared["input_ids"])
    return Result("TRL", num_proc, rows, len(prepared), tokens, load_s, seconds, cpu)


# -- correctness --------------------------------------------------------------------------------
def cross_check(rows: list[dict], tok_dir: Path, out: Path) -> list[str]:
    """sftkit labels vs TRL labels, token by token, on `rows` (no truncation on either side)."""
    from sftkit.config import DataConfig
    from sftkit.data.load import load_data
    from sftkit.data.templates import prepare_tokenizer
    from sftkit.model import load_tokenizer

    path = write_jsonl(rows, len(rows), out / "check.jsonl")
    tokenizer = load_tokenizer(tok_dir)
    prepare_tokenizer(tokenizer)
    data = DataConfig(train=[str(path)], cache=False, strategy="assistant", max_length=1 << 30)  # no truncation
    ours = load_data(data, tokenizer, seed=0, progress=False)[0].report
    trainer = trl_trainer(tok_dir, 1, None, rows[0], out / "trl-check")
    theirs, _ = trl_prepare(trainer, path)
    if len(ours.examples) != len(theirs):
        return [f"cross-check: sftkit kept {len(ours.examples)} examples, TRL {len(theirs)}: cannot align"]

    kinds: Counter[str] = Counter()  # token-level outcome where the ids agree
    why: Counter[str] = Counter()  # where the disagreeing tokens sit
    same_ids = identical = 0
    newline = tokenizer.convert_tokens_to_ids("\u010a")  # the byte-level "\n" token
    after = {tokenizer.convert_tokens_to_ids("assistant"): "TRL only: the '\\n' after '<|im_start|>assistant'",
             tokenizer.convert_tokens_to_ids("<|im_end|>"): "TRL only: the '\\n' after '<|im_end|>'"}
    first_other = None
    for index, (mine, other) in enumerate(zip(ours.examples, theirs)):
        if mine.input_ids != other["input_ids"]:
            continue
        same_ids += 1
        identical += mine.labels == other["labels"]
        ids = mine.input_ids
        for j, (a, b) in enumerate(zip(mine.labels, other["labels"])):
            a_on, b_on = a != IGNORE, b != IGNORE
            if a_on == b_on:
                kinds["both trained" if a_on else "both masked"] += 1
                continue
            kinds["sftkit only" if a_on else "TRL only"] += 1
            if b_on and ids[j] == newline and j and ids[j - 1] in after:
                why[after[ids[j - 1]]] += 1
            else:
                why["unexplained"] += 1
                first_other = first_other or (index, j, tokenizer.decode(ids[max(0, j - 8): j + 4]))
    total = sum(kinds.values())
    agree = kinds["both trained"] + kinds["both masked"]
    lines = [
        f"cross-check, sftkit labels vs TRL assistant_masks labels, {len(rows)} distinct conversations "
        f"({sum('tools' in r for r in rows)} with tools, {sum(_replies(r) > 1 for r in rows)} multi-turn):",
        f"  input_ids identical in {same_ids}/{len(rows)}; labels identical in {identical}/{len(rows)}",
        f"  {total} tokens: agree on {agree} ({100 * agree / max(total, 1):.2f}%; both trained "
        f"{kinds['both trained']}, both masked {kinds['both masked']}); TRL only {kinds['TRL only']}, "
        f"sftkit only {kinds['sftkit only']}",
    ]
    lines += [f"  {n:7d} x {reason}" for reason, n in why.most_common()]
    if why and not why["unexplained"]:
        lines += ["  all of them: TRL's {% generation %} block opens before the '\\n' that ends the generation "
                  "prompt and closes",
                  "  after the '\\n' that follows <|im_end|>; sftkit trains what the model generates, from after "
                  "the inference",
                  "  prompt through <|im_end|>, the token generation stops on"]
    if first_other:
        lines.append(f"  first unexplained difference: example {first_other[0]} token {first_other[1]}: "
                     f"{first_other[2]!r}")
    return lines


def _replies(row: dict) -> int:
    return sum(m["role"] == "assistant" for m in row["messages"])


# -- report -------------------------------------------------------------------------------------
def table(results: list[Result]) -> str:
    head = f"{'tool':<10} {'num_proc':>8} {'examples':>9} {'kept':>7} {'load s':>7} {'seconds':>8} " \
           f"{'examples/s':>11} {'tokens/s':>10} {'cpu s':>7}"
    lines = [head, "-" * len(head)]
    for r in sorted(results, key=lambda r: (TOOLS.index(r.tool), r.num_proc or 0)):
        lines.append(f"{r.tool:<10} {str(r.num_proc):>8} {r.examples:>9} {r.kept:>7} {r.load_s:>7.2f} {r.seconds:>8.2f} "
                     f"{r.per_s:>11.1f} {r.tokens / r.seconds:>10.0f} {r.cpu_s:>7.1f}")
    return "\n".join(lines)


def measure(path: Path, tok_dir: Path, args: argparse.Namespace, first_row: dict, work: Path) -> list[Result]:
    """Each tool at each num_proc, interleaved so that a change in the machine's load hits both;
    with --repeat, the fastest of the repeats of each."""
    results: dict[tuple[str, int | None], Result] = {}
    pool_problem = sftkit_pool_problem()
    # TRL's default dataset_num_proc=None maps in this process; datasets 5 runs even num_proc=1 in a pool
    plan = [(tool, n) for n in [None, *sorted(set(args.num_proc))] for tool in TOOLS
            if args.only in (None, tool) and (n is not None or tool == "TRL")]
    if pool_problem and any(tool != "TRL" and n > 1 for tool, n in plan):
        print(f"  sftkit num_proc>1: skipped, its pool would hang: a DataError does not survive pickling "
              f"({pool_problem})", flush=True)
        plan = [(tool, n) for tool, n in plan if tool == "TRL" or n == 1]
    for _ in range(args.repeat):
        for tool, n in plan:
            if tool != "TRL":
                result = run_sftkit(path, tok_dir, n, args.max_length, args.examples, fast_bpe=tool == "sftkit")
            else:
                result = run_trl(path, tok_dir, n, args.max_length, args.examples, first_row, work / "trl")
            print(f"  {tool:<10} num_proc={n}: {result.seconds:.1f}s", flush=True)
            if (tool, n) not in results or result.seconds < results[tool, n].seconds:
                results[tool, n] = result
    return list(results.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50_000, help="rows in the benchmark JSONL")
    parser.add_argument("--quick", action="store_true", help="2,000 rows and a 50-row cross-check")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--check", type=int, default=200, help="distinct conversations in the cross-check")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest is kept")
    parser.add_argument("--only", choices=TOOLS, help="run one tool (e.g. to profile it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.check = 2_000, 50

    import datasets
    import transformers
    import trl

    datasets.disable_caching()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()  # "Reducing num_proc to 1 for dataset of size 1" (the 1-row trainer)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # SFTConfig's own deprecated fields
    tok_dir = tokenizer_dir()
    by_source = conversations()
    rows = mixed(by_source)
    work = Path(tempfile.mkdtemp(prefix="sftkit-bench-preprocess-"))
    path = write_jsonl(rows, args.examples, work / "bench.jsonl")
    print(f"data: {len(rows)} distinct conversations ({', '.join(f'{k} {len(v)}' for k, v in by_source.items())}), "
          f"repeated to {args.examples} rows in {path} (removed at the end)")
    print(f"tokenizer: {tok_dir}; max_length {args.max_length}; TRL {trl.__version__}, "
          f"transformers {transformers.__version__}, datasets {datasets.__version__}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}")

    try:
        results = measure(path, tok_dir, args, first_row=rows[0], work=work)
        if not args.only:
            print("\n".join(cross_check(spread(by_source, args.check), tok_dir, work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results))
    best = {tool: max((r.per_s for r in results if r.tool == tool), default=0.0) for tool in TOOLS}
    if best["sftkit"] and best["sftkit-tok"]:
        print(f"sftkit with tiktoken / with the tokenizer alone: {best['sftkit'] / best['sftkit-tok']:.2f}")
    if best["sftkit"] and best["TRL"]:
        per_cpu = {tool: max(r.examples / r.cpu_s for r in results if r.tool == tool) for tool in ("sftkit", "TRL")}
        print(f"load average {os.getloadavg()[0]:.2f} at the end (the machine is shared: compare `cpu s` too); "
              f"examples per CPU-second, sftkit/TRL: {per_cpu['sftkit'] / per_cpu['TRL']:.2f}")
        print(f"sftkit/TRL preprocess ratio: {best['sftkit'] / best['TRL']:.2f}")


if __name__ == "__main__":
    main()
