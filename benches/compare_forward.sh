#!/usr/bin/env bash
# Runs the monoscope forward benchmark and the PyTorch reference on this machine, one after
# the other, and prints tokens/s for each and their ratio (monoscope / PyTorch).
#   pip install torch transformers && bash benches/compare_forward.sh
# On a CUDA GPU, both there (monoscope built with --features cuda):
#   DEVICE=cuda bash benches/compare_forward.sh             (DEVICE: cpu, cuda or cuda:N)
set -euo pipefail
cd "$(dirname "$0")/.."
device="${DEVICE:-cpu}"
features=()
[ "$device" = cpu ] || features=(--features cuda)
MONOSCOPE_FORWARD_DEVICE="$device" cargo bench --bench forward ${features[@]+"${features[@]}"} \
  -- --noplot >&2
tag=$([ "$device" = cpu ] && echo cpu || echo "${device/:/}")
[ "$tag" = cuda ] && tag=cuda0
est=target/criterion/forward/gpt2_small_${tag}_b8x128_capture_mlp_post/new/estimates.json
rust_tps=$(python3 -c "import json;e=json.load(open('$est'));print(1024/(e['mean']['point_estimate']/1e9))")
torch_json=$(python3 benches/reference/forward_torch.py --device "$device")
torch_tps=$(python3 -c "import json,sys;print(json.loads(sys.argv[1])['tokens_per_second'])" "$torch_json")
python3 - "$rust_tps" "$torch_tps" "$torch_json" <<'PY'
import sys, json
rust, torch = float(sys.argv[1]), float(sys.argv[2])
info = json.loads(sys.argv[3])
print(f"monoscope  {rust:10.1f} tokens/s")
print(f"pytorch    {torch:10.1f} tokens/s  (torch {info['torch']}, {info['threads']} threads)")
print(f"ratio      {rust / torch:10.2f}x  (monoscope / pytorch)")
PY
