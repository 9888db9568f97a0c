"""sftkit vs TRL SFTTrainer: training throughput, memory and loss on the same model, data and settings.

    .venv/bin/python bench/train_throughput.py                 # 2,000 examples, one epoch per configuration
    .venv/bin/python bench/train_throughput.py --quick         # 240 examples: a smoke run (a few minutes)
    .venv/bin/python bench/train_throughput.py --configs "sftkit packed" "TRL packed (BFD)"

The same for every configuration: a tiny random Llama (the llama3.2 config shrunk to hidden 256,
4 layers, 4 heads / 2 KV heads, MLP 768, tied embeddings: 5.2M parameters) with an 8,200-token
byte-level BPE trained here from the Qwen2.5 tokenizer on the conversations themselves (keeping
Qwen2.5's chat template, which TRL recognises and swaps for its `{% generation %}` version);
real conversations from shared/data/instructions (FastChat, LIMA, OASST en/zh, glaive tool calls)
that fit in 512 tokens (mean about 190), shuffled with seed 0: the first `--examples` train, the
next 100 evaluate; max_length 512, batch 8, one epoch, AdamW (fused, betas 0.9/0.95, lr 1e-3,
no weight decay), 3% warm-up then cosine, clip 1.0, assistant-only loss, float32 on CPU.

Padded and padding-free, both tools see the same examples in the same order: sftkit's seeded epoch
order (`SFTKIT_BENCH_SEED`, default 0), given to TRL pre-ordered with its sequential sampler, so the
final losses compare the tools and not two shuffles. Packed rows differ, so TRL shuffles its own.
TRL's masks also train two template tokens per reply that sftkit leaves out (the `\n` ending the
generation prompt and the one after `<|im_end|>`); `--trl-same-labels` gives TRL sftkit's tokenized
examples instead, so both train exactly the same tokens (a check of the training itself).

Configurations, interleaved sftkit / TRL, each in its own subprocess of this one (so its peak RSS
is its own, read with wait4):
  sftkit padded / padding-free / packed   `sftkit.train.train` with data.batching=padding_free / packed
  TRL padded / padding-free / packed (BFD) `SFTTrainer` with padding_free / packing (gradient
                                           checkpointing off: TRL's default, on, is slower)
  TRL packed (wrapped)                     packing_strategy="wrapped": documents attend across each other
                                           and are cut at row ends; shown for honesty, never "best"

Throughput leaves out the first 10 optimizer steps (warm-up); trained tokens carry loss, input
tokens are all non-pad tokens. "final loss" is the token-weighted loss on the 100 held-out
conversations after training, computed by the same function (`sftkit.evaluate.perplexity.eval_loss`) for both.
On CUDA it also prints MFU against a measured bf16 matmul rate (written for CUDA, untested: the
machine this was written on has no GPU). The last line is `sftkit/TRL trained tokens/s ratio:
X.XX`: sftkit's best configuration against TRL's best that keeps documents apart.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
INSTRUCTIONS = SHARED / "instructions"
SOURCES = ("fastchat_dummy_conversation.json", "fastchat_dummy_conversation_with_system.json",
           "lima_llamafactory.json", "oasst1_sft_zh_llamafactory.json", "oasst_en_100_trees.jsonl",
           "llamafactory_glaive_toolcall_en_demo.json")
MAX_LENGTH, BATCH, LR, WARMUP, EVAL_EXAMPLES, SKIP_STEPS, VOCAB = 512, 8, 1e-3, 0.03, 100, 10, 8192
SEED = int(os.environ.get("SFTKIT_BENCH_SEED", "0"))  # the data order of both tools (the model is the same)
CONFIGS = {  # name -> (tool, settings); the order is the run order (interleaved)
    "sftkit padded": ("sftkit", {}),
    "TRL padded": ("trl", {}),
    "sftkit padding-free": ("sftkit", {"padding_free": True}),
    "TRL padding-free": ("trl", {"padding_free": True, "max_length": None}),  # TRL's rule; every example fits
    "sftkit packed": ("sftkit", {"packing": True}),
    "TRL packed (BFD)": ("trl", {"packing": True, "packing_strategy": "bfd"}),
    "TRL packed (wrapped)": ("trl", {"packing": True, "packing_strategy": "wrapped"}),
}
CROSSES = {"TRL packed (wrapped)"}  # documents attend across each other
PAIRS = [("sftkit padded", "TRL padded"), ("sftkit padding-free", "TRL padding-free"),
         ("sftkit packed", "TRL packed (BFD)")]


# -- data, tokenizer, model (made once per work directory) ---------------------------------------
def first_dir(*candidates: Path) -> Path:
    return next((c for c in candidates if c.exists()), candidates[-1])


def conversation_rows() -> list[dict]:
    """Every source as `messages` rows (tools as a JSON string, which both tools read), shuffled."""
    from sftkit.data.formats import load_records

    rows = []
    for name in SOURCES:
        for record in load_records(INSTRUCTIONS / name).records:
            row = {"messages": record.as_template_dicts()}
            if record.tools:
                row["tools"] = json.dumps(record.tools, ensure_ascii=False)
            rows.append(row)
    random.Random(0).shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def prepare(work: Path, n_train: int) -> dict[str, str]:
    """Tokenizer, model and the train/eval files under `work` (reused when already there)."""
    paths = {"model": str(work / "model"), "train": str(work / f"train-{n_train}.jsonl"),
             "eval": str(work / f"eval-{n_train}.jsonl")}
    if all(Path(p).exists() for p in paths.values()):
        return paths
    from transformers import AutoTokenizer

    from sftkit.config import DataConfig
    from sftkit.data.load import load_data
    from sftkit.data.templates import prepare_tokenizer
    from sftkit.model import build_tiny_model

    work.mkdir(parents=True, exist_ok=True)
    rows = conversation_rows()
    qwen = AutoTokenizer.from_pretrained(first_dir(REPO / "tests/assets/tokenizers/qwen2.5", SHARED / "tokenizers/qwen2.5"))
    texts = [qwen.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    tokenizer = qwen.train_new_from_iterator(texts, vocab_size=VOCAB)
    everything = write_jsonl(work / "all.jsonl", rows)
    prepare_tokenizer(tokenizer)
    examples = load_data(DataConfig(train=[str(everything)], max_length=1 << 30), tokenizer, 0)[0].examples
    fits = sorted(int(ex.source.rsplit(":", 1)[1]) - 1 for ex in examples if len(ex.input_ids) <= MAX_LENGTH)
    if len(fits) < n_train + EVAL_EXAMPLES:
        sys.exit(f"only {len(fits)} conversations fit in {MAX_LENGTH} tokens; ask for fewer --examples")
    write_jsonl(Path(paths["train"]), [rows[i] for i in fits[:n_train]])
    write_jsonl(Path(paths["eval"]), [rows[i] for i in fits[n_train : n_train + EVAL_EXAMPLES]])
    config = first_dir(REPO / "tests/assets/configs/llama3.2.json", SHARED / "configs/llama3.2.json")
    model = build_tiny_model(config, tokenizer, layers=4, hidden=256, heads=4, kv_heads=2, intermediate=768,
                             overrides={"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id})
    model.save_pretrained(paths["model"])
    tokenizer.save_pretrained(paths["model"])
    return paths


# -- workers: one configuration per process ------------------------------------------------------
def run_sftkit(paths: dict[str, str], out: Path, settings: dict, dtype: str, device: str) -> dict:
    from sftkit.recipe import config_from_dict
    from sftkit.train import train

    config = config_from_dict({
        "model": {"path": paths["model"], "dtype": dtype},
        "data": {"train": paths["train"], "eval": paths["eval"], "max_length": MAX_LENGTH, **settings},
        "train": {"epochs": 1, "batch_size": BATCH, "lr": LR, "warmup_ratio": WARMUP, "log_every": SKIP_STEPS,
                  "sample_max_new_tokens": 1, "device": device, "seed": SEED},
        "output_dir": str(out),
    })
    train(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    intervals = []  # (trained, input tokens, seconds) of every logged interval after the first (the warm-up)
    for before, row in zip(rows, rows[1:]):
        trained = row["tokens"] - before["tokens"]
        seconds = trained / row["tokens_per_s"]
        intervals.append((trained, row["input_tokens_per_s"] * seconds, seconds))
    return {"steps": rows[-1]["step"], **totals(intervals), "eval_loss": rows[-1]["eval_loss"],
            "train_loss": rows[-1]["loss"]}


def totals(intervals: list[tuple[float, float, float]]) -> dict:
    """Sums over the measured intervals, and the intervals themselves (for the median rates)."""
    return {"trained": sum(i[0] for i in intervals), "inputs": sum(i[1] for i in intervals),
            "seconds": sum(i[2] for i in intervals), "intervals": intervals}


def run_trl(paths: dict[str, str], out: Path, settings: dict, dtype: str, device: str) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sftkit.config import DataConfig
    from sftkit.data.batches import epoch_order
    from sftkit.data.load import load_data
    from sftkit.data.templates import prepare_tokenizer
    from sftkit.evaluate.perplexity import eval_loss

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003 - HF callback signature
            self.times.append(time.perf_counter())

    counts: list[tuple[int, int]] = []  # (trained, input) tokens of every collated batch, in order

    def counting(collator):  # noqa: ANN001, ANN202
        def collate(examples):  # noqa: ANN001, ANN202
            batch = collator(examples)
            real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
            counts.append((int((batch["labels"][:, 1:] != -100).sum()), int(real)))
            return batch
        return collate

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch_dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    settings = {"max_length": MAX_LENGTH, **settings}
    dataset = load_dataset("json", data_files=paths["train"], split="train")
    if os.environ.get("SFTKIT_BENCH_TRL_LABELS") == "sftkit":  # diagnosis: TRL trains exactly sftkit's tokens
        from datasets import Dataset

        ours = AutoTokenizer.from_pretrained(paths["model"])
        prepare_tokenizer(ours)
        examples = load_data(DataConfig(train=[paths["train"]], max_length=MAX_LENGTH), ours, 0)[0].examples
        dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    same_order = not settings.get("packing")  # packed rows differ between the tools: TRL shuffles its own
    if same_order:  # sftkit's example order for this seed, so final losses compare the tools, not two shuffles
        dataset = dataset.select(epoch_order(len(dataset), SEED, 0))
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=1,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=WARMUP, adam_beta2=0.95, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch_fused", assistant_only_loss="labels" not in dataset.column_names, gradient_checkpointing=False,
        bf16=dtype == "bfloat16", use_cpu=device == "cpu", logging_steps=SKIP_STEPS, save_strategy="no",
        report_to=[], seed=SEED, dataloader_num_workers=0, disable_tqdm=True,
        train_sampling_strategy="sequential" if same_order else "random", **settings)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=dataset)
    trainer.data_collator = counting(trainer.data_collator)
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    steps, times = len(clock.times), clock.times
    intervals = [(sum(c[0] for c in counts[k : k + SKIP_STEPS]), sum(c[1] for c in counts[k : k + SKIP_STEPS]),
                  times[min(k + SKIP_STEPS, steps) - 1] - times[k - 1]) for k in range(SKIP_STEPS, steps, SKIP_STEPS)]
    prepare_tokenizer(tokenizer)
    eval_examples = load_data(DataConfig(train=[paths["eval"]], max_length=MAX_LENGTH), tokenizer, 0)[0].examples
    final_eval, _ = eval_loss(trainer.model, eval_examples, BATCH, tokenizer.pad_token_id)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"steps": steps, **totals(intervals), "eval_loss": final_eval,
            "train_loss": losses[-1] if losses else float("nan")}


def worker(name: str, paths: dict[str, str], out: Path, dtype: str, device: str, result_file: Path) -> None:
    import torch

    tool, settings = CONFIGS[name]
    result = (run_sftkit if tool == "sftkit" else run_trl)(paths, out, settings, dtype, device)
    if device.startswith("cuda"):
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    result_file.write_text(json.dumps(result))


# -- parent: run, measure, print ------------------------------------------------------------------
def spawn(name: str, args: argparse.Namespace, paths: dict[str, str]) -> dict:
    """Run one configuration in a child process; its result plus its own peak RSS (wait4)."""
    slug = name.replace(" ", "-").replace("(", "").replace(")", "")
    result_file, log = args.workdir / f"{slug}.json", args.workdir / f"{slug}.log"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--worker", name, "--workdir", str(args.workdir), "--examples",
               str(args.examples), "--dtype", args.dtype, "--device", args.device]
    load = os.getloadavg()[0]
    with log.open("w") as sink:
        child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0 or not result_file.is_file():
        sys.exit(f"{name} failed (exit {child.returncode}); see {log}")
    return {**json.loads(result_file.read_text()), "rss_bytes": usage.ru_maxrss * 1024, "load": load}


def matmul_rate() -> float:
    """Measured bf16 matmul FLOP/s of this GPU (8192^3 products)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192**3 * reps / (time.perf_counter() - start)


def flops_per_token(model_dir: str) -> float:
    """Training FLOPs per input token: 6 x (matmul parameters, head included) + causal attention."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    head_dim = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    per_layer = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    matmul = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
    attention = 6 * c.num_hidden_layers * c.hidden_size * MAX_LENGTH  # 12 L d T, halved by the causal mask
    return 6 * matmul + attention


def rate(r: dict, which: str, median: bool = True) -> float:
    """Tokens/s (`which`: trained or inputs): the median of the 10-step intervals, or the whole-run mean.

    The median shrugs off other people's jobs on a shared machine, which can slow a stretch of a run
    several-fold; the mean is printed beside it."""
    if not median:
        return r[which] / r["seconds"]
    column = 0 if which == "trained" else 1
    return statistics.median(i[column] / i[2] for i in r["intervals"])


def report(results: dict[str, dict], args: argparse.Namespace, paths: dict[str, str]) -> None:
    memory = "CUDA peak" if args.device.startswith("cuda") else "peak RSS"
    print(f"\n{'configuration':24} {'steps':>5} {'trained tok/s':>13} {'input tok/s':>11} {'(mean)':>7} "
          f"{memory + ' GB':>12} {'final loss':>10} {'train loss':>10} {'load':>5}")
    for name, r in results.items():
        peak = r.get("cuda_peak_bytes", r["rss_bytes"]) / 1e9
        note = "  documents attend across each other" if name in CROSSES else ""
        print(f"{name:24} {r['steps']:>5} {rate(r, 'trained'):>13,.0f} {rate(r, 'inputs'):>11,.0f} "
              f"{rate(r, 'inputs', median=False):>7,.0f} {peak:>12.2f} {r['eval_loss']:>10.4f} {r['train_loss']:>10.4f} "
              f"{r['load']:>5.1f}{note}")
    print("tokens/s: median of 10-step intervals after the first 10 steps; (mean): the whole measured run")
    if args.device.startswith("cuda"):
        matmul, per_token = matmul_rate(), flops_per_token(paths["model"])
        print(f"\nMFU against a measured bf16 matmul rate of {matmul / 1e12:.0f} TFLOP/s (untested code path):")
        for name, r in results.items():
            print(f"  {name:24} {rate(r, 'inputs') * per_token / matmul:6.1%}")
    print()
    for ours, theirs in PAIRS:
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            print(f"{ours} / {theirs}: trained tokens/s {rate(a, 'trained') / rate(b, 'trained'):.2f} "
                  f"(mean {rate(a, 'trained', False) / rate(b, 'trained', False):.2f}), input tokens/s "
                  f"{rate(a, 'inputs') / rate(b, 'inputs'):.2f}, peak memory {a['rss_bytes'] / b['rss_bytes']:.2f}, "
                  f"final loss {a['eval_loss']:.4f} vs {b['eval_loss']:.4f}")
    ours = [n for n in results if CONFIGS[n][0] == "sftkit"]
    theirs = [n for n in results if CONFIGS[n][0] == "trl" and n not in CROSSES]
    if ours and theirs:
        best = max(ours, key=lambda n: rate(results[n], "trained"))
        reference = max(theirs, key=lambda n: rate(results[n], "trained"))
        print(f"best: {best} vs {reference}, median trained tokens/s (machine load {os.getloadavg()[0]:.1f} at the end)")
        print(f"sftkit/TRL trained tokens/s ratio: {rate(results[best], 'trained') / rate(results[reference], 'trained'):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="training conversations (default 2000)")
    parser.add_argument("--quick", action="store_true", help="240 examples: a smoke run")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sftkit-bench-train"))
    parser.add_argument("--device", default="cuda" if os.path.exists("/dev/nvidia0") else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--trl-same-labels", action="store_true",
                        help="diagnosis: TRL trains sftkit's tokenized examples (the same labels), not its own masks")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.examples = 240 if args.quick else args.examples
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.trl_same_labels:  # read by the TRL worker (a child process: it inherits the environment)
        os.environ["SFTKIT_BENCH_TRL_LABELS"] = "sftkit"
    paths = prepare(args.workdir, args.examples)
    if args.worker:
        slug = args.worker.replace(" ", "-").replace("(", "").replace(")", "")
        worker(args.worker, paths, args.workdir / "runs" / slug, args.dtype, args.device, args.workdir / f"{slug}.json")
        return
    import torch

    print(f"{args.examples} training conversations, {args.device} {args.dtype}, torch threads "
          f"{torch.get_num_threads()} of {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    results = {}
    for name in args.configs:
        results[name] = spawn(name, args, paths)
        r = results[name]
        print(f"  {name:24} {r['inputs'] / r['seconds']:8,.0f} input tok/s  ({r['steps']} steps, "
              f"load {r['load']:.1f})", flush=True)
    report(results, args, paths)


if __name__ == "__main__":
    main()
