#!/usr/bin/env python3
"""Check that the real `sae_lens` package loads an SAE directory (cfg.json +
sae_weights.safetensors, e.g. one written by monoscope) and, given reference outputs,
that its encode/decode agree with them.

    /opt/saelens-venv/bin/python scripts/saelens_load_check.py DIR [--io FILE] [--tol 1e-5]

FILE is a safetensors file with float tensors `x` [n, d_in], `feature_acts` [n, d_sae] and
`reconstruction` [n, d_in] (the layout of tests/fixtures/saelens/<arch>/io.safetensors), and
for a transcoder `output` [n, d_out] (what its forward() returns, skip path included);
without --io, DIR/io.safetensors is used when present. Prints one line per check and exits
1 if any check fails (2 if the directory cannot be loaded at all).
See scripts/saelens_fixtures.py for installing sae_lens.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import sae_lens
from sae_lens import SAE

failures = 0


def check(name: str, ok: bool, detail: str) -> None:
    global failures
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


@torch.no_grad()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--io", type=Path, help="reference x / feature_acts / reconstruction")
    ap.add_argument("--tol", type=float, default=1e-5, help="max abs difference allowed")
    args = ap.parse_args()
    print(f"sae_lens {sae_lens.__version__}, torch {torch.__version__}, dir {args.dir}")

    cfg = json.loads((args.dir / "cfg.json").read_text())
    try:
        sae = SAE.load_from_disk(args.dir, device="cpu")
    except Exception as e:  # noqa: BLE001
        print(f"FAIL load: SAE.load_from_disk raised {type(e).__name__}: {e}")
        return 2
    check(
        "load",
        True,
        f"{type(sae).__name__} (cfg architecture {cfg.get('architecture')!r}), "
        f"d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}, dtype {sae.cfg.dtype}",
    )

    # A cfg.json without metadata.sae_lens_version (or a top-level one) is treated by
    # sae_lens as pre-6.0 and rebuilt from its top-level keys, dropping nested metadata.
    version = cfg.get("sae_lens_version") or cfg.get("metadata", {}).get("sae_lens_version")
    check("v6 config", version is not None, f"sae_lens_version {version!r}")
    for key in ("model_name", "hook_name", "hook_name_out", "context_size"):
        want = cfg.get("metadata", {}).get(key, cfg.get(key))
        got = getattr(sae.cfg.metadata, key)
        check(f"metadata.{key}", want == got, f"cfg.json {want!r}, sae_lens {got!r}")

    # The weights as sae_lens holds them (strict load: no missing or extra tensors) equal
    # the file, so nothing was transformed on the way in.
    raw = load_file(args.dir / "sae_weights.safetensors")
    state = sae.state_dict()
    for key in sorted(raw):
        ok = key in state and state[key].shape == raw[key].shape
        diff = max_abs(state[key], raw[key].to(state[key].dtype)) if ok else float("inf")
        check(f"weight {key}", ok and diff == 0.0, f"{tuple(raw[key].shape)} {raw[key].dtype}, max|diff| {diff:.3g}")

    io_path = args.io or (args.dir / "io.safetensors")
    if args.io is None and not io_path.is_file():
        print("(no --io and no DIR/io.safetensors: encode/decode not checked)")
        return 1 if failures else 0
    ref = load_file(io_path)
    x, acts_ref, recon_ref = ref["x"], ref["feature_acts"], ref["reconstruction"]
    acts = sae.encode(x)
    d = max_abs(acts, acts_ref)
    check("encode", d <= args.tol, f"max|sae_lens - ref| {d:.3g} (tol {args.tol:g}) vs {io_path}")
    flips = ((acts > 0) != (acts_ref > 0)).sum().item()
    check(
        "active set",
        flips == 0,
        f"{flips} (token, latent) pairs differ in firing; "
        f"ref active/token {(acts_ref > 0).sum(-1).tolist()}",
    )
    d = max_abs(sae.decode(acts_ref), recon_ref)
    check("decode(ref feature_acts)", d <= args.tol, f"max|diff| {d:.3g}")
    if "output" in ref:
        d = max_abs(sae(x), ref["output"])
        check("forward (transcoder output)", d <= args.tol, f"max|diff| {d:.3g}")
    d = max_abs(sae.decode(acts), recon_ref)
    check("decode(encode(x))", d <= args.tol, f"max|diff| {d:.3g}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
