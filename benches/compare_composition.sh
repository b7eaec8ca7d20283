#!/usr/bin/env bash
# Composition scores, monoscope beside TransformerLens on this machine: on the bundled world
# model, the time each takes for Q, K and V (monoscope: `heads --composition` with and without
# the flag, the best of five; TransformerLens: the best of five after a warm-up), then on it
# and on every fixture architecture (RMSNorm, Gemma's (1+w) gain, grouped- and multi-query
# attention, partial rotary) the largest difference over every head pair.
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
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for model in assets/world tests/fixtures/models/*; do
  name=$(basename "$model")
  ./target/release/monoscope heads --composition --json --model "$model" > "$out/$name.ours.json"
  python3 benches/reference/composition_tl.py --model "$model" 2>/dev/null > "$out/$name.theirs.json"
done
python3 - "$with" "$without" "$out" <<'PY'
import glob, json, os, sys
with_s, without_s, out = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
world = json.load(open(f"{out}/world.theirs.json"))
print(f"monoscope         {(with_s - without_s) * 1e3:8.1f} ms for Q, K and V on the world model "
      "(heads --composition minus heads)")
print(f"TransformerLens   {world['seconds'] * 1e3:8.1f} ms  (transformer_lens {world['transformer_lens']}, "
      f"torch {world['torch']}, {world['threads']} threads)")
def flat(x):
    return [v for a in x for b in a for c in b for v in c]
for path in sorted(glob.glob(f"{out}/*.ours.json")):
    name = os.path.basename(path).removesuffix(".ours.json")
    ours, theirs = json.load(open(path)), json.load(open(f"{out}/{name}.theirs.json"))
    for c in ours["composition"]:
        a, b = flat(c["scores"]), flat(theirs["scores"][c["mode"]])
        assert len(a) == len(b), (name, c["mode"], len(a), len(b))
        diff = max(abs(x - y) for x, y in zip(a, b))
        top = max(range(len(a)), key=lambda i: a[i])
        print(f"{name:<9} {c['mode']}-composition: {len(a):5} pairs, max |monoscope - TransformerLens| "
              f"= {diff:.2e}; highest {a[top]:.4f} (TransformerLens {b[top]:.4f})")
PY
