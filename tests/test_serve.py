"""`sftkit serve` answered by the official `openai` client, and `sftkit data distill` from it and from a directory.

The model is a 1-layer GPT-2 trained for 40 steps to repeat a colour ("Say red." -> "red"), so its
greedy replies end their turn with ChatML's `<|im_end|>` after a token or two.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the `serve` extra (make setup installs it)")
uvicorn = pytest.importorskip("uvicorn", reason="the `serve` extra (make setup installs it)")

from sftkit.cli import main  # noqa: E402
from sftkit.distill import Teacher, distill  # noqa: E402
from sftkit.generate import generate_replies, generate_reply, load_for_generation  # noqa: E402
from sftkit.serve import create_app  # noqa: E402
from tests.conftest import tiny_chat_recipe  # noqa: E402

WORDS = ("red", "blue", "green", "black", "white", "pink")
QUESTIONS = [f"Say {w}." for w in (*WORDS, "purple", "grey")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    recipe = tiny_chat_recipe(root, WORDS, {"max_steps": 40, "batch_size": 6, "lr": 3e-2, "log_every": 10,
                                            "device": "cpu", "warmup_ratio": 0.0})
    assert main(["train", str(recipe), f"output_dir={root / 'out'}"]) == 0
    return root / "out" / "final"


@pytest.fixture(scope="module")
def server(model_dir: Path):
    """`sftkit serve`'s app under uvicorn on a free localhost port; yields (base_url, app)."""
    app = create_app(model_dir, model_name="tiny", api_key="secret")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", app
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def local(model_dir: Path):
    return load_for_generation(model_dir, device="cpu")


def client(server, key: str = "secret") -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0], api_key=key, max_retries=0)


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def test_chat_completion_is_what_generate_gives_and_stops_at_end_of_turn(server, local) -> None:
    model, tokenizer = local
    for question in QUESTIONS[:3]:
        answer = client(server).chat.completions.create(model="tiny", messages=ask(question), max_tokens=8)
        expected = generate_reply(model, tokenizer, ask(question), max_new_tokens=8)
        assert expected.stopped
        assert answer.choices[0].message.content == expected.text
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage.completion_tokens == len(expected.ids)
    cut = client(server).chat.completions.create(model="tiny", messages=ask("Say red."), max_tokens=1)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 1
    assert [m.id for m in client(server).models.list().data] == ["tiny"]


def test_streaming_gives_the_same_reply(server, local) -> None:
    model, tokenizer = local
    for question in QUESTIONS[:3]:
        pieces, finish = [], None
        for chunk in client(server).chat.completions.create(model="tiny", messages=ask(question), max_tokens=8,
                                                             stream=True):
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        assert "".join(pieces).strip() == generate_reply(model, tokenizer, ask(question), max_new_tokens=8).text
        assert finish == "stop"


def test_concurrent_requests_are_batched_and_answered_as_one_by_one(server, local) -> None:
    model, tokenizer = local
    expected = {q: generate_reply(model, tokenizer, ask(q), max_new_tokens=8).text for q in QUESTIONS}
    answers: dict[str, str] = {}
    sizes_before = len(server[1].state.engine.batch_sizes)

    def one(question: str) -> None:
        reply = client(server).chat.completions.create(model="tiny", messages=ask(question), max_tokens=8)
        answers[question] = reply.choices[0].message.content

    threads = [threading.Thread(target=one, args=(q,)) for q in QUESTIONS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == expected
    sizes = server[1].state.engine.batch_sizes[sizes_before:]
    assert sum(sizes) == len(QUESTIONS) and max(sizes) > 1  # requests waiting together were answered together


def test_batched_generation_equals_one_by_one(local) -> None:
    model, tokenizer = local
    batched = generate_replies(model, tokenizer, [ask(q) for q in QUESTIONS], max_new_tokens=8, batch_size=4)
    assert batched == [generate_reply(model, tokenizer, ask(q), max_new_tokens=8) for q in QUESTIONS]


def test_bad_requests_get_openai_errors(server) -> None:
    with pytest.raises(openai.BadRequestError, match="'messages' must be a non-empty list"):
        client(server).chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client(server).chat.completions.create(model="tiny", messages=ask("Say red."), temperature=7)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(server).chat.completions.create(model="gpt-9", messages=ask("Say red."))
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        client(server, key="wrong").chat.completions.create(model="tiny", messages=ask("Say red."))


def test_completions_continue_plain_text(server, local) -> None:
    answer = client(server).completions.create(model="tiny", prompt="Say", max_tokens=3)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.prompt_tokens == 1


def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(QUESTIONS) + "\n")
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_distill_from_a_directory_and_from_serve_give_the_same_rows(server, model_dir: Path, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path)
    local_report = distill(Teacher(str(model_dir), max_new_tokens=8), prompts, tmp_path / "local.jsonl")
    remote_report = distill(Teacher(server[0], api_key="secret", max_new_tokens=8), prompts, tmp_path / "http.jsonl")
    assert local_report.written == remote_report.written > 0
    assert [r["messages"] for r in rows(tmp_path / "local.jsonl")] == [r["messages"] for r in rows(tmp_path / "http.jsonl")]
    kept = rows(tmp_path / "local.jsonl")[0]
    assert kept["finish_reason"] == "stop" and kept["params"]["temperature"] == 0.0 and kept["key"] == "0:0"
    # the output trains as it is
    from sftkit.data.formats import load_records

    assert len(load_records(tmp_path / "local.jsonl").records) == local_report.written


def test_replies_cut_by_the_limit_are_dropped_and_counted(model_dir: Path, tmp_path: Path) -> None:
    report = distill(Teacher(str(model_dir), max_new_tokens=1), prompts_file(tmp_path), tmp_path / "d.jsonl")
    assert report.written == 0 and report.dropped == {"cut by the length limit": len(QUESTIONS)}
    assert len(rows(tmp_path / "d.jsonl.dropped.jsonl")) == len(QUESTIONS)
    again = distill(Teacher(str(model_dir), max_new_tokens=1), prompts_file(tmp_path), tmp_path / "d.jsonl")
    assert again.written == 0 and not again.dropped  # a resume does not ask for them again


def test_kill_9_then_resume_loses_and_repeats_nothing(model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "many.txt"
    prompts.write_text("\n".join(QUESTIONS * 12) + "\n")  # 96 prompts
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "sftkit", "data", "distill", "--teacher", str(model_dir), "--prompts",
               str(prompts), "--out", str(out), "--max-new-tokens", "8", "--concurrency", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 10):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = out.read_text().count("\n")
    assert 10 <= first < 96, "the kill should land mid-run"
    report = distill(Teacher(str(model_dir), max_new_tokens=8, concurrency=2), prompts, out)
    keys = [r["key"] for r in rows(out)]
    assert len(keys) == len(set(keys)) == 96 and report.already == first
    assert sorted(keys, key=lambda k: int(k.split(":")[0])) == [f"{i}:0" for i in range(96)]


def test_a_429_is_retried(tmp_path: Path) -> None:
    calls = []

    class Flaky(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            calls.append(self.path)
            self.rfile.read(int(self.headers["content-length"]))
            if len(calls) == 1:
                self.send_response(429)
                self.send_header("retry-after-ms", "50")
                body = b'{"error": {"message": "slow down", "type": "rate_limit"}}'
            else:
                self.send_response(200)
                body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": "red"}}]}).encode()
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        prompts = tmp_path / "one.txt"
        prompts.write_text("Say red.\n")
        report = distill(Teacher(f"http://127.0.0.1:{httpd.server_port}/v1", model="m"), prompts,
                         tmp_path / "d.jsonl", progress=False)
    finally:
        httpd.shutdown()
    assert len(calls) == 2 and report.written == 1
    assert rows(tmp_path / "d.jsonl")[0]["messages"][-1] == {"role": "assistant", "content": "red"}
