#!/usr/bin/env bash
# Peak memory of `monoscope export` against corpus size: exports the bundled SAE's activations
# over N and 10·N tokens of the bundled corpus and prints both peak RSS figures and their
# ratio (memory must stay flat: ratio < 1.2). Usage: bash benches/export_rss.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20000}"
cargo build --release --quiet
bin=target/release/monoscope
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
peak() {
  "$bin" export --sae assets/sae/world-l4-topk --corpus world --tokens "$1" \
    --out "$tmp/export-$1" --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["peak_rss_bytes"], r["activation_rows"], r["this_run"]["total_seconds"])'
}
read -r small rows_small secs_small < <(peak "$n")
read -r large rows_large secs_large < <(peak $((10 * n)))
python3 - "$n" "$small" "$rows_small" "$secs_small" "$large" "$rows_large" "$secs_large" <<'PY'
import sys
n, small, rs, ss, large, rl, sl = sys.argv[1:]
n, small, large = int(n), int(small), int(large)
print(f"{n:>9} tokens: {int(rs):>10} rows  peak RSS {small / 2**20:7.1f} MiB  ({float(ss):.1f} s)")
print(f"{10 * n:>9} tokens: {int(rl):>10} rows  peak RSS {large / 2**20:7.1f} MiB  ({float(sl):.1f} s)")
print(f"ratio (10x tokens): {large / small:.3f}")
PY
