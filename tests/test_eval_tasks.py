"""`sftkit eval` and `eval.tasks`: task files, matching checked by hand, one scoring path during and after training.

The model is a 1-layer GPT-2 (real tokenizer, ChatML added by training) taught to repeat a word
("Say green." -> "green", "Say 7." -> "7"), so its replies are known and every match rule can be checked
against a reply written out by hand; multiple choice is checked against log-probabilities summed by
hand from one forward pass per choice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sftkit.cli import main
from sftkit.data.messages import DataError
from sftkit.evaluate.task_eval import Asker, choice_logliks, score_tasks
from sftkit.evaluate.tasks import (
    Task,
    answered,
    cut_plain,
    few_shot_messages,
    judge,
    parse_task,
    plain_text,
    read_tasks,
    shots_for,
    wilson,
)
from sftkit.generate import encode_prompt, generate_reply, load_for_generation
from tests.conftest import tiny_chat_recipe

WORDS = ("green", "blue", "7", "12")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task(**row) -> Task:
    return parse_task("t.jsonl:1", {"prompt": "q", **row})


# -- matching, by hand --------------------------------------------------------------------------
def test_contains_exact_regex_numeric_by_hand() -> None:
    assert judge(task(expected="Paris"), "The capital is paris.")                      # contains ignores case
    assert not judge(task(expected="Paris"), "The capital is Lyon.")
    assert judge(task(expected="Paris", match="exact"), "  paris. ")                 # white space, case, final "."
    assert not judge(task(expected="Paris", match="exact"), "Paris, France")
    assert judge(task(expected=r"^\d+ apples$", match="regex"), "12 apples")
    assert not judge(task(expected=r"^\d+ apples$", match="regex"), "twelve apples")
    assert not judge(task(expected="^paris", match="regex"), "Paris")                # regex keeps case
    assert judge(task(expected=18, match="numeric"), "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18")  # the last number
    assert judge(task(expected="1234", match="numeric"), "It costs $1,234.")
    assert judge(task(expected="0.5", match="numeric"), "one half: 0.50")
    assert not judge(task(expected="18", match="numeric"), "18 or 19")
    assert not judge(task(expected="18", match="numeric"), "no number")
    assert judge(task(expected=["Lima", "Quito"]), "Quito it is")                     # any of a list


def test_first_sentence_and_ignore_as_the_demo_judges() -> None:
    bissau = task(expected="Bissau", scope="first_sentence", ignore=["Guinea-Bissau"])
    assert not judge(bissau, "Guinea-Bissau is in Africa.")                           # only inside the name
    assert judge(bissau, "The capital of Guinea-Bissau is Bissau.")
    assert not judge(bissau, "Is it Bissau? Yes, Bissau.")                            # a question answers nothing
    assert not judge(bissau, "It is in Africa. Bissau is the capital.")               # after the first sentence
    assert answered("Paris. What else?") and not answered("What is it? Paris.") and not answered("  ")


def test_wilson_interval_by_hand() -> None:
    # p = 0.5, n = 100: centre 0.5, half-width 1.96 * sqrt(0.25/100 + 1.96^2/40000) / (1 + 1.96^2/100)
    low, high = wilson(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)


def test_plain_text_few_shot_prompt_and_cut(tmp_path: Path) -> None:
    tasks = read_tasks(write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "Capital of France?", "expected": "Paris", "solution": "Paris is the capital."},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "expected": "4"},
        {"prompt": "Capital of Peru?", "choices": ["Lima", "Quito"], "answer": "Lima"}]))
    messages = few_shot_messages(tasks[2], shots_for(tasks, 2, 2))
    assert plain_text(messages) == ("Question: Capital of France?\nAnswer: Paris is the capital.\n\n"
                                    "Question: 2+2?\nAnswer: 4\n\nQuestion: Capital of Peru?\nAnswer:")
    assert [t.solved() for t in tasks] == ["Paris is the capital.", "4", "Lima"]
    assert cut_plain(" Lima.\n\nQuestion: next") == ("Lima.", True)
    assert cut_plain(" Lima and more") == ("Lima and more", False)


@pytest.mark.parametrize(("row", "where"), [
    ('{"prompt": "q", "expected": "a", "match": "fuzzy"}', "t.jsonl:2: field 'match': unknown match 'fuzzy'"),
    ('{"prompt": "q"}', "t.jsonl:2: no \"expected\" answer"),
    ('{"prompt": "q", "choices": ["a", "b"], "answer": 2}', "t.jsonl:2: field 'answer'"),
    ('{"prompt": "q", "expected": "x", "match": "numeric"}', "t.jsonl:2: field 'expected': not a number"),
    ('{"prompt": "q", "expected": "(", "match": "regex"}', "t.jsonl:2: field 'expected': not a regular expression"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "expected": "a"}',
     "t.jsonl:2: field 'messages[1]'"),
    ('{"prompt": "q", "expected": "a", "colour": 1}', "t.jsonl:2: unknown field 'colour'"),
    ('[1, 2]', "t.jsonl:2: not an object"),
])
def test_bad_task_files_name_file_line_and_field(tmp_path: Path, row: str, where: str, capsys) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "fine", "expected": "x"}\n' + row + "\n")
    with pytest.raises(DataError) as err:
        read_tasks(path)
    assert str(err.value).startswith(str(tmp_path / where))
    assert main(["eval", "--model", str(tmp_path), "--tasks", str(path)]) == 2      # before any model loads
    assert f"sftkit: error: {tmp_path / where}" in capsys.readouterr().err


# -- a tiny trained model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One `sftkit train` run with eval.tasks scored at steps 50, 100, 150 (checkpoints at 50 and 100)."""
    root = tmp_path_factory.mktemp("eval_tasks")
    recipe = tiny_chat_recipe(root, WORDS * 4, {"max_steps": 150, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0,
                                                "eval_every": 50, "save_every": 50, "keep_checkpoints": None,
                                                "log_every": 100, "device": "cpu", "sample_prompt": "Say green."})
    tasks = write_jsonl(root / "tasks.jsonl", [
        *({"prompt": f"Say {w}.", "expected": w, "match": "exact"} for w in WORDS),
        {"prompt": "Say 7.", "expected": "7.0", "match": "numeric"},
        {"prompt": "Say green.", "expected": "^gr", "match": "regex"},
        {"prompt": "Say blue.", "expected": "red"},
        {"prompt": "Say blue.", "choices": ["red", "green", "blue"], "answer": 2},
        {"prompt": "Say 12.", "choices": ["7", "12"], "answer": "12"},
    ])
    out = root / "out"
    assert main(["train", str(recipe), f"eval.tasks={tasks}", "eval.tasks_max_new_tokens=8",
                 "eval.best_metric=task_accuracy", "train.keep_best=true", f"output_dir={out}"]) == 0
    return {"root": root, "out": out, "tasks": tasks, "base": root / "tiny-gpt2"}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_every_rule_scored_by_hand_on_the_model(run: dict[str, Path]) -> None:
    model, tokenizer = load_for_generation(run["out"] / "final", device="cpu")
    tasks = read_tasks(run["tasks"])
    scored = score_tasks(Asker(model, tokenizer), tasks, max_new_tokens=8)
    for t, row in zip(tasks, scored.rows):
        if t.choices is None:  # batched replies == one by one (sftkit generate's path)
            reply = generate_reply(model, tokenizer, t.prompt, max_new_tokens=8)
            assert row["reply"] == reply.text and row["stopped"] == reply.stopped
    replies = [r["reply"] for r in scored.rows]
    assert replies[:4] == list(WORDS), replies  # it learnt to repeat: the rules below are checked on known text
    assert [r["correct"] for r in scored.rows[:7]] == [True] * 4 + [True, True, False]  # exact, numeric, regex, "red"
    assert [r["answered"] for r in scored.rows[:7]] == [True] * 7
    for t, row in zip(tasks[7:], scored.rows[7:]):  # choices: log-probabilities summed by hand, one forward each
        context = encode_prompt(tokenizer, t.prompt)
        by_hand = []
        for choice in t.choices:
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([context + cont])).logits[0].float(), -1)
            by_hand.append(sum(logp[len(context) - 1 + j, c].item() for j, c in enumerate(cont)))
        assert row["logliks"] == pytest.approx(by_hand, abs=1e-4)
        assert row["chosen"] == max(range(len(by_hand)), key=by_hand.__getitem__)
        assert row["correct"] == (row["chosen"] == t.answer) and row["reply"] == t.choices[row["chosen"]]
    assert scored.accuracy == sum(r["correct"] for r in scored.rows) / len(tasks)
    pairs = [(encode_prompt(tokenizer, tasks[7].prompt), [7, 8, 9])] * 3  # padding never changes a figure
    assert choice_logliks(model, pairs[:1], 0) == pytest.approx(choice_logliks(model, pairs + [([1] * 20, [2])], 0)[:1])


def test_the_same_figure_in_training_and_from_sftkit_eval(run: dict[str, Path], capsys) -> None:
    rows = {r["step"]: r for r in metrics(run["out"]) if "task_accuracy" in r}
    assert sorted(rows) == [50, 100, 150] and all({"task_answered", "task_ended_turn"} <= set(r) for r in rows.values())
    for step, directory in ((50, run["out"] / "checkpoints" / "step-50"), (100, run["out"] / "checkpoints" / "step-100"),
                            (150, run["out"] / "final")):
        out = run["root"] / f"eval-{step}"
        capsys.readouterr()
        assert main(["eval", "--model", str(directory), "--tasks", str(run["tasks"]), "--out", str(out),
                     "--max-new-tokens", "8", "--device", "cpu"]) == 0
        printed = capsys.readouterr().out
        figures = json.loads((out / "summary.json").read_text())["results"]["model"]
        assert figures["accuracy"] == rows[step]["task_accuracy"]
        assert f"accuracy: {100 * rows[step]['task_accuracy']:.1f}% (n=9)" in printed.splitlines()
        during = [json.loads(x) for x in (run["out"] / "tasks" / f"step-{step}" / "results.jsonl").read_text().splitlines()]
        after = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
        assert [r["reply"] for r in during] == [r["reply"] for r in after]


def test_keep_best_follows_task_accuracy(run: dict[str, Path]) -> None:
    evals = [r for r in metrics(run["out"]) if "task_accuracy" in r]
    best = max(evals, key=lambda r: r["task_accuracy"])  # max() keeps the earliest of equal ones
    written = json.loads((run["out"] / "best" / "best.json").read_text())
    assert written["step"] == best["step"] and written["task_accuracy"] == best["task_accuracy"]


def test_base_without_template_needs_few_shot(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert main(["eval", "--model", str(run["base"]), "--tasks", str(run["tasks"]), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "--few-shot K" in err and "Traceback" not in err
    assert main(["eval", "--model", str(run["base"]), "--tasks", str(run["tasks"]), "--few-shot", "2",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "fs"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "model (plain text, 2-shot)" in printed and "accuracy: " in printed.splitlines()[-2]
    first = json.loads((tmp_path / "fs" / "results.jsonl").read_text().splitlines()[0])
    assert first["prompt"] == "Question: Say blue.\nAnswer: blue\n\nQuestion: Say 7.\nAnswer: 7\n\n" \
                              "Question: Say green.\nAnswer:"
    # side by side: the tuned model zero-shot through its template, the base 2-shot in plain text
    assert main(["eval", "--model", str(run["out"] / "final"), "--base", str(run["base"]), "--tasks",
                 str(run["tasks"]), "--few-shot", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "both"),
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].startswith("accuracy: ") and lines[-2].startswith("base accuracy: ") and "(n=9)" in lines[-2]
    # a base without a template and without --few-shot: asked through the tuned model's template
    assert main(["eval", "--model", str(run["out"] / "final"), "--base", str(run["base"]), "--tasks",
                 str(run["tasks"]), "--max-new-tokens", "4", "--out", str(tmp_path / "tpl"), "--device", "cpu"]) == 0
    assert "base (chat template)" in capsys.readouterr().out


# -- lm-evaluation-harness on the same items ----------------------------------------------------
HARNESS_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{prompt}}}}"
target_delimiter: ""
"""
GENERATE = """output_type: generate_until
doc_to_target: "{{expected}}"
generation_kwargs:
  until: ["<|im_end|>"]
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
"""
CHOICES = """output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_harness_reproduces_sftkits_score_on_the_same_items(run: dict[str, Path], tmp_path: Path) -> None:
    """The harness (its own HF backend, chat template applied) and `sftkit eval` on the same items: the same
    replies and the same figures; log-likelihoods that differ by one term per item, the same for every choice
    (the harness scores the template's trailing newline as part of each choice). GSM8K (the docs/lm_eval/gsm8k_local.yaml task,
    first items of ../shared's test file) is scored by the harness's flexible-extract and by sftkit's
    `numeric` rule; both take the reply's last number, so on these replies the figures agree (they can part
    on "18.0" vs "18", which the harness compares as strings and sftkit as numbers)."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install 'sftkit[eval]'")
    import yaml

    from sftkit.evaluate.lm_eval_run import run_lm_eval
    from tests.conftest import SHARED_DATA

    rows = [json.loads(line) for line in run["tasks"].read_text().splitlines()]
    sets = {"gen": [r for r in rows if r.get("match") == "exact"],
            "mc": [{**r, "answer": r["choices"].index(r["answer"]) if isinstance(r["answer"], str) else r["answer"]}
                   for r in rows if "choices" in r]}
    specs = []
    for name, extra in (("gen", GENERATE), ("mc", CHOICES)):
        data = write_jsonl(tmp_path / f"{name}.jsonl", sets[name])
        (tmp_path / f"{name}.yaml").write_text(HARNESS_TASK.format(name=f"sftkit_{name}", data=data) + extra)
        specs.append(str(tmp_path / f"{name}.yaml"))
    gsm8k = SHARED_DATA / "instructions" / "gsm8k_test.jsonl"
    if gsm8k.is_file():
        items = [json.loads(line) for line in gsm8k.read_text().splitlines()[:4]]
        write_jsonl(tmp_path / "gsm8k.jsonl", items)
        task = yaml.safe_load((Path(__file__).parents[1] / "docs" / "lm_eval" / "gsm8k_local.yaml").read_text())
        task["dataset_kwargs"]["data_files"]["test"] = str(tmp_path / "gsm8k.jsonl")
        (tmp_path / "gsm" / "gsm8k.yaml").parent.mkdir()
        (tmp_path / "gsm" / "gsm8k.yaml").write_text(yaml.safe_dump(task))
        specs.append(str(tmp_path / "gsm" / "gsm8k.yaml"))
        sets["gsm8k_local"] = [{"prompt": r["question"], "expected": r["answer"].split("####")[-1].strip().replace(",", ""),
                                "match": "numeric"} for r in items]

    final = run["out"] / "final"
    harness = run_lm_eval(final, ",".join(specs), out=tmp_path / "lm", batch_size=8, device="cpu", max_new_tokens=8)
    model, tokenizer = load_for_generation(final, device="cpu")
    for name, items in sets.items():
        task_name = name if name == "gsm8k_local" else f"sftkit_{name}"
        ours = score_tasks(Asker(model, tokenizer), read_tasks(write_jsonl(tmp_path / f"ours-{name}.jsonl", items)),
                           max_new_tokens=8)
        samples = sorted(harness["samples"][task_name], key=lambda s: s["doc_id"])
        metric = "acc,none" if name == "mc" else "exact_match,flexible-extract" if name == "gsm8k_local" \
            else "exact_match,none"
        assert harness["results"][task_name][metric] == pytest.approx(ours.accuracy), name
        for sample, row in zip(samples, ours.rows, strict=True):
            if name == "mc":  # the harness moves the context's trailing "\n" (the end of ChatML's "assistant\n")
                # into every continuation, so each choice carries the same extra log P("\n"): the same argmax
                offsets = [r[0] - ours for r, ours in zip(sample["filtered_resps"], row["logliks"], strict=True)]
                assert offsets == pytest.approx([offsets[0]] * len(offsets), abs=1e-3) and offsets[0] < 0
            else:
                assert sample["resps"][0][0].strip() == row["reply"], name
