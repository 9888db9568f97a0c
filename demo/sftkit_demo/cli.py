"""`sftkit demo`: the demo's command, added to `sftkit` through the `sftkit.commands` entry point.

    sftkit demo [--out DIR] [--base DIR] [--epochs N] [--lr LR]
    sftkit demo --evidence [--base DIR]            # = make evidence: reports/evidence.md
"""

from __future__ import annotations

import argparse


def add_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("demo", help="base model vs SFT on held-out facts, offline on a CPU (make demo)")
    p.add_argument("--out", default="runs/demo", help="directory for the fine-tuned model and report.md")
    p.add_argument("--base", help="pre-trained base model (default: the repository's demo/base-model)")
    p.add_argument("--epochs", type=int, default=3, help="SFT epochs (default 3)")
    p.add_argument("--lr", type=float, default=1e-4, help="SFT peak learning rate (default 1e-4)")
    p.add_argument("--evidence", action="store_true",
                   help="instead: the claims about SFT as controlled runs -> reports/evidence.md (make evidence)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from sftkit_demo.run import DEFAULT_BASE, DemoOptions, run_demo

    if args.evidence:
        from sftkit_demo.evidence import main as evidence

        return evidence(["--base", str(args.base or DEFAULT_BASE)])

    run_demo(DemoOptions(out=args.out, base=args.base or DEFAULT_BASE, epochs=args.epochs, lr=args.lr))
    return 0
