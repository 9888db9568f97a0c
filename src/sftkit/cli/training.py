"""`sftkit train`, `sftkit eval` and `sftkit config keys`: their arguments and the calls they make."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    _add_train(commands)
    _add_eval(commands)
    _add_config_keys(commands)


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
