"""Load test of `python -m infer serve`: throughput and latency against concurrency.

Builds a random-weight checkpoint of a preset (default `base`), converts it (default int8; the
LM head too with `--quantize-head`), starts the server on 127.0.0.1, and drives it with the
official `openai` client: for each concurrency, `--requests` streamed completions with a fixed
prompt length and a fixed number of output tokens (end tokens are not expected from random
weights; a request that ends early is counted with the tokens it got). Reports requests/s,
output tokens/s, p50/p99 time to the first token and p50/p99 time per output token after the
first (TPOT: (last - first) / (n - 1) per request; tokens arrive a decode chunk at a time, so
per-token gaps are not meaningful). The server runs with `--kv-cache-dtype` (default bf16, the
server's own default); the table's first line says which.

    flock /tmp/hpllm-bench.lock python bench/serve_load.py --concurrency 1,4,16,32
"""

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from random_checkpoint import build_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_level(client, prompt: str, concurrency: int, n_requests: int, output_len: int
              ) -> dict:
    def one(_: int) -> tuple[float, float, float, int]:
        started = time.perf_counter()
        stamps = []
        stream = client.completions.create(model="bench", prompt=prompt, max_tokens=output_len,
                                           temperature=0, stream=True)
        tokens = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        if not stamps:
            raise RuntimeError("a request streamed no text; its tokens decoded to nothing")
        first = stamps[0] - started
        tpot = (stamps[-1] - stamps[0]) / max(1, tokens - 1)
        return first, tpot, time.perf_counter() - started, tokens

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n_requests)))
    elapsed = time.perf_counter() - started
    ttft = [r[0] for r in results]
    tpot = [r[1] for r in results]
    tokens = sum(r[3] for r in results)
    return {"concurrency": concurrency, "requests": n_requests,
            "requests_per_s": n_requests / elapsed, "output_tokens_per_s": tokens / elapsed,
            "ttft_p50_ms": 1e3 * statistics.median(ttft),
            "ttft_p99_ms": 1e3 * _percentile(ttft, 0.99),
            "tpot_p50_ms": 1e3 * statistics.median(tpot),
            "tpot_p99_ms": 1e3 * _percentile(tpot, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--to", default="int8")
    parser.add_argument("--quantize-head", action="store_true",
                        help="quantize the LM head too, as `python -m infer bench "
                             "--quantize-head` does (else it stays float32: 98 of the ~200 "
                             "MB a base int8 step reads)")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--requests", type=int, default=32, help="per concurrency level")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--kv-cache-dtype", choices=("bf16", "f32", "int8"), default="bf16",
                        help="the server's KV cache (default %(default)s, as `infer serve`'s)")
    parser.add_argument("--chunk-size", type=int, default=4,
                        help="decode steps per engine round (default %(default)s, as `infer "
                             "serve`'s)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import openai

    from hpllm.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(Path(tmp), args.preset, args.to, args.quantize_head)
        tokenizer = Tokenizer.load(checkpoint / "tokenizer.json")
        words = ("the cat sat on the mat a dog ran in the park " * 100).split()
        prompt = " ".join(words[:args.prompt_len])
        while len(tokenizer.encode(prompt)) > args.prompt_len:
            prompt = prompt.rsplit(" ", 1)[0]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen(
            [sys.executable, "-m", "infer", "serve", str(checkpoint), "--port", str(port),
             "--max-batch", str(args.max_batch), "--max-queue", "1024", "--max-seq-len",
             str(args.max_seq_len), "--kv-cache-dtype", args.kv_cache_dtype,
             "--chunk-size", str(args.chunk_size),
             "--model-name", "bench"],
            cwd=REPO, env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                   max_retries=0, timeout=600)
            deadline = time.monotonic() + 1800
            while True:
                try:
                    client.models.list()
                    break
                except openai.APIConnectionError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the server did not start") from None
                    time.sleep(1)
            run_level(client, prompt, 1, 2, 4)  # warm the connection path
            rows = [run_level(client, prompt, c, max(args.requests, c), args.output_len)
                    for c in (int(x) for x in args.concurrency.split(","))]
        finally:
            server.terminate()
            server.wait(timeout=120)
    if args.json:
        print(json.dumps({"args": vars(args), "results": rows}, indent=1))
        return
    head = ", head too" if args.quantize_head else ", head float32"
    print(f"{args.preset} {args.to}{head}, {args.kv_cache_dtype} KV cache, chunks of "
          f"{args.chunk_size}, prompt "
          f"{args.prompt_len} tokens, output {args.output_len}, --max-batch {args.max_batch}, "
          f"load {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| concurrency | requests/s | output tokens/s | TTFT p50 / p99 ms | "
          "TPOT p50 / p99 ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests_per_s']:.2f} | "
              f"{r['output_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} / "
              f"{r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} |")


if __name__ == "__main__":
    main()
