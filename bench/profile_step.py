"""Where one sftkit training step spends its time: torch.profiler over a few optimizer steps.

    .venv/bin/python bench/profile_step.py                          # the train_throughput tiny model, padding-free
    .venv/bin/python bench/profile_step.py --model qwen2-100m --steps 2
    .venv/bin/python bench/profile_step.py --batching padded --rows 30
    .venv/bin/python bench/profile_step.py --tool trl --steps 2                  # TRL's SFTTrainer step, the same way
    python3 bench/profile_step.py --workdir /tmp/sftkit-gpu-work --model qwen2.5-0.5b --device cuda --dtype bfloat16 \
        --max-length 2048 --examples 320      # on the GPU (bench/gpu/driver.py runs this after its tables)

The model and data are `bench/train_throughput.py`'s (its work directory, made by it if missing); the
step is sftkit's own (`setup_model`, `setup_data`, `setup_optimizer`, `backward_pass`, clipping, the
one read-back of `finish_window`, AdamW), the same as `sftkit train` without logging; with `--tool trl`
it is TRL's `SFTTrainer` (train_throughput's settings, no logging inside the profiled steps), profiled
from the end of its first step to the end of step 1 + `--steps`. One warm-up step, then `--steps`.
Prints the top operators by self time and the time grouped by what it is for (on CUDA: the kernels'
device time, and the wall time per step, so the share the GPU sits idle waiting for Python shows),
then per optimizer step the host syncs and the operators (`count_syncs`), on CPU too: a launch-bound
GPU step pays a whole pipeline drain for each sync, and about one kernel launch per operator.
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


def count_syncs(events: list, tolist_calls: int) -> dict[str, int]:
    """Host syncs and operator calls among the profiler's `events` (one per call).

    A sync is a read of a tensor's values by the host, which on a GPU waits until every kernel queued
    before it has run. `.item()`, `float()`, `int()` and `bool()` of a tensor are one
    `aten::_local_scalar_dense` call each, on the CPU as on CUDA; `aten::nonzero` (boolean-mask
    indexing, `.nonzero()`) reads how many elements are True, a sync on CUDA that is not a
    `_local_scalar_dense`. `.tolist()` of a CPU tensor reads its memory without any operator (checked:
    it records nothing), so it is counted by wrapping `torch.Tensor.tolist` (`tolist_calls`). On CPU
    these count every such read, whatever tensor it reads; sftkit reads a batch's structure with numpy
    before the batch moves (no operator either), so what is counted is what would sync on a GPU.
    "operators" is every `aten::` call (nested ones included): a proxy for kernel launches on a GPU.
    """
    names = [e.name for e in events]
    return {"local_scalar_dense": names.count("aten::_local_scalar_dense"), "nonzero": names.count("aten::nonzero"),
            "tolist": tolist_calls, "operators": sum(n.startswith("aten::") for n in names),
            "in_optimizer": sum(e.name == "aten::_local_scalar_dense" and _in_optimizer(e) for e in events)}


def _in_optimizer(event: object) -> bool:
    """Whether `event` ran inside `optimizer.step()`: the CPU kernel of fused AdamW reads each parameter's step
    count with `.item()` (`aten::_fused_adamw_` -> `aten::item`); its CUDA kernel keeps them on the GPU."""
    parent = getattr(event, "cpu_parent", None)
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return True
        parent = parent.cpu_parent
    return False


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
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--tool", default="sftkit", choices=["sftkit", "trl"])
    args = parser.parse_args()

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from sftkit.data.batches import Batcher, input_token_count
    from sftkit.data.templates import pad_token_id
    from sftkit.faults import gradient_norm_tensor
    from sftkit.recipe import config_from_dict
    from sftkit.train import backward_pass, setup_data, setup_model, setup_optimizer

    paths = tt.prepare(args.workdir, args.examples, args.model)
    config = config_from_dict({
        "model": {"path": paths["model"], "dtype": args.dtype},
        "data": {"train": paths["train"], "max_length": args.max_length, "batching": args.batching},
        "train": {"batch_size": tt.BATCH, "lr": tt.LR, "max_steps": args.steps + 1, "device": args.device,
                  "grad_accum": args.grad_accum},
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

    def step(i: int) -> int:  # as `sftkit.train.loop`: the window's backward, clipping, ONE read-back, AdamW
        _, batches, _ = batcher.batches(i)
        window = backward_pass(model, batches)
        grad_norm = gradient_norm_tensor(model.parameters(), 1.0)
        window.read_back(grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(input_token_count(b) for b in batches)

    tolist_calls = [0]
    tolist = torch.Tensor.tolist

    def counted_tolist(self: torch.Tensor) -> object:
        tolist_calls[0] += 1
        return tolist(self)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities)
    torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign]
    try:
        if args.tool == "trl":
            tokens, wall = profile_trl(args, paths, prof, sync, tolist_calls)
        else:
            step(0)  # warm-up: allocations, kernel choices
            sync()
            tolist_calls[0] = 0
            started = time.perf_counter()
            with prof:
                tokens = sum(step(i + 1) for i in range(args.steps))
                sync()
            wall = time.perf_counter() - started
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    events = prof.key_averages()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    # on CUDA a kernel's time appears twice, as the kernel and as the operator that launched it: the total is
    # the kernels', the groups the operators' (a Triton kernel launched from Python has no operator: "other")
    total = sum(own(e) for e in events if not cuda or e.device_type == DeviceType.CUDA)
    events_by_op = [e for e in events if e.device_type == DeviceType.CPU]
    print(f"{'TRL ' if args.tool == 'trl' else ''}{args.model}, {args.batching}, {args.device} {args.dtype}, {args.steps} steps, {tokens} input tokens, "
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
    counts = count_syncs(prof.events(), tolist_calls[0])
    scalars = counts["local_scalar_dense"] - counts["in_optimizer"]
    syncs = scalars + counts["nonzero"] + counts["tolist"]
    inside = counts["in_optimizer"] / args.steps
    print(f"host syncs per optimizer step: {syncs / args.steps:g} ({scalars / args.steps:g} item/float/int/bool, "
          f"{counts['nonzero'] / args.steps:g} nonzero, {counts['tolist'] / args.steps:g} tolist; grad_accum "
          f"{args.grad_accum}" + (f"; besides {inside:g} item inside the optimizer: the CPU kernel of fused AdamW "
                                  "reads each parameter's step count, the CUDA kernel does not)" if inside else ")"))
    print(f"operators per optimizer step: {counts['operators'] / args.steps:g}")


def profile_trl(args: argparse.Namespace, paths: dict[str, str], prof: object, sync: object,
                tolist_calls: list[int]) -> tuple[int, float]:
    """TRL's SFTTrainer on the same model and data (train_throughput's settings for `--batching`), profiled from
    the end of its first optimizer step to the end of step 1 + `--steps`: (input tokens, wall seconds);
    `tolist_calls` holds the calls of that window only."""
    import numpy as np
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    settings = {"padded": {}, "padding_free": {"padding_free": True, "max_length": None},
                "packed": {"packing": True, "packing_strategy": "bfd"}}[args.batching]
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    dataset = load_dataset("json", data_files=paths["train"], split="train")
    config = SFTConfig(
        output_dir=str(args.workdir / "profile-trl"), per_device_train_batch_size=tt.BATCH,
        gradient_accumulation_steps=args.grad_accum, learning_rate=tt.LR, adam_beta2=0.95, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch_fused", assistant_only_loss=True, gradient_checkpointing=False,
        bf16=args.dtype == "bfloat16", use_cpu=args.device == "cpu", logging_steps=10_000, save_strategy="no",
        report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True, max_steps=args.steps + 1,
        **{"max_length": args.max_length, **settings})
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=dataset)
    tokens, clock, counted = [0], [0.0, 0.0], [0]
    collator = trainer.data_collator

    def counting(examples: list) -> dict:  # numpy: no torch operator of its own in the profile
        batch = collator(examples)
        real = batch.get("attention_mask", batch["input_ids"])
        tokens[0] += int(np.count_nonzero(real.numpy())) if "attention_mask" in batch else real.numel()
        return batch

    class Window(TrainerCallback):
        def on_step_end(self, train_args: object, state: object, control: object, **kwargs: object) -> None:
            if state.global_step == 1:
                sync()
                tokens[0], tolist_calls[0] = 0, 0
                clock[0] = time.perf_counter()
                prof.start()
            elif state.global_step == 1 + args.steps:
                sync()
                prof.stop()
                clock[1], counted[0] = time.perf_counter(), tolist_calls[0]

    trainer.data_collator = counting
    trainer.add_callback(Window())
    trainer.train()
    tolist_calls[0] = counted[0]
    return tokens[0], clock[1] - clock[0]


if __name__ == "__main__":
    main()
