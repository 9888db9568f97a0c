"""One self-contained HTML page per run: what was trained, on what, and how it went.

    sftkit report runs/tiny                                   # runs/tiny/report.html (also written when a run ends)
    sftkit report runs/tiny --base models/base --prompts prompts.txt   # + base vs tuned replies, side by side

The page needs no server and loads nothing from anywhere: styles inline, charts as base64 PNGs. Its
sections, each from the run directory alone:

- the run: steps, trained tokens, time, first and last losses (metrics.jsonl), best/ when kept;
- the resolved config (sftkit_config.yaml);
- the data: the run's data re-read through `sftkit.data.load.load_data` — the one entry training and
  `sftkit data preview` use (the token cache makes it a lookup) — with counts, a histogram of example
  lengths against data.max_length, what was left out and why, and the first examples with trained
  tokens coloured exactly as `data preview` colours them (its own `coloured`, turned into HTML);
- the curves: train and eval loss, learning rate, task accuracy and reference perplexity when logged;
- the sample reply of every evaluation; the forgetting monitor's figures per evaluation;
- with `--base` and `--prompts`: `sftkit compare`'s greedy replies of base and tuned (`final/`).

A section that cannot be made (the data moved away, say) says why in its place; the rest is written.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from sftkit.config import CONFIG_FILE
from sftkit.runlog import METRICS_FILE

REPORT_FILE = "report.html"
EXAMPLES_SHOWN = 3
STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;
color:#1f2328;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;border-bottom:1px solid #d0d7de;padding-bottom:.2rem;
margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:left;
vertical-align:top}th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f8fa;padding:.7rem;overflow-x:auto;white-space:pre-wrap;word-break:break-word;font-size:.85rem}
.trained{color:#1a7f37;font-weight:bold}.masked{color:#8c959f}.warn{color:#bc4c00}.muted{color:#57606a}
img{max-width:100%}summary{cursor:pointer;color:#0969da}.charts{display:flex;flex-wrap:wrap;gap:1rem}.charts img{width:34rem}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _table(header: list[str] | None, rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    """An HTML table of cells already escaped (or markup); `header` None: a table of facts, named in column 0."""
    def cell(i: int, value: Any) -> str:
        tag = "th" if header is None and i == 0 else "td"
        return f"<{tag}{' class=n' if i in numeric else ''}>{value}</{tag}>"

    head = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cell(i, value) for i, value in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else _esc(value)


def png(draw: Callable[[Any], None], size: tuple[float, float] = (6.4, 3.4)) -> str:
    """An <img> holding what `draw(ax)` plots, as an inline base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return f'<img alt="chart" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def ansi_to_html(text: str) -> str:
    """`data preview`'s coloured text (its TRAINED / MASKED / RESET codes) as HTML spans."""
    from sftkit.data.preview import MASKED, RESET, TRAINED

    classes = {TRAINED: "trained", MASKED: "masked"}
    out, current = [], None
    for part in re.split(f"({re.escape(TRAINED)}|{re.escape(MASKED)}|{re.escape(RESET)})", text):
        if part in classes:
            current = classes[part]
        elif part == RESET:
            current = None
        elif part:
            out.append(f'<span class="{current}">{_esc(part)}</span>' if current else _esc(part))
    return "".join(out)


def history(run_dir: Path) -> list[dict[str, Any]]:
    import json

    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def section_run(run_dir: Path, config: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    last = train[-1] if train else {}
    facts = [["model", _esc(config.get("model", {}).get("path", "?"))],
             ["steps", _esc(last.get("step", 0))],
             ["trained tokens", f"{last.get('tokens', 0):,}"],
             ["training time", f"{last.get('elapsed_s', 0):.1f} s"],
             ["peak memory", f"{last.get('peak_mem_gb', 0):.2f} GB"]]
    if train:
        facts.append(["train loss", f"{train[0]['loss']:.4f} → {train[-1]['loss']:.4f} (first → last logged)"])
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        facts.append(["eval loss", f"{evals[0]['eval_loss']:.4f} → {evals[-1]['eval_loss']:.4f} "
                                   f"(lowest {best['eval_loss']:.4f} at step {best['step']})"])
    if (run_dir / "best" / "best.json").is_file():
        facts.append(["best/", _esc((run_dir / "best" / "best.json").read_text().strip())])
    where = [name for name in ("final", "best", "tb", "trackio", "mlflow", "wandb") if (run_dir / name).exists()]
    facts.append(["in the run directory", _esc(", ".join(f"{n}/" for n in where) or "-")])
    return _table(None, facts)


def section_config(config: dict[str, Any]) -> str:
    text = yaml.safe_dump(config, sort_keys=False)
    return (f"<details><summary>{CONFIG_FILE}: {len(text.splitlines())} lines, every key as the run resolved it "
            f"(click to open)</summary><pre>{_esc(text)}</pre></details>")


def _data_tokenizer(run_dir: Path, config: Any):  # -> PreTrainedTokenizerBase
    """The tokenizer training rendered with: model.path's, with the run's template (preview's way); final/'s
    when model.path is gone."""
    from sftkit.data.templates import prepare_tokenizer
    from sftkit.model import load_tokenizer

    path = Path(config.model.path)
    tokenizer = load_tokenizer(path if path.is_dir() else run_dir / "final",
                               trust_remote_code=config.model.trust_remote_code)
    prepare_tokenizer(tokenizer, config.data.template, required=False)
    return tokenizer


def section_data(run_dir: Path) -> str:
    from sftkit.data.load import load_data
    from sftkit.data.preview import coloured
    from sftkit.recipe import load_config

    config = load_config(run_dir / CONFIG_FILE)
    tokenizer = _data_tokenizer(run_dir, config)
    splits = dict(zip(("train", "eval"), load_data(config.data, tokenizer, config.train.seed, progress=False)))
    rows, parts = [], []
    for name, split in splits.items():
        left = split.left_out()
        rows.append([name, f"{len(split.examples):,}", f"{split.report.trained_tokens:,}",
                     f"{split.report.total_tokens:,}",
                     "<br>".join(f"{n} {_esc(reason)}" for reason, n in left.items()) or "none"])
    parts.append(_table(["split", "examples", "trained tokens", "tokens", "left out (and why)"], rows, {1, 2, 3}))
    notes = [f"{name}: {note} ×{n}" for name, split in splits.items() for note, n in sorted(split.report.warnings.items())]
    notes += [f"{name}: {w}" for name, split in splits.items() for w in split.warnings]
    if notes:
        parts.append("<ul>" + "".join(f'<li class="warn">{_esc(n)}</li>' for n in notes) + "</ul>")
    train = splits["train"].examples
    lengths = [len(train[i].input_ids) for i in range(len(train))]
    trained = [train[i].num_trained for i in range(len(train))]

    def histogram(ax: Any) -> None:
        bins = min(40, max(5, int(math.sqrt(len(lengths)))))
        ax.hist(lengths, bins=bins, color="#0969da", alpha=0.8, label="tokens per example")
        ax.hist(trained, bins=bins, color="#1a7f37", alpha=0.6, label="trained tokens per example")
        if config.data.max_length <= 1.5 * max(lengths):  # else it would squash the bars to the left
            ax.axvline(config.data.max_length, color="#cf222e", linestyle="--",
                       label=f"data.max_length {config.data.max_length}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("train examples")
        ax.legend(fontsize=8)

    parts.append(png(histogram))
    parts.append(f"<p class=muted>Lengths of the {len(lengths):,} train examples: min {min(lengths)}, median "
                 f"{sorted(lengths)[len(lengths) // 2]}, max {max(lengths)} tokens (data.max_length "
                 f"{config.data.max_length}).</p>")
    parts.append(f"<h3>The first {min(EXAMPLES_SHOWN, len(train))} train examples</h3><p class=muted>As "
                 '<code>sftkit data preview</code> shows them: <span class="trained">trained tokens</span>, '
                 '<span class="masked">masked tokens</span> (context only).</p>')
    for i in range(min(EXAMPLES_SHOWN, len(train))):
        example = train[i]
        parts.append(f"<p class=muted>── {_esc(example.source)}: {len(example.input_ids)} tokens, "
                     f"{example.num_trained} trained</p><pre>{ansi_to_html(coloured(example, tokenizer))}</pre>")
    return "".join(parts)


def section_curves(rows: list[dict[str, Any]]) -> str:
    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in rows if key in r and (r["step"] > 0 or key == "reference_ppl")]
        return ([p[0] for p in points], [p[1] for p in points]) if points else ([], [])

    charts = []
    if series("loss")[0] or series("eval_loss")[0]:
        def loss(ax: Any) -> None:
            ax.plot(*series("loss"), label="train loss")
            if series("eval_loss")[0]:
                ax.plot(*series("eval_loss"), "o-", label="eval loss")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("loss (nats / trained token)")
            ax.legend()
        charts.append(png(loss))
    for key, label in (("lr", "learning rate"), ("task_accuracy", "task accuracy"),
                       ("reference_ppl", "reference perplexity (forgetting)"), ("grad_norm", "gradient norm")):
        if series(key)[0]:
            def draw(ax: Any, key: str = key, label: str = label) -> None:
                ax.plot(*series(key), "o-" if key in ("task_accuracy", "reference_ppl") else "-")
                ax.set_xlabel("optimizer step")
                ax.set_ylabel(label)
            charts.append(png(draw))
    return f'<div class="charts">{"".join(charts)}</div>' if charts else "<p>No steps logged.</p>"


def section_samples(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    evals = [r for r in rows if "sample" in r or "eval_loss" in r or "task_accuracy" in r]
    if not evals:
        return "<p>No evaluation ran.</p>"
    prompt = config.get("train", {}).get("sample_prompt") or "the first prompt of the eval split (else train)"
    table = _table(["step", "eval loss", "task accuracy", "sample reply"],
                   [[r["step"], _num(r.get("eval_loss", "")),
                     f"{100 * r['task_accuracy']:.1f}%" if "task_accuracy" in r else "",
                     f"<pre>{_esc(r.get('sample', ''))}</pre>"] for r in evals], {0, 1, 2})
    return f"<p class=muted>Sample prompt: {_esc(prompt)}</p>{table}"


def section_forgetting(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    measured = [r for r in rows if "reference_ppl" in r]
    if not measured:
        return "<p>Not measured: set <code>eval.reference_data</code> to a text the model should keep knowing.</p>"
    tolerance = config.get("eval", {}).get("forgetting_tolerance", 0.2)
    body = []
    for r in measured:
        rise = r.get("reference_rise")
        shown = "base model" if rise is None else f"{rise:+.1%}"
        body.append([r["step"], f"{r['reference_ppl']:.3f}",
                     f'<span class="warn">{shown} over tolerance</span>' if rise is not None and rise > tolerance
                     else _esc(shown)])
    return (f"<p class=muted>Perplexity of {_esc(config.get('eval', {}).get('reference_data'))}; warning above "
            f"+{tolerance:.0%}.</p>" + _table(["step", "reference perplexity", "rise over the base"], body, {0, 1}))


def section_compare(run_dir: Path, base: str | Path, prompts: str | Path, max_new_tokens: int) -> str:
    from sftkit.evaluate.compare import compare, read_prompts

    rows = compare(base, run_dir / "final", read_prompts(prompts), max_new_tokens=max_new_tokens)
    def mark(reply: Any) -> str:  # a reply cut by the token limit is marked
        return _esc(reply.text) + ("" if reply.stopped else ' <span class="warn">…</span>')

    table = _table(["#", "prompt", "base", "tuned"],
                   [[n, _esc(row.question), mark(row.base), mark(row.tuned)] for n, row in enumerate(rows, 1)], {0})
    ended = f"base {sum(r.base.stopped for r in rows)}/{len(rows)}, tuned {sum(r.tuned.stopped for r in rows)}/{len(rows)}"
    return (f"<p class=muted>Greedy replies, the tuned model's chat template for both. Base: {_esc(base)}. "
            f"… = cut at {max_new_tokens} tokens before the end of the turn. Ended their turn: {ended}.</p>{table}")


def write_report(run_dir: str | Path, *, base: str | Path | None = None, prompts: str | Path | None = None,
                 max_new_tokens: int = 128, out: str | Path | None = None) -> Path:
    """Write `run_dir/report.html` (or `out`) and return its path."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / CONFIG_FILE).is_file():
        from sftkit.config import ConfigError

        raise ConfigError(f"{run_dir}: no {CONFIG_FILE} — `sftkit report` takes a run's output_dir")
    if (base is None) != (prompts is None):
        from sftkit.config import ConfigError

        raise ConfigError("sftkit report: --base and --prompts go together (the prompts both models answer)")
    config = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
    rows = history(run_dir)
    sections: list[tuple[str, str, Callable[[], str]]] = [
        ("run", "The run", lambda: section_run(run_dir, config, rows)),
        ("config", "Resolved config", lambda: section_config(config)),
        ("data", "Data", lambda: section_data(run_dir)),
        ("curves", "Curves", lambda: section_curves(rows)),
        ("samples", "Samples per evaluation", lambda: section_samples(rows, config)),
        ("forgetting", "Forgetting monitor", lambda: section_forgetting(rows, config)),
    ]
    if base is not None:  # asked for by name: its errors are the user's to see, not a note in the page
        compared = section_compare(run_dir, base, prompts, max_new_tokens)  # type: ignore[arg-type]
        sections.append(("compare", "Base vs tuned", lambda: compared))
    body = []
    for anchor, title, make in sections:
        try:
            content = make()
        except Exception as err:  # one section missing is no reason to lose the others
            content = f'<p class="warn">Could not be made: {_esc(type(err).__name__)}: {_esc(err)}</p>'
            print(f"report: the {title.lower()} section could not be made ({type(err).__name__}: {err})")
        body.append(f'<section id="{anchor}"><h2>{_esc(title)}</h2>{content}</section>')
    name = _esc(run_dir.resolve().name)
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>sftkit run {name}</title>"
            f"<style>{STYLE}</style></head><body><h1>sftkit run {name}</h1>"
            f"<p class=muted>{_esc(run_dir.resolve())} · report written {datetime.now():%Y-%m-%d %H:%M}</p>"
            + "".join(body) + "</body></html>\n")
    target = Path(out) if out else run_dir / REPORT_FILE
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target
