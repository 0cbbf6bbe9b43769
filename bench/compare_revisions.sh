#!/usr/bin/env bash
# Decode speed of two revisions, measured in one sitting with the runs interleaved.
#
#   bench/compare_revisions.sh OLD NEW [ROUNDS]      (run from the repository root)
#
# OLD and NEW are git revisions (NEW may be "WORKTREE": the checkout as it is). Each is checked
# out into a temporary detached worktree, then ROUNDS (default 4) rounds run
# `python -m infer bench` once per revision, in ABBA order (old, new, new, old, ...) so a slow
# drift of the shared machine's load hits both alike; every run holds /tmp/hpllm-bench.lock.
# The JSON reports go to $OUT (default: a new folder under /tmp) and a table of the median
# decode ms/step per weight format, old against new, is printed at the end.
#
# Environment: PYTHON (default .venv/bin/python), OUT, BENCH_ARGS (default: the batch-1
# comparison of docs/performance.md).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
old_rev=$1
new_rev=$2
rounds=${3:-4}
python=$(realpath -s "${PYTHON:-.venv/bin/python}")  # -s: a venv's python is a symlink
bench_args=${BENCH_ARGS:---preset base --json --to f32,int8,int4 --quantize-head --batch-sizes 1 --repeats 3}
out=${OUT:-$(mktemp -d /tmp/hpllm-compare-XXXXXX)}
mkdir -p "$out"
trees=$(mktemp -d /tmp/hpllm-trees-XXXXXX)

cleanup() {
    git worktree remove --force "$trees/old" 2>/dev/null || true
    if [[ $new_rev == WORKTREE ]]; then rm -f "$trees/new"
    else git worktree remove --force "$trees/new" 2>/dev/null || true; fi
    rmdir "$trees" 2>/dev/null || true
}
trap cleanup EXIT

git worktree add --quiet --detach "$trees/old" "$old_rev"
if [[ $new_rev == WORKTREE ]]; then
    ln -s "$(pwd)" "$trees/new"
else
    git worktree add --quiet --detach "$trees/new" "$new_rev"
fi
echo "old: $old_rev ($(git -C "$trees/old" rev-parse --short HEAD)), new: $new_rev" \
    "($(git -C "$trees/new" rev-parse --short HEAD)$([[ $new_rev == WORKTREE ]] && \
    [[ -n $(git status --porcelain) ]] && echo ", with uncommitted changes")); reports in $out"

run() {  # run NAME ROUND
    local name=$1 round=$2
    echo "round $round: $name" >&2
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
    (cd "$trees/$name" && PYTHONPATH=src:. flock /tmp/hpllm-bench.lock \
        "$python" -m infer bench $bench_args) > "$out/$name-$round.json"
}

for ((round = 1; round <= rounds; round++)); do
    if ((round % 2)); then run old "$round"; run new "$round"
    else run new "$round"; run old "$round"; fi
done

"$python" - "$out" <<'EOF'
import json, statistics, sys
from pathlib import Path

runs = {"old": [], "new": []}
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    report = json.loads(path.read_text())
    runs[path.stem.split("-")[0]].append(report.get("reports", [report]))
print("| weights | batch | old ms/step (runs) | new ms/step (runs) | old median | new median "
      "| new/old |")
print("|---|---|---|---|---|---|---|")
for i, report in enumerate(runs["old"][0]):
    for j, row in enumerate(report["results"]):
        per = {side: [reports[i]["results"][j]["decode_ms_per_step"] for reports in runs[side]]
               for side in runs}
        old, new = (statistics.median(per[side]) for side in ("old", "new"))
        print(f"| {report['weights']} | {row['batch_size']} | "
              f"{', '.join(f'{x:.2f}' for x in per['old'])} | "
              f"{', '.join(f'{x:.2f}' for x in per['new'])} | {old:.2f} | {new:.2f} | "
              f"{new / old:.3f} |")
for side in runs:
    loads = [reports[0]["load_average_1min_before_after"] for reports in runs[side]]
    print(f"{side}: 1-minute load average before/after each run: "
          f"{', '.join(f'{a:.1f}/{b:.1f}' for a, b in loads)}")
EOF
