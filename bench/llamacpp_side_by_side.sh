#!/usr/bin/env bash
# hpllm `bench` and llama.cpp `llama-bench` on the same shape, interleaved in one run: batch-1
# decode (tg128) and 128-token prefill (pp128) of f32, bf16, int8 and int4 against llama.cpp's
# F32, F16, Q8_0 and Q4_0 (random weights of the same shape; the head quantized on both sides),
# and of w8a8 and w4a8 (int8 / int4 weights with int8 activations per token: the arithmetic of
# llama.cpp's Q8_0 and Q4_0 dot products, which quantize the activations to 8 bits too)
# against Q8_0 and Q4_0.
# KV cache: hpllm's bf16 (`infer bench`'s default; --kv-cache-dtype in the extra args changes
# it) against llama.cpp's f16 (llama-bench's default, given explicitly); the table says both.
# Positions: llama-bench's tg128 decodes positions 0-127 of an emptied cache (its test_gen after
# llama_memory_clear), so hpllm's decode is timed after a 1-token prompt (positions 1-128), and
# its prefill in a second `infer bench` call with a 128-token prompt, as pp128. (Until the tenth
# sitting hpllm's decode followed its 128-token prefill: positions 128-255, three times the
# cache reads per step of llama.cpp's on average.)
#
#   flock /tmp/hpllm-bench.lock bench/llamacpp_side_by_side.sh [base] [extra args for infer bench]
#
# Needs llama.cpp's `llama-bench` and the GGUF files that ../shared/peers/build.sh and
# models.sh (from the project's handover folder) write under PEERS_DIR (default
# ~/.cache/hpllm-peers). LLAMA_BUILD picks the llama.cpp build folder (default
# $PEERS_DIR/build-llamacpp). For the AVX2 paths on an AVX-512 CPU, build llama.cpp with
# -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF and run
#   HPLLM_KERNEL_ISA=avx2 XLA_FLAGS=--xla_cpu_max_isa=AVX2 LLAMA_BUILD=... bench/llamacpp_side_by_side.sh
# Run from the project root (it uses .venv/bin/python).
set -euo pipefail
P=${PEERS_DIR:-$HOME/.cache/hpllm-peers}; shape=${1:-base}; shift || true
LLAMA_BUILD=${LLAMA_BUILD:-$P/build-llamacpp}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) | flags: $(grep -o -w 'avx512f\|avx512_vnni\|avx512_bf16\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')| load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "hpllm kernels: HPLLM_KERNEL_ISA=${HPLLM_KERNEL_ISA:-native} XLA_FLAGS=${XLA_FLAGS:-} | llama.cpp: $LLAMA_BUILD"
run_llama() { for m in f32 f16 q8_0 q4_0; do
  "$LLAMA_BUILD/bin/llama-bench" -m "$P/models/$shape-$m.gguf" -t "$(nproc)" -p 128 -n 128 -r 3 \
    -ctk f16 -ctv f16 -o json >"$out/llama-$m-$1.json" 2>/dev/null; done; }
# run_ours TAG: decode (tg-TAG: 1-token prompt, 128 steps) and prefill (pp-TAG: 128 tokens).
run_ours() { local tag=$1; shift
  local what prompt new
  for part in "tg 1 129" "pp 128 2"; do read -r what prompt new <<<"$part"
    .venv/bin/python -m infer bench --preset "$shape" --json --to f32,bf16,int8,int4,w8a8,w4a8 \
      --quantize-head --batch-sizes 1 --prompt-len "$prompt" --new-tokens "$new" --repeats 3 \
      --kv-cache-dtype bf16 "$@" >"$out/ours-$what-$tag.json" 2>"$out/ours-$tag.err" \
      || { echo "python -m infer bench failed: $(tail -n 1 "$out/ours-$tag.err")"; exit 1; }
  done; }
run_ours 1 "$@"; run_llama 1; run_ours 2 "$@"; run_llama 2
.venv/bin/python - "$out" <<'PY'
import glob, json, statistics, sys
d = sys.argv[1]
theirs_runs, ours_runs = {}, {}
for f in glob.glob(f"{d}/llama-*.json"):
    fmt = f.split("llama-")[1].rsplit("-", 1)[0]
    for r in json.load(open(f)):
        theirs_runs.setdefault((fmt, "tg" if r["n_gen"] else "pp"), []).append(r["avg_ts"])
path, kv = "", set()
for f in glob.glob(f"{d}/ours-*.json"):
    part = f.split("ours-")[1].split("-")[0]  # tg: the decode call, pp: the prefill call
    field = "decode_tokens_per_s" if part == "tg" else "prefill_tokens_per_s"
    report = json.load(open(f))
    for rep in report["reports"]:
        path = rep.get("native_kernel_path") or path
        kv.add(rep["kv_cache_dtype"])
        for row in rep["results"]:
            ours_runs.setdefault((rep["weights"], part), []).append(row[field])
median = lambda runs, key: statistics.median(runs.get(key) or [0])
ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"
print(f"hpllm native kernel path: {path or 'none'}; KV cache: hpllm {', '.join(sorted(kv))}, "
      "llama.cpp f16; decode at positions 1-128 (llama.cpp 0-127); medians of two interleaved "
      "rounds")
print("| hpllm / llama.cpp | hpllm decode tok/s | llama.cpp tg128 | ratio "
      "| hpllm prefill tok/s | llama.cpp pp128 | ratio |")
print("|---|---|---|---|---|---|---|")
for mine, theirs in (("f32", "f32"), ("bf16", "f32"), ("bf16", "f16"), ("int8", "q8_0"),
                     ("int4", "q4_0"), ("w8a8", "q8_0"), ("w4a8", "q4_0")):
    m = {k: median(ours_runs, (mine, k)) for k in ("tg", "pp")}
    t = {k: median(theirs_runs, (theirs, k)) for k in ("tg", "pp")}
    print(f"| {mine} / {theirs.upper()} | {m['tg']:.1f} | {t['tg']:.1f} | "
          f"{ratio(m['tg'], t['tg'])} | {m['pp']:.0f} | {t['pp']:.0f} | "
          f"{ratio(m['pp'], t['pp'])} |")
PY
