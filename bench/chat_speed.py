"""Chat reply speed against `bench`'s batch-1 decode rate for the same model (issue 14).

Runs `python -m infer chat CKPT` on a scripted conversation (greedy, one `/stats` after every
turn) and `python -m infer bench CKPT --batch-sizes 1` on the same checkpoint, alternating the
two `--rounds` times so that a drift of a shared machine's load hits both. A reply's rate is
its tokens over the time from submitting the turn to its last token (the turn's own prefill
included), as `/stats` prints it. Without CKPT, a random-weight checkpoint of the demo's shape
(`small`) is built and converted to int8 in a temporary folder, since only the speed matters.

    flock /tmp/hpllm-bench.lock python bench/chat_speed.py [CKPT] [--turns 6] [--rounds 2]
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from random_checkpoint import build_checkpoint

REPO = Path(__file__).resolve().parents[1]
TURNS = ["Tell me about the weather today.", "And what about tomorrow?",
         "Why do you think so?", "Say that again in other words.",
         "What did I ask you first?", "Thank you, that is all for now."]
STATS = re.compile(r"\[last reply: (\d+) tokens in ([\d.]+) s, ([\d.]+) tokens/s")


def chat_rates(checkpoint: Path, turns: int, max_new_tokens: int) -> list[tuple[int, float]]:
    script = "".join(f"{TURNS[i % len(TURNS)]}\n/stats\n" for i in range(turns))
    done = subprocess.run(
        [sys.executable, "-m", "infer", "chat", str(checkpoint), "--greedy",
         "--max-new-tokens", str(max_new_tokens)],
        input=script, capture_output=True, text=True, cwd=REPO, check=True)
    return [(int(n), float(rate)) for n, _, rate in STATS.findall(done.stderr)]


def bench_rate(checkpoint: Path, new_tokens: int) -> float:
    done = subprocess.run(
        [sys.executable, "-m", "infer", "bench", str(checkpoint), "--batch-sizes", "1",
         "--prompt-len", "32", "--new-tokens", str(new_tokens), "--repeats", "3", "--json"],
        capture_output=True, text=True, cwd=REPO, check=True)
    report = json.loads(done.stdout)
    report = report.get("reports", [report])[0]
    return report["results"][0]["decode_tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path)
    parser.add_argument("--preset", default="small", help="shape of the random model")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or build_checkpoint(Path(tmp), args.preset, "int8")
        later_turns, bench_rates = [], []
        for round_ in range(args.rounds):
            rates = chat_rates(checkpoint, args.turns, args.max_new_tokens)
            later_turns += [rate for _, rate in rates[1:]]
            bench_rates.append(bench_rate(checkpoint, args.max_new_tokens))
            print(f"round {round_ + 1}: chat turns (tokens, tokens/s) {rates}; "
                  f"bench batch-1 decode {bench_rates[-1]:.1f} tokens/s", flush=True)
    chat, bench = statistics.median(later_turns), statistics.median(bench_rates)
    print(json.dumps({"checkpoint": str(args.checkpoint or f"random {args.preset} int8"),
                      "chat_tokens_per_s_turn2_on_median": chat,
                      "bench_batch1_decode_tokens_per_s_median": bench,
                      "bench_over_chat": bench / chat}, indent=1))


if __name__ == "__main__":
    main()
