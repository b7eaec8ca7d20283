#!/usr/bin/env python3
"""Deterministic synthetic SAE activations (float32 safetensors: `train` [65536, 512], `eval` [8192, 512]).

Generator (numpy Generator PCG64 seeded with --seed; draws happen in exactly this order):
- 8192 ground-truth directions in R^512: standard normal, rows normalised to unit L2 norm.
- Feature i (0-based) fires independently per token with probability p_i = min(c / (i + 1)^ALPHA, 0.5),
  ALPHA = 1.0, with c chosen (fixed-point iteration) so that sum(p) = 32, i.e. ~32 active features
  per token on average.
- Tokens are generated in chunks of 4096 (train first, then eval). Per chunk: a uniform [4096, 8192]
  float64 draw gives the mask (u < p); magnitudes of the active entries (row-major order) are
  1 + |N(0,1)|; x = magnitudes @ directions + N(0, 0.01^2) noise ([4096, 512] draw).
Prints the mean ground-truth L0 and the mean squared norm of x.
"""

import argparse
import os
import time

import numpy as np
from safetensors.numpy import save_file

D_MODEL, N_FEATURES, TARGET_L0, P_MAX, ALPHA, NOISE = 512, 8192, 32.0, 0.5, 1.0, 0.01
N_TRAIN, N_EVAL, CHUNK = 65536, 8192, 4096


def probabilities():
    base = 1.0 / np.arange(1, N_FEATURES + 1, dtype=np.float64) ** ALPHA
    c = TARGET_L0 / base.sum()
    for _ in range(200):  # rescale the unclipped part until the clipped sum hits the target
        p = np.minimum(c * base, P_MAX)
        clipped = p >= P_MAX
        free = base[~clipped].sum()
        c_new = (TARGET_L0 - P_MAX * clipped.sum()) / free
        if abs(c_new - c) <= 1e-12 * c:
            break
        c = c_new
    return np.minimum(c * base, P_MAX)


def generate(rng, dirs, p, n_tokens):
    out = np.empty((n_tokens, D_MODEL), dtype=np.float32)
    l0_total = 0
    for start in range(0, n_tokens, CHUNK):
        mask = rng.random((CHUNK, N_FEATURES)) < p
        rows, cols = np.nonzero(mask)
        mags = np.zeros((CHUNK, N_FEATURES), dtype=np.float32)
        mags[rows, cols] = 1.0 + np.abs(rng.standard_normal(rows.size))
        l0_total += rows.size
        x = mags @ dirs
        x += (NOISE * rng.standard_normal((CHUNK, D_MODEL))).astype(np.float32)
        out[start:start + CHUNK] = x
    return out, l0_total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    dirs = rng.standard_normal((N_FEATURES, D_MODEL))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    dirs = dirs.astype(np.float32)
    p = probabilities()

    train, l0_train = generate(rng, dirs, p, N_TRAIN)
    evalx, l0_eval = generate(rng, dirs, p, N_EVAL)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file({"train": train, "eval": evalx}, args.out)

    all_x = np.concatenate([train, evalx])
    print(f"expected L0 (sum p) = {p.sum():.3f}; p max {p.max():.3f} min {p.min():.2e}; "
          f"clipped features {(p >= P_MAX).sum()}")
    print(f"mean ground-truth L0 = {(l0_train + l0_eval) / (N_TRAIN + N_EVAL):.3f} "
          f"(train {l0_train / N_TRAIN:.3f}, eval {l0_eval / N_EVAL:.3f})")
    print(f"mean squared norm of x = {float((all_x.astype(np.float64) ** 2).sum(1).mean()):.3f}")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
