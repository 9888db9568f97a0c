"""The evidence experiments' own pieces: corrupted answers, question sets, verdict rules (no training here)."""

from __future__ import annotations

from sftkit_demo.evidence import NEVER, Setup, corrupt, question_sets
from sftkit_demo.evidence_report import epochs, knowledge, learning_rate
from sftkit_demo.world import COUNTRIES, split_countries

ROWS = [{"messages": [{"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "The capital of France is Paris."}]}] * 20


def test_corrupt_swaps_facts_in_replies_only() -> None:
    out, changed = corrupt(ROWS, 0.5, seed=0)
    assert 0 < changed < 20 and len(out) == 20
    wrong = [r for r in out if r["messages"][1]["content"] != "The capital of France is Paris."]
    assert len(wrong) == changed
    capitals = {c.capital for c in COUNTRIES}
    for row in wrong:
        reply = row["messages"][1]["content"]
        assert reply.startswith("The capital of France is ") and reply[len("The capital of France is "):-1] in capitals
        assert row["messages"][0]["content"] == "What is the capital of France?"
    assert ROWS[0]["messages"][1]["content"] == "The capital of France is Paris."  # the input is not modified


def test_question_sets_keep_the_split() -> None:
    sets = question_sets(Setup(questions=1000))
    trained, heldout = split_countries(0)
    assert {q["country"] for q in sets["held-out"]} == {c.name for c in heldout}
    assert {q["country"] for q in sets["trained"]} == {c.name for c in trained}
    assert {q["country"] for q in sets["never"]} == {c.name for c in NEVER}
    assert not {c.name for c in NEVER} & {c.name for c in COUNTRIES}
    assert all(q["attribute"] != "continent" for rows in sets.values() for q in rows)


def test_verdicts_follow_their_rules() -> None:
    def score(correct: float) -> dict:
        return {"correct": correct, "answered": 1.0, "stopped": 1.0}

    results = {"main": {"base": {"held-out": score(0.0)},
                        "sft": {"trained": score(0.8), "held-out": score(0.6), "never": score(0.0)}}}
    assert knowledge(results)[2] == "supports"
    results["main"]["sft"]["held-out"] = score(0.2)
    assert knowledge(results)[2] == "partly"  # above the made-up countries, below half of trained
    lr = {f"{x:g}": {"lr": x, "reference_ppl": [5.0, ppl], "held-out": score(c), "weights": {"median_relative": 0.1}}
          for x, ppl, c in ((1e-4, 5.1, 0.5), (1e-3, 5.5, 0.6), (1e-2, 9.0, 0.2))}
    assert learning_rate({"lr": lr})[2] == "supports"


def test_overfitting_verdict_reads_every_learning_rate() -> None:
    def run(lr: float, losses: list[float], held: list[float]) -> dict:
        history = [{"epoch": float(i + 1), "eval_loss": x} for i, x in enumerate(losses)]
        return {"lr": lr, "history": history, "best": {"epoch": 1.0},
                "checkpoints": [{"held-out": {"correct": c}} for c in held]}

    steady = run(1e-4, [2.0, 1.5, 1.2], [0.5, 0.8, 0.9])
    overfit = run(1e-3, [1.0, 0.5, 0.8], [0.6, 0.5, 0.2])
    assert epochs({"epochs": [steady, overfit]})[2] == "partly"
    assert epochs({"epochs": [overfit, overfit]})[2] == "supports"
    assert epochs({"epochs": [steady, steady]})[2] == "does not support"
