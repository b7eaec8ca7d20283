#!/usr/bin/env bash
# SAE training speed and quality against PyTorch, side by side on this machine: the same
# synthetic data (d_in 512), the same recipe (d_sae 8192, k 32, batch 4096, Adam 4e-4; and a
# ReLU-L1 SAE of the same size), the same number of steps. Prints tokens/s and FVU for each and
# the ratios. Usage (needs torch, numpy, safetensors):
#   pip install torch numpy safetensors && bash benches/compare_sae.sh [STEPS]
# On a CUDA GPU both sides run there (monoscope built with --features cuda, its tensor engine):
#   DEVICE=cuda bash benches/compare_sae.sh [STEPS]        (DEVICE: cpu, cuda or cuda:N)
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-200}"
data="${SAE_BENCH_DATA:-target/sae-bench/synthetic.safetensors}"
mkdir -p "$(dirname "$data")"
[ -f "$data" ] || python3 benches/reference/sae_synthetic.py --out "$data" >&2
device="${DEVICE:-cpu}"
features=()
[ "$device" = cpu ] || features=(--features cuda)
bin=$(cargo build --release --bench sae ${features[@]+"${features[@]}"} \
  --message-format=json-render-diagnostics | python3 scripts/executables.py bench:sae)
rust=$(MONOSCOPE_SAE_COMPARE="$data" MONOSCOPE_SAE_STEPS="$steps" MONOSCOPE_SAE_DEVICE="$device" "$bin")
torch=""
for v in topk_dense topk_sparse relu_l1; do
  torch+=$(python3 benches/reference/sae_torch.py --data "$data" --variant "$v" --steps "$steps" \
    --device "$device")$'\n'
done
python3 benches/reference/sae_ratios.py "$rust" "$torch"
