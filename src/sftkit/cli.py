"""The `sftkit` command: parses arguments and dispatches; the work lives in the modules.

    sftkit data preview --tokenizer DIR --data FILE [--format F] [--template NAME]
                        [--strategy assistant|last|all] [--turns auto|whole|per_turn|last]
                        [--reasoning train|mask|drop] [--max-length N] [--json] [--pack]
    sftkit data inspect FILE [--tokenizer DIR] [--template NAME] [--max-length N] [--report DIR]
    sftkit data clean FILE --out FILE [--near-dup-threshold 0.85] [--min-reply-chars N]
                      [--tokenizer DIR --max-tokens N] [--drop-pattern REGEX ...] [--drop-refusals]
    sftkit data distill --teacher DIR|URL --prompts FILE --out FILE [--n K] [--temperature T]
    sftkit data cache ls|clear [--dir DIR]             # the token cache of rendered examples
    sftkit train [--nproc N] [--overwrite] CONFIG.yaml [key=value ...]
    sftkit generate --model DIR --prompt TEXT [--system TEXT] [--max-new-tokens N] [--temperature T]
    sftkit chat --model DIR
    sftkit serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]   # OpenAI-compatible
    sftkit export ADAPTER_DIR --out DIR [--merge] [--base DIR] [--dtype auto|float32|bfloat16|float16]
    sftkit export MODEL_DIR --gguf --out FILE.gguf [--dtype auto|float32|bfloat16|float16]   # llama.cpp, Ollama
    sftkit report RUN_DIR [--base DIR --prompts FILE]   # RUN_DIR/report.html: one self-contained page
    sftkit model tiny --config ARCH.json --tokenizer DIR --out DIR
    sftkit diff BASE TUNED [--png FILE] [--threshold 0.01] [--per-tensor] [--json FILE]
    sftkit compare BASE TUNED --prompts FILE [--out FILE.md] [--max-new-tokens N]
    sftkit config keys [SECTION | KEY]          # every recipe key: type, default, description
    sftkit --version

Commands from other packages join through the `sftkit.commands` entry point: `sftkit demo` is
the demo's (demo/sftkit_demo), installed with sftkit by `make setup`.

Start-up stays well under a second for `--help`, `--version` and a bad recipe: this module imports
only the standard library and `sftkit.config`; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, entry_points, version

from sftkit.config import DTYPES, STRATEGIES

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
    from sftkit.recipe import load_config
    from sftkit.data.preview import preview
    from sftkit.data.templates import prepare_tokenizer
    from sftkit.model import load_tokenizer

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


def _add_train(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="fine-tune a local model from a YAML recipe")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="run N processes on this machine with torchrun (before CONFIG; see train.strategy)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in output_dir (its files are removed first); without it, "
                        "training into a directory that holds a run is refused (or use train.resume=true)")
    p.add_argument("config", help="YAML recipe, e.g. configs/tiny-cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-5")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from sftkit.recipe import load_config

    if args.nproc is not None:  # `torchrun --standalone --nproc_per_node=N -m sftkit train CONFIG ...`
        load_config(args.config, args.overrides)  # a bad config fails here, once, not on every rank
        from sftkit.distributed import launch

        return launch(args.nproc, [*(["--overwrite"] if args.overwrite else []), args.config, *args.overrides])
    config = load_config(args.config, args.overrides)  # a bad recipe fails here, before torch is imported
    from sftkit.train import train

    train(config, overwrite=args.overwrite)
    return 0


def _add_generate(commands: argparse._SubParsersAction) -> None:
    for name, help_text in (("generate", "one reply to --prompt"), ("chat", "multi-turn chat on stdin, streamed")):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--model", required=True, help="trained model directory, e.g. runs/tiny/final")
        if name == "generate":
            p.add_argument("--prompt", required=True)
        p.add_argument("--system", help="system message")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        p.add_argument("--device", default="auto")
        p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from sftkit.generate import chat, generate_command

    options = {"system": args.system, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "device": args.device}
    if args.command == "chat":
        chat(args.model, **options)
    else:
        generate_command(args.model, args.prompt, **options)
    return 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("export", help="a LoRA adapter as a merged plain HF model (--merge) or a clean adapter; "
                                           "any model directory as one GGUF file (--gguf)")
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="a LoRA run's final/ or checkpoints/step-N/ (with --gguf: "
                                                          "also a full run's final/, best/ or step-N/)")
    p.add_argument("--out", required=True, help="new directory to write (with --gguf: a new FILE.gguf)")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base: loads without PEFT")
    p.add_argument("--gguf", action="store_true", help="one GGUF file for llama.cpp / Ollama / LM Studio, with the "
                                                       "chat template and end-of-turn token (pip install 'sftkit[gguf]')")
    p.add_argument("--base", help="base model directory (default: base_model_name_or_path of adapter_config.json)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="dtype of the merged weights, or of the GGUF's matrices (default: the stored dtype)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    if args.gguf:
        from sftkit.config import ConfigError

        if args.merge:
            raise ConfigError("--gguf merges an adapter by itself: leave out --merge")
        from sftkit.export import export_gguf

        export_gguf(args.adapter, args.out, base=args.base, dtype=args.dtype)
        return 0
    from sftkit.export import export

    export(args.adapter, args.out, merge=args.merge, base=args.base, dtype=args.dtype)
    return 0


def _add_report(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("report", help="one self-contained HTML page of a run: config, data, curves, samples")
    p.add_argument("run", metavar="RUN_DIR", help="a run's output_dir (written there as report.html)")
    p.add_argument("--base", help="the model before fine-tuning: adds its greedy replies beside final/'s")
    p.add_argument("--prompts", help="with --base: .txt (one prompt per line) or .jsonl ({prompt} or {messages})")
    p.add_argument("--max-new-tokens", type=int, default=128, help="with --base (default 128)")
    p.add_argument("--out", help="HTML file to write (default RUN_DIR/report.html)")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from sftkit.report import write_report

    print(write_report(args.run, base=args.base, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                       out=args.out))
    return 0


def _add_model_tiny(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser("model", help="model utilities").add_subparsers(dest="model_command", required=True)
    p = model.add_parser("tiny", help="write a tiny random model (real architecture, shrunk) for smoke tests")
    p.add_argument("--config", required=True, help="architecture config.json, e.g. ../shared/data/configs/qwen2.json")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory, e.g. ../shared/data/tokenizers/qwen2.5")
    p.add_argument("--out", required=True, help="directory to write (model + tokenizer)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.set_defaults(func=_run_model_tiny)


def _run_model_tiny(args: argparse.Namespace) -> int:
    from sftkit.checkpoint import save_tiny_model

    print(save_tiny_model(args.config, args.tokenizer, args.out, layers=args.layers, hidden=args.hidden))
    return 0


def _add_evidence(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("diff", help="per-layer relative weight change of TUNED vs BASE: table and PNG")
    p.add_argument("base", metavar="BASE", help="the model before fine-tuning")
    p.add_argument("tuned", metavar="TUNED", help="a run's final/, best/ or checkpoints/step-N/ (or a LoRA adapter)")
    p.add_argument("--png", help="bar chart to write (default: TUNED/weight_diff.png)")
    p.add_argument("--threshold", type=float, default=0.01,
                   help="a weight counts as moved when |dW| > threshold x rms(W) of its tensor (default 0.01)")
    p.add_argument("--per-tensor", action="store_true", help="one row per tensor instead of per layer")
    p.add_argument("--json", help="also write the figures as JSON")
    p.set_defaults(func=_run_diff)
    p = commands.add_parser("compare", help="greedy replies of BASE and TUNED to the same prompts, side by side")
    p.add_argument("base", metavar="BASE", help="the model before fine-tuning")
    p.add_argument("tuned", metavar="TUNED", help="the fine-tuned model (its chat template is used for both)")
    p.add_argument("--prompts", required=True, help=".txt (one prompt per line) or .jsonl ({prompt} or {messages})")
    p.add_argument("--out", help="markdown file to write (default: TUNED/compare.md)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_run_compare)


def _run_diff(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sftkit.evaluate.diff import weight_diff

    report = weight_diff(args.base, args.tuned, threshold=args.threshold)
    print(report.table(per_tensor=args.per_tensor))
    print(f"chart: {report.plot(args.png or Path(args.tuned) / 'weight_diff.png')}")
    if args.json:
        Path(args.json).write_text(report.to_json())
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sftkit.evaluate.compare import compare, markdown, read_prompts, table

    rows = compare(args.base, args.tuned, read_prompts(args.prompts), max_new_tokens=args.max_new_tokens,
                   device=args.device)
    print(table(rows))
    out = Path(args.out or Path(args.tuned) / "compare.md")
    out.write_text(markdown(rows, args.base, args.tuned))
    print(f"markdown: {out}")
    return 0


def _add_eval(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("eval", help="score a model on a task file (accuracy, 95%% interval, every reply), or run "
                                         "lm-evaluation-harness tasks on it")
    p.add_argument("--model", required=True, help="a trained directory (final/, best/, checkpoints/step-N/, an adapter)")
    p.add_argument("--tasks", help="JSONL task file: {prompt|messages, expected, match} or {choices, answer} a line")
    p.add_argument("--base", help="also score this model (the one before fine-tuning), side by side")
    p.add_argument("--few-shot", type=int, metavar="K", help="prompt the base (or, alone, the model) with K solved "
                                                             "items of the file; plain text without a template")
    p.add_argument("--out", help="directory for results.jsonl and summary.json (default: runs/eval/TASKS-STEM)")
    p.add_argument("--max-new-tokens", type=int, help="longest reply (default 128; with --lm-eval: each task's own)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts generated together (left-padded)")
    p.add_argument("--device", default="auto")
    p.add_argument("--lm-eval", metavar="TASKS", help="lm-evaluation-harness task names or YAML files (comma-"
                                                      "separated), run offline on --model (pip install 'sftkit[eval]')")
    p.add_argument("--limit", type=int, help="with --lm-eval: the first N items of each task")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from sftkit.config import ConfigError

    for name in ("few_shot", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0")
    if (args.max_new_tokens is not None and args.max_new_tokens < 1) or args.batch_size < 1:
        raise ConfigError("--max-new-tokens and --batch-size must be >= 1")
    if args.lm_eval:
        if args.tasks or args.base:
            raise ConfigError("--lm-eval runs the harness on --model alone: leave out --tasks and --base "
                              "(run sftkit eval once more for them)")
        from sftkit.evaluate.lm_eval_run import run_lm_eval

        run_lm_eval(args.model, args.lm_eval, few_shot=args.few_shot, limit=args.limit, out=args.out,
                    batch_size=args.batch_size, device=args.device, max_new_tokens=args.max_new_tokens)
        return 0
    if not args.tasks:
        raise ConfigError("sftkit eval: give --tasks FILE (a task file) or --lm-eval TASKS (harness tasks)")
    from sftkit.evaluate.task_eval import eval_command

    eval_command(args.model, args.tasks, base=args.base, few_shot=args.few_shot, out=args.out,
                 max_new_tokens=args.max_new_tokens or 128, batch_size=args.batch_size, device=args.device)
    return 0


def _add_config_keys(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser("config", help="recipe keys").add_subparsers(dest="config_command", required=True)
    p = config.add_parser("keys", help="every recipe key with its type, default and description",
                          description="Every key a recipe (or a KEY=VALUE override) can set, from sftkit.config.")
    p.add_argument("section", nargs="?", metavar="SECTION | KEY",
                   help="only one section (model, data, train, lora, eval, output_dir) or one key (train.lr)")
    p.set_defaults(func=_run_config_keys)


def _run_config_keys(args: argparse.Namespace) -> int:
    import textwrap

    from sftkit.recipe import describe_keys

    section, _, key = (args.section or "").partition(".")
    rows = describe_keys(section or None)
    if key:
        rows = [row for row in rows if row[0] == args.section]
        if not rows:
            from sftkit.recipe import _unknown_key

            raise _unknown_key(args.section)
    for name, kind, default, doc in rows:
        print(f"{name}: {kind} = {default}")
        if doc:
            print(textwrap.fill(doc, width=100, initial_indent="    ", subsequent_indent="    "))
    return 0


def _version() -> str:
    try:
        return f"sftkit {version('sftkit')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "sftkit (not installed)"


def _add_data_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="the token cache of rendered examples: list it or clear it")
    p.add_argument("action", choices=["ls", "clear"])
    p.add_argument("--dir", help="the cache directory (default: $SFTKIT_CACHE_DIR, else ~/.cache/sftkit/tokens)")
    p.set_defaults(func=_run_data_cache)


def _run_data_cache(args: argparse.Namespace) -> int:
    import shutil

    from sftkit.data.store import cache_root, list_cache

    root = cache_root(args.dir)
    found = list_cache(root)
    if args.action == "clear":
        for directory, _, _ in found:
            shutil.rmtree(directory)
        for partial in root.glob(".*") if root.is_dir() else []:  # killed renders' temporary directories
            shutil.rmtree(partial, ignore_errors=True)
        print(f"cleared {len(found)} stores ({sum(size for *_, size in found) / 2**20:.1f} MiB) from {root}")
        return 0
    for directory, meta, size in found:
        print(f"{directory.name}  {meta['examples']:>9,} examples  {meta['tokens']:>12,} tokens  "
              f"{size / 2**20:>9.1f} MiB  {(meta.get('read_lines') or [''])[0][:80]}")
    print(f"{len(found)} stores, {sum(size for *_, size in found) / 2**20:.1f} MiB in {root}")
    return 0


def _add_serve(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("serve", help="an OpenAI-compatible HTTP endpoint over a trained directory (small loads)")
    p.add_argument("--model", required=True, help="trained model directory or LoRA adapter, e.g. runs/tiny/final")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY`")
    p.add_argument("--name", help="the model's name in the API (default: the directory's name)")
    p.add_argument("--max-batch", type=int, default=8, help="concurrent requests answered in one batch")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from sftkit.serve import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, model_name=args.name,
          device=args.device, max_batch=args.max_batch)
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftkit", description="Supervised fine-tuning of language models.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="look at and prepare datasets").add_subparsers(dest="data_command", required=True)
    _add_data_preview(data)
    _add_data_inspect(data)
    _add_data_clean(data)
    _add_data_distill(data)
    _add_data_cache(data)
    _add_train(commands)
    _add_generate(commands)
    _add_serve(commands)
    _add_export(commands)
    _add_report(commands)
    _add_model_tiny(commands)
    _add_evidence(commands)
    _add_eval(commands)
    _add_config_keys(commands)
    for plugin in entry_points(group="sftkit.commands"):  # e.g. `sftkit demo`, from demo/ (never imported here)
        plugin.load()(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one clear message and exit 2, never a bare traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `sftkit data preview --json | head`
        return 0
    except KeyboardInterrupt:  # Ctrl-C outside training (which stops at a checkpoint: sftkit.faults)
        print(f"\n{_rank()}sftkit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from sftkit.errors import user_errors

        if not isinstance(err, user_errors()):
            raise
        switch = _skip_switch(args)
        message = err.naming(switch) if switch and hasattr(err, "naming") else str(err)  # DataFileError's hint
        print(f"{_rank()}sftkit: error: {message}", file=sys.stderr)
        return 2


def _skip_switch(args: argparse.Namespace) -> str | None:
    """How this command skips invalid records: a recipe's key, or the --skip-invalid flag (None: neither)."""
    if args.command == "train" or (args.command == "data" and getattr(args, "config", None)):
        return "data.skip_invalid=true (in the recipe, or after it on the command line)"
    return "--skip-invalid" if hasattr(args, "skip_invalid") else None


def _rank() -> str:
    """"[rank R] " in a process started by torchrun: the message says which rank failed."""
    return f"[rank {os.environ['RANK']}] " if "RANK" in os.environ and "LOCAL_RANK" in os.environ else ""
