"""`sftkit generate` / `sftkit chat`: the training template, and stopping at the end-of-turn token.

A tiny model whose output head is forced (all weights 0, a bias on one token) makes "what comes
next" certain, so stopping and `max_new_tokens` can be checked exactly without training.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from sftkit.checkpoint import save_tiny_model
from sftkit.cli import main
from sftkit.data.messages import Conversation, Message
from sftkit.data.render import IGNORE_INDEX, Renderer
from sftkit.data.templates import prepare_tokenizer
from sftkit.generate import (
    chat,
    encode_prompt,
    generate_reply,
    load_for_generation,
    stop_ids,
    training_template_kwargs,
)
from sftkit.model import ModelError, build_tiny_model
from tests.conftest import config_path, tokenizer_dir

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return AutoTokenizer.from_pretrained(tokenizer_dir("qwen2.5"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(config_path("qwen2"), tokenizer_dir("qwen2.5"), tmp_path_factory.mktemp("gen") / "tiny")


def forced(tokenizer, token_id: int):
    """A tiny Qwen2 that always predicts `token_id` (an untied head with bias, weights zero)."""
    model = build_tiny_model(config_path("qwen2"), tokenizer, overrides={"tie_word_embeddings": False})
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 10.0
    model.lm_head = head
    return model.eval()


@pytest.mark.parametrize("family", ["qwen2.5", "llama3.2", "phi3"])
def test_prompt_is_what_training_trains_after(family: str) -> None:
    """The generation prompt = the tokens before the trained reply in training, id for id."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(family))
    kwargs = {"date_string": "26 Jul 2024"}
    convo = Conversation([Message("user", "What is 2+2?"), Message("assistant", "4")])
    example = Renderer(tokenizer, template_kwargs=kwargs).render(convo)
    first_trained = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert encode_prompt(tokenizer, convo.as_template_dicts()[:1], kwargs) == example.input_ids[:first_trained]


def test_stop_ids_add_the_end_of_turn_token(qwen_tokenizer) -> None:
    im_end, endoftext = qwen_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model = build_tiny_model(config_path("qwen2"), qwen_tokenizer)
    model.generation_config.eos_token_id = endoftext  # a base model's config knows only <|endoftext|>
    assert stop_ids(model, qwen_tokenizer) == [endoftext, im_end]
    gpt2 = AutoTokenizer.from_pretrained(tokenizer_dir("gpt2"))
    prepare_tokenizer(gpt2, "chatml")
    assert gpt2.convert_tokens_to_ids("<|im_end|>") in stop_ids(build_tiny_model(config_path("gpt2"), gpt2), gpt2)


def test_generation_stops_at_end_of_turn(qwen_tokenizer) -> None:
    im_end, endoftext = qwen_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model = forced(qwen_tokenizer, im_end)
    model.generation_config.eos_token_id = endoftext  # stopping must come from the template's end of turn
    reply = generate_reply(model, qwen_tokenizer, QUESTION, max_new_tokens=10)
    assert reply.ids == [im_end] and reply.stopped and reply.text == ""


def test_generation_without_end_of_turn_runs_to_max_new_tokens(qwen_tokenizer) -> None:
    word = qwen_tokenizer.convert_tokens_to_ids("hello")
    reply = generate_reply(forced(qwen_tokenizer, word), qwen_tokenizer, QUESTION, max_new_tokens=5)
    assert reply.ids == [word] * 5 and not reply.stopped and reply.text == "hello" * 5


def test_sampling_with_temperature(qwen_tokenizer) -> None:
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    reply = generate_reply(forced(qwen_tokenizer, im_end), qwen_tokenizer, QUESTION, temperature=0.7)
    assert reply.ids == [im_end]  # bias 10 vs 0: sampling still picks it


def test_generate_command(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--system", "Be brief.",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() or "max-new-tokens 3" in captured.err


def test_chat_repl_keeps_history_and_resets(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stdin = io.StringIO("Hi\nHow are you?\n/reset\n\nBye\n/exit\nnever read\n")
    messages = chat(tiny_dir, system="Be brief.", max_new_tokens=3, device="cpu", stdin=stdin)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "Bye"
    assert "sftkit chat" in capsys.readouterr().out


def test_template_kwargs_come_back_from_the_training_config(tmp_path: Path) -> None:
    assert training_template_kwargs(tmp_path) == {}
    (tmp_path / "sftkit_config.yaml").write_text("data:\n  template_kwargs: {date_string: 26 Jul 2024}\n")
    assert training_template_kwargs(tmp_path) == {"date_string": "26 Jul 2024"}


def test_local_directories_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ModelError, match="local directories only"):
        load_for_generation("Qwen/Qwen2.5-0.5B-Instruct")
    assert main(["generate", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--prompt", "Hi"]) == 2
    assert "sftkit loads local directories only" in capsys.readouterr().err


class Terminal(io.StringIO):
    """stdout of `sftkit chat` where the user presses Ctrl-C (a real SIGINT to this process) as the first
    reply starts to print; everything printed is kept."""

    interrupted = False

    def write(self, text: str) -> int:
        after_banner = "\n" in self.getvalue()
        written = super().write(text)
        if after_banner and not self.interrupted:  # the first reply is streaming
            self.interrupted = True
            os.kill(os.getpid(), signal.SIGINT)  # Python's own handler: KeyboardInterrupt right here
        return written


def test_ctrl_c_during_a_reply_stops_it_and_keeps_the_session(tiny_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Python's own Ctrl-C handler, as in a terminal: a run started in the background (`make test &`, nohup)
    # inherits SIGINT ignored, and the Terminal's SIGINT would then do nothing
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_during_a_reply(tiny_dir, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_during_a_reply(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    stdin = io.StringIO("Tell me a long story\nHi\n")
    messages = chat(tiny_dir, max_new_tokens=3, device="cpu", stdin=stdin)
    assert [(m["role"], m["content"]) for m in messages][:1] == [("user", "Hi")]  # the stopped one left out
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert "[reply stopped (Ctrl-C)" in terminal.getvalue()
    assert stdin.read() == ""  # the session went on to read the next prompt, then ended at end of input


def test_ctrl_c_at_the_prompt_ends_the_session_without_a_traceback(tiny_dir: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    class CtrlC(io.StringIO):
        def readline(self, *args: object) -> str:
            line = super().readline()
            if not line:
                raise KeyboardInterrupt
            return line

    messages = chat(tiny_dir, max_new_tokens=2, device="cpu", stdin=CtrlC("Hi\n"))
    assert [m["role"] for m in messages] == ["user", "assistant"]
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err


def test_ctrl_c_at_the_prompt_of_a_real_chat_process_exits_cleanly(tiny_dir: Path) -> None:
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "sftkit", "chat", "--model", str(tiny_dir), "--device", "cpu",
                                "--max-new-tokens", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = process.stdout.readline()  # the model is loaded; the next line read is the user's
        assert banner.startswith("sftkit chat"), process.stderr.read()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
