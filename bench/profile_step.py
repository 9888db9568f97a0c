"""Where one sftkit training step spends its time: torch.profiler over a few optimizer steps.

    .venv/bin/python bench/profile_step.py                          # the train_throughput tiny model, padding-free
    .venv/bin/python bench/profile_step.py --model qwen2-100m --steps 2
    .venv/bin/python bench/profile_step.py --batching padded --rows 30
    python3 bench/profile_step.py --workdir /tmp/sftkit-gpu-work --model qwen2.5-0.5b --device cuda --dtype bfloat16 \
        --max-length 2048 --examples 320      # on the GPU (bench/gpu/driver.py runs this after its tables)

The model and data are `bench/train_throughput.py`'s (its work directory, made by it if missing); the
step is sftkit's own (`setup_model`, `setup_data`, `setup_optimizer`, `backward_window`, clipping,
AdamW), the same as `sftkit train` without logging. One warm-up step, then `--steps` profiled steps.
Prints the top operators by self time and the time grouped by what it is for (on CUDA: the kernels'
device time, and the wall time per step, so the share the GPU sits idle waiting for Python shows).
"""

from __future__ import annotations

import argparse
import sys
import time
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-length", type=int, default=tt.MAX_LENGTH)
    args = parser.parse_args()

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from sftkit.data.batches import Batcher
    from sftkit.data.templates import pad_token_id
    from sftkit.recipe import config_from_dict
    from sftkit.train import backward_window, setup_data, setup_model, setup_optimizer

    paths = tt.prepare(args.workdir, args.examples, args.model)
    config = config_from_dict({
        "model": {"path": paths["model"], "dtype": args.dtype},
        "data": {"train": paths["train"], "max_length": args.max_length, "batching": args.batching},
        "train": {"batch_size": tt.BATCH, "lr": tt.LR, "max_steps": args.steps + 1, "device": args.device},
        "output_dir": str(args.workdir / "profile"),
    })
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
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
    sync()
    started = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        tokens = sum(step(i + 1) for i in range(args.steps))
        sync()
    wall = time.perf_counter() - started
    events = prof.key_averages()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    # on CUDA a kernel's time appears twice, as the kernel and as the operator that launched it: the total is
    # the kernels', the groups the operators' (a Triton kernel launched from Python has no operator: "other")
    total = sum(own(e) for e in events if not cuda or e.device_type == DeviceType.CUDA)
    events_by_op = [e for e in events if e.device_type == DeviceType.CPU]
    print(f"{args.model}, {args.batching}, {args.device} {args.dtype}, {args.steps} steps, {tokens} input tokens, "
          f"torch threads {torch.get_num_threads()}: {total / 1e6:.2f} s of {'kernel' if cuda else 'operator'} "
          f"self time in {wall:.2f} s of wall time (profiled){'; the GPU is busy ' if cuda else ''}"
          f"{f'{total / 1e6 / wall:.0%} of it' if cuda else ''}")
    print(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=args.rows))
    grouped: dict[str, float] = defaultdict(float)
    for event in events_by_op:
        group = next((g for g, keys in GROUPS if any(k in event.key for k in keys)), "other")
        grouped[group] += own(event)
    if cuda:
        grouped["other"] = max(0.0, total - sum(v for g, v in grouped.items() if g != "other"))
    for group, micros in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"  {group:32} {micros / 1e6:7.2f} s  {micros / total:6.1%}")


if __name__ == "__main__":
    main()
