#!/usr/bin/env bash
# Cross-layer transcoder training against PyTorch, side by side on this machine: the same rows
# of the bundled model's activations (every layer's hook_resid_mid and hook_mlp_out; 8 layers,
# 192 wide), the same recipe (1,536 features a layer, BatchTopK k 16 with 4k candidates per
# token, batch 1,024, Adam 1e-3 with warm-up and decay, AuxK off), the same number of steps.
# Prints tokens/s, FVU and L0 on held-out rows for monoscope and for the PyTorch reference with
# dense and with sparse (embedding_bag) decoding, and the ratios. Usage (needs torch and
# safetensors):
#   bash benches/compare_clt.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-100}"
python="${PYTHON:-/opt/saelens-venv/bin/python}"
data="${CLT_BENCH_DATA:-target/clt-bench/rows.safetensors}"
mkdir -p "$(dirname "$data")"
bin=$(cargo build --release --bench clt --message-format=json-render-diagnostics \
  | python3 scripts/executables.py bench:clt)
[ -f "$data" ] || MONOSCOPE_CLT_DUMP="$data" "$bin"
ours=$(MONOSCOPE_CLT_COMPARE="$data" MONOSCOPE_CLT_STEPS="$steps" "$bin")
echo "$ours"
for v in dense sparse; do
  theirs=$("$python" benches/reference/clt_torch.py --data "$data" --variant "$v" --steps "$steps")
  echo "$theirs"
  python3 - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"  monoscope / {b['side']}: {a['tokens_per_second'] / b['tokens_per_second']:.2f}x tokens/s; "
      f"FVU {a['fvu']:.4f} vs {b['fvu']:.4f}; L0 {a['l0']:.1f} vs {b['l0']:.1f}")
PY
done
