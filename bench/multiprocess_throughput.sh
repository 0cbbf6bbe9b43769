#!/usr/bin/env bash
# Training tokens/s of one run as 1 process x 2 devices against 2 processes x 1 device (the
# same global batch, JAX's distributed runtime with gloo between the processes), `small`
# preset, in ABBA order so a drift of the machine's load hits both alike.
#
#   bench/multiprocess_throughput.sh [STEPS]        (from the repository root; default 12)
#
# Prints the median tokens/s of steps 3..STEPS of each run (steps 1-2 include compilation).
set -euo pipefail
steps=${1:-12}
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d /tmp/hpllm-mp-XXXXXX)
echo "CPU: $(grep -o -m1 -w 'avx512f\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')| $(nproc) cores | load $(cut -d' ' -f1 /proc/loadavg)"
for layout in 1x2 2x1 2x1 1x2; do
  n=${layout%x*}; k=${layout#*x}
  out=$work/$layout-$RANDOM
  "$python" -m train launch --num-processes "$n" --devices-per-process "$k" -- --preset small \
    --steps "$steps" --eval-every 0 --save-every 0 --out "$out" >"$out.log" 2>&1
  "$python" - "$out/metrics.jsonl" "$layout" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"{sys.argv[2]} (processes x devices): median {statistics.median(r['tokens_per_s'] for r in rows[2:]):,.0f} tokens/s")
PY
done
rm -rf "$work"
