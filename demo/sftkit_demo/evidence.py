"""The claims people make about SFT, each reproduced as a controlled run on the demo world.

    make evidence                                       # = python -m sftkit_demo.evidence = sftkit demo --evidence
    python -m sftkit_demo.evidence --base demo/base-model --out reports --work runs/evidence
    python -m sftkit_demo.evidence --prompting-only runs/demo/sft/final   # that row alone, into the report

Every run fine-tunes the committed demo base model (`demo/base-model/`, pre-trained on the demo
corpus, no chat template) with `sftkit train` and the built-in ChatML template, and changes one
thing against the main run:

    main        assistant-only loss, the recipe below                    -> answering, knowledge, weights
    all-tokens  data.strategy=all                                        -> loss masking
    lr-*        train.lr swept (the main run is one of them)             -> forgetting
    epochs-*    a 128-conversation subset, 20 epochs, a checkpoint per epoch, lr 1e-4 and 1e-3 -> overfitting
    clean-small / noisy-large   300 clean conversations vs all of them with 50% of the facts
                swapped for another country's, the same number of optimizer steps -> quality vs quantity
    (no run)    the base model prompted with 0/3/8 solved examples vs the main run -> prompt first?
                (sftkit_demo.prompting, scored by `sftkit eval`'s own path)

Models are asked with greedy decoding (batched, left-padded) and judged by `sftkit_demo.score.judge`:
*answered* = the first sentence is a statement, *correct* = it names the expected fact. Question sets:
`trained` countries (in the SFT data), `held-out` countries (only in pre-training), and `never`,
made-up countries that are in no data at all. The forgetting monitor's reference text is a sample
of pre-training documents. Finished runs are reused when their config is unchanged, so an
interrupted `make evidence` goes on where it stopped. The report is `sftkit_demo.evidence_report`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from sftkit.config import CONFIG_FILE
from sftkit.data.templates import pad_token_id
from sftkit.durable import file_sha256
from sftkit.evaluate.compare import compare, markdown
from sftkit.evaluate.diff import weight_diff
from sftkit.evaluate.task_eval import generate_batch
from sftkit.generate import encode_prompt, load_for_generation, stop_ids
from sftkit.model import load_tokenizer
from sftkit.recipe import config_from_dict
from sftkit_demo import distillation
from sftkit_demo.chats import heldout_questions
from sftkit_demo.dataset import read_jsonl, write_jsonl
from sftkit_demo.prompting import demo_check, prompting
from sftkit_demo.score import judge
from sftkit_demo.tasks import task_item
from sftkit_demo.world import COUNTRIES, Country, split_countries

# Countries that exist in no data at all: whatever the model says about them cannot be knowledge.
NEVER = [Country(*row) for row in (
    ("Valdoria", "Mirento", "Europe", "Valdorian", "valdor"), ("Kessaria", "Tolvan", "Asia", "Kessari", "kess"),
    ("Ombrelia", "Sarnet", "Africa", "Ombrelian", "ombra"), ("Drustania", "Pellach", "Europe", "Drustan", "drust"),
    ("Zerunda", "Makoli", "Africa", "Zerundi", "zerun"), ("Velmora", "Castrel", "South America", "Velmoran", "velm"),
    ("Quorath", "Ishpen", "Asia", "Quorathi", "qorin"), ("Teluvia", "Norrow", "Oceania", "Teluvian", "tel"),
    ("Brisanta", "Olvado", "North America", "Brisantan", "brisa"), ("Harvenia", "Lusk", "Europe", "Harven", "harv"),
    ("Morvasi", "Tenbury", "Africa", "Morvasian", "morva"), ("Calyndra", "Fenwick", "Oceania", "Calyndran", "caly"),
)]


@dataclass
class Setup:
    """Where things are and how big the experiment is."""

    base: Path = Path("demo/base-model")
    data: Path = Path("demo/data")
    work: Path = Path("runs/evidence")
    out: Path = Path("reports")
    questions: int = 160
    """Questions per set (trained / held-out / never), a seeded sample; capital, language and currency."""
    seed: int = 0
    device: str = "cpu"


def recipe(setup: Setup, name: str, **changes: Any) -> dict[str, Any]:
    """The main SFT recipe as a config dict, with `changes` as dotted keys (`train.lr`).

    The recipe of `sftkit demo` (sftkit_demo.run.sft_config: ChatML, assistant-only loss, lr 1e-4, 3 epochs of
    batch 16), in plain padded batches (the demo groups them by length, for speed only), plus an eval per epoch
    on sft_eval.jsonl and the forgetting monitor."""
    raw: dict[str, Any] = {
        "model": {"path": str(setup.base), "dtype": "float32"},
        "data": {"train": str(setup.data / "sft_train.jsonl"), "eval": str(setup.data / "sft_eval.jsonl"),
                 "template": "chatml", "max_length": 256},
        "train": {"epochs": 3, "lr": 1e-4, "batch_size": 16, "warmup_ratio": 0.05, "weight_decay": 0.0,
                  "eval_every_epoch": True, "log_every": 20, "sample_max_new_tokens": 24, "seed": setup.seed,
                  "device": setup.device},
        "eval": {"reference_data": str(setup.work / "reference.jsonl")},
        "output_dir": str(setup.work / name),
    }
    for key, value in changes.items():
        section, field = key.split(".")
        raw[section][field] = value
    return raw


def sft(setup: Setup, name: str, **changes: Any) -> Path:
    """Run (or reuse) one `sftkit train` run; its output_dir."""
    from sftkit.train import train

    config = config_from_dict(recipe(setup, name, **changes))
    out = Path(config.output_dir)
    done, weights = out / "final" / CONFIG_FILE, file_sha256(setup.base / "model.safetensors")
    if (done.is_file() and _same_run(yaml.safe_load(done.read_text()), config.to_dict())
            and (out / "base.sha256").is_file() and (out / "base.sha256").read_text() == weights):
        print(f"evidence    reusing {out} (same config, same base model)")
        return out
    shutil.rmtree(out, ignore_errors=True)  # no checkpoint of an older run may be scored as this one's
    start = time.perf_counter()
    train(config)
    (out / "seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    (out / "base.sha256").write_text(weights)
    return out


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same config, wherever the base model lies (its weights are compared by sha256)."""
    return {**a, "model": {**a["model"], "path": None}} == {**b, "model": {**b["model"], "path": None}}


# -- questions and answers ----------------------------------------------------------------------
def question_sets(setup: Setup) -> dict[str, list[dict[str, Any]]]:
    """trained / held-out / never: {country, attribute, question, answer} rows, up to `setup.questions` each.

    Continent questions are left out: with six answers, a model that always says "Europe" or "Africa"
    would score on countries it knows nothing about (the made-up ones included)."""
    trained, heldout = split_countries(setup.seed)
    sets = {"trained": heldout_questions(trained, setup.seed), "held-out": heldout_questions(heldout, setup.seed),
            "never": heldout_questions(NEVER, setup.seed)}
    rng = random.Random(setup.seed)
    sets = {name: [q for q in rows if q["attribute"] != "continent"] for name, rows in sets.items()}  # guessable
    return {name: rng.sample(rows, min(setup.questions, len(rows))) for name, rows in sets.items()}


@dataclass
class Score:
    """Shares of replies that answered, were correct, and ended their turn; mean reply length in words."""

    n: int
    answered: float
    correct: float
    stopped: float
    words: float


def ask(model_dir: Path, questions: list[dict[str, Any]], *, chat: bool, base: Path | None = None,
        max_new_tokens: int = 32, device: str = "cpu") -> tuple[Score, list[str]]:
    """Ask every question (as a user turn with the chat template, or as plain text to a base model); score it."""
    if chat:
        model, tokenizer = load_for_generation(model_dir, device=device)
        prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q["question"]}]) for q in questions]
        stops = stop_ids(model, tokenizer)
    else:
        from transformers import AutoModelForCausalLM

        tokenizer = load_tokenizer(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        prompts = [tokenizer(q["question"])["input_ids"] for q in questions]  # `<s>` + question, as in pre-training
        stops = [tokenizer.eos_token_id]
    pad_id = pad_token_id(tokenizer, stops)
    results = generate_batch(model, prompts, stops, pad_id, max_new_tokens)
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids, _ in results]
    verdicts = [judge(text, q["answer"], q["country"]) for text, q in zip(texts, questions)]
    n = max(len(questions), 1)
    score = Score(len(questions), sum(v.answered for v in verdicts) / n, sum(v.correct for v in verdicts) / n,
                  sum(stopped for _, stopped in results) / n, sum(len(t.split()) for t in texts) / n)
    return score, texts


# -- data variants ------------------------------------------------------------------------------
def write_reference(setup: Setup, documents: int = 60) -> Path:
    """A seeded sample of pre-training documents: the text the forgetting monitor watches."""
    rows = read_jsonl(setup.data / "pretrain.jsonl")
    path = setup.work / "reference.jsonl"
    write_jsonl(path, random.Random(setup.seed).sample(rows, min(documents, len(rows))))
    return path


def corrupt(rows: list[dict[str, Any]], share: float, seed: int) -> tuple[list[dict[str, Any]], int]:
    """Copies of `rows` where, in `share` of the conversations, every fact in an assistant reply is swapped
    for the same attribute of another country (a fluent, confident, wrong answer); and how many were."""
    rng = random.Random(seed)
    values = {attr: sorted({c.fact(attr) for c in COUNTRIES}) for attr in ("capital", "language", "currency")}
    by_value = sorted(((v, attr) for attr, vs in values.items() for v in vs), key=lambda p: -len(p[0]))
    out, changed = [], 0
    for row in rows:
        row = json.loads(json.dumps(row))
        if rng.random() < share:
            hit = False
            for message in row["messages"]:
                if message["role"] != "assistant":
                    continue
                for value, attr in by_value:
                    if value in message["content"]:
                        wrong = rng.choice([v for v in values[attr] if v != value and value not in v])
                        message["content"] = message["content"].replace(value, wrong)
                        hit = True
                        break
            changed += hit
        out.append(row)
    return out, changed


# -- the experiments ----------------------------------------------------------------------------
def run_all(setup: Setup) -> dict[str, Any]:
    """Every run and measurement; a JSON-able dict for the report."""
    setup.work.mkdir(parents=True, exist_ok=True)
    write_reference(setup)
    sets = question_sets(setup)
    results: dict[str, Any] = {"setup": {**{k: str(v) for k, v in asdict(setup).items()},
                                         "base_sha256": file_sha256(setup.base / "model.safetensors")},
                               "questions": {k: len(v) for k, v in sets.items()}}

    def score(run_dir: Path, name: str) -> dict[str, Any]:
        s, texts = ask(run_dir, sets[name], chat=True, device=setup.device)
        return {**asdict(s), "examples": [{"q": q["question"], "expected": q["answer"], "reply": t}
                                          for q, t in zip(sets[name][:3], texts[:3])]}

    # 1-3. the main run: answering, behaviour vs knowledge, weight change
    main = sft(setup, "main")
    base_scores = {name: asdict(ask(setup.base, sets[name], chat=False, device=setup.device)[0])
                   for name in ("trained", "held-out")}
    results["main"] = {"base": base_scores, "sft": {name: score(main / "final", name) for name in sets},
                       "history": metrics(main)}
    # the seed's second source of data: a student trained only on the main model's answers to new prompts
    results["distillation"] = distillation.run(main / "final", setup.work / "distill", setup.out / "distillation.md",
                                               setup.base, setup.seed)
    results["prompting"] = {**prompting(setup.base, main / "final", sets["held-out"], setup.device),
                            "demo_check": demo_check(main / "final", setup.base, setup.seed, setup.device)}
    prompts = [[{"role": "user", "content": q["question"]}] for name in sets for q in sets[name][:3]]
    side_by_side = compare(setup.base, main / "final", prompts, max_new_tokens=32, device=setup.device)
    (setup.out / "evidence").mkdir(parents=True, exist_ok=True)
    (setup.out / "evidence" / "compare.md").write_text(markdown(side_by_side, setup.base, main / "final"))
    diff = weight_diff(setup.base, main / "final")
    results["weights"] = {**diff.summary(), "layers": [(g.name, g.relative, g.moved) for g in diff.groups()],
                          "png": str(diff.plot(setup.out / "evidence" / "weight_diff.png"))}

    # 4. loss masking
    every = sft(setup, "all-tokens", **{"data.strategy": "all"})
    results["masking"] = {"assistant": {n: results["main"]["sft"][n] for n in ("trained", "held-out")},
                          "all": {n: score(every / "final", n) for n in ("trained", "held-out")}}

    # 5. learning rate and forgetting
    sweep = {}
    for lr in (1e-4, 1e-3, 1e-2):
        run = main if lr == 1e-4 else sft(setup, f"lr-{lr:g}", **{"train.lr": lr})
        rows = metrics(run)
        sweep[f"{lr:g}"] = {"lr": lr, "reference_ppl": [r["reference_ppl"] for r in rows if "reference_ppl" in r],
                            "held-out": score(run / "final", "held-out"), "trained": score(run / "final", "trained"),
                            "weights": weight_diff(setup.base, run / "final").summary()}
    results["lr"] = sweep

    # 6. epochs and overfitting: a small subset, many epochs, a checkpoint per epoch; the main lr, then 10x
    subset = setup.work / "sft_train_128.jsonl"
    write_jsonl(subset, read_jsonl(setup.data / "sft_train.jsonl")[:128])
    held_tasks = setup.work / "heldout_tasks.jsonl"  # the held-out set as a task file: accuracy at every eval
    write_jsonl(held_tasks, [task_item(q) for q in sets["held-out"]])
    results["epochs"] = []
    for name, lr in (("epochs", 1e-4), ("epochs-lr0.001", 1e-3)):
        run = sft(setup, name, **{"data.train": str(subset), "train.epochs": 20, "train.lr": lr, "train.save_every": 8,
                                  "train.keep_checkpoints": None, "train.keep_best": True,
                                  "eval.tasks": str(held_tasks), "eval.tasks_max_new_tokens": 32})
        ckpts = sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:])) + [run / "final"]
        per_epoch = [{"held-out": score(c, "held-out"), "trained": score(c, "trained")} for c in ckpts]
        results["epochs"].append({"lr": lr, "history": metrics(run), "checkpoints": per_epoch, "steps_per_epoch": 8,
                                  "best": json.loads((run / "best" / "best.json").read_text())})

    # 7. quality vs quantity: the same number of optimizer steps
    rows = read_jsonl(setup.data / "sft_train.jsonl")
    clean = setup.work / "sft_clean_300.jsonl"
    write_jsonl(clean, rows[:300])
    noisy_rows, changed = corrupt(rows, 0.5, setup.seed)
    noisy = setup.work / "sft_noisy_all.jsonl"
    write_jsonl(noisy, noisy_rows)
    steps = 3 * -(-len(rows) // 16)  # the main run's steps
    quality = {}
    for name, path in (("clean-small", clean), ("noisy-large", noisy)):
        run = sft(setup, name, **{"data.train": str(path), "train.max_steps": steps})
        quality[name] = {n: score(run / "final", n) for n in ("trained", "held-out")}
    results["quality"] = {**quality, "clean_rows": 300, "noisy_rows": len(rows), "corrupted": changed,
                          "steps": steps}
    results["seconds"] = {p.parent.name: float(p.read_text()) for p in setup.work.glob("*/seconds.txt")}
    return results


def metrics(run: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl rows without the text samples."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "sample"} for r in rows]


def prompting_only(setup: Setup, sft_dir: Path) -> int:
    """The prompt-first row (and the demo check) for `sft_dir`, merged into the last campaign's results."""
    from sftkit_demo.evidence_report import write_report

    path = setup.out / "evidence" / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["prompting"] = {**prompting(setup.base, sft_dir, question_sets(setup)["held-out"], setup.device),
                            "demo_check": demo_check(sft_dir, setup.base, setup.seed, setup.device)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"report: {write_report(results, setup.out)}" if "main" in results else f"results: {path}")
    return 0


def distillation_only(setup: Setup, teacher: Path) -> int:
    """The distillation row for `teacher`, merged into the last campaign's results."""
    from sftkit_demo.evidence_report import write_report

    path = setup.out / "evidence" / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["distillation"] = distillation.run(teacher, setup.work / "distill", setup.out / "distillation.md",
                                               setup.base, setup.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"report: {write_report(results, setup.out)}" if "main" in results else f"results: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from sftkit_demo.evidence_report import write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=Setup.base, help="the pre-trained demo base model")
    parser.add_argument("--data", type=Path, default=Setup.data, help="demo data directory")
    parser.add_argument("--work", type=Path, default=Setup.work, help="run directories")
    parser.add_argument("--out", type=Path, default=Setup.out, help="writes OUT/evidence.md and OUT/evidence/")
    parser.add_argument("--questions", type=int, default=Setup.questions, help="questions per set")
    parser.add_argument("--prompting-only", type=Path, metavar="SFT_DIR",
                        help="only the prompt-first row, with SFT_DIR as the fine-tuned model, merged into "
                             "OUT/evidence/results.json and the report")
    parser.add_argument("--distillation-only", type=Path, metavar="TEACHER_DIR",
                        help="only the distillation row, TEACHER_DIR answering new prompts, merged into the report")
    args = parser.parse_args(argv)
    setup = Setup(args.base, args.data, args.work, args.out, args.questions)
    if not (setup.base / "model.safetensors").is_file():
        raise SystemExit(f"no demo base model at {setup.base}: build it with `python demo/build_base.py`")
    if args.prompting_only:
        return prompting_only(setup, args.prompting_only)
    if args.distillation_only:
        return distillation_only(setup, args.distillation_only)
    start = time.perf_counter()
    results = run_all(setup)
    wall = time.perf_counter() - start
    timings = setup.work.glob("*/seconds.txt")
    trained_now = sum(float(t.read_text()) for t in timings if t.stat().st_mtime >= time.time() - wall)
    results["other_seconds"] = wall - trained_now  # asking questions, diffs, plots (runs reused or not)
    (setup.out / "evidence").mkdir(parents=True, exist_ok=True)
    (setup.out / "evidence" / "results.json").write_text(json.dumps(results, indent=1))
    print(f"report: {write_report(results, setup.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
