"""`sftkit demo` (= `make demo`): the story SFT exists for, told offline in a few minutes on a CPU.

    sftkit demo                                 # demo/base-model -> runs/demo/ (fine-tuned model + report)
    sftkit demo --out /tmp/demo --epochs 2      # another directory, a shorter fine-tune

1. The base model (demo/base-model: a small Llama that `demo/build_base.py` pre-trained with
   `sftkit train` on raw text) is asked a few questions as plain text: it continues the list.
2. It is fine-tuned with the real `sftkit train` path on chat conversations about the *trained*
   countries: the built-in ChatML template (new special tokens, embeddings resized), masks on the
   assistant replies only, a small learning rate, a few epochs.
3. Both models answer the same questions side by side, and every held-out question (countries whose
   facts are only in the pre-training text) is scored; a table and `report.md` + `loss.png` close it.

The last line printed is always `held-out: base answered A%, SFT correct B%`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sftkit_demo.chats import SftSpec, build_sft, heldout_questions
from sftkit_demo.dataset import write_jsonl
from sftkit_demo.phrasing import question
from sftkit_demo.report import (
    Figures,
    Showcase,
    figures_table,
    final_line,
    write_report,
)
from sftkit_demo.score import ask_base, ask_chat, judge
from sftkit_demo.tasks import write_heldout_tasks
from sftkit_demo.world import BY_NAME, split_countries

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BASE = REPO / "demo" / "base-model"

# (country, attribute) shown side by side: two trained countries, then held-out ones (seed 0 split).
SHOWCASE = (("France", "capital"), ("Japan", "currency"), ("Germany", "capital"), ("Spain", "language"),
            ("China", "capital"), ("Canada", "currency"), ("Brazil", "continent"))


@dataclass
class DemoOptions:
    """What `sftkit demo` runs; the defaults are the full demo."""

    out: Path = Path("runs/demo")
    """Directory for the SFT run (sft/final is the fine-tuned model), its data and report.md."""
    base: Path = DEFAULT_BASE
    """The pre-trained base model (no chat template)."""
    epochs: int = 3
    """SFT epochs."""
    lr: float = 1e-4
    """SFT peak learning rate: small, so SFT teaches the format and keeps what pre-training stored."""
    batch_size: int = 16
    """Conversations per optimizer step."""
    sft_rows: int | None = None
    """Use only the first N SFT conversations (tests); None = all."""
    heldout_limit: int | None = None
    """Score only N held-out questions, spread over the countries (tests); None = all."""
    trained_checks: int = 60
    """Questions about trained countries scored, in phrasings drawn afresh."""
    seed: int = 0
    """Seed of the split and the SFT data; must be the one the base model's corpus was built with."""
    extra: list[str] = field(default_factory=list)
    """Further `sftkit train` overrides, e.g. ["lora.enabled=true"]."""

    def __post_init__(self) -> None:
        self.out, self.base = Path(self.out), Path(self.base)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0 (got {self.epochs}, "
                             f"{self.batch_size}, {self.lr})")


def check_base(base: Path) -> None:
    """Fail with what to do when the base model directory is missing or incomplete."""
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (base / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"demo base model {base} lacks {', '.join(missing)}: run from a checkout of the repository "
            "(demo/base-model/ is committed), pass --base DIR, or rebuild it with `python demo/build_base.py`"
        )


def _spread(rows: list[dict], limit: int | None) -> list[dict]:
    """`limit` rows taken evenly through `rows` (all when None), so every continent and attribute shows."""
    if limit is None or limit >= len(rows):
        return rows
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit)]


def _load_base(base: Path):  # -> (model, tokenizer); transformers is imported lazily, as in cli.py
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    if tokenizer.chat_template:
        raise ValueError(f"{base}: a demo base model must have no chat template (SFT adds one)")
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, use_safetensors=True, dtype="float32")
    return model.eval(), tokenizer


def sft_config(options: DemoOptions, data: Path):
    """The `sftkit train` config of the demo's fine-tune (what `sftkit train` would read from YAML)."""
    from sftkit.recipe import load_config

    return load_config(None, [
        f"model.path={options.base}", "model.dtype=float32",
        f"data.train={data}", "data.template=chatml", "data.strategy=assistant", "data.max_length=256",
        "data.group_by_length=true",  # batches of similar lengths: less padding, a faster CPU run
        f"train.epochs={options.epochs}", f"train.lr={options.lr}", f"train.batch_size={options.batch_size}",
        "train.warmup_ratio=0.05", "train.log_every=5", f"train.seed={options.seed}", "train.device=cpu",
        "train.sample_prompt=What is the capital of Germany?", "train.sample_max_new_tokens=24",
        f"output_dir={options.out / 'sft'}", *options.extra,
    ])


def _trained_questions(trained_names: list[str], count: int, seed: int) -> list[dict]:
    """Questions about trained countries, drawn afresh (country, attribute and phrasing)."""
    rng = random.Random(seed + 1)
    rows = []
    for _ in range(count):
        country = BY_NAME[rng.choice(trained_names)]
        attribute = rng.choice(("capital", "continent", "language", "currency"))
        rows.append({"country": country.name, "attribute": attribute, "answer": country.fact(attribute),
                     "question": question(country, attribute, rng.randrange(4))})
    return rows


def _score(replies: list[str], rows: list[dict]) -> tuple[float, float]:
    """(share answered, share correct) in percent."""
    verdicts = [judge(r, row["answer"], row["country"]) for r, row in zip(replies, rows)]
    n = max(len(verdicts), 1)
    return 100 * sum(v.answered for v in verdicts) / n, 100 * sum(v.correct for v in verdicts) / n


def run_demo(options: DemoOptions) -> Figures:
    """Run the whole demo, printing as it goes; return the figures of its closing table."""
    import torch
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury the story; sftkit's own bar stays
    # One thread unless OMP_NUM_THREADS says otherwise: batches this small gain little from a second
    # core (35 s vs 52 s for the whole demo), and a multi-threaded run on a busy machine crawls (190 s).
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or 1)
    check_base(options.base)
    options.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(options.out / "sft", ignore_errors=True)  # a fresh run, never a resumed one
    trained, heldout = split_countries(options.seed)
    held = _spread(heldout_questions(heldout, options.seed), options.heldout_limit)
    trained_rows = _trained_questions([c.name for c in trained], options.trained_checks, options.seed)
    show = [{"country": c, "attribute": a, "answer": BY_NAME[c].fact(a), "question": question(BY_NAME[c], a),
             "trained": c in {t.name for t in trained}} for c, a in SHOWCASE]

    model, tokenizer = _load_base(options.base)
    params = sum(p.numel() for p in model.parameters())
    print(f"base model  {options.base}  ({params / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}, "
          "pre-trained by sftkit on raw text, no chat template)")
    print(f"countries   {len(trained)} trained (in SFT conversations), {len(heldout)} held out "
          "(facts only in the pre-training text)\n")
    print("1. The base model, asked plain questions, continues the pattern:\n")
    base_show = ask_base(model, tokenizer, [r["question"] for r in show])
    for row, reply in zip(show, base_show):
        print(f"  {row['question']}\n    -> {reply}")
    base_held = _score(ask_base(model, tokenizer, [r["question"] for r in held]), held)
    base_trained = _score(ask_base(model, tokenizer, [r["question"] for r in trained_rows]), trained_rows)
    del model

    rows, _ = build_sft(trained, options.seed, SftSpec())
    rows = rows[: options.sft_rows] if options.sft_rows else rows
    data = options.out / "data" / "sft_train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(data, rows)
    print(f"\n2. Fine-tuning with `sftkit train` on {len(rows)} conversations about trained countries "
          f"({data}):\n")
    from sftkit.generate import load_for_generation
    from sftkit.train import train

    sft_start = time.perf_counter()
    final = train(sft_config(options, data))
    sft_seconds = time.perf_counter() - sft_start
    metrics = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines() if line]
    trained_tokens = max((m.get("tokens", 0) for m in metrics), default=0)

    model, tokenizer = load_for_generation(final, device="cpu")
    print("\n3. The same questions, base model vs fine-tuned model:\n")
    sft_show = ask_chat(model, tokenizer, [r["question"] for r in show])
    showcase = [Showcase(r["question"], "trained" if r["trained"] else "held-out", b, s,
                         judge(s, r["answer"], r["country"]).correct) for r, b, s in zip(show, base_show, sft_show)]
    for item in showcase:
        print(item.console())
    sft_held = _score(ask_chat(model, tokenizer, [r["question"] for r in held]), held)
    sft_trained = _score(ask_chat(model, tokenizer, [r["question"] for r in trained_rows]), trained_rows)

    figures = Figures(
        trained_prompts=len(trained_rows), heldout_prompts=len(held),
        base_answered_trained=base_trained[0], sft_answered_trained=sft_trained[0],
        base_answered_heldout=base_held[0], sft_answered_heldout=sft_held[0],
        sft_correct_trained=sft_trained[1], sft_correct_heldout=sft_held[1],
        base_correct_heldout=base_held[1], trained_tokens=trained_tokens, sft_seconds=sft_seconds,
        total_seconds=time.perf_counter() - start, epochs=options.epochs, lr=options.lr,
    )
    report = write_report(options.out, figures, showcase, final)
    tasks = write_heldout_tasks(options.out / "data" / "heldout_tasks.jsonl", options.seed)  # for `sftkit eval`
    print(f"\nfine-tuned model {final}\nreport           {report} (+ loss.png)\n"
          f"score it again   sftkit eval --model {final} --tasks {tasks} --max-new-tokens 32   "
          "(add --base BASE --few-shot 3: the base prompted with 3 solved examples)\n")
    print(figures_table(figures))
    print(final_line(figures))
    return figures
