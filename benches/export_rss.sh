#!/usr/bin/env bash
# Peak memory of `monoscope export` against corpus size: writes a plain-text corpus of N lines
# and one of 10·N lines, exports each whole with the bundled SAE, and prints both peak RSS
# figures (the process's VmHWM) and their ratio (memory must stay flat: ratio < 1.2).
# Usage: bash benches/export_rss.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000}"
cargo build --release --quiet
bin=target/release/monoscope
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
corpus() {
  python3 - "$1" "$2" <<'PY'
import random, sys
lines, path = int(sys.argv[1]), sys.argv[2]
rng = random.Random(0)
words = "the capital of country is city river mountain currency language spoken in known as".split()
with open(path, "w") as f:
    for i in range(lines):
        f.write(f"Document {i}: " + " ".join(rng.choice(words) for _ in range(14)) + ".\n")
PY
}
peak() {
  corpus "$1" "$tmp/corpus-$1.txt"
  "$bin" export --sae assets/sae/world-l4-topk --corpus "$tmp/corpus-$1.txt" \
    --out "$tmp/export-$1" --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["peak_rss_bytes"], r["tokens"], r["activation_rows"], r["this_run"]["total_seconds"])'
}
read -r small tok_small rows_small secs_small < <(peak "$n")
read -r large tok_large rows_large secs_large < <(peak $((10 * n)))
python3 - "$n" "$small" "$tok_small" "$rows_small" "$secs_small" "$large" "$tok_large" "$rows_large" "$secs_large" <<'PY'
import sys
n, small, ts, rs, ss, large, tl, rl, sl = sys.argv[1:]
n, small, large = int(n), int(small), int(large)
print(f"{n:>7} lines, {int(ts):>8} tokens, {int(rs):>9} rows: peak RSS {small / 2**20:7.1f} MiB ({float(ss):.1f} s)")
print(f"{10 * n:>7} lines, {int(tl):>8} tokens, {int(rl):>9} rows: peak RSS {large / 2**20:7.1f} MiB ({float(sl):.1f} s)")
print(f"ratio (10x corpus): {large / small:.3f}")
PY
