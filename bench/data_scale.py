"""Data at scale: render time, peak memory and disk per token, first run vs a token-cache hit, vs TRL/datasets.

    .venv/bin/python bench/data_scale.py                      # 20k and 100k conversations
    .venv/bin/python bench/data_scale.py --sizes 20000 100000 400000 1000000            # TRL at every size: ~70 min here

The conversations are the shared instruction sets in `messages` form, repeated with a unique prefix
per row ("[row N] ...") so no two are equal. Each measurement runs in its own process: sftkit's
`load_data` with an empty cache (a streamed render: read, render and write the store a chunk at a time), the
same call again (a cache hit: what a second `sftkit train` does before its first step), and TRL's
`SFTTrainer` data preparation (`load_dataset("json")` + `_prepare_dataset`, its Arrow cache on) on
the same file. Peak RSS is each child's own `ru_maxrss`. Qwen2.5's tokenizer, assistant-only masks, max_length 2048.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def conversations() -> list[dict]:
    sys.path.insert(0, str(ROOT / "src"))
    from sftkit.data.formats import load_records
    from sftkit.data.messages import Conversation

    rows = []
    for name in ("llamafactory_alpaca_en_demo.json", "lima_llamafactory.json", "alpaca_data_cleaned_1000_fastchat.json",
                 "oasst_en_100_trees.jsonl", "gsm8k_train.jsonl"):
        path = SHARED / "instructions" / name
        if path.is_file():
            for record in load_records(path, on_error="skip").records:
                if isinstance(record, Conversation):
                    rows.append({"messages": [{"role": m.role, "content": m.content} for m in record.messages]})
    if not rows:
        raise SystemExit(f"needs the shared instruction sets in {SHARED / 'instructions'}")
    return rows


def write_dataset(path: Path, size: int, base: list[dict]) -> None:
    with path.open("w") as f:
        for i in range(size):
            row = base[i % len(base)]
            messages = [dict(m) for m in row["messages"]]
            first_user = next(m for m in messages if m["role"] == "user")
            first_user["content"] = f"[row {i}] {first_user['content']}"
            f.write(json.dumps({"messages": messages}) + "\n")


CHILD = {
    "sftkit": """
import sys, time, json
sys.path.insert(0, {src!r})
from transformers import AutoTokenizer
from sftkit.config import DataConfig
from sftkit.data.load import load_data
from sftkit.data.templates import prepare_tokenizer
tok = AutoTokenizer.from_pretrained({tok!r}); prepare_tokenizer(tok)
start = time.perf_counter()
train, _ = load_data(DataConfig(train=[{data!r}], max_length=2048, cache_dir={cache!r}, num_proc={proc}), tok, 0,
                     progress=False)
seconds = time.perf_counter() - start
import resource
print(json.dumps({{"seconds": seconds, "examples": len(train.examples), "tokens": train.report.total_tokens,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
""",
    "trl": """
import sys, time, json, os
os.environ["HF_DATASETS_CACHE"] = {cache!r}
from datasets import load_dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer
from transformers import AutoModelForCausalLM, Qwen2Config
tok = AutoTokenizer.from_pretrained({tok!r})
model = AutoModelForCausalLM.from_config(Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, intermediate_size=64, vocab_size=len(tok)))
start = time.perf_counter()
data = load_dataset("json", data_files={data!r}, split="train")
args = SFTConfig(output_dir={cache!r} + "/out", max_length=2048, assistant_only_loss=True, report_to=[],
                 use_cpu=True, bf16=False, logging_strategy="no", save_strategy="no",
                 dataset_num_proc={proc} if {proc} > 1 else None)
trainer = SFTTrainer(model=model, args=args, train_dataset=data.select(range(1)), processing_class=tok)
out = trainer._prepare_dataset(data, tok, args, packing=False, formatting_func=None, dataset_name="train")
import resource
print(json.dumps({{"seconds": time.perf_counter() - start, "examples": len(out), "tokens": 0,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
""",
}


def measure(kind: str, data: Path, cache: Path, proc: int) -> dict:
    code = CHILD[kind].format(src=str(ROOT / "src"), tok=str(SHARED / "tokenizers" / "qwen2.5"), data=str(data),
                              cache=str(cache), proc=proc)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])  # peak_gb: the child's own ru_maxrss (KiB)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--trl-sizes", type=int, nargs="+", default=None,
                        help="run TRL only at these sizes (it took 35 min and 5.4 GB at 1M here); default: every size")
    args = parser.parse_args()
    base = conversations()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sftkit-scale-") as tmp:
        for size in args.sizes:
            data = Path(tmp) / f"conv-{size}.jsonl"
            write_dataset(data, size, base)
            cache = Path(tmp) / f"cache-{size}"
            first = measure("sftkit", data, cache, args.num_proc)
            second = measure("sftkit", data, cache, args.num_proc)
            store_bytes = sum(f.stat().st_size for f in cache.rglob("*.bin"))
            run_trl = not args.no_trl and (args.trl_sizes is None or size in args.trl_sizes)
            trl = measure("trl", data, Path(tmp) / f"hf-{size}", args.num_proc) if run_trl else {}
            rows.append((size, first, second, store_bytes, trl))
            print(size, first, second, store_bytes, trl, f"load {os.getloadavg()[0]:.1f}", flush=True)
            data.unlink()  # a size's files go before the next one's are written (1M: ~3 GB)
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(Path(tmp) / f"hf-{size}", ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"\nsftkit token cache vs TRL/datasets, Qwen2.5 tokenizer, num_proc {args.num_proc}, load average {load:.1f}\n")
    print(f"{'conversations':>13} {'render s':>9} {'conv/s':>7} {'peak GB':>8} {'hit s':>7} {'hit peak GB':>11} "
          f"{'B/token':>8} {'TRL s':>7} {'TRL peak GB':>11}")
    for size, first, second, store_bytes, trl in rows:
        tokens = max(first.get("tokens", 0), 1)
        rate = size / first["seconds"] if "seconds" in first else float("nan")
        print(f"{size:>13,} {first.get('seconds', float('nan')):>9.1f} {rate:>7.0f} {first.get('peak_gb', float('nan')):>8.2f} "
              f"{second.get('seconds', float('nan')):>7.2f} {second.get('peak_gb', float('nan')):>11.2f} "
              f"{store_bytes / tokens:>8.2f} {trl.get('seconds', float('nan')):>7.1f} "
              f"{trl.get('peak_gb', float('nan')):>11.2f}")
    size, first, second, *_ = rows[-1]
    smallest = rows[0][1]
    if len(rows) > 1 and "peak_gb" in first and "peak_gb" in smallest:
        print(f"\nfirst-run peak RSS at {size:,} / at {rows[0][0]:,}: {first['peak_gb'] / smallest['peak_gb']:.2f}x")
    if "seconds" in first and "seconds" in second:
        print(f"second run / first run data time at {size:,}: {second['seconds'] / first['seconds']:.3f} "
              f"({first['seconds'] / second['seconds']:.0f}x sooner)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
