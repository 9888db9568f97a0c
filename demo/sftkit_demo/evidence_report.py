"""reports/evidence.md and its plots from the results of `sftkit_demo.evidence` (results.json).

    python -m sftkit_demo.evidence_report reports/evidence/results.json     # redraw without re-running

Each claim gets its measured figures and a verdict computed from them by the rule written beside
it — supports / partly / does not support — so the report says what the numbers say, even where
that disagrees with the claim.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COMMAND = "make evidence   # = .venv/bin/python -m sftkit_demo.evidence"


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- one verdict per claim: (run, measured, verdict, rule) ---------------------------------------
def answering(r: dict[str, Any]) -> tuple[str, str, str, str]:
    base, sft = r["main"]["base"]["held-out"]["answered"], r["main"]["sft"]["held-out"]["answered"]
    verdict = "supports" if sft - base >= 0.3 else "does not support" if sft <= base else "partly"
    measured = (f"held-out questions answered: base {pct(base)} -> SFT {pct(sft)} (trained countries: base "
                f"{pct(r['main']['base']['trained']['answered'])} -> SFT {pct(r['main']['sft']['trained']['answered'])})")
    return "main run vs the base model, same questions", measured, verdict, "supports when SFT answers >= 30 points more"


def knowledge(r: dict[str, Any]) -> tuple[str, str, str, str]:
    s = r["main"]["sft"]
    t, h, n = s["trained"]["correct"], s["held-out"]["correct"], s["never"]["correct"]
    base_h = r["main"]["base"]["held-out"]["correct"]
    if h >= 0.5 * t and h > base_h and n <= 0.05:
        verdict = "supports"
    elif h > n + 0.05:
        verdict = "partly"
    else:
        verdict = "does not support"
    measured = (f"correct after SFT: trained countries {pct(t)}, held-out (pre-training only) {pct(h)}, never in any "
                f"data {pct(n)} (yet answered {pct(s['never']['answered'])} of those); base on held-out {pct(base_h)}")
    rule = "supports when held-out >= half of trained, above the base, and made-up countries <= 5%"
    return "main run, three question sets", measured, verdict, rule


def weights(r: dict[str, Any]) -> tuple[str, str, str, str]:
    w = r["weights"]
    med, top = w["median_relative"], w["max_relative"]
    verdict = "supports" if top < 0.05 else "partly" if med < 0.2 else "does not support"
    measured = (f"per-layer ‖ΔW‖/‖W‖: median {med:.3f}, max {top:.3f} ({w['max_layer']}); all weights "
                f"{w['overall_relative']:.3f}, {pct(w['overall_moved'])} moved by > {w['threshold']:g} x rms; "
                f"{w['added_rows']} new token rows")
    return "`sftkit diff` base vs main run", measured, verdict, "supports when every layer moves < 5%; partly when the median < 20%"


def masking(r: dict[str, Any]) -> tuple[str, str, str, str]:
    a, e = r["masking"]["assistant"], r["masking"]["all"]
    gain = sum(a[n]["correct"] - e[n]["correct"] for n in a) / len(a)
    stop = sum(a[n]["stopped"] - e[n]["stopped"] for n in a) / len(a)
    verdict = "supports" if gain > 0.03 or stop > 0.03 else "does not support" if gain < -0.03 else "not measurable"
    measured = "; ".join(f"{n}: correct {pct(a[n]['correct'])} vs {pct(e[n]['correct'])}, answered "
                         f"{pct(a[n]['answered'])} vs {pct(e[n]['answered'])}, ended the turn {pct(a[n]['stopped'])} vs "
                         f"{pct(e[n]['stopped'])}" for n in a) + " (assistant-only vs all tokens)"
    return "data.strategy assistant vs all", measured, verdict, "supports when assistant-only is > 3 points better"


def learning_rate(r: dict[str, Any]) -> tuple[str, str, str, str]:
    runs = sorted(r["lr"].values(), key=lambda x: x["lr"])
    base_ppl = runs[0]["reference_ppl"][0]
    final = [(x["lr"], x["reference_ppl"][-1], x["held-out"]["correct"]) for x in runs]
    rises = final[-1][1] > 1.2 * base_ppl and final[-1][1] > final[0][1]
    falls = final[-1][2] < max(c for _, _, c in final) - 0.05
    verdict = "supports" if rises and falls else "partly" if rises or falls else "does not support"
    measured = f"reference ppl (base {base_ppl:.2f}) / held-out correct / median layer change: " + ", ".join(
        f"lr {lr:g}: {ppl:.2f} / {pct(c)} / {x['weights']['median_relative']:.3f}" for (lr, ppl, c), x in zip(final, runs))
    rule = "supports when the highest lr raises reference ppl > 20% over the base and loses > 5 points of accuracy"
    return f"{len(runs)} learning rates, otherwise the main run", measured, verdict, rule


def _overfits(e: dict[str, Any]) -> tuple[bool, bool, str]:
    """(eval loss rose > 5% over its minimum, held-out accuracy fell > 5 points from its peak, figures) of one run."""
    losses = [(row["epoch"], row["eval_loss"]) for row in e["history"] if "eval_loss" in row]
    best_epoch, best = min(losses, key=lambda x: x[1])
    last_epoch, last = losses[-1]
    held = [c["held-out"]["correct"] for c in e["checkpoints"]]
    text = (f"lr {e['lr']:g}: eval loss lowest {best:.3f} at epoch {best_epoch:g}, {last:.3f} at epoch {last_epoch:g}; "
            f"held-out correct peaks at {pct(max(held))} (epoch {held.index(max(held)) + 1}), {pct(held[-1])} at "
            f"the end; train.keep_best kept epoch {e['best']['epoch']:g}")
    return last > best * 1.05, held[-1] < max(held) - 0.05, text


def epochs(r: dict[str, Any]) -> tuple[str, str, str, str]:
    runs = [_overfits(e) for e in r["epochs"]]
    main_rises, main_falls, _ = runs[0]
    shown = [rises and falls for rises, falls, _ in runs]
    verdict = ("supports" if all(shown) else "partly" if any(shown) or main_rises or main_falls
               else "does not support")
    measured = "; ".join(text for _, _, text in runs)
    rule = ("supports when, at every lr, the last eval loss is > 5% over its minimum and held-out accuracy falls "
            "> 5 points; partly when only some runs show it")
    return "128 conversations, 20 epochs, a checkpoint per epoch, two lr", measured, verdict, rule


def quality(r: dict[str, Any]) -> tuple[str, str, str, str]:
    q = r["quality"]
    c, n = q["clean-small"], q["noisy-large"]
    diff = sum(c[k]["correct"] - n[k]["correct"] for k in c) / len(c)
    verdict = "supports" if diff > 0.03 else "does not support" if diff < -0.03 else "no difference"
    measured = "; ".join(f"{k}: correct {pct(c[k]['correct'])} vs {pct(n[k]['correct'])}" for k in c) + (
        f" ({q['clean_rows']} clean vs {q['noisy_rows']} with {q['corrupted']} corrupted, {q['steps']} steps each)")
    return "small clean set vs large noisy set", measured, verdict, "supports when clean is > 3 points more correct"


def prompt_first(r: dict[str, Any]) -> tuple[str, str, str, str] | None:
    p = r.get("prompting")
    if not p:
        return None
    shots = {int(k): v["accuracy"] for k, v in p["shots"].items()}
    best_k = max(shots, key=lambda k: (shots[k], -k))
    sft = p["sft"]["accuracy"]
    verdict = ("prompting can't: fine-tune" if sft - shots[best_k] > 0.10 else
               "prompting is enough" if shots[best_k] >= sft - 0.05 else "close")
    measured = (f"held-out correct (n={p['n']}): base " + ", ".join(f"{k}-shot {pct(v)}" for k, v in sorted(shots.items()))
                + f" -> SFT {pct(sft)} (95% interval {pct(p['sft']['ci_low'])}-{pct(p['sft']['ci_high'])}; best "
                f"prompt {best_k}-shot {pct(p['shots'][str(best_k)]['ci_low'])}-{pct(p['shots'][str(best_k)]['ci_high'])})")
    run = f"base with K solved examples (plain text) vs SFT `{p['sft_model']}`, `sftkit eval` scoring"
    return run, measured, verdict, "fine-tune when SFT beats the best few-shot prompt by > 10 points; prompting is "\
        "enough within 5 points"


def distilled(r: dict[str, Any]) -> tuple[str, str, str, str] | None:
    d = r.get("distillation")
    if not d:
        return None
    gap = d["student_correct"] - d["teacher_correct"]
    verdict = "supports" if gap >= -0.05 else "does not support"
    measured = (f"held-out correct (n={d['n']}): student {pct(d['student_correct'])} vs teacher "
                f"{pct(d['teacher_correct'])}; {d['kept']} of {d['prompts']} answers kept "
                f"({sum(d['dropped'].values())} dropped), distilled in {d['distill_seconds']:.0f} s")
    run = ("`sftkit data distill`: the SFT model answers new prompts; a student (same base, same recipe) "
           "trains on those answers only ([distillation.md](distillation.md))")
    return run, measured, verdict, "supported when the student is within 5 points of the teacher"


CLAIMS = (("SFT makes the base model answer", answering), ("SFT teaches behaviour, not knowledge", knowledge),
          ("SFT barely changes the weights", weights), ("Loss masking (assistant only) matters", masking),
          ("High learning rate -> catastrophic forgetting", learning_rate),
          ("Too many epochs -> overfitting", epochs), ("Quality beats quantity", quality),
          ("Prompt first, fine-tune when prompting can't", prompt_first),
          ("A stronger model's answers are SFT data (distillation)", distilled))


def observations(r: dict[str, Any]) -> list[str]:
    """Figures behind the verdicts, taken from the results; the sentences around them are fixed text."""
    never, a, e = r["main"]["sft"]["never"], r["masking"]["assistant"]["held-out"], r["masking"]["all"]["held-out"]
    q = r["quality"]
    lines = [
        f"- Made-up countries: the SFT model answered {pct(never['answered'])} of the questions and was right on "
        f"{pct(never['correct'])}; it states a fact about some real country instead, e.g. "
        f"*{never['examples'][0]['q']}* -> {never['examples'][0]['reply']!r}. SFT taught the answer format, not the "
        "facts, nor to say it does not know.",
        f"- All tokens trained: replies ended their turn {pct(e['stopped'])} of the time (assistant-only "
        f"{pct(a['stopped'])}), {e['words']:.0f} words on average ({a['words']:.0f}): the model also learnt to write "
        f"the user's side, e.g. {r['masking']['all']['held-out']['examples'][0]['reply']!r}.",
    ]
    for x in sorted(r["lr"].values(), key=lambda x: x["lr"]):
        lines.append(f"- lr {x['lr']:g}: trained countries {pct(x['trained']['correct'])} correct, held-out "
                     f"{pct(x['held-out']['correct'])}; reference perplexity {x['reference_ppl'][0]:.2f} -> "
                     f"{x['reference_ppl'][-1]:.2f}; median layer change {x['weights']['median_relative']:.3f}.")
    lines.append(f"- Quality: {q['clean_rows']} clean conversations seen {q['steps'] * 16 / q['clean_rows']:.0f} times "
                 f"each vs {q['noisy_rows']} ({q['corrupted']} with swapped facts) seen "
                 f"{q['steps'] * 16 / q['noisy_rows']:.0f} times, {q['steps']} steps of 16 each.")
    return lines


def did_it_work(r: dict[str, Any]) -> list[str]:
    """`sftkit eval` on the demo's models: the prompt-first table and the check against the demo's own scoring."""
    p = r.get("prompting")
    if not p:
        return []
    lines = ["## Did it work? `sftkit eval` on the demo's models", "",
             f"The held-out questions as a task file (`sftkit_demo.tasks`), scored by `sftkit eval`'s own path "
             f"(`sftkit.evaluate.task_eval`, greedy, 32 new tokens); base `{p['base']}`, SFT `{p['sft_model']}`.", "",
             "| model, prompt | accuracy | 95% interval | answered | ended the turn | mean tokens |",
             "|---|---|---|---|---|---|"]
    rows = [(f"base, {k}-shot plain text", v) for k, v in sorted(p["shots"].items(), key=lambda kv: int(kv[0]))]
    for name, f in rows + [("SFT, chat template, 0-shot", p["sft"])]:
        lines.append(f"| {name} | {100 * f['accuracy']:.1f}% | {100 * f['ci_low']:.1f}-{100 * f['ci_high']:.1f}% | "
                     f"{pct(f['answered'])} | {pct(f['ended_turn'])} | {f['mean_tokens']:.1f} |")
    best = max(p["shots"].values(), key=lambda f: f["accuracy"])
    lines += ["", f"Base, {best['asked']}: *{best['examples'][-1]['q'].splitlines()[-2]}* -> "
              f"{best['examples'][-1]['reply']!r}.", ""]
    for e in r.get("epochs", []):  # eval.tasks during training vs the same questions asked of each checkpoint
        curve = [row for row in e["history"] if "task_accuracy" in row]
        if not curve:
            continue
        after = [c["held-out"]["correct"] for c in e["checkpoints"]]
        same = sum(abs(row["task_accuracy"] - a) < 1e-9 for row, a in zip(curve, after))
        lines += [f"Task accuracy at every eval of the epochs run at lr {e['lr']:g} (`eval.tasks` = the held-out "
                  "questions, scored inside training): " + ", ".join(f"epoch {row['epoch']:g} "
                  f"{pct(row['task_accuracy'])}" for row in curve) + f"; the same figure as the checkpoint of that "
                  f"epoch asked afterwards at {same}/{min(len(curve), len(after))} evals (the purple curve of the "
                  "epochs plot).", ""]
    c = r["prompting"].get("demo_check")
    if c:
        f = c["sftkit_eval"]
        lines += [f"The demo's own {c['n']} held-out questions on `{c['sft_model']}`: `sftkit eval` "
                  f"{f['correct']}/{c['n']} correct ({100 * f['accuracy']:.1f}%), answered {f['answered'] * c['n']:.0f}; "
                  f"the demo's scoring (`sftkit_demo.score`) {c['demo_correct']}/{c['n']}, answered "
                  f"{c['demo_answered']}; the same reply for {c['same_replies']}/{c['n']} questions and the same "
                  f"verdict for {c['same_verdicts']}/{c['n']}.", ""]
        if "base" in c:
            b = c["base"]
            parts = ", ".join(f"{a} {k}/{n}" for a, (k, n) in b["by_attribute"].items())
            lines += [f"The base on those {c['n']} questions, {c['base_shots']}-shot (the file's first items as "
                      f"examples: {'; '.join(repr(x) for x in b['shots_shown'])}): {b['correct']}/{c['n']} correct "
                      f"({100 * b['accuracy']:.1f}%): {parts}. Continents have six possible answers, so they are "
                      "guessable (the set above leaves them out); which examples are shown moves the few-shot figure "
                      "(the set above draws them from its own shuffled questions).", ""]
    return lines


# -- plots --------------------------------------------------------------------------------------
def plot_answering(r: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    sets = ["trained", "held-out", "never"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = [("base answered", [r["main"]["base"].get(s, {}).get("answered", 0) for s in sets]),
            ("SFT answered", [r["main"]["sft"][s]["answered"] for s in sets]),
            ("SFT correct", [r["main"]["sft"][s]["correct"] for s in sets])]
    for i, (label, values) in enumerate(bars):
        ax.bar([x + 0.27 * i for x in range(len(sets))], values, 0.27, label=label)
    ax.set_xticks([x + 0.27 for x in range(len(sets))], ["trained countries", "held-out countries", "made-up countries"])
    ax.set_ylabel("share of questions")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return _save(fig, path, plt)


def plot_lr(r: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    runs = sorted(r["lr"].values(), key=lambda x: x["lr"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for x in runs:
        a.plot(range(len(x["reference_ppl"])), x["reference_ppl"], "o-", label=f"lr {x['lr']:g}")
    a.set_xlabel("evaluation (0 = base model)")
    a.set_ylabel("reference perplexity")
    a.set_yscale("log")
    a.legend(fontsize=8)
    lrs = [x["lr"] for x in runs]
    for name in ("trained", "held-out"):
        b.plot(lrs, [x[name]["correct"] for x in runs], "o-", label=f"{name} correct")
    b.set_xscale("log")
    b.set_xlabel("learning rate")
    b.set_ylim(0, 1)
    b.legend(fontsize=8)
    return _save(fig, path, plt)


def plot_epochs(r: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(r["epochs"]), figsize=(6 * len(r["epochs"]), 3.5), squeeze=False)
    for a, e in zip(axes[0], r["epochs"]):
        evals = [(row["epoch"], row["eval_loss"]) for row in e["history"] if "eval_loss" in row]
        train = [(row["epoch"], row["loss"]) for row in e["history"] if "loss" in row]
        a.plot(*zip(*train), color="tab:gray", alpha=0.6, label="train loss")
        a.plot(*zip(*evals), "o-", color="tab:blue", label="eval loss")
        a.set_xlabel("epoch")
        a.set_ylabel("loss")
        a.set_title(f"128 conversations, lr {e['lr']:g}", fontsize=10)
        b = a.twinx()
        held = [c["held-out"]["correct"] for c in e["checkpoints"]]
        b.plot(range(1, len(held) + 1), held, "s--", color="tab:red", label="held-out correct")
        tasks = [(row["epoch"], row["task_accuracy"]) for row in e["history"] if "task_accuracy" in row]
        if tasks:  # eval.tasks: the held-out accuracy measured during training, at every eval
            b.plot(*zip(*tasks), ".:", color="tab:purple", label="task accuracy (eval.tasks)")
        b.set_ylim(0, 1)
        b.set_ylabel("held-out correct")
        lines = a.get_legend_handles_labels()[0] + b.get_legend_handles_labels()[0]
        a.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    return _save(fig, path, plt)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the report ---------------------------------------------------------------------------------
def write_report(r: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    figures = out / "evidence"
    plot_answering(r, figures / "answering.png")
    plot_lr(r, figures / "learning_rate.png")
    plot_epochs(r, figures / "epochs.png")
    trained = sum(r.get("seconds", {}).values()) / 60
    other = r.get("other_seconds", 0) / 60
    lines = ["# Evidence: what SFT changed, measured on the demo world", "",
             f"Regenerate: `{COMMAND}` — {trained + other:.0f} min on a 2-core CPU shared with other jobs: "
             f"{trained:.1f} min of `sftkit train` over {len(r.get('seconds', {}))} runs, {other:.1f} min asking "
             "questions, diffing and plotting. Finished runs are reused when their config and base are unchanged.",
             "", f"Base model: `{r['setup']['base']}` (model.safetensors sha256 "
             f"{r['setup'].get('base_sha256', '?')[:12]}…); run directories under `{r['setup']['work']}`.",
             "", f"Questions per set: {', '.join(f'{k} {v}' for k, v in r['questions'].items())}. Greedy decoding; *answered* = the first sentence is a "
             "statement; *correct* = it names the expected fact (`sftkit_demo.score.judge`). *held-out* countries are "
             "only in pre-training; *never* are made-up countries in no data at all. Questions ask for a capital, a "
             "language or a currency (continents, six possible answers, are guessable and left out).", "",
             "| claim | run | measured | verdict |", "|---|---|---|---|"]
    rules = []
    for claim, fn in CLAIMS:
        if (row := fn(r)) is None:  # results of a campaign older than the claim
            continue
        run, measured, verdict, rule = row
        lines.append(f"| {claim} | {run} | {measured} | **{verdict}** |")
        rules.append(f"- {claim}: {rule}.")
    lines += ["", "Verdict rules:", *rules, "", "## Observations", "", *observations(r), "",
              "![answering](evidence/answering.png)", "", "![weight change per layer](evidence/weight_diff.png)", "",
              "![learning rate](evidence/learning_rate.png)", "", "![epochs](evidence/epochs.png)", "",
              *did_it_work(r), "## Sample replies (main run)", ""]
    for name, score in r["main"]["sft"].items():
        for ex in score["examples"]:
            lines.append(f"- {name}: *{ex['q']}* -> {ex['reply']!r} (expected {ex['expected']})")
    lines += ["", "`sftkit compare` of the base and the main run on nine of these questions, both with the "
              "ChatML template: [evidence/compare.md](evidence/compare.md).", "",
              "Raw figures: [evidence/results.json](evidence/results.json).", ""]
    path = out / "evidence.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    results_file = Path(sys.argv[1] if len(sys.argv) > 1 else "reports/evidence/results.json")
    print(write_report(json.loads(results_file.read_text()), results_file.parent.parent))
