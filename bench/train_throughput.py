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

Throughput leaves out the first `--log-every` (10) optimizer steps (warm-up); trained tokens carry loss,
input tokens are all non-pad tokens. "final loss" is the token-weighted loss on the 100 held-out
conversations after training (`--eval-batches N`: the first N batches), computed by the same function
(`sftkit.evaluate.perplexity.eval_loss`) for both.

MFU: model FLOPs per trained token (`training_flops`: 6 N for the blocks over every input token, 4 N for
a frozen LoRA base plus 6 per adapter weight, causal attention at each document's real length, the head
at trained positions only) x trained tokens/s, over a peak measured in the same run: on CPU the best
fp32 `torch.mm` rate at the model's shapes (tokens per step x hidden x hidden / intermediate / vocab)
and at a 3072 square, at the start and at the end; on CUDA a bf16 8192^3 matmul. The last lines are
`sftkit/TRL trained tokens/s ratio: X.XX` (sftkit's best full fine-tuning configuration against TRL's
best that keeps documents apart) and `sftkit CPU MFU: Y%` (GPU on CUDA).

    .venv/bin/python bench/train_throughput.py --model qwen2-100m --quick --batch 2 --max-steps 5 --log-every 1 \
        --eval-batches 1 --configs "sftkit padding-free" "TRL padding-free"    # the 100M model, a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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
MAX_LENGTH, BATCH, LR, WARMUP, EVAL_EXAMPLES, VOCAB = 512, 8, 1e-3, 0.03, 100, 8192
SKIP_STEPS = 10  # steps per measured interval (--log-every); the first interval is warm-up
MAX_STEPS = 0  # --max-steps; 0: one whole epoch
MODELS = {  # --model: the shape built from a real config, with the bench's 8k tokenizer
    "tiny": ("llama3.2.json", {"layers": 4, "hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 768}),
    "qwen2-100m": ("qwen2.json", {"layers": 12, "hidden": 768, "heads": 12, "kv_heads": 2, "intermediate": 2816}),
    # bench/gpu: the real shapes (the body; the vocabulary is the tokenizer's), and their dry-run miniatures
    "qwen2.5-0.5b": ("qwen2.json", {"layers": 24, "hidden": 896, "heads": 14, "kv_heads": 2, "intermediate": 4864}),
    "llama3.2-1b": ("llama3.2.json", {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "intermediate": 8192}),
    "tiny-qwen2": ("qwen2.json", {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128}),
    "tiny-llama": ("llama3.2.json", {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128}),
}
EVAL_BATCHES: int | None = None  # --eval-batches: the final loss on the first N eval batches only (big models)
LORA = {"r": 16, "alpha": 32}  # every linear layer of the blocks, no dropout, in both tools
SEED = int(os.environ.get("SFTKIT_BENCH_SEED", "0"))  # the data order of both tools (the model is the same)
CONFIGS = {  # name -> (tool, settings); the order is the run order (interleaved)
    "sftkit padded": ("sftkit", {}),
    "TRL padded": ("trl", {}),
    "sftkit padding-free": ("sftkit", {"padding_free": True}),
    "TRL padding-free": ("trl", {"padding_free": True, "max_length": None}),  # TRL's rule; every example fits
    "sftkit packed": ("sftkit", {"packing": True}),
    "TRL packed (BFD)": ("trl", {"packing": True, "packing_strategy": "bfd"}),
    "TRL packed (wrapped)": ("trl", {"packing": True, "packing_strategy": "wrapped"}),
    "sftkit LoRA padding-free": ("sftkit", {"padding_free": True, "lora": LORA}),  # not run unless named
    "TRL LoRA padding-free": ("trl", {"padding_free": True, "max_length": None, "lora": LORA}),
}
DEFAULT_CONFIGS = [name for name in CONFIGS if "LoRA" not in name]
CROSSES = {"TRL packed (wrapped)"}  # documents attend across each other
LORA_CONFIGS = {name for name in CONFIGS if "LoRA" in name}  # compared with each other, never "best"
PAIRS = [("sftkit padded", "TRL padded"), ("sftkit padding-free", "TRL padding-free"),
         ("sftkit packed", "TRL packed (BFD)"), ("sftkit LoRA padding-free", "TRL LoRA padding-free")]


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


def prepare(work: Path, n_train: int, model_name: str = "tiny") -> dict[str, str]:
    """Tokenizer, model and the train/eval files under `work` (reused when already there)."""
    paths = {"model": str(work / ("model" if model_name == "tiny" else f"model-{model_name}")),
             "train": str(work / f"train-{n_train}.jsonl"), "eval": str(work / f"eval-{n_train}.jsonl")}
    if all(Path(p).exists() for p in paths.values()):
        return paths
    from transformers import AutoTokenizer

    from sftkit.config import DataConfig
    from sftkit.data.load import load_data
    from sftkit.data.templates import prepare_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    if Path(paths["train"]).exists() and Path(paths["eval"]).exists() and (work / "model").exists():
        tokenizer = AutoTokenizer.from_pretrained(work / "model")  # another model shape on the same data
        build_model(paths["model"], model_name, tokenizer)
        return paths
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
    if model_name != "tiny":
        build_model(str(work / "model"), "tiny", tokenizer)
    build_model(paths["model"], model_name, tokenizer)
    return paths


def build_model(path: str, model_name: str, tokenizer) -> None:
    """The random model `model_name` (MODELS) for `tokenizer`, saved with it under `path`."""
    from sftkit.model import build_tiny_model

    config_name, shape = MODELS[model_name]
    config = first_dir(REPO / "tests/assets/configs" / config_name, SHARED / "configs" / config_name)
    model = build_tiny_model(config, tokenizer, **shape,
                             overrides={"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id})
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# -- workers: one configuration per process ------------------------------------------------------
def run_sftkit(paths: dict[str, str], out: Path, settings: dict, dtype: str, device: str) -> dict:
    from sftkit.recipe import config_from_dict
    from sftkit.train import train

    settings = dict(settings)
    lora = settings.pop("lora", None)
    config = config_from_dict({
        "model": {"path": paths["model"], "dtype": dtype},
        "data": {"train": paths["train"], "eval": paths["eval"], "max_length": MAX_LENGTH, **settings},
        **({"lora": {"enabled": True, "r": lora["r"], "alpha": lora["alpha"], "dropout": 0.0}} if lora else {}),
        "train": {"epochs": 1, "batch_size": BATCH, "lr": LR, "warmup_ratio": WARMUP, "log_every": SKIP_STEPS,
                  **({"max_steps": MAX_STEPS} if MAX_STEPS else {}), "eval_max_batches": EVAL_BATCHES,
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

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    counts: list[tuple[int, int]] = []  # (trained, input) tokens of every collated batch, in order

    def counting(collator):
        def collate(examples):
            batch = collator(examples)
            real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
            counts.append((int((batch["labels"][:, 1:] != -100).sum()), int(real)))
            return batch
        return collate

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch_dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    settings = {"max_length": MAX_LENGTH, **settings}
    lora = settings.pop("lora", None)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
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
        train_sampling_strategy="sequential" if same_order else "random", max_steps=MAX_STEPS or -1, **settings)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=dataset, peft_config=peft_config)
    trainer.data_collator = counting(trainer.data_collator)
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    steps, times = len(clock.times), clock.times
    intervals = [(sum(c[0] for c in counts[k : k + SKIP_STEPS]), sum(c[1] for c in counts[k : k + SKIP_STEPS]),
                  times[min(k + SKIP_STEPS, steps) - 1] - times[k - 1]) for k in range(SKIP_STEPS, steps, SKIP_STEPS)]
    prepare_tokenizer(tokenizer)
    eval_examples = load_data(DataConfig(train=[paths["eval"]], max_length=MAX_LENGTH), tokenizer, 0)[0].examples
    final_eval, _ = eval_loss(trainer.model, eval_examples, BATCH, tokenizer.pad_token_id, EVAL_BATCHES)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"steps": steps, **totals(intervals), "eval_loss": final_eval,
            "train_loss": losses[-1] if losses else float("nan")}


def worker(name: str, paths: dict[str, str], out: Path, dtype: str, device: str, result_file: Path) -> None:
    import torch

    tool, settings = CONFIGS[name]
    shutil.rmtree(out, ignore_errors=True)  # a fresh output_dir: sftkit refuses to mix two runs in one
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
               str(args.examples), "--dtype", args.dtype, "--device", args.device, "--model", args.model,
               "--max-steps", str(args.max_steps), "--log-every", str(args.log_every), "--max-length",
               str(args.max_length), "--batch", str(args.batch)] + (
                   ["--eval-batches", str(args.eval_batches)] if args.eval_batches else [])
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


def gemm_rates(model_dir: str, rows: int, seconds: float = 0.5) -> dict[str, float]:
    """fp32 torch.mm FLOP/s on this CPU at the model's shapes (`rows` tokens per step) and a large square."""
    import torch
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    d, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
    shapes = {"attention proj": (rows, d, d), "mlp up": (rows, d, i), "mlp down": (rows, i, d),
              "head": (rows, d, v), "square 3072": (3072, 3072, 3072)}
    rates = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.mm(a, b)
        reps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or reps < 2:
            torch.mm(a, b, out=out)
            reps += 1
        rates[name] = 2 * m * k * n * reps / elapsed
    return rates


def document_stats(paths: dict[str, str]) -> tuple[list[int], int]:
    """The training examples' lengths (input tokens) and trained tokens, as sftkit renders them."""
    from transformers import AutoTokenizer

    from sftkit.config import DataConfig
    from sftkit.data.load import load_data
    from sftkit.data.templates import prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    prepare_tokenizer(tokenizer)
    examples = load_data(DataConfig(train=[paths["train"]], max_length=MAX_LENGTH), tokenizer, 0)[0].examples
    trained = sum(sum(1 for label in ex.labels[1:] if label != -100) for ex in examples)
    return [len(ex.input_ids) for ex in examples], trained


def lora_parameters(config, r: int) -> int:
    """Adapter weights of rank `r` on every linear layer of the blocks (q, k, v, o, gate, up, down)."""
    c = config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    d, q, kv, i = c.hidden_size, c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim, c.intermediate_size
    return c.num_hidden_layers * r * ((d + q) * 2 + (d + kv) * 2 + (d + i) * 3)


def training_flops(config, lengths: list[int], trained: int, lora_params: int = 0) -> float:
    """Model FLOPs of one pass over documents of `lengths` tokens with `trained` trained tokens in all.

    Every matmul costs 2 FLOPs per weight per token forward, 2 more for the gradient of its input and 2 for
    the gradient of its weight: 6 N per token for the blocks (full fine-tuning). Under LoRA
    (`lora_params` > 0) the frozen base does forward + input gradient only (4 N), the adapters 6 each.
    Attention scores and values, causal (half the square), per document of its real length: forward
    2 n^2 (heads x head_dim) per layer, x3 with the backward. The head is needed at trained positions
    only (the loss is there): 6 (full) or 4 (frozen, LoRA) x hidden x vocab per trained token.
    The embedding lookup and norms are not counted."""
    c = config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    body = c.num_hidden_layers * (c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size)
    weight_passes = 4 if lora_params else 6
    tokens = sum(lengths)
    attention = 6 * c.num_hidden_layers * q * sum(n * n for n in lengths)
    head = weight_passes * c.hidden_size * c.vocab_size * trained
    return weight_passes * body * tokens + 6 * lora_params * tokens + attention + head


def flops_per_trained_token(paths: dict[str, str], lora_r: int = 0) -> float:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(paths["model"])
    lengths, trained = document_stats(paths)
    return training_flops(config, lengths, trained, lora_parameters(config, lora_r) if lora_r else 0) / trained


def peak_bytes(r: dict) -> int:
    """The run's peak memory: CUDA's allocator peak on a GPU, the process's peak RSS on a CPU."""
    return r.get("cuda_peak_bytes", r["rss_bytes"])


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def parameters(model_dir: str) -> int:
    """Parameters of the saved model (tied embeddings once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


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
        peak = peak_bytes(r) / 1e9
        note = "  documents attend across each other" if name in CROSSES else ""
        print(f"{name:24} {r['steps']:>5} {rate(r, 'trained'):>13,.0f} {rate(r, 'inputs'):>11,.0f} "
              f"{rate(r, 'inputs', median=False):>7,.0f} {peak:>12.2f} {r['eval_loss']:>10.4f} {r['train_loss']:>10.4f} "
              f"{r['load']:>5.1f}{note}")
    print(f"tokens/s: median of {SKIP_STEPS}-step intervals after the first {SKIP_STEPS} steps; (mean): the whole "
          "measured run")
    per_token = flops_per_trained_token(paths)
    per_token_lora = flops_per_trained_token(paths, LORA["r"]) if set(results) & LORA_CONFIGS else per_token
    if args.device.startswith("cuda"):
        peak, what = matmul_rate(), "bf16 8192^3 matmul"
    else:
        rates = {name: max(a, b) for (name, a), b in zip(args.gemm_start.items(), gemm_rates(
            paths["model"], args.step_tokens).values())}
        peak, what = max(rates.values()), "fp32 torch.mm, the best of these shapes"
        print(f"\nfp32 GEMM on this CPU (torch.mm, {torch_threads()} threads, {args.step_tokens} rows = tokens per "
              "step; the better of the run's start and end): " + ", ".join(f"{n} {v / 1e9:.1f}" for n, v in rates.items())
              + " GFLOP/s")
    print(f"model FLOPs per trained token {per_token / 1e6:,.1f} M (6 N + causal attention at the real document "
          f"lengths + the head at trained positions; LoRA {per_token_lora / 1e6:,.1f} M: 4 N for the frozen base); "
          f"peak {peak / 1e9:,.1f} GFLOP/s ({what})")
    args.mfu = {name: rate(r, "trained") * (per_token_lora if name in LORA_CONFIGS else per_token) / peak
                for name, r in results.items()}
    for name in results:
        print(f"  MFU {name:24} {args.mfu[name]:6.1%}")
    print()
    for ours, theirs in PAIRS:
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            print(f"{ours} / {theirs}: trained tokens/s {rate(a, 'trained') / rate(b, 'trained'):.2f} "
                  f"(mean {rate(a, 'trained', False) / rate(b, 'trained', False):.2f}), input tokens/s "
                  f"{rate(a, 'inputs') / rate(b, 'inputs'):.2f}, peak memory {peak_bytes(a) / peak_bytes(b):.2f}, "
                  f"final loss {a['eval_loss']:.4f} vs {b['eval_loss']:.4f}")
    ours = [n for n in results if CONFIGS[n][0] == "sftkit" and n not in LORA_CONFIGS]
    theirs = [n for n in results if CONFIGS[n][0] == "trl" and n not in CROSSES | LORA_CONFIGS]
    if ours and theirs:
        best = max(ours, key=lambda n: rate(results[n], "trained"))
        reference = max(theirs, key=lambda n: rate(results[n], "trained"))
        print(f"best: {best} vs {reference}, median trained tokens/s (machine load {os.getloadavg()[0]:.1f} at the end)")
        print(f"sftkit/TRL trained tokens/s ratio: {rate(results[best], 'trained') / rate(results[reference], 'trained'):.2f}")
    if ours:
        best = max(ours, key=lambda n: rate(results[n], "trained"))
        print(f"sftkit {'GPU' if args.device.startswith('cuda') else 'CPU'} MFU: {args.mfu[best]:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="training conversations (default 2000)")
    parser.add_argument("--quick", action="store_true", help="240 examples: a smoke run")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sftkit-bench-train"))
    parser.add_argument("--device", default="cuda" if os.path.exists("/dev/nvidia0") else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--trl-same-labels", action="store_true",
                        help="diagnosis: TRL trains sftkit's tokenized examples (the same labels), not its own masks")
    parser.add_argument("--model", choices=list(MODELS), default="tiny",
                        help="tiny (5.2M, default) or qwen2-100m (Qwen2-shaped, hidden 768, 12 layers, 100M)")
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS, help="stop each run after this many steps")
    parser.add_argument("--log-every", type=int, default=SKIP_STEPS, help="steps per measured interval (10)")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="longest example in tokens (512)")
    parser.add_argument("--batch", type=int, default=BATCH, help="examples per optimizer step (8)")
    parser.add_argument("--eval-batches", type=int, help="final loss on the first N eval batches only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.examples = 240 if args.quick else args.examples
    globals().update(MAX_STEPS=args.max_steps, SKIP_STEPS=args.log_every, MAX_LENGTH=args.max_length, BATCH=args.batch,
                     EVAL_BATCHES=args.eval_batches)  # read by the workers (children get them as arguments)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.trl_same_labels:  # read by the TRL worker (a child process: it inherits the environment)
        os.environ["SFTKIT_BENCH_TRL_LABELS"] = "sftkit"
    paths = prepare(args.workdir, args.examples, args.model)
    if args.worker:
        slug = args.worker.replace(" ", "-").replace("(", "").replace(")", "")
        worker(args.worker, paths, args.workdir / "runs" / f"{args.model}-{slug}", args.dtype, args.device,
               args.workdir / f"{slug}.json")
        return
    import torch

    print(f"{args.examples} training conversations, model {args.model} ({parameters(paths['model']) / 1e6:.1f}M "
          f"parameters), {args.device} {args.dtype}, torch threads {torch.get_num_threads()} of {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    lengths, _ = document_stats(paths)
    args.step_tokens = round(BATCH * sum(lengths) / len(lengths))
    args.gemm_start = {} if args.device.startswith("cuda") else gemm_rates(paths["model"], args.step_tokens)
    results = {}
    for name in args.configs:
        results[name] = spawn(name, args, paths)
        r = results[name]
        print(f"  {name:24} {r['inputs'] / r['seconds']:8,.0f} input tok/s  ({r['steps']} steps, "
              f"load {r['load']:.1f})", flush=True)
    report(results, args, paths)


if __name__ == "__main__":
    main()
