"""`python -m infer serve CKPT`: an OpenAI-compatible HTTP server over `infer.engine`.

FastAPI + uvicorn (the stack of vLLM's and llama-cpp-python's servers). Endpoints:
`POST /v1/chat/completions`, `POST /v1/completions` (both with `stream` as server-sent events,
`data: {chunk}` lines and a final `data: [DONE]`), `GET /v1/models`, `GET /health`.

One engine thread owns the model and steps the scheduler; handlers talk to it through
`Engine.submit` (a lock-protected queue) and, per request, an asyncio queue that the engine
thread feeds with `call_soon_threadsafe`, so the event loop never waits on the model. A client
that disconnects mid-stream cancels its request, which frees its slot at the next round.

Errors are OpenAI-style JSON bodies (`{"error": {"message", "type", "param", "code"}}`): 400
for bad parameters, malformed JSON or a prompt longer than the context, 404 for an unknown
model, 429 when the queue is full. SIGTERM and Ctrl-C stop accepting connections, let the
requests in flight finish (up to `shutdown_timeout` seconds), stop the engine and return.
"""

import asyncio
import json
import secrets
import signal
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hpllm.hf_tokenizer import PretrainedTokenizer
from hpllm.tokenizer import Tokenizer
from infer.chat import render_messages
from infer.detokenizer import Detokenizer
from infer.engine import FINISH_CANCELLED, FINISH_REASONS, Engine, QueueFullError, Request
from infer.generate import PromptTooLongError
from infer.sampling import SamplingConfig

FINISH_ERROR = "error"  # the engine thread hit a bug; its traceback is on stderr


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status, message, kind, param, code)


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None
                ) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Body(BaseModel):
    """The fields both completion endpoints share; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # an extension, as in vLLM
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: str | list[str]


class EngineThread:
    """Steps the engine while there is work, sleeps on `engine.wakeup` otherwise. A bug in a
    step fails the requests in flight (finish reason `error`), empties the engine and goes on."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.engine.wakeup.set()
        self._thread.join()

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            if not engine.busy:
                engine.wakeup.wait(0.1)
                engine.wakeup.clear()
                continue
            try:
                engine.step()
            except Exception:
                traceback.print_exc()
                engine.fail_all(FINISH_ERROR)


class _Pipe:
    """The engine thread's output for one request, delivered into the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[tuple[list[int], str | None]] = asyncio.Queue()

    def __call__(self, ids: list[int], finish: str | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (ids, finish))
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass


def create_app(engine: Engine, tokenizer: Tokenizer | PretrainedTokenizer, model_name: str
               ) -> FastAPI:
    app = FastAPI(title="hpllm", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, error: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(error.message, error.kind, error.param, error.code),
                            status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: HttpRequest, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = (f"{'.'.join(where)}: {first['msg']}" if where else first["msg"])
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', '')})"
        return JSONResponse(_error_body(message, "invalid_request_error",
                                        ".".join(where) or None), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": engine.running, "queued": engine.queued,
                **{reason: engine.finished[reason] for reason in FINISH_REASONS}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "hpllm"}]}

    def check_model(body: _Body) -> None:
        if body.model is not None and body.model != model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has "
                           f"{model_name!r}", param="model", code="model_not_found")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatBody) -> JSONResponse | StreamingResponse:
        check_model(body)
        prompt = render_messages(tokenizer, [(m.role, m.content) for m in body.messages])
        return await complete(body, prompt, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody) -> JSONResponse | StreamingResponse:
        check_model(body)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(texts) != 1:
            raise ApiError(400, "give exactly one prompt", param="prompt")
        text = texts[0]
        prompt = (tokenizer.encode_prompt(text) if isinstance(tokenizer, PretrainedTokenizer)
                  else tokenizer.encode(text))
        return await complete(body, prompt, chat=False)

    async def complete(body: _Body, prompt: list[int], *, chat: bool
                       ) -> JSONResponse | StreamingResponse:
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        room = engine.context - len(prompt)
        max_tokens = room if body.max_tokens is None else min(body.max_tokens, room)
        try:
            sampling = SamplingConfig(temperature=body.temperature, top_k=body.top_k,
                                      top_p=body.top_p)
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        pipe = _Pipe(asyncio.get_running_loop())
        request = Request(prompt, max(max_tokens, 0), pipe, sampling,
                          secrets.randbits(31) if body.seed is None else body.seed)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            engine.submit(request)
        except PromptTooLongError as error:
            raise ApiError(400, str(error), param="messages" if chat else "prompt",
                           code="context_length_exceeded") from None
        except QueueFullError as error:
            raise ApiError(429, str(error), kind="rate_limit_error") from None
        reply = _Reply(request, pipe, Detokenizer(tokenizer.decode, stops), model_name, chat)
        if body.stream:
            return StreamingResponse(reply.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await reply.whole())

    return app


class _Reply:
    """One request's tokens turned into OpenAI response bodies, whole or as SSE chunks."""

    def __init__(self, request: Request, pipe: _Pipe, text: Detokenizer, model_name: str,
                 chat: bool):
        self.request, self.pipe, self.text, self.chat = request, pipe, text, chat
        self.model_name = model_name
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.n_tokens = 0

    async def pieces(self) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, None) as tokens arrive, then ("", finish reason). Cancels the request
        if the consumer goes away (a disconnected client) or a stop string ends it."""
        finish = None
        try:
            while finish is None:
                ids, finish = await self.pipe.queue.get()
                self.n_tokens += len(ids)
                piece = self.text.push(ids)
                if self.text.stopped:
                    finish = "stop"
                elif finish is not None:
                    piece += self.text.finish()
                if piece:
                    yield piece, None
            if finish == FINISH_ERROR:
                raise RuntimeError("the engine failed on this request (see the server log)")
            yield "", "stop" if finish == FINISH_CANCELLED else finish
        finally:
            self.request.cancel()  # no-op once the engine has finished it

    def usage(self) -> dict[str, int]:
        prompt = len(self.request.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": self.n_tokens,
                "total_tokens": prompt + self.n_tokens}

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    async def whole(self) -> dict[str, Any]:
        parts = [part async for part in self.pieces()]
        content, finish = "".join(p for p, _ in parts), parts[-1][1]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": content},
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [choice], "usage": self.usage()}

    def _chunk(self, piece: str | None, finish: str | None) -> str:
        if self.chat:
            delta = {} if piece is None else {"content": piece}
            if piece == "" and finish is None:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            body = {**self._head("text_completion"), "choices": [choice]}
        if finish is not None:
            body["usage"] = self.usage()
        return f"data: {json.dumps(body)}\n\n"

    async def events(self) -> AsyncIterator[str]:
        if self.chat:
            yield self._chunk("", None)  # the role comes first, as OpenAI sends it
        async for piece, finish in self.pieces():
            yield self._chunk(None if finish else piece, finish)
        yield "data: [DONE]\n\n"


def serve(engine: Engine, tokenizer: Tokenizer | PretrainedTokenizer, model_name: str, *,
          host: str, port: int, shutdown_timeout: float = 30.0) -> None:
    """Serve until SIGTERM or Ctrl-C, then finish the requests in flight and return."""
    import uvicorn

    worker = EngineThread(engine)
    worker.start()
    config = uvicorn.Config(create_app(engine, tokenizer, model_name), host=host, port=port,
                            lifespan="off", log_level="info",
                            timeout_graceful_shutdown=int(shutdown_timeout))
    # uvicorn shuts down gracefully on SIGTERM / SIGINT, then raises the signal again for the
    # handler it found installed: make that one a no-op, so a clean shutdown exits with 0.
    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
        worker.stop()
