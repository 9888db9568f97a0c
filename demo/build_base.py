"""Rebuild the demo's data and its small pre-trained base model from nothing.

    .venv/bin/python demo/build_base.py                 # data, tokenizer, random model, pre-training
    .venv/bin/python demo/build_base.py --data-only     # just rewrite demo/data/
    OMP_NUM_THREADS=1 .venv/bin/python demo/build_base.py train.epochs=8   # extra `sftkit train` overrides

Steps, all deterministic for a given --seed:
  1. demo/data/: the world's split, the pre-training corpus and the SFT / held-out files
     (`sftkit.demo.dataset.write_demo_data`);
  2. a byte-level BPE tokenizer trained on the corpus, and a randomly initialised Llama with it,
     written to runs/demo-base/init/ (`sftkit.demo.base`);
  3. pre-training by sftkit itself: `sftkit train demo/pretrain.yaml` (strategy `all`, every
     token of the raw documents trained), into runs/demo-base/pretrain/;
  4. final/ copied to demo/base-model/ — the model `sftkit demo` starts from (committed, < 25 MB).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sftkit.demo.base import BaseModelSpec, train_tokenizer, write_initial_model  # noqa: E402
from sftkit.demo.dataset import read_jsonl, write_demo_data  # noqa: E402

DATA = ROOT / "demo" / "data"
BASE_MODEL = ROOT / "demo" / "base-model"
RECIPE = ROOT / "demo" / "pretrain.yaml"
MAX_MODEL_BYTES = 25 * 1024 * 1024
# What a plain Hugging Face model directory needs; run bookkeeping in final/ is not copied.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the corpus and the model init")
    parser.add_argument("--vocab-size", type=int, default=3000, help="BPE vocabulary target (the corpus caps it)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "demo-base", help="scratch directory")
    parser.add_argument("--data-only", action="store_true", help="only rewrite demo/data/")
    parser.add_argument("overrides", nargs="*", help="extra `sftkit train` overrides, e.g. train.epochs=8")
    return parser.parse_args(argv)


def write_data(seed: int) -> None:
    counts = write_demo_data(DATA, seed)
    print("data        " + ", ".join(f"{name} {n}" for name, n in counts.items()))


def write_init(work: Path, seed: int, vocab_size: int) -> Path:
    """Tokenizer + random model in work/init; returns that directory."""
    documents = [row["text"] for row in read_jsonl(DATA / "pretrain.jsonl")]
    tokenizer = train_tokenizer(documents, vocab_size=vocab_size)
    tokens = sum(len(ids) + 1 for ids in tokenizer(documents)["input_ids"])  # + EOS per document
    init = work / "init"
    shutil.rmtree(init, ignore_errors=True)
    params = write_initial_model(init, tokenizer, BaseModelSpec(), seed)
    print(f"tokenizer   {len(tokenizer)} tokens; corpus {len(documents)} documents, {tokens:,} tokens")
    print(f"model       {params:,} parameters (random init) -> {init}")
    return init


def pretrain(init: Path, work: Path, overrides: list[str]) -> Path:
    """Run `sftkit train` on the corpus; return its final/ directory."""
    sftkit = Path(sys.executable).parent / "sftkit"
    command = [str(sftkit) if sftkit.exists() else "sftkit", "train", str(RECIPE),
               f"model.path={init}", f"data.train={DATA / 'pretrain.jsonl'}", f"output_dir={work / 'pretrain'}",
               *overrides]
    print("pre-train   " + " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    print(f"pre-train   done in {time.perf_counter() - start:.0f}s")
    return work / "pretrain" / "final"


def install(final: Path) -> None:
    """Copy the model files of `final` to demo/base-model/, refusing a chat template or a big model."""
    if (final / "chat_template.jinja").exists():
        raise RuntimeError(f"{final} has a chat template: the demo base model must not have one")
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json") if not (final / name).is_file()]
    if missing:
        raise RuntimeError(f"{final} lacks {', '.join(missing)}")
    size = (final / "model.safetensors").stat().st_size
    if size > MAX_MODEL_BYTES:
        raise RuntimeError(f"{final}/model.safetensors is {size / 2**20:.1f} MiB, over the 25 MiB budget")
    shutil.rmtree(BASE_MODEL, ignore_errors=True)
    BASE_MODEL.mkdir(parents=True)
    for name in MODEL_FILES:
        if (final / name).is_file():
            shutil.copy2(final / name, BASE_MODEL / name)
    print(f"base model  {BASE_MODEL} ({size / 2**20:.1f} MiB of weights)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_data(args.seed)
    if args.data_only:
        return
    init = write_init(args.work, args.seed, args.vocab_size)
    install(pretrain(init, args.work, args.overrides))


if __name__ == "__main__":
    main()
