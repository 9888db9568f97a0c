"""Where one sftkit training step spends its time: torch.profiler over a few optimizer steps.

    .venv/bin/python bench/profile_step.py                          # the train_throughput tiny model, padding-free
    .venv/bin/python bench/profile_step.py --model qwen2-100m --steps 2
    .venv/bin/python bench/profile_step.py --batching padded --rows 30

The model and data are `bench/train_throughput.py`'s (its work directory, made by it if missing); the
step is sftkit's own (`setup_model`, `setup_data`, `setup_optimizer`, `backward_window`, clipping,
AdamW), the same as `sftkit train` without logging. One warm-up step, then `--steps` profiled steps.
Prints the top operators by self time and the time grouped by what it is for.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt

GROUPS = [  # (group, substrings of operator names), the first that matches
    ("matmul (linear layers, head)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention (sdpa)", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("optimizer (fused AdamW)", ("adam",)),
    ("softmax / exp / log (loss)", ("aten::exp", "aten::log", "aten::amax", "aten::sub_", "aten::div_", "softmax")),
    ("norms, activations, rotary", ("silu", "rsqrt", "aten::pow", "aten::mean", "aten::mul", "aten::add", "aten::neg",
                                    "aten::cat", "aten::sigmoid")),
    ("copies, indexing, layout", ("copy_", "index", "gather", "scatter", "clone", "contiguous", "aten::to",
                                  "embedding", "masked", "nonzero", "aten::where", "aten::fill_", "zero_")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(tt.MODELS), default="tiny")
    parser.add_argument("--batching", default="padding_free", choices=["padded", "padding_free", "packed"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="operators listed")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sftkit-bench-train"))
    parser.add_argument("--examples", type=int, default=240)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from sftkit.data.batches import Batcher
    from sftkit.data.templates import pad_token_id
    from sftkit.recipe import config_from_dict
    from sftkit.train import backward_window, setup_data, setup_model, setup_optimizer

    paths = tt.prepare(args.workdir, args.examples, args.model)
    config = config_from_dict({
        "model": {"path": paths["model"], "dtype": "float32"},
        "data": {"train": paths["train"], "max_length": tt.MAX_LENGTH, "batching": args.batching},
        "train": {"batch_size": tt.BATCH, "lr": tt.LR, "max_steps": args.steps + 1, "device": "cpu"},
        "output_dir": str(args.workdir / "profile"),
    })
    device = torch.device("cpu")
    model, tokenizer, _ = setup_model(config, device)
    examples = setup_data(config, tokenizer)[0].examples
    batcher = Batcher.from_config(examples, pad_token_id(tokenizer), config.data, config.train, 1)
    optimizer, _ = setup_optimizer(model, config.train, args.steps + 1)
    model.train()

    def step(i: int) -> int:
        _, batches, _ = batcher.batches(i)
        backward_window(model, batches)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(int(b["attention_mask"].sum()) for b in batches)

    step(0)  # warm-up: allocations, kernel choices
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tokens = sum(step(i + 1) for i in range(args.steps))
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.model}, {args.batching}, {args.steps} steps, {tokens} input tokens, torch threads "
          f"{torch.get_num_threads()}: {total / 1e6:.2f} s of operator self time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    grouped: dict[str, float] = defaultdict(float)
    for event in events:
        group = next((g for g, keys in GROUPS if any(k in event.key for k in keys)), "other")
        grouped[group] += event.self_cpu_time_total
    for group, micros in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"  {group:32} {micros / 1e6:7.2f} s  {micros / total:6.1%}")


if __name__ == "__main__":
    main()
