#!/usr/bin/env bash
# Composition scores of the bundled world model, monoscope beside TransformerLens on this
# machine: the largest difference over every head pair for Q-, K- and V-composition, and the
# time each takes for the three (monoscope: `heads --composition` with and without the
# flag, the best of five; TransformerLens: the best of five after a warm-up).
#   pip install transformer_lens && bash benches/compare_composition.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked >&2
best_of_five() {
  python3 - "$@" <<'PY'
import subprocess, sys, time
times = []
for _ in range(5):
    start = time.perf_counter()
    subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
    times.append(time.perf_counter() - start)
print(min(times))
PY
}
with=$(best_of_five ./target/release/monoscope heads --composition --json)
without=$(best_of_five ./target/release/monoscope heads --json)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
./target/release/monoscope heads --composition --json > "$dir/ours.json"
python3 benches/reference/composition_tl.py 2>/dev/null > "$dir/theirs.json"
python3 - "$with" "$without" "$dir/ours.json" "$dir/theirs.json" <<'PY'
import json, sys
with_s, without_s = float(sys.argv[1]), float(sys.argv[2])
ours, theirs = json.load(open(sys.argv[3])), json.load(open(sys.argv[4]))
rust_s = with_s - without_s
print(f"monoscope         {rust_s * 1e3:8.1f} ms for Q, K and V (heads --composition minus heads)")
print(f"TransformerLens   {theirs['seconds'] * 1e3:8.1f} ms  (transformer_lens {theirs['transformer_lens']}, "
      f"torch {theirs['torch']}, {theirs['threads']} threads)")
def flat(x):
    return [v for a in x for b in a for c in b for v in c]
for c in ours["composition"]:
    a, b = flat(c["scores"]), flat(theirs["scores"][c["mode"]])
    assert len(a) == len(b), (c["mode"], len(a), len(b))
    diff = max(abs(x - y) for x, y in zip(a, b))
    top = max(range(len(a)), key=lambda i: a[i])
    print(f"{c['mode']}-composition: {len(a)} pairs, max |monoscope - TransformerLens| = {diff:.2e}; "
          f"highest {a[top]:.4f} (TransformerLens {b[top]:.4f}); baseline {c['baseline']:.4f}")
PY
