"""Rebuild the demo's data and its small pre-trained base model from nothing.

    .venv/bin/python demo/build_base.py                 # data, tokenizer, random model, pre-training
    .venv/bin/python demo/build_base.py --data-only     # just rewrite demo/data/
    OMP_NUM_THREADS=1 .venv/bin/python demo/build_base.py train.epochs=8   # extra `sftkit train` overrides
    .venv/bin/python demo/build_base.py --data /tmp/b/data --work /tmp/b --out /tmp/b/model train.max_steps=5  # smoke

Steps, all deterministic for a given --seed:
  1. demo/data/: the world's split, the pre-training corpus and the SFT / held-out files
     (`sftkit_demo.dataset.write_demo_data`);
  2. a byte-level BPE tokenizer trained on the corpus, and a randomly initialised Llama with it,
     written to runs/demo-base/init/ (`sftkit_demo.base`);
  3. pre-training by sftkit itself: `sftkit train demo/pretrain.yaml` (strategy `all`, every
     token of the raw documents trained), into runs/demo-base/pretrain/;
  4. the weights of final/ with the initial, template-free tokenizer written to demo/base-model/
     — the model `sftkit demo` starts from (committed, < 25 MB; `sftkit_demo.base.save_base_model`).
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

from sftkit_demo.base import BaseModelSpec, save_base_model, train_tokenizer, write_initial_model  # noqa: E402
from sftkit_demo.dataset import read_jsonl, write_demo_data  # noqa: E402

DATA = ROOT / "demo" / "data"
BASE_MODEL = ROOT / "demo" / "base-model"
RECIPE = ROOT / "demo" / "pretrain.yaml"
MAX_MODEL_BYTES = 25 * 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the corpus and the model init")
    parser.add_argument("--vocab-size", type=int, default=3000, help="BPE vocabulary target (the corpus caps it)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "demo-base", help="scratch directory")
    parser.add_argument("--data", type=Path, default=DATA, help="where the data files go (default demo/data)")
    parser.add_argument("--data-only", action="store_true", help="only rewrite the data files")
    parser.add_argument("--out", type=Path, default=BASE_MODEL, help="base model directory (default demo/base-model)")
    parser.add_argument("overrides", nargs="*", help="extra `sftkit train` overrides, e.g. train.epochs=8")
    return parser.parse_args(argv)


def write_data(data: Path, seed: int) -> None:
    counts = write_demo_data(data, seed)
    print("data        " + ", ".join(f"{name} {n}" for name, n in counts.items()))


def write_init(data: Path, work: Path, seed: int, vocab_size: int) -> Path:
    """Tokenizer + random model in work/init; returns that directory."""
    documents = [row["text"] for row in read_jsonl(data / "pretrain.jsonl")]
    tokenizer = train_tokenizer(documents, vocab_size=vocab_size)
    tokens = sum(len(ids) + 1 for ids in tokenizer(documents)["input_ids"])  # + EOS per document
    init = work / "init"
    shutil.rmtree(init, ignore_errors=True)
    params = write_initial_model(init, tokenizer, BaseModelSpec(), seed)
    print(f"tokenizer   {len(tokenizer)} tokens; corpus {len(documents)} documents, {tokens:,} tokens")
    print(f"model       {params:,} parameters (random init) -> {init}")
    return init


def pretrain(data: Path, init: Path, work: Path, overrides: list[str]) -> Path:
    """Run `sftkit train` on the corpus; return its final/ directory."""
    sftkit = Path(sys.executable).parent / "sftkit"
    command = [str(sftkit) if sftkit.exists() else "sftkit", "train", str(RECIPE),
               f"model.path={init}", f"data.train={data / 'pretrain.jsonl'}", f"output_dir={work / 'pretrain'}",
               *overrides]
    print("pre-train   " + " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    print(f"pre-train   done in {time.perf_counter() - start:.0f}s")
    return work / "pretrain" / "final"


def install(final: Path, init: Path, out: Path = BASE_MODEL) -> None:
    """Write the pre-trained weights of `final` with `init`'s tokenizer to `out`, within the size budget."""
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json") if not (final / name).is_file()]
    if missing:
        raise RuntimeError(f"{final} lacks {', '.join(missing)}")
    shutil.rmtree(out, ignore_errors=True)
    size = save_base_model(final, init, out)
    if size > MAX_MODEL_BYTES:
        raise RuntimeError(f"{out}/model.safetensors is {size / 2**20:.1f} MiB, over the 25 MiB budget: "
                           "shrink BaseModelSpec or --vocab-size")
    print(f"base model  {out} ({size / 2**20:.1f} MiB of weights)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_data(args.data, args.seed)
    if args.data_only:
        return
    init = write_init(args.data, args.work, args.seed, args.vocab_size)
    install(pretrain(args.data, init, args.work, args.overrides), init, args.out)


if __name__ == "__main__":
    main()
