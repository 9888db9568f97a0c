"""The prepared GPU check: sftkit vs TRL on Qwen2.5-0.5B- and Llama-3.2-1B-shaped random models, bf16.

    bash bench/gpu/run.sh                                        # on the GPU machine (one device-tool call)
    .venv/bin/python bench/gpu/driver.py --dry-run --out /tmp/g  # CPU, tiny shapes, the same code path

For each model shape, four runs of `bench/train_throughput.py` (each in its own process, so each
CUDA peak is its own): sftkit and TRL `SFTTrainer`, padding-free (TRL with its default loss, the
chunked `nll` Triton kernel, its best on CUDA: it refuses Liger's fused cross-entropy), full
fine-tuning and LoRA (r 16, every linear layer of the blocks), bf16, sdpa attention, the same data in
the same order. Each prints tokens/s, peak memory, final loss and MFU against a measured bf16
matmul rate. Before them: a packed-vs-unpacked check (the summed loss of a few documents packed into
one row, sftkit's padding-free batch, against each document alone, in fp32 and bf16, on the GPU);
`bench/profile_step.py` over three sftkit steps of the first shape (kernel time by kind, and how busy
the GPU is); `bench/loss_memory.py` at the issue's sizes (4k / 16k tokens x 152k / 262k vocabulary,
hidden 2048, bf16). Everything lands in `--out` as it finishes (summary.txt at the end, one file per
run), so a run cut by the device's time limit keeps what it did.

Data: synthetic conversations (user and assistant turns of random lengths, words drawn from the text
of tests/assets/data), rendered with the real Qwen2.5 tokenizer and template; the Llama-3.2-1B body
gets the same tokenizer (vocabulary 151,665 rather than Llama's 128,256: no Llama tokenizer travels
with the repository).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
ASSETS = REPO / "tests" / "assets"
CONFIGS = ["sftkit padding-free", "TRL padding-free", "sftkit LoRA padding-free", "TRL LoRA padding-free"]
REAL = {"models": ["qwen2.5-0.5b", "llama3.2-1b"], "device": "cuda", "dtype": "bfloat16", "examples": 320,
        "steps": 30, "log_every": 5, "max_length": 2048, "eval_batches": 2, "words": (40, 900),
        "loss": ["--hidden", "2048"]}
DRY = {"models": ["tiny-qwen2", "tiny-llama"], "device": "cpu", "dtype": "float32", "examples": 24,
       "steps": 4, "log_every": 2, "max_length": 256, "eval_batches": 1, "words": (5, 60),
       "loss": ["--tokens", "64", "--vocab", "4096", "--hidden", "32", "--methods", "sftkit", "trl", "plain"]}


def conversations(n: int, words: tuple[int, int], seed: int) -> list[dict]:
    """`n` conversations of 1-3 exchanges, turns of random lengths made of the assets' own words."""
    text = " ".join((ASSETS / "data" / name).read_text(encoding="utf-8") for name in ("pretrain.txt", "pretrain.md"))
    vocabulary = [w for w in text.split() if w.isprintable()]
    rng = random.Random(seed)

    def turn(low: int, high: int) -> str:
        start = rng.randrange(len(vocabulary))
        return " ".join(vocabulary[(start + i) % len(vocabulary)] for i in range(rng.randint(low, high)))

    rows = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": turn(words[0] // 2, words[1] // 4)})
            messages.append({"role": "assistant", "content": turn(words[0], words[1] // 2)})
        rows.append({"messages": messages})
    return rows


def prepare(work: Path, models: list[str], n_train: int, words: tuple[int, int], dtype: str) -> None:
    """The files `train_throughput.prepare` looks for: train/eval JSONL and one model directory per shape."""
    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, str(BENCH))
    import train_throughput as tt

    from sftkit.model import build_tiny_model

    work.mkdir(parents=True, exist_ok=True)
    for name, n, seed in ((f"train-{n_train}.jsonl", n_train, 0), (f"eval-{n_train}.jsonl", tt.EVAL_EXAMPLES, 1)):
        tt.write_jsonl(work / name, conversations(n, words, seed))
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "qwen2.5")
    tokenizer.save_pretrained(work / "model")  # train_throughput.prepare checks for the tiny model's directory
    for model_name in models:
        config_name, shape = tt.MODELS[model_name]
        start = time.perf_counter()
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: seconds
            model = build_tiny_model(ASSETS / "configs" / config_name, tokenizer, **shape,
                                     overrides={"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id})
        model.to(getattr(torch, dtype)).save_pretrained(work / f"model-{model_name}")
        tokenizer.save_pretrained(work / f"model-{model_name}")
        print(f"{model_name}: {sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters, built in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        del model


def packed_check(work: Path, model_name: str, device: str, n_docs: int = 6) -> str:
    """The summed loss of `n_docs` documents in one padding-free row vs each alone, fp32 and bf16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkit.config import DataConfig
    from sftkit.data.batches import collate, collate_documents
    from sftkit.data.load import load_data
    from sftkit.data.templates import prepare_tokenizer
    from sftkit.loss import token_loss_sum

    model_dir = work / f"model-{model_name}"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepare_tokenizer(tokenizer)
    train = next(work.glob("train-*.jsonl"))
    examples = load_data(DataConfig(train=[str(train)], max_length=1024), tokenizer, 0)[0].examples[:n_docs]
    pad = tokenizer.pad_token_id
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
        with torch.no_grad():
            alone = sum(float(token_loss_sum(model, {k: v.to(device) for k, v in collate([ex], pad).items()}))
                        for ex in examples)
            packed = float(token_loss_sum(model, {k: v.to(device) for k, v in
                                                  collate_documents([examples], pad).items()}))
        tokens = sum(len(ex.input_ids) for ex in examples)
        out.append(f"{str(dtype).split('.')[-1]}: alone {alone:.4f}, packed {packed:.4f}, "
                   f"relative difference {abs(packed - alone) / abs(alone):.1e}")
        del model
    return f"{model_name} packed vs unpacked loss ({n_docs} documents, {tokens} tokens in one row): " + "; ".join(out)


def run(command: list[str], log: Path, timeout: int) -> str:
    """Run `command`, its output into `log` (and echoed); return the output."""
    print("$ " + " ".join(command), flush=True)
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # its own process group: a timeout ends its workers too
    try:
        stdout, stderr = child.communicate(timeout=timeout)
        output = stdout + (f"\n[exit {child.returncode}]\n{stderr[-3000:]}" if child.returncode else "")
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, _ = child.communicate()
        output = f"{stdout}\n[timed out after {timeout} s]"
    log.write_text(output)
    print(output, flush=True)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the logs and summary.txt go")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sftkit-gpu-work"), help="models and data")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few steps: proves it starts")
    parser.add_argument("--models", nargs="+", help="model shapes (default: both)")
    parser.add_argument("--timeout", type=int, help="seconds per model's four runs (170 on the GPU, 900 dry)")
    args = parser.parse_args()
    plan = DRY if args.dry_run else REAL
    models = args.models or plan["models"]
    args.timeout = args.timeout or (900 if args.dry_run else 170)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepare(args.work, models, plan["examples"], plan["words"], plan["dtype"])
    summary = []
    for model_name in models:
        try:
            summary.append(packed_check(args.work, model_name, plan["device"]))
        except Exception as err:  # noqa: BLE001 - the summary says what failed; the runs go on
            summary.append(f"{model_name} packed vs unpacked loss: failed: {type(err).__name__}: {err}")
        print(summary[-1], flush=True)
    # the quick diagnostics first (each lands in --out as it finishes): where a step's time goes, the loss alone
    output = run([sys.executable, str(BENCH / "profile_step.py"), "--workdir", str(args.work), "--model", models[0],
                  "--device", plan["device"], "--dtype", plan["dtype"], "--max-length", str(plan["max_length"]),
                  "--examples", str(plan["examples"]), "--steps", "3", "--rows", "30"],
                 args.out / "profile.txt", args.timeout)
    summary.append(f"== where one sftkit step's time goes ({models[0]}) ==\n" + "\n".join(
        line for line in output.splitlines() if re.search(r"\s[0-9.]+ s\s+[0-9.]+%$", line) or " steps, " in line
        or "per optimizer step" in line))  # host syncs and operators per step (the launch-bound suspects)
    output = run([sys.executable, str(BENCH / "loss_memory.py"), "--device", plan["device"], "--dtype", plan["dtype"],
                  *plan["loss"]], args.out / "loss_memory.txt", args.timeout)
    summary.append("== loss alone ==\n" + output.strip())
    for model_name in models:
        output = run([sys.executable, str(BENCH / "train_throughput.py"), "--workdir", str(args.work), "--examples",
                      str(plan["examples"]), "--model", model_name, "--device", plan["device"], "--dtype", plan["dtype"],
                      "--max-steps", str(plan["steps"]), "--log-every", str(plan["log_every"]), "--max-length",
                      str(plan["max_length"]), "--eval-batches", str(plan["eval_batches"]), "--configs", *CONFIGS],
                     args.out / f"throughput-{model_name}.txt", args.timeout)
        table = output[output.find("configuration"):] if "configuration" in output else output[-1500:]
        summary.append(f"== {model_name} ==\n{table.strip()}")
    summary.append(f"whole check: {time.perf_counter() - started:.0f} s")
    (args.out / "summary.txt").write_text("\n\n".join(summary) + "\n")
    print("\n\n".join(summary), flush=True)


if __name__ == "__main__":
    main()
