"""Peak memory and throughput of full fine-tuning vs LoRA vs QLoRA: same model, same data, same steps.

    .venv/bin/python bench/memory.py                  # Qwen2-shaped, hidden 512, 4 layers, 20 steps
    .venv/bin/python bench/memory.py --quick          # hidden 256, 6 steps: a smoke run
    .venv/bin/python bench/memory.py --hidden 384 --steps 30 --device cuda
    .venv/bin/python bench/memory.py --threads 1      # steadier tokens/s on a busy shared CPU

The model is Qwen2's real architecture config (`tests/assets/configs/qwen2.json`, tied embeddings)
shrunk to `--hidden` / `--layers`, random weights, with the real Qwen2.5 tokenizer and its template,
so the 151,665-row embedding matrix is most of the parameters, as it is in small real models. The
data is `tests/assets/data/chat_messages.jsonl` (10 varied conversations), batch 4, max length 512.

Each configuration runs in its own Python process (`--child KIND`), so each peak is its own:

  full    every weight trains (AdamW: gradient + two moments per weight)
  lora    `lora.enabled=true`, r 16 on all linear layers of the blocks; the base is frozen
  qlora   the same with the base in 4-bit NF4 (`lora.quantize=nf4`): CUDA + bitsandbytes only;
          elsewhere its row says why it did not run (the error `sftkit train` gives)

Each child builds the run with sftkit's own recipe (`setup_model`, `setup_data`, `setup_optimizer`)
and runs `--steps` optimizer steps of the same loop as `sftkit train` (no eval, no checkpoints).
Memory on CPU is the process's peak resident set (`ru_maxrss`), shown whole and minus the resident
set right after the imports (`train MB`: model + optimizer + activations); on CUDA it is
`torch.cuda.max_memory_allocated`. Throughput is input tokens per second over the steps after the
first. Ratios are against `full`. On a shared machine, tokens/s moves with the load average printed
in the header; memory does not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets"
QWEN2_CONFIG = ASSETS / "configs" / "qwen2.json"
TOKENIZER = ASSETS / "tokenizers" / "qwen2.5"
DATA = ASSETS / "data" / "chat_messages.jsonl"
KINDS = {
    "full": [],
    "lora": ["lora.enabled=true", "lora.r=16", "lora.alpha=32"],
    "qlora": ["lora.enabled=true", "lora.r=16", "lora.alpha=32", "lora.quantize=nf4"],
}


def rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one configuration, in its own process ---------------------------------------------------------
def child(kind: str, model_dir: Path, steps: int, device_name: str, threads: int | None) -> dict:
    """Train `steps` steps of configuration `kind`; return its figures (or why it could not run)."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from sftkit.config import ConfigError
    from sftkit.recipe import load_config
    from sftkit.data.batches import collate, window
    from sftkit.model import count_parameters, resolve_device
    from transformers import set_seed

    from sftkit.data.templates import pad_token_id
    from sftkit.train import backward_window, setup_data, setup_model, setup_optimizer

    base_rss = rss_mb()
    overrides = [f"model.path={model_dir}", f"data.train={DATA}", "data.max_length=512", "model.dtype=float32",
                 "train.batch_size=4", "train.lr=1e-4", f"train.max_steps={steps}", f"train.device={device_name}",
                 *KINDS[kind]]
    config = load_config(None, overrides)
    device = resolve_device(device_name)
    set_seed(0)
    try:
        model, tokenizer, _ = setup_model(config, device)
    except ConfigError as err:
        return {"kind": kind, "skipped": str(err)}
    examples = setup_data(config, tokenizer)[0].examples
    optimizer, _ = setup_optimizer(model, config.train, steps)
    trainable, total = count_parameters(model)
    pad = pad_token_id(tokenizer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    tokens, start = 0, 0.0
    for step in range(steps):
        if step == 1:  # the first step pays for allocations and kernel selection: not timed
            tokens, start = 0, time.perf_counter()
        _, micro = window(len(examples), step, batch_size=4, grad_accum=1, seed=0)
        batches = [collate([examples[i] for i in ids], pad) for ids in micro]
        loss_sum, n_trained = backward_window(model, batches)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sum(int(b["attention_mask"].sum()) for b in batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    row = {"kind": kind, "device": str(device), "trainable": trainable, "total": total,
           "tokens_per_s": tokens / seconds, "loss": loss_sum / max(n_trained, 1)}
    if device.type == "cuda":
        row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row["peak_mb"], row["train_mb"] = peak_rss_mb(), peak_rss_mb() - base_rss
    return row


# -- the parent: one model, one subprocess per configuration, one table -----------------------------
def build_model(out: Path, hidden: int, layers: int) -> Path:
    from sftkit.checkpoint import save_tiny_model

    heads = hidden // 64
    return save_tiny_model(QWEN2_CONFIG, TOKENIZER, out, layers=layers, hidden=hidden, heads=heads,
                           kv_heads=max(1, heads // 4), intermediate=hidden * 11 // 4)


def run_child(kind: str, model_dir: Path, steps: int, device: str, threads: int | None) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--model", str(model_dir), "--steps", str(steps),
               "--device", device] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"kind": kind, "skipped": f"failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    """Rows of figures with ratios against the `full` row."""
    full = next((r for r in rows if r["kind"] == "full" and "skipped" not in r), None)

    def ratio(row: dict, key: str) -> str:
        return f"{row[key] / full[key]:.2f}x" if full and key in row and key in full and full[key] else "-"

    on_cuda = any(r.get("device", "").startswith("cuda") for r in rows)
    memory = "peak alloc MB" if on_cuda else "peak RSS MB"
    head = (f"{'config':<7} {'trainable':>12} {'total':>12} {memory:>13} {'ratio':>6} {'train MB':>9} {'ratio':>6} "
            f"{'tokens/s':>9} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for row in rows:
        if "skipped" in row:
            reason = row["skipped"]
            short = "needs CUDA" if "CUDA" in reason else "did not run"
            lines.append(f"{row['kind']:<7} {short}: {reason}")
            continue
        train_mb = f"{row['train_mb']:>9.0f}" if "train_mb" in row else f"{'-':>9}"
        lines.append(f"{row['kind']:<7} {row['trainable']:>12,} {row['total']:>12,} {row['peak_mb']:>13.0f} "
                     f"{ratio(row, 'peak_mb'):>6} {train_mb} {ratio(row, 'train_mb'):>6} "
                     f"{row['tokens_per_s']:>9.0f} {ratio(row, 'tokens_per_s'):>6}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads per run (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="hidden 256, 6 steps")
    parser.add_argument("--child", choices=list(KINDS), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.steps, args.device, args.threads)))
        return
    if args.quick:
        args.hidden, args.steps = 256, 6
    with tempfile.TemporaryDirectory(prefix="sftkit-memory-") as tmp:
        model_dir = build_model(Path(tmp) / "qwen2", args.hidden, args.layers)
        print(f"Qwen2-shaped: hidden {args.hidden}, {args.layers} layers, Qwen2.5 tokenizer; {args.steps} steps of "
              f"batch 4 from {DATA.name}; device {args.device}; threads {args.threads or 'default'}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        rows = []
        for kind in KINDS:
            rows.append(run_child(kind, model_dir, args.steps, args.device, args.threads))
            print(f"  {kind}: done", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
