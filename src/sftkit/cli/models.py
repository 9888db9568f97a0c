"""`sftkit generate|chat|serve|export|report|model tiny|diff|compare`: arguments and the calls they make."""

from __future__ import annotations

import argparse

from sftkit.config import DTYPES


def add_commands(commands: argparse._SubParsersAction) -> None:
    _add_generate(commands)
    _add_serve(commands)
    _add_export(commands)
    _add_report(commands)
    _add_model_tiny(commands)
    _add_evidence(commands)


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
