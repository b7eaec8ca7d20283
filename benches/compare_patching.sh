#!/usr/bin/env bash
# Activation patching on the bundled world model, monoscope beside TransformerLens on this
# machine: the time for the thirteen grids (criterion's mean for monoscope, the best of five runs
# for TransformerLens), their ratio, and the largest difference between the grids.
#   pip install transformer_lens && bash benches/compare_patching.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench patching -- --noplot world_japan_france_all_sites >&2
est=target/criterion/patching/world_japan_france_all_sites/new/estimates.json
rust_s=$(python3 -c "import json;print(json.load(open('$est'))['mean']['point_estimate']/1e9)")
cargo build --release --locked >&2
ours=$(./target/release/monoscope patch --clean "The capital of Japan is" \
  --corrupted "The capital of France is" --answer " Tokyo" --wrong " Paris" \
  --sites resid_pre,attn_out,mlp_out,heads,queries,keys,values,patterns,heads_by_pos,queries_by_pos,keys_by_pos,values_by_pos,patterns_by_pos --json)
theirs=$(python3 benches/reference/patching_tl.py 2>/dev/null)
python3 - "$rust_s" "$ours" "$theirs" <<'PY'
import json, sys
rust_s, ours, theirs = float(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"monoscope         {rust_s * 1e3:8.1f} ms for the thirteen grids")
print(f"TransformerLens   {theirs['seconds'] * 1e3:8.1f} ms  (transformer_lens {theirs['transformer_lens']}, "
      f"torch {theirs['torch']}, {theirs['threads']} threads)")
print(f"speed-up          {theirs['seconds'] / rust_s:8.2f}x  (TransformerLens time / monoscope time)")
for name, key in [("clean", "clean_logit_diff"), ("corrupted", "corrupted_logit_diff")]:
    print(f"{name} logit difference: monoscope {ours[key]:.4f}, TransformerLens {theirs[key]:.4f}")
for grid in ours["grids"]:
    a, b = grid["patched"], theirs["grids"][grid["site"]]
    diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    shape = (len(a), len(a[0]))
    assert shape == (len(b), len(b[0])), (grid["site"], shape)
    print(f"{grid['site']:<15} {shape[0]}x{shape[1]}  max |monoscope - TransformerLens| = {diff:.2e}")
PY
