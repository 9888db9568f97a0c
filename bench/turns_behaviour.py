"""Does a model think at turn 1? Trained with data.turns=whole vs per_turn on multi-turn reasoning data.

    .venv/bin/python bench/turns_behaviour.py      # 132 training steps in all; 18 min on 2 busy shared cores; runs/turns_behaviour/

The demo's small pre-trained Llama (demo/base-model) gets Qwen3's chat template (its control tokens
added, embeddings resized), then is fine-tuned twice with the real `sftkit train` path on the same
300 conversations of 2-3 questions about countries, every reply with its reasoning ("France is in
Europe. The capital of France is Paris." before the answer) — once with `data.turns=whole`, once with
`data.turns=per_turn`. Qwen3's template drops the reasoning of earlier replies from history, so under
`whole` every reply but the last is trained without thinking; under `per_turn` each reply is trained
as it was generated, thinking included.

Both models then answer 40 questions greedily, at turn 1 (a fresh chat) and at turn 2 (after one
exchange, shown as Qwen3 shows history), and we count the replies that start by thinking
(`<think>` followed by reasoning text before `</think>`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "demo"))

from tokenizers import AddedToken  # noqa: E402

from sftkit.checkpoint import save_tokenizer  # noqa: E402
from sftkit.config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from sftkit.generate import generate_reply, load_for_generation  # noqa: E402
from sftkit.model import init_new_token_rows, load_tokenizer, read_weights  # noqa: E402
from sftkit.train import train  # noqa: E402
from sftkit_demo.phrasing import answer, question  # noqa: E402
from sftkit_demo.world import ATTRIBUTES, split_countries  # noqa: E402

QWEN3_TEMPLATE = REPO / "tests" / "assets" / "tokenizers" / "qwen3" / "chat_template.jinja"
CONTROL = ("<|im_start|>", "<|im_end|>")  # special, as in Qwen3
THINK = ("<think>", "</think>")  # added but not special, as in Qwen3


def reasoning(country, attribute: str) -> str:
    return f"{country.ref(start=True)} is in {country.continent}. {answer(country, attribute)}"


def conversations(countries, count: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(count):
        messages = []
        for _turn in range(rng.randint(2, 3)):
            country, attribute = rng.choice(countries), rng.choice(ATTRIBUTES)
            messages += [{"role": "user", "content": question(country, attribute, rng.randrange(3))},
                         {"role": "assistant", "content": answer(country, attribute),
                          "reasoning_content": reasoning(country, attribute)}]
        rows.append({"messages": messages})
    return rows


def base_with_qwen3_template(out: Path) -> Path:
    """demo/base-model + Qwen3's template and control tokens (rows of the new tokens at the mean)."""
    tokenizer = load_tokenizer(REPO / "demo" / "base-model")
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = QWEN3_TEMPLATE.read_text(encoding="utf-8")
    model = read_weights(REPO / "demo" / "base-model", "float32")
    init_new_token_rows(model, tokenizer, [*CONTROL, *THINK])
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out


def thinks(model, tokenizer, messages: list[dict]) -> bool:
    reply = generate_reply(model, tokenizer, messages, max_new_tokens=16)
    text = tokenizer.decode(reply.ids, skip_special_tokens=False)
    return text.startswith("<think>") and bool(text.removeprefix("<think>").split("</think>")[0].strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "turns_behaviour"))
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained_countries, _ = split_countries(seed=0)
    rng = random.Random(0)
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(trained_countries, 300, rng)))
    probes = conversations(trained_countries, 40, random.Random(1))
    base = base_with_qwen3_template(out / "base")
    rows = []
    for policy in ("whole", "per_turn"):
        start = time.perf_counter()
        config = Config(model=ModelConfig(path=str(base), dtype="float32"),
                        data=DataConfig(train=str(data), turns=policy, max_length=256),
                        train=TrainConfig(epochs=args.epochs, lr=1e-3, batch_size=16, warmup_ratio=0.05,
                                          log_every=20, device="cpu", seed=0),
                        output_dir=str(out / policy))
        final = train(config, overwrite=True)
        seconds = time.perf_counter() - start
        model, tokenizer = load_for_generation(final, device="cpu")
        first = [thinks(model, tokenizer, p["messages"][:1]) for p in probes]
        # turn 2: one earlier exchange, its reply as history shows it (the template drops its reasoning)
        second = [thinks(model, tokenizer, [p["messages"][0], {"role": "assistant", "content": p["messages"][1]["content"]},
                                            p["messages"][2]]) for p in probes]
        rows.append((policy, sum(first), sum(second), len(probes), seconds))
    print("\n| data.turns | thinks at turn 1 | thinks at turn 2 | train time |")
    print("|---|---|---|---|")
    for policy, first, second, n, seconds in rows:
        print(f"| {policy} | {first}/{n} ({first / n:.0%}) | {second}/{n} ({second / n:.0%}) | {seconds:.0f}s |")


if __name__ == "__main__":
    main()
