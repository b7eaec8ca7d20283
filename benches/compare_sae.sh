#!/usr/bin/env bash
# SAE training speed and quality against PyTorch, side by side on this machine: the same
# synthetic data (d_in 512), the same recipe (d_sae 8192, k 32, batch 4096, Adam 4e-4; and a
# ReLU-L1 SAE of the same size), the same number of steps. Prints tokens/s and FVU for each and
# the ratios. Usage (needs torch, numpy, safetensors):
#   pip install torch numpy safetensors && bash benches/compare_sae.sh [STEPS]
# On a CUDA GPU both sides run there (monoscope built with --features cuda, its tensor engine):
#   DEVICE=cuda bash benches/compare_sae.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-200}"
data="${SAE_BENCH_DATA:-target/sae-bench/synthetic.safetensors}"
mkdir -p "$(dirname "$data")"
[ -f "$data" ] || python3 benches/reference/sae_synthetic.py --out "$data" >&2
device="${DEVICE:-cpu}"
features=()
[ "$device" = cpu ] || features=(--features cuda)
cargo build --release --bench sae "${features[@]}" >&2
bin=$(ls -t target/release/deps/sae-* | grep -v '\.d$' | head -1)
rust=$(MONOSCOPE_SAE_COMPARE="$data" MONOSCOPE_SAE_STEPS="$steps" MONOSCOPE_SAE_DEVICE="$device" "$bin")
torch=""
for v in topk_dense topk_sparse relu_l1; do
  torch+=$(python3 benches/reference/sae_torch.py --data "$data" --variant "$v" --steps "$steps" \
    --device "$device")$'\n'
done
python3 - "$rust" "$torch" <<'PY'
import json, sys
rust = {r["variant"]: r for r in map(json.loads, sys.argv[1].split("\n")) if r}
torch = {r["variant"]: r for r in (json.loads(l) for l in sys.argv[2].split("\n") if l.strip())}
print(f"{'run':28} {'tokens/s':>10} {'FVU':>8} {'L0':>8}")
for name, r in [("monoscope topk", rust["topk"]), ("pytorch topk dense", torch["topk_dense"]),
                ("pytorch topk sparse (bag)", torch["topk_sparse"]),
                ("monoscope relu-l1", rust["relu_l1"]), ("pytorch relu-l1", torch["relu_l1"])]:
    print(f"{name:28} {r['tokens_per_second']:10.0f} {r['fvu']:8.4f} {r['l0']:8.1f}")
best = max(torch["topk_dense"], torch["topk_sparse"], key=lambda r: r["tokens_per_second"])
print(f"topk speed ratio   {rust['topk']['tokens_per_second'] / best['tokens_per_second']:.2f}x (vs the faster PyTorch form, {best['variant']})")
print(f"topk FVU ratio     {rust['topk']['fvu'] / best['fvu']:.3f} (monoscope / pytorch)")
print(f"relu-l1 speed ratio {rust['relu_l1']['tokens_per_second'] / torch['relu_l1']['tokens_per_second']:.2f}x")
print(f"relu-l1 FVU ratio   {rust['relu_l1']['fvu'] / torch['relu_l1']['fvu']:.3f}")
PY
