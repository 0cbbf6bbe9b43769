"""`python -m infer serve` end to end: two server processes on 127.0.0.1 (a tiny random model with
a small tokenizer, a 64-token context so start-up compiles little), driven by the official
`openai` client and by raw HTTP for what the client will not send."""

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import pytest

from hpllm.checkpoint import write_checkpoint
from hpllm.config import preset
from hpllm.model import Transformer
from hpllm.tokenizer import Tokenizer

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "hello world, how are you?",
             "the quick brown fox jumps over the lazy dog"] * 5
CONTEXT = 64
START_TIMEOUT_S = 600  # compiling on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, *flags: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
        # The server's log goes to a file: into a pipe nobody reads, uvicorn's access lines
        # (one per /health poll of `_wait_for`) filled its 64 KiB and the server blocked
        # writing them, hanging the tests that poll longest (a loaded machine's).
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "infer", "serve", str(checkpoint), "--port", str(self.port),
             "--max-seq-len", str(CONTEXT), "--model-name", "tiny", *flags],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if get(self, "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("server did not start")

    def client(self) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                             timeout=120)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self.log.close()


def request(server: Server, method: str, path: str, body: bytes | None = None
            ) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        connection.request(method, path, body=body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def get(server: Server, path: str) -> tuple[int, dict]:
    return request(server, "GET", path)


def post(server: Server, path: str, payload: dict) -> tuple[int, dict]:
    return request(server, "POST", path, json.dumps(payload).encode())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / "ckpt"
    tokenizer = Tokenizer.train(SENTENCES, vocab_size=300)
    cfg = preset("tiny")
    write_checkpoint(folder, {"model": cfg.to_dict(), "quant": {"mode": "none"}, "step": 1},
                     {"model": Transformer(cfg, key=jax.random.key(0))},
                     {"tokenizer.json": tokenizer.to_json()})
    return folder


@pytest.fixture(scope="module")
def servers(checkpoint):
    """A server with 8 slots and one with 2 slots and a queue of 2, started together (their
    compilations overlap), killed at the end whatever happened."""
    started = {"wide": Server(checkpoint, "--max-batch", "8"),
               "narrow": Server(checkpoint, "--max-batch", "2", "--max-queue", "2",
                                "--shutdown-timeout", "60")}
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def test_the_openai_client_lists_the_model_and_completes(servers):
    client = servers["wide"].client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = [{"role": "user", "content": "hello world"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                           temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert 0 < reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # Streamed, the same greedy reply arrives in pieces, then the finish reason.
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    completion = client.completions.create(model="tiny", prompt="the cat", max_tokens=6,
                                           temperature=0, seed=3)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 6
    streamed = client.completions.create(model="tiny", prompt="the cat", max_tokens=6,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


def test_concurrent_greedy_requests_return_what_each_returns_alone(servers):
    client = servers["wide"].client()
    words = " ".join(SENTENCES[:4]).split()
    prompts = [" ".join(words[:2 + 3 * i]) for i in range(8)]  # 2 to 23 words

    def complete(i: int) -> str:
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=4 + 3 * i,
                                          temperature=0).choices[0].text

    alone = [complete(i) for i in range(8)]
    barrier = threading.Barrier(8)

    def together(i: int) -> str:
        barrier.wait(timeout=60)
        return complete(i)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(together, range(8))) == alone


@pytest.fixture(scope="module")
def long_prompt(servers) -> str:
    """A prompt whose greedy completion runs to the end of the context (the random model
    could end others early with an end token)."""
    for prompt in SENTENCES[:4] + ["hello", "the", "a dog", "park"]:
        status, body = post(servers["wide"], "/v1/completions", {
            "model": "tiny", "prompt": prompt, "max_tokens": CONTEXT, "temperature": 0})
        if status == 200 and body["choices"][0]["finish_reason"] == "length":
            return prompt
    pytest.fail("no prompt found that the tiny model completes to the end of the context")


def _wait_for(server: Server, ready, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = get(server, "/health")[1]
        if ready(health):
            return health
        time.sleep(0.05)
    raise TimeoutError(f"server state never reached: {health}")


def test_closing_a_stream_frees_its_slot(servers, long_prompt):
    server = servers["narrow"]
    client = server.client()
    # Both slots busy with streams that fill the context, then both closed after their first
    # token. The tiny model can still reach the end of the context before the server sees the
    # second close (a clean-clone run did once), so a round where a stream finished first is
    # run again; every round must free both slots, and one round must cancel both streams.
    for _ in range(3):
        before = get(server, "/health")[1]
        streams = [client.completions.create(model="tiny", prompt=long_prompt,
                                             max_tokens=CONTEXT, temperature=0, stream=True)
                   for _ in range(2)]
        for stream in streams:
            next(iter(stream))
            stream.close()
        health = _wait_for(server, lambda h, before=before: h["running"] == 0 and (
            h["cancelled"] + h["length"] + h["stop"]
            == before["cancelled"] + before["length"] + before["stop"] + 2))
        if health["cancelled"] == before["cancelled"] + 2:
            break
    else:
        pytest.fail(f"no round cancelled both streams: {health}")
    after = client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length")


def test_requests_beyond_the_queue_get_429_and_the_rest_succeed(servers, long_prompt):
    server = servers["narrow"]  # 2 slots, 2 places in the queue
    barrier = threading.Barrier(10)

    def send(_: int) -> tuple[int, dict]:
        barrier.wait(timeout=60)
        return post(server, "/v1/completions", {"model": "tiny", "prompt": long_prompt,
                                                "max_tokens": 40, "temperature": 0})

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(send, range(10)))
    statuses = sorted(status for status, _ in results)
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) >= 4 and statuses.count(429) >= 1, statuses
    for status, body in results:
        if status == 429:
            assert body["error"]["type"] == "rate_limit_error"
        else:
            assert body["usage"]["completion_tokens"] > 0


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(servers):
    server = servers["wide"]
    status, body = request(server, "POST", "/v1/chat/completions", b'{"messages": [')
    assert status == 400 and "JSON" in body["error"]["message"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    status, body = post(server, "/v1/chat/completions", {**chat, "max_tokens": -1})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = post(server, "/v1/chat/completions", {**chat, "model": "gpt-9"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    long_prompt = "the quick brown fox jumps over the lazy dog " * 40
    status, body = post(server, "/v1/completions", {"model": "tiny", "prompt": long_prompt})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = post(server, "/v1/chat/completions", {**chat, "max_tokens": 2})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_sigterm_finishes_the_request_in_flight_then_exits_0(servers):
    server = servers["narrow"]
    client = server.client()
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the cat"}], max_tokens=30,
        temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks)  # the request is in flight
    server.process.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason in ("stop", "length")
    assert server.process.wait(timeout=120) == 0
