#!/usr/bin/env python3
"""Prints the SAE training comparison table and ratios (benches/compare_sae.sh,
scripts/gpu-check.sh): argv[1] holds benches/sae.rs's JSON lines, argv[2] sae_torch.py's."""

import json
import sys


def lines(text):
    return [json.loads(l) for l in text.split("\n") if l.strip()]


rust = {r["variant"]: r for r in lines(sys.argv[1])}
torch = {r["variant"]: r for r in lines(sys.argv[2])}
print(f"{'run':28} {'tokens/s':>10} {'FVU':>8} {'L0':>8}")
for name, r in [("monoscope topk", rust["topk"]), ("pytorch topk dense", torch["topk_dense"]),
                ("pytorch topk sparse (bag)", torch["topk_sparse"]),
                ("monoscope relu-l1", rust["relu_l1"]), ("pytorch relu-l1", torch["relu_l1"])]:
    print(f"{name:28} {r['tokens_per_second']:10.0f} {r['fvu']:8.4f} {r['l0']:8.1f}")
best = max(torch["topk_dense"], torch["topk_sparse"], key=lambda r: r["tokens_per_second"])
print(f"topk speed ratio   {rust['topk']['tokens_per_second'] / best['tokens_per_second']:.2f}x"
      f" (vs the faster PyTorch form, {best['variant']})")
print(f"topk FVU ratio     {rust['topk']['fvu'] / best['fvu']:.3f} (monoscope / pytorch)")
print(f"relu-l1 speed ratio {rust['relu_l1']['tokens_per_second'] / torch['relu_l1']['tokens_per_second']:.2f}x")
print(f"relu-l1 FVU ratio   {rust['relu_l1']['fvu'] / torch['relu_l1']['fvu']:.3f}")
