#!/usr/bin/env bash
# Attribution graphs side by side: `monoscope attribute` and circuit-tracer 0.5.0's `attribute`
# on the same machine, model, transcoders and prompt (BOS first, as circuit-tracer puts it).
# Prints each one's time for the attribution itself (models loaded), the ratio, each process's
# peak resident memory, and how far apart the two unpruned adjacency matrices are.
#   bash benches/compare_attribution.sh TRANSCODERS_DIR [MODEL_DIR] [PROMPT]
# TRANSCODERS_DIR: per-layer transcoders as monoscope saves them, or a cross-layer transcoder in
# circuit-tracer's format (benches/reference/random_clt.py makes one for the bundled model).
# Needs a Python with circuit-tracer 0.5.0 (PYTHON, default /opt/saelens-venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
transcoders=${1:?a folder of per-layer transcoders (layer_0, layer_1, ...) or a CLT}
model=${2:-assets/world}
prompt=${3:-The capital of Japan is}
python=${PYTHON:-/opt/saelens-venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --release --quiet
ours=$(/usr/bin/time -f "%M" -o "$tmp/ours.rss" ./target/release/monoscope attribute \
    --model "$model" --transcoders "$transcoders" \
    --prompt "$prompt" --bos --out "$tmp/graph.json" --adjacency "$tmp/ours.safetensors" --json)
theirs=$("$python" benches/reference/attribute_circuit_tracer.py --model "$model" \
    --transcoders "$transcoders" --prompt "$prompt" --out "$tmp/theirs.safetensors" 2>/dev/null)
"$python" - "$tmp" "$ours" "$theirs" <<'PY'
import json, sys
from safetensors.torch import load_file
tmp, ours, theirs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
ours_rss_mb = int(open(f"{tmp}/ours.rss").read().split()[-1]) / 1024
a, b = load_file(f"{tmp}/ours.safetensors"), load_file(f"{tmp}/theirs.safetensors")
same = {k: bool((a[k] == b[k]).all()) if a[k].shape == b[k].shape else False
        for k in ["input_ids", "active_features", "logit_tokens"]}
adj = (a["adjacency"] - b["adjacency"]).abs().max().item() if a["adjacency"].shape == b["adjacency"].shape else None
print(json.dumps({
    "nodes": ours["nodes"],
    "active_features": ours["active_features"],
    "same": same,
    "adjacency_max_abs_difference": adj,
    "adjacency_max_abs": b["adjacency"].abs().max().item(),
    "monoscope_seconds": round(ours["seconds"], 3),
    "circuit_tracer_seconds": round(theirs["seconds"], 3),
    "circuit_tracer_threads": theirs["threads"],
    "speedup": round(theirs["seconds"] / ours["seconds"], 2),
    "monoscope_peak_rss_mb": round(ours_rss_mb),
    "circuit_tracer_peak_rss_mb": round(theirs["peak_rss_mb"]),
}, indent=1))
PY
