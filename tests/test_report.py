"""`sftkit report` and the report.html every run ends with: one self-contained page, opened in Chromium.

A real run (1-layer GPT-2 with ChatML, evals with samples, a reference text for the forgetting monitor,
one invalid record skipped) writes report.html by itself; `sftkit report RUN --base --prompts` adds the
base-vs-tuned table. The page is read with html.parser (every section, no external URL, trained tokens
exactly where `data preview` puts them) and, where Debian's chromium is installed, rendered headless
with its console logged: no console message, and a screenshot that is not blank.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sftkit.cli import main
from sftkit.report import ansi_to_html
from tests.conftest import tiny_chat_recipe

WORDS = ("red", "blue", "green", "black", "white", "pink")
TRAIN = {"max_steps": 6, "batch_size": 2, "lr": 1e-2, "log_every": 1, "eval_every": 3, "device": "cpu",
         "sample_max_new_tokens": 3}
SECTIONS = ["run", "config", "data", "curves", "samples", "forgetting"]


class Page(HTMLParser):
    """Sections, every URL-bearing attribute, the trained spans and the images of an HTML page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.urls: list[str] = []
        self.trained: list[str] = []
        self.images = 0
        self._in_trained = self._in_pre = 0
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "section":
            self.sections.append(attributes["id"] or "")
        for name in ("src", "href", "action", "data", "poster"):
            if attributes.get(name):
                self.urls.append(attributes[name] or "")
        self.images += tag == "img"
        self._in_pre += tag == "pre"
        if tag == "span" and attributes.get("class") == "trained" and self._in_pre:  # in the examples, not the legend
            self._in_trained += 1
            self.trained.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_pre -= tag == "pre"
        if tag == "span" and self._in_trained:
            self._in_trained -= 1

    def handle_data(self, data: str) -> None:
        if self._in_trained:
            self.trained[-1] += data


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    recipe = tiny_chat_recipe(root, WORDS, TRAIN)
    with (root / "train.jsonl").open("a") as f:
        f.write(json.dumps({"messages": [{"role": "assistant", "content": "no user turn"}], "extra": 1}) + "\n")
        f.write("{not json\n")
    (root / "reference.txt").write_text("The sky is blue.\n---\nGrass is green and snow is white.\n")
    out = root / "out"
    assert main(["train", str(recipe), f"output_dir={out}", "data.eval_fraction=0.2", "data.skip_invalid=true",
                 f"eval.reference_data={root / 'reference.txt'}"]) == 0
    return out


def test_every_run_ends_with_a_self_contained_report(run: Path) -> None:
    text = (run / "report.html").read_text()
    page = Page(text)
    assert page.sections == SECTIONS
    assert "Could not be made" not in text
    assert all(url.startswith("data:image/png;base64,") for url in page.urls) and page.images >= 4
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text.replace((str(run.parent)), "")), \
        "no URL of any other place"
    assert "<script" not in text and "<link" not in text
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "sample" in row:
            assert f"<pre>{row['sample']}</pre>" in text or row["sample"] == ""
    assert "1 invalid (bad JSON)" in text and "1 invalid (no user turn)" in text  # left out, and why
    assert "reference perplexity" in text and "base model" in text  # the step-0 row of the forgetting monitor


def test_trained_tokens_are_coloured_as_data_preview_colours_them(run: Path) -> None:
    """The page's trained spans are the [[ ]] runs `sftkit data preview --no-colour` prints, in order."""
    from sftkit.data.load import load_data
    from sftkit.data.preview import coloured
    from sftkit.data.templates import prepare_tokenizer
    from sftkit.model import load_tokenizer
    from sftkit.recipe import load_config

    config = load_config(run / "sftkit_config.yaml")
    tokenizer = load_tokenizer(config.model.path)
    prepare_tokenizer(tokenizer, config.data.template)
    train, _ = load_data(config.data, tokenizer, config.train.seed, progress=False)
    want = [piece for i in range(3) for piece in re.findall(r"\[\[(.*?)\]\]", coloured(train.examples[i], tokenizer, False),
                                                               re.DOTALL)]
    assert want and Page((run / "report.html").read_text()).trained == want
    assert ansi_to_html("\033[1;32m<b>\033[0m\033[2;37mx\033[0m") == \
        '<span class="trained">&lt;b&gt;</span><span class="masked">x</span>'


def test_report_command_adds_base_vs_tuned(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = json.loads(json.dumps(__import__("yaml").safe_load((run / "sftkit_config.yaml").read_text())))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say red.\nSay blue.\n")
    out = tmp_path / "with-base.html"
    assert main(["report", str(run), "--base", config["model"]["path"], "--prompts", str(prompts),
                 "--max-new-tokens", "3", "--out", str(out)]) == 0
    page = Page(out.read_text())
    assert page.sections == SECTIONS + ["compare"] and "Say blue." in out.read_text()
    assert capsys.readouterr().out.strip().endswith(str(out))


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no sftkit_config.yaml — `sftkit report` takes a run's output_dir" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_console_messages(run: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
            "--window-size=1280,3000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", (run / "report.html").as_uri()], check=False, capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0 and all(f'<section id="{s}">' in dom.stdout for s in SECTIONS)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    subprocess.run([*base, f"--screenshot={shot}", (run / "report.html").as_uri()], capture_output=True, timeout=120,
                   check=True)
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1280, 3000) and len(set(image.getdata())) > 20  # text and charts, not a blank page
