"""`sftkit serve`: an OpenAI-compatible endpoint over a trained directory, for tests and small loads.

    sftkit serve --model runs/demo/final                    # http://127.0.0.1:8000/v1
    sftkit serve --model runs/lora/final --port 9000 --api-key secret

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="final", messages=[{"role": "user", "content": "Hi"}])

`/v1/chat/completions` (streaming or not) renders the messages with the model's own template and the
template variables it was trained with, and stops at its end-of-turn token, exactly as
`sftkit generate` does; `/v1/completions` continues plain text; `/v1/models` lists the one model.
Concurrent non-streaming requests are batched (up to `max_batch`, left-padded); a streamed request
runs alone. Errors are JSON in OpenAI's shape with a 4xx status. It binds to localhost unless told
otherwise; `--api-key` requires `Authorization: Bearer KEY`.

At scale, vLLM or SGLang serve the same directory: `vllm serve runs/demo/final`.
FastAPI + uvicorn (the `serve` extra) do HTTP; the batching worker is sftkit's: one thread owns the
model, so requests never run the model at the same time.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftkit.data.templates import pad_token_id
from sftkit.generate import (
    Reply,
    continue_ids,
    encode_prompt,
    eos_ids,
    generate_replies,
    generation_config,
    load_for_generation,
    stop_ids,
    training_template_kwargs,
)
from sftkit.model import ModelError

try:  # the `serve` extra; module-level, because FastAPI reads the endpoints' annotations from these globals
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError:  # `serve()` says which extra to install
    FastAPI = None  # type: ignore[assignment,misc]

MAX_NEW_TOKENS = 512


class RequestError(Exception):
    """A bad request: answered with `status` and OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request for the worker: chat `messages` or a plain-text `prompt`, its limits, and where the answer goes."""

    messages: list[dict[str, Any]] | None
    prompt: str | None
    max_new_tokens: int
    temperature: float
    top_p: float | None
    stream: queue.Queue | None = None  # text pieces, then None, for a streamed request
    future: Future = field(default_factory=Future)


class Engine:
    """The model, its tokenizer and one worker thread that runs every request, batching what waits together."""

    def __init__(self, model_dir: str | Path, *, device: str = "auto", max_batch: int = 8) -> None:
        self.model, self.tokenizer = load_for_generation(model_dir, device=device)
        self.template_kwargs = training_template_kwargs(model_dir)
        self.stops = stop_ids(self.model, self.tokenizer, self.template_kwargs)
        self.max_batch = max_batch
        self.batch_sizes: list[int] = []  # how many requests each model call answered
        self.jobs: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._work, daemon=True, name="sftkit-serve").start()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def _work(self) -> None:
        while True:
            batch = [self.jobs.get()]
            while len(batch) < self.max_batch and batch[0].stream is None:
                try:
                    job = self.jobs.get(timeout=0.005)  # requests arriving together are answered together
                except queue.Empty:
                    break
                if job.stream is not None or not _same_sampling(job, batch[0]):
                    self.jobs.put(job)  # another kind: next round (order among kinds is not kept)
                    break
                batch.append(job)
            self.batch_sizes.append(len(batch))
            try:
                results = self._run(batch)
                for job, result in zip(batch, results):
                    job.future.set_result(result)
            except Exception as err:  # the model failed: every waiting request gets a 500, the server lives
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
                    if job.stream is not None:
                        job.stream.put(None)

    def _run(self, batch: list[Job]) -> list[Reply]:
        first = batch[0]
        if first.stream is not None:
            return [self._stream(first)]
        if first.messages is not None:
            return generate_replies(self.model, self.tokenizer, [job.messages for job in batch],
                                    max_new_tokens=[job.max_new_tokens for job in batch],
                                    temperature=first.temperature, top_p=first.top_p,
                                    template_kwargs=self.template_kwargs, batch_size=len(batch))
        return [self._complete(job) for job in batch]

    def prompt_ids(self, job: Job) -> list[int]:
        if job.messages is not None:
            return encode_prompt(self.tokenizer, job.messages, self.template_kwargs)
        return self.tokenizer(job.prompt)["input_ids"]

    def _complete(self, job: Job, streamer: Any = None) -> Reply:
        """One request alone: a plain-text completion, or a chat reply streamed piece by piece."""
        stops = self.stops if job.messages is not None else eos_ids(self.model)
        config = generation_config(self.model, stops, pad_token_id(self.tokenizer, self.stops), job.max_new_tokens,
                                   job.temperature, job.top_p)
        return continue_ids(self.model, self.tokenizer, self.prompt_ids(job), config, streamer)

    def _stream(self, job: Job) -> Reply:
        assert job.stream is not None
        pieces = job.stream

        class Pieces:  # transformers' streamer protocol: put(token ids), end()
            def __init__(self, tokenizer: Any) -> None:
                self.tokenizer, self.ids, self.sent, self.skip_prompt = tokenizer, [], "", True

            def put(self, value: torch.Tensor) -> None:
                if self.skip_prompt:  # the first call carries the prompt
                    self.skip_prompt = False
                    return
                self.ids += value.reshape(-1).tolist()
                text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > len(self.sent):  # whole characters only
                    pieces.put(text[len(self.sent):])
                    self.sent = text

            def end(self) -> None:
                pass

        try:
            return self._complete(job, Pieces(self.tokenizer))
        finally:
            pieces.put(None)


def _same_sampling(a: Job, b: Job) -> bool:
    return (a.messages is None) == (b.messages is None) and (a.temperature, a.top_p) == (b.temperature, b.top_p)


def parse_request(body: Any, chat: bool) -> Job:
    """The request's fields, checked: what OpenAI's API would refuse is refused with the field named."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
                raise RequestError(f"messages[{i}]: expected an object with role system, user, assistant or tool",
                                   f"messages[{i}].role")
            content = message.get("content")
            if isinstance(content, list):  # OpenAI's content parts: the text ones joined
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str) and not message.get("tool_calls"):
                raise RequestError(f"messages[{i}].content must be a string", f"messages[{i}].content")
            messages[i] = {**message, "content": content or ""}
        prompt = None
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string", "prompt")
        messages = None
    limit = body.get("max_completion_tokens", body.get("max_tokens")) or MAX_NEW_TOKENS
    if not isinstance(limit, int) or limit < 1:
        raise RequestError("'max_tokens' must be a positive integer", "max_tokens")
    temperature = body.get("temperature", 0.0)
    temperature = 0.0 if temperature is None else temperature
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise RequestError("'temperature' must be a number between 0 and 2", "temperature")
    top_p = body.get("top_p")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise RequestError("'top_p' must be a number in (0, 1]", "top_p")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", "n")
    stream = queue.Queue() if body.get("stream") else None
    return Job(messages, prompt, limit, float(temperature), top_p, stream)


def create_app(model_dir: str | Path, *, model_name: str | None = None, api_key: str | None = None,
               device: str = "auto", max_batch: int = 8) -> Any:
    """The FastAPI application serving `model_dir` (loaded now)."""
    if FastAPI is None:
        raise ModelError("sftkit serve needs the `serve` extra: pip install 'sftkit[serve]' (fastapi, uvicorn)")
    engine = Engine(model_dir, device=device, max_batch=max_batch)
    name = model_name or Path(model_dir).name
    app = FastAPI(title="sftkit serve", docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def _refused(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.middleware("http")
    async def _authorise(request: Request, call_next: Any) -> Any:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            err = RequestError("invalid API key: send 'Authorization: Bearer KEY'", status=401,
                               kind="authentication_error", code="invalid_api_key")
            return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    async def read(request: Request, chat: bool) -> Job:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise RequestError("the request body is not JSON") from None
        if isinstance(body, dict) and body.get("model") not in (None, name):
            raise RequestError(f"the model {body.get('model')!r} does not exist; this server has {name!r}",
                               "model", status=404, code="model_not_found")
        return parse_request(body, chat)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "sftkit"}]}

    async def answer(request: Request, chat: bool) -> Any:
        job = engine.submit(await read(request, chat))
        kind, rid, created = ("chat.completion" if chat else "text_completion"), _id(chat), int(time.time())
        if job.stream is not None:
            return StreamingResponse(_events(job, chat, kind, rid, created, name), media_type="text/event-stream")
        reply = await asyncio.wrap_future(job.future)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop" if reply.stopped else "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": reply.text.strip()}
        else:
            choice.update(text=reply.text, logprobs=None)
        usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": len(reply.ids),
                 "total_tokens": reply.prompt_tokens + len(reply.ids)}
        return {"id": rid, "object": kind, "created": created, "model": name, "choices": [choice], "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await answer(request, chat=False)

    return app


async def _events(job: Job, chat: bool, kind: str, rid: str, created: int, name: str) -> Any:
    """Server-sent events: a chunk per piece of text, then the finish reason, then [DONE]."""
    def chunk(delta: dict[str, Any] | str, finish: str | None) -> str:
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"delta": delta} if chat else {"text": delta, "logprobs": None})
        body = {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": name,
                "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    assert job.stream is not None
    if chat:
        yield chunk({"role": "assistant", "content": ""}, None)
    while (piece := await asyncio.to_thread(job.stream.get)) is not None:
        yield chunk({"content": piece} if chat else piece, None)
    reply = await asyncio.wrap_future(job.future)
    yield chunk({} if chat else "", "stop" if reply.stopped else "length")
    yield "data: [DONE]\n\n"


def _id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, device: str = "auto", max_batch: int = 8) -> None:
    """`sftkit serve`: load the model and answer until Ctrl-C."""
    try:
        import uvicorn
    except ImportError:
        raise ModelError("sftkit serve needs the `serve` extra: pip install 'sftkit[serve]' "
                         "(fastapi, uvicorn)") from None
    app = create_app(model_dir, model_name=model_name, api_key=api_key, device=device, max_batch=max_batch)
    name = model_name or Path(model_dir).name
    print(f"serving {model_dir} as {name!r} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
