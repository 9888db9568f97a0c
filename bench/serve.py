"""Requests per second of `sftkit serve` on the demo's fine-tuned model, batched vs one at a time.

    .venv/bin/python bench/serve.py [--model runs/demo/sft/final] [--requests 64] [--concurrency 16]

The same held-out questions are sent by `--concurrency` threads of the official `openai` client to
`sftkit serve` (in this process, on a free localhost port) with `--max-batch 1` (every request alone,
the reference) and with `--max-batch 8/16`; greedy, 32 new tokens at most. Every reply is checked
against `sftkit generate`'s (`generate_reply`) for the same question. Prints a table and the ratio.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))


def serve_in_thread(model: Path, max_batch: int):
    import uvicorn

    from sftkit.serve import create_app

    app = create_app(model, model_name="demo", max_batch=max_batch, device="cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1", app


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=Path("runs/demo/sft/final"))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model}: run `make demo` first")

    import torch
    from openai import OpenAI

    from sftkit.generate import generate_reply, load_for_generation
    from sftkit_demo.chats import heldout_questions
    from sftkit_demo.world import split_countries

    torch.set_num_threads(2)
    questions = [r["question"] for r in heldout_questions(split_countries(0)[1], 0)][: args.requests]
    model, tokenizer = load_for_generation(args.model, device="cpu")
    expected = [generate_reply(model, tokenizer, [{"role": "user", "content": q}], max_new_tokens=32).text
                for q in questions]
    del model

    rows = []
    for max_batch in (1, 8, 16):
        server, url, app = serve_in_thread(args.model, max_batch)
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)

        def ask(question: str) -> str:
            reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": question}],
                                                   max_tokens=32)
            return reply.choices[0].message.content

        ask(questions[0])  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            replies = list(pool.map(ask, questions))
        seconds = time.perf_counter() - start
        sizes = app.state.engine.batch_sizes[1:]
        same = sum(r == e for r, e in zip(replies, expected))
        rows.append((max_batch, len(questions) / seconds, sum(sizes) / len(sizes), same))
        server.should_exit = True
        time.sleep(0.5)

    print(f"\nsftkit serve, {args.model}, {len(questions)} requests from {args.concurrency} threads, "
          f"{torch.get_num_threads()} CPU threads\n")
    print(f"{'max batch':>10} {'requests/s':>11} {'mean batch':>11} {'= sftkit generate':>18}")
    for max_batch, rps, mean, same in rows:
        print(f"{max_batch:>10} {rps:>11.2f} {mean:>11.1f} {same:>12}/{len(questions)}")
    print(f"\nbatched (16) / one at a time requests/s ratio: {rows[-1][1] / rows[0][1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
