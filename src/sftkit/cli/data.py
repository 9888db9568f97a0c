"""`sftkit data preview|inspect|clean|distill|cache`: their arguments and the calls they make."""

from __future__ import annotations

import argparse
import os
import sys

from sftkit.config import STRATEGIES


def add_commands(data: argparse._SubParsersAction) -> None:
    """The `sftkit data` subcommands."""
    _add_data_preview(data)
    _add_data_inspect(data)
    _add_data_clean(data)
    _add_data_distill(data)
    _add_data_cache(data)


def _columns(text: str) -> dict[str, str]:
    """`instruction=instruction,input=context,output=response` -> mapping."""
    pairs = [part.split("=", 1) for part in text.split(",") if part]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"--columns expects key=value pairs separated by commas, got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def _add_data_preview(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preview", help="show trained vs masked tokens, or print them as JSON",
                       description="Either a training recipe (exactly what `sftkit train RECIPE` trains) or "
                                   "--tokenizer and --data for a quick look.")
    p.add_argument("config", nargs="?", metavar="RECIPE.yaml", help="a training recipe: its model's tokenizer, "
                   "template, template_kwargs, strategy, max_length, batching and data")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, as for sftkit train")
    p.add_argument("--split", default="train", choices=["train", "eval"], help="which split to show (default train)")
    p.add_argument("--tokenizer", help="local tokenizer (or model) directory (without a recipe)")
    p.add_argument("--data", nargs="+", help="JSON / JSONL / Parquet file(s) (without a recipe)")
    p.add_argument("--format", default="auto", help="auto, messages, alpaca, prompt_completion, sharegpt, text, ...")
    p.add_argument("--columns", type=_columns, help="column mapping, e.g. instruction=instruction,output=response")
    p.add_argument("--template", help="built-in chat template (chatml, llama3, mistral) or a .jinja file")
    p.add_argument("--strategy", default="assistant", choices=list(STRATEGIES))
    p.add_argument("--turns", default="auto", choices=["auto", "whole", "per_turn", "last"],
                   help="which renders become examples (data.turns; default auto)")
    p.add_argument("--reasoning", default="train", choices=["train", "mask", "drop"],
                   help="reasoning in the replies: trained, masked or dropped (data.reasoning; default train)")
    p.add_argument("--max-length", type=int, default=2048, help="longest example in tokens (default 2048)")
    p.add_argument("--json", action="store_true", help="one {input_ids, labels} object per example, input order")
    p.add_argument("--pack", action="store_true",
                   help="show packed rows (best-fit decreasing to --max-length); --json adds position_ids")
    p.add_argument("--limit", type=int, default=3, help="examples to print in human mode (default 3)")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid records and count them")
    p.add_argument("--num-proc", type=int, default=1, help="processes for rendering")
    p.add_argument("--no-fast-bpe", action="store_true",
                   help="tokenize with the tokenizer alone, not tiktoken (which gives the same ids, faster)")
    p.add_argument("--no-colour", action="store_true", help="mark trained text with [[ ]] instead of colour")
    p.set_defaults(func=_run_data_preview)


def _run_data_preview(args: argparse.Namespace) -> int:
    from sftkit.config import ConfigError, DataConfig
    from sftkit.data.preview import preview
    from sftkit.data.templates import prepare_tokenizer
    from sftkit.model import load_tokenizer
    from sftkit.recipe import load_config

    seed = 0
    if args.config:
        if args.tokenizer or args.data:
            raise ConfigError("data preview: give a recipe, or --tokenizer and --data, not both")
        config = load_config(args.config, args.overrides)
        data, tokenizer_path, seed = config.data, config.model.path, config.train.seed
    else:
        if not (args.tokenizer and args.data):
            raise ConfigError("data preview: give a training recipe (RECIPE.yaml), or --tokenizer DIR and --data FILE")
        data = DataConfig(train=args.data, format=args.format, columns=args.columns, template=args.template,
                          strategy=args.strategy, max_length=args.max_length, skip_invalid=args.skip_invalid,
                          turns=args.turns, reasoning=args.reasoning,
                          fast_bpe=not args.no_fast_bpe, num_proc=args.num_proc,
                          batching="packed" if args.pack else "padded")
        tokenizer_path = args.tokenizer
    tokenizer = load_tokenizer(tokenizer_path)
    added = prepare_tokenizer(tokenizer, data.template)
    info = sys.stderr if args.json else sys.stdout
    preview(data, tokenizer, seed=seed, split=args.split, as_json=args.json, limit=args.limit,
            colour=sys.stdout.isatty() and not args.no_colour, added=added, out=sys.stdout, info=info)
    return 0


def _add_data_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="counts, token lengths, truncation, duplicates, scripts, worst offenders")
    p.add_argument("file", help="JSON / JSONL / Parquet file")
    p.add_argument("--tokenizer", help="local tokenizer directory: token figures with its chat template")
    p.add_argument("--template", help="built-in chat template (chatml, llama3, mistral) or a .jinja file")
    p.add_argument("--max-length", type=int, default=2048, help="training's max_length (default 2048)")
    p.add_argument("--strategy", default="assistant", choices=list(STRATEGIES))
    p.add_argument("--format", default="auto", help="auto, messages, alpaca, prompt_completion, sharegpt, text, ...")
    p.add_argument("--columns", type=_columns, help="column mapping, e.g. instruction=instruction,output=response")
    p.add_argument("--near-dup-threshold", type=float, default=0.85, help="Jaccard of word 3-grams (default 0.85)")
    p.add_argument("--min-reply-chars", type=int, default=10, help="replies shorter than this are counted (default 10)")
    p.add_argument("--num-proc", type=int, default=1, help="processes for rendering")
    p.add_argument("--report", metavar="DIR", help="write DIR/report.md with lengths.png and replies.png")
    p.set_defaults(func=_run_data_inspect)


def _run_data_inspect(args: argparse.Namespace) -> int:
    from sftkit.data.tools.inspect import inspect_file, write_report

    report = inspect_file(
        args.file,
        tokenizer=_data_tokenizer(args.tokenizer, args.template),
        max_length=args.max_length,
        strategy=args.strategy,
        format=args.format,
        columns=args.columns,
        near_threshold=args.near_dup_threshold,
        min_reply_chars=args.min_reply_chars,
        num_proc=args.num_proc,
        progress=True,
    )
    print(report.summary())
    if args.report:
        print(f"report: {write_report(report, args.report)}")
    return 0


def _add_data_clean(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clean", help="remove duplicates, near-duplicates, short/long replies; same format out")
    p.add_argument("file", help="JSON / JSONL / Parquet file (never modified)")
    p.add_argument("--out", required=True, help="cleaned file, same suffix as FILE")
    p.add_argument("--report", metavar="FILE.md", help="report path (default: <out>.report.md and <out>.report.json)")
    p.add_argument("--dedupe", default="near", choices=["near", "exact", "none"], help="near = exact + near (default)")
    p.add_argument("--near-dup-threshold", type=float, default=0.85, help="Jaccard of word 3-grams (default 0.85)")
    p.add_argument("--min-reply-chars", type=int, default=0, help="remove rows with a shorter reply (default 0: off)")
    p.add_argument("--max-tokens", type=int, help="remove rows rendered longer than this (needs --tokenizer)")
    p.add_argument("--tokenizer", help="local tokenizer directory, for --max-tokens")
    p.add_argument("--template", help="built-in chat template (chatml, llama3, mistral) or a .jinja file")
    p.add_argument("--drop-pattern", action="append", default=[], metavar="REGEX", help="remove rows with a reply matching it (repeatable)")
    p.add_argument("--drop-refusals", action="store_true", help="also the built-in list ('As an AI language model', ...)")
    p.add_argument("--skip-invalid", action="store_true", help="remove invalid rows instead of stopping")
    p.add_argument("--format", default="auto", help="auto, messages, alpaca, prompt_completion, sharegpt, text, ...")
    p.add_argument("--columns", type=_columns, help="column mapping, e.g. instruction=instruction,output=response")
    p.set_defaults(func=_run_data_clean)


def _run_data_clean(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sftkit.data.messages import DataError
    from sftkit.data.sources import expand_paths
    from sftkit.data.tools.clean import CleanOptions, clean_file, write_clean_report

    if expand_paths(args.file) != [Path(args.file)]:  # a directory or a glob: clean writes one file back
        raise DataError(args.file, "data clean cleans one file at a time (it writes it back in its own format)",
                        hint="run it once per file")

    options = CleanOptions(
        dedupe=args.dedupe,
        near_threshold=args.near_dup_threshold,
        min_reply_chars=args.min_reply_chars,
        max_tokens=args.max_tokens,
        drop_patterns=tuple(args.drop_pattern),
        drop_refusals=args.drop_refusals,
        skip_invalid=args.skip_invalid,
        format=args.format,
        columns=args.columns,
    )
    tokenizer = _data_tokenizer(args.tokenizer, args.template)
    report = clean_file(args.file, args.out, options, tokenizer=tokenizer, progress=True)
    print(report.summary())
    print(f"report: {write_clean_report(report, args.out, args.report)}")
    return 0


def _data_tokenizer(path: str | None, template: str | None):  # -> PreTrainedTokenizerBase | None
    """The tokenizer at `path` with its chat template installed, or None without `path`."""
    from sftkit.data.templates import TemplateError, prepare_tokenizer

    if path is None:
        if template:
            raise TemplateError("--template needs --tokenizer")
        return None
    from sftkit.model import load_tokenizer

    tokenizer = load_tokenizer(path)
    prepare_tokenizer(tokenizer, template)
    return tokenizer


def _add_data_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="training data from a teacher: a model directory or an OpenAI-compatible URL")
    p.add_argument("--teacher", required=True, help="model directory, or an endpoint such as http://127.0.0.1:8000/v1")
    p.add_argument("--prompts", required=True, help=".txt (one prompt per line) or .jsonl ({prompt} or {messages})")
    p.add_argument("--out", required=True, help="messages JSONL to write (appended to: a killed run resumes)")
    p.add_argument("--n", type=int, default=1, help="replies per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--model", help="the endpoint's model name (default: the first it lists)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight, or the local batch size")
    p.add_argument("--drop-refusals", action="store_true", help="drop replies matching data clean's refusal list")
    p.add_argument("--dedupe", action="store_true", help="drop a reply equal to an earlier one to the same prompt")
    p.set_defaults(func=_run_data_distill)


def _run_data_distill(args: argparse.Namespace) -> int:
    from sftkit.distill import Teacher, distill

    teacher = Teacher(args.teacher, model=args.model, api_key=args.api_key, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, concurrency=args.concurrency)
    report = distill(teacher, args.prompts, args.out, n=args.n, drop_refusals=args.drop_refusals, dedupe=args.dedupe)
    print(report.summary(args.out))
    return 0


def _add_data_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="the token cache of rendered examples: list it or clear it")
    p.add_argument("action", choices=["ls", "clear"])
    p.add_argument("--dir", help="the cache directory (default: $SFTKIT_CACHE_DIR, else ~/.cache/sftkit/tokens)")
    p.set_defaults(func=_run_data_cache)


def _run_data_cache(args: argparse.Namespace) -> int:
    import shutil

    from sftkit.data.store import cache_root, list_cache, sweep

    root = cache_root(args.dir)
    left = sweep(root)  # killed renders' temporary directories, where their process is gone
    found = list_cache(root)
    if args.action == "clear":
        for directory, _, _ in found:
            shutil.rmtree(directory)
        print(f"cleared {len(found)} stores ({sum(size for *_, size in found) / 2**20:.1f} MiB) from {root}")
    else:
        for directory, meta, size in found:
            print(f"{directory.name}  {meta['examples']:>9,} examples  {meta['tokens']:>12,} tokens  "
                  f"{size / 2**20:>9.1f} MiB  {(meta.get('read_lines') or [''])[0][:80]}")
        print(f"{len(found)} stores, {sum(size for *_, size in found) / 2**20:.1f} MiB in {root}")
    for directory, size, whose in left:
        print(f"left: {directory.name}  {size / 2**20:.1f} MiB  a render's temporary directory ({whose})")
    return 0
